import pytest
from django.test import override_settings


@pytest.mark.django_db
def test_healthz_answers_without_touching_dependencies(client, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response["X-Request-ID"].startswith("req_")


@pytest.mark.django_db
def test_readyz_checks_database_and_broker(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.json()
    assert response.json()["checks"] == {"database": "ok", "broker": "ok"}


@pytest.mark.django_db
def test_readyz_says_which_dependency_is_down(client):
    with override_settings(CELERY_BROKER_URL="redis://127.0.0.1:1/0"):
        response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["broker"] != "ok"


@pytest.mark.django_db
def test_metrics_are_prometheus_text(client):
    client.get("/healthz")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert (
        b'sirocco_http_requests_total{method="GET",route="healthz",status="200"}'
        in response.content
    )


@pytest.mark.django_db
def test_a_valid_caller_request_id_is_kept_and_a_bad_one_replaced(client):
    assert client.get("/healthz", HTTP_X_REQUEST_ID="abc-123")["X-Request-ID"] == "abc-123"
    assert client.get("/healthz", HTTP_X_REQUEST_ID="bad id\n")["X-Request-ID"].startswith("req_")


@pytest.mark.django_db
def test_metrics_need_the_token_when_one_is_set(client, settings):
    settings.METRICS_TOKEN = "scrape-me-0123456789"
    refused = client.get("/metrics")
    assert refused.status_code == 401
    assert refused["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert "METRICS_TOKEN" in refused.json()["detail"]
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert (
        client.get("/metrics", HTTP_AUTHORIZATION="Basic scrape-me-0123456789").status_code == 401
    )
    scraped = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-me-0123456789")
    assert scraped.status_code == 200
    assert b"sirocco_http_requests_total" in scraped.content


@pytest.mark.django_db
def test_without_a_token_metrics_are_for_this_machine_only(client):
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200
    assert client.get("/metrics").status_code == 200  # the test client is 127.0.0.1


@pytest.mark.nodb
def test_the_deploy_check_warns_without_a_metrics_token(settings):
    from controlplane.checks import check_metrics_token

    settings.METRICS_TOKEN = ""
    assert [w.id for w in check_metrics_token(None)] == ["sirocco.W001"]
    settings.METRICS_TOKEN = "set"
    assert check_metrics_token(None) == []
