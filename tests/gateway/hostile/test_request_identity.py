"""Usage identity under attack, against the running gateway: a client's request id never merges
or suppresses usage, and the gateway's own ids cannot be predicted.

Before: a client's X-Request-ID was the usage event's unique key (ON CONFLICT DO NOTHING), so
ten requests with one header were one row, and the gateway's own ids were a per-process prefix
and a counter, so another tenant could send the next one first and make a request vanish."""

import itertools
import re

import httpx
import pytest

from metering.models import UsageEvent

pytestmark = pytest.mark.slow

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
REQUEST_ID = re.compile(r"req_[0-9a-f]{32}")


@pytest.fixture
def tenants(
    gateway, organization, other_organization, inference_key, make_deployment, upstream_server
):
    make_deployment(organization, name="chat", endpoints=[upstream_server.url])
    make_deployment(other_organization, name="chat", endpoints=[upstream_server.url])
    _key, secret = inference_key(organization)
    _other_key, other_secret = inference_key(other_organization)
    return {
        organization.pk: {"authorization": f"Bearer {secret}"},
        other_organization.pk: {"authorization": f"Bearer {other_secret}"},
    }


def test_a_reused_client_request_id_bills_every_request_in_every_organization(gateway, tenants):
    served = []
    with httpx.Client(base_url=gateway.v1, timeout=30) as client:
        for organization_id, auth in tenants.items():
            for header in ("x-request-id", "x-client-request-id"):
                for stream in (False, True):
                    for _ in range(5):
                        response = client.post(
                            "/chat/completions",
                            json={**CHAT, "stream": stream},
                            headers={**auth, header: "same-id"},
                        )
                        assert response.status_code == 200
                        assert response.headers["x-client-request-id"] == "same-id"
                        served.append((organization_id, response.headers["x-request-id"]))
    rows = list(
        UsageEvent.objects.values_list("organization_id", "request_id", "client_request_id")
    )
    assert len(rows) == len(served) == 40  # every request billed: nothing merged
    assert sorted((org, rid) for org, rid, _ in rows) == sorted(served)
    assert {client_id for _, _, client_id in rows} == {"same-id"}
    for organization_id in tenants:
        billed = UsageEvent.objects.filter(organization_id=organization_id)
        assert billed.count() == 20
        assert sum(row.prompt_tokens + row.completion_tokens for row in billed) == 20 * (12 + 8)


def test_request_ids_are_random_and_a_client_cannot_take_another_tenants(gateway, tenants):
    (victim, victim_auth), (attacker, attacker_auth) = tenants.items()
    with httpx.Client(base_url=gateway.v1, timeout=30) as client:
        ids = [
            client.post("/chat/completions", json=CHAT, headers=victim_auth).headers["x-request-id"]
            for _ in range(30)
        ]
        assert all(REQUEST_ID.fullmatch(request_id) for request_id in ids)
        assert len(set(ids)) == len(ids)
        # No shared prefix and no counter: consecutive ids differ in about half of 128 bits.
        numbers = [int(request_id[4:], 16) for request_id in ids]
        assert len({number >> 64 for number in numbers}) == len(numbers)
        assert all(bin(a ^ b).count("1") > 20 for a, b in itertools.pairwise(numbers))
        # The attacker sends the victim's ids (past ones, and made-up "next" ones) as its own:
        # they are only correlation fields on the attacker's own rows.
        guesses = ids[-5:] + [f"req_{number + 1:032x}" for number in numbers[-5:]]
        for guess in guesses:
            response = client.post(
                "/chat/completions", json=CHAT, headers={**attacker_auth, "x-request-id": guess}
            )
            assert response.status_code == 200
            assert response.headers["x-request-id"] != guess
        after = client.post("/chat/completions", json=CHAT, headers=victim_auth)
        assert after.status_code == 200
    victim_rows = UsageEvent.objects.filter(organization_id=victim)
    assert victim_rows.count() == 31  # none vanished
    assert set(ids) <= set(victim_rows.values_list("request_id", flat=True))
    attacker_rows = UsageEvent.objects.filter(organization_id=attacker)
    assert attacker_rows.count() == len(guesses)
    assert sorted(attacker_rows.values_list("client_request_id", flat=True)) == sorted(guesses)
    assert not set(attacker_rows.values_list("request_id", flat=True)) & set(guesses)
