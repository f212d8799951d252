"""Test helpers for partner-hosted models: the fake provider process (tests/fakeprovider.py) and a
partner model made through the catalog's own services, connected to it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx

from accounts.actors import Actor
from accounts.roles import Role
from catalog import providers, services, terms
from catalog.models import Model
from catalog.permissions import operator_system_actor
from deployments.services import deployment_create
from tests.fakeprovider import TEST_API_KEY

REPO_ROOT = Path(__file__).resolve().parents[1]
PROVIDER_KEY = TEST_API_KEY  # the fake provider's credential
PROVIDER_MODEL_ID = "mistral-large-2411"
OUR_PRICE = (Decimal("3.000000"), Decimal("9.000000"))  # per million, USD
PROVIDER_COST = (Decimal("2.000000"), Decimal("6.000000"))
MESSAGES = [{"role": "user", "content": "Say hello in French please"}]


@dataclass
class FakeProviderProcess:
    url: str
    process: subprocess.Popen

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def control(self, **control) -> None:
        httpx.post(self.url + "/_control", json=control, timeout=5).raise_for_status()

    def received(self) -> list[dict]:
        return httpx.get(self.url + "/_requests", timeout=5).json()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_fake_provider(log_path: Path) -> FakeProviderProcess:
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakeprovider", "--port", "0", "--api-key", PROVIDER_KEY],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(r"fake provider on (http://127\.0\.0\.1:\d+)", log_path.read_text())
        if found:
            return FakeProviderProcess(found.group(1), process)
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the fake provider did not start:\n{log_path.read_text()}")


def make_partner_model(base_url: str, *, slug="mistral-large", **connection_fields):
    """A published partner model served through a `mistral` connection to `base_url`, with our
    price, the provider's cost and terms version "1"; returns (version, connection)."""
    actor = operator_system_actor()
    model = services.model_create(
        actor=actor,
        slug=slug,
        display_name="Mistral Large",
        publisher="Mistral AI",
        hosting=Model.Hosting.PARTNER,
        tasks=["chat"],
        languages=["en", "fr"],
        license="Mistral AI Terms of Service (API)",
        context_length=131072,
        architecture="dense",
        total_parameters=123_000_000_000,
        active_parameters=123_000_000_000,
    )
    version = services.model_version_create(actor=actor, model=model, version="24.11")
    connection = providers.provider_connection_create(
        actor=actor,
        name=f"{slug}-conn",
        kind="mistral",
        base_url=base_url,
        credential=PROVIDER_KEY,
        **connection_fields,
    )
    providers.provider_model_set(
        actor=actor, version=version, provider_model_id=PROVIDER_MODEL_ID, connection=connection
    )
    services.token_price_set(
        actor=actor,
        version=version,
        input_per_million=OUR_PRICE[0],
        output_per_million=OUR_PRICE[1],
        currency="USD",
    )
    providers.provider_cost_set(
        actor=actor,
        version=version,
        currency="USD",
        input_per_million=PROVIDER_COST[0],
        output_per_million=PROVIDER_COST[1],
    )
    terms.terms_publish(
        actor=actor, version=version, terms_version="1", title="Terms", body="Be nice."
    )
    services.model_version_publish(actor=actor, version=version)
    return version, connection


def enable_partner_model(organization, version, *, name="large", accept=True):
    """The organization's serverless entry to the partner model (terms accepted first)."""
    actor = Actor(organization=organization, role=Role.OWNER)
    if accept:
        terms.terms_accept(actor=actor, version=version, terms_version="1")
    return deployment_create(actor=actor, name=name, model=version.model.slug, type="serverless")


def partner_chat(gateway, secret, **body) -> httpx.Response:
    """A chat completion of the partner model as `enable_partner_model` names it (`large`)."""
    return httpx.post(
        f"{gateway.v1}/chat/completions",
        json={"model": "large", "messages": MESSAGES, "max_tokens": 4, **body},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=60,
    )


def partner_stream(gateway, secret, **body) -> list[str]:
    """The `data:` lines of a streamed chat completion of `large` (answered 200)."""
    with httpx.stream(
        "POST",
        f"{gateway.v1}/chat/completions",
        json={"model": "large", "messages": MESSAGES, "max_tokens": 8, "stream": True, **body},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        return [line for line in response.iter_lines() if line.startswith("data:")]
