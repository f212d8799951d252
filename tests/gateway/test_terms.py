"""A model with terms of use (a publisher's self-hosted model here) is refused by the gateway
with a clear 403 until the caller's organization accepted the terms in force, and again when
a new version of the terms comes into force; nothing is sent upstream or metered meanwhile."""

import time

import httpx
import pytest

from accounts.actors import Actor
from catalog.models import TermsOfUse
from catalog.terms import terms_accept
from metering.models import UsageEvent

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "hi"}]


def call(gateway, secret, *, until_status=None):
    """POST a chat; with `until_status`, retry for the route cache's few tenths of a second."""
    deadline = time.monotonic() + 5
    while True:
        answer = httpx.post(
            gateway.v1 + "/chat/completions",
            json={"model": "chat", "messages": CHAT},
            headers={"Authorization": f"Bearer {secret}"},
        )
        if until_status is None or answer.status_code == until_status:
            return answer
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.1)


def test_terms_must_be_accepted_before_calling_and_again_for_a_new_version(
    gateway, organization, inference_key, make_deployment, upstream_server
):
    deployment = make_deployment(organization, name="chat", endpoints=[upstream_server.url])
    version = deployment.model_version
    TermsOfUse.objects.create(
        model_version=version, version="2026-01", title="Terms", body="Be nice."
    )
    _key, secret = inference_key(organization)

    refused = call(gateway, secret)
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["code"] == "terms_not_accepted" and error["param"] == "model"
    assert "2026-01" in error["message"] and "/terms/accept" in error["message"]
    assert UsageEvent.objects.count() == 0

    terms_accept(actor=Actor.system(organization), version=version, terms_version="2026-01")
    assert call(gateway, secret, until_status=200).status_code == 200

    TermsOfUse.objects.create(
        model_version=version,
        version="2026-02",
        title="Terms",
        body="Be nicer.",
    )
    again = call(gateway, secret, until_status=403)
    assert "2026-02" in again.json()["error"]["message"]
    served = UsageEvent.objects.count()
    assert call(gateway, secret).status_code == 403
    assert UsageEvent.objects.count() == served
