"""The standalone gateway's /metrics is held to the same rule as web's (controlplane/ops.py)."""

import httpx


def test_the_gateway_metrics_need_the_token_when_one_is_set(gateway, settings):
    settings.METRICS_TOKEN = "scrape-me-0123456789"
    refused = httpx.get(gateway.url + "/metrics")
    assert refused.status_code == 401
    assert "METRICS_TOKEN" in refused.json()["error"]["message"]
    assert (
        httpx.get(gateway.url + "/metrics", headers={"Authorization": "Bearer no"}).status_code
        == 401
    )
    scraped = httpx.get(
        gateway.url + "/metrics", headers={"Authorization": "Bearer scrape-me-0123456789"}
    )
    assert scraped.status_code == 200
    assert "sirocco_gateway" in scraped.text or "python_info" in scraped.text


def test_without_a_token_the_gateway_serves_metrics_to_loopback(gateway, settings):
    settings.METRICS_TOKEN = ""
    assert httpx.get(gateway.url + "/metrics").status_code == 200  # the test is on loopback
