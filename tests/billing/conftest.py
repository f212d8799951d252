import contextlib
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from django.test import override_settings

from billing.statements import revenue_share_set
from catalog.models import Listing, TokenPrice
from catalog.permissions import operator_system_actor
from catalog.publishers import publisher_create
from tests.billing.factories import UsageEventFactory
from tests.catalog.factories import ModelVersionFactory, TokenPriceFactory
from tests.factories import OrganizationFactory

WEBHOOK_SECRET = "whsec_test_secret"
SERVER = Path(__file__).with_name("localstripe_server.py")

# A fixed clock for billing tests: mid-March 2026, so February is a closed-able period.
NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
def now():
    return NOW


@pytest.fixture
def version(db):
    return ModelVersionFactory()


@pytest.fixture
def price(version) -> TokenPrice:
    """$0.50 in / $1.50 out per 1M tokens, in force since 2026-01-01."""
    return TokenPriceFactory(
        model_version=version,
        input_per_million=Decimal("0.500000"),
        output_per_million=Decimal("1.500000"),
        effective_from=datetime(2026, 1, 1, tzinfo=UTC),
    )


def at(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def days(n) -> timedelta:
    return timedelta(days=n)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_localstripe():
    """The Stripe stand-in on a free loopback port; yields its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(SERVER), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"{base}/v1/customers", headers={"Authorization": "Bearer sk_test_x"})
            break
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"localstripe did not start: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
    try:
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def localstripe():
    """The Stripe stand-in for this module's tests."""
    with running_localstripe() as base:
        yield base


@pytest.fixture
def stripe_on(localstripe):
    with override_settings(
        STRIPE_API_KEY="sk_test_sirocco",
        STRIPE_API_BASE=localstripe,
        STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        STRIPE_TIMEOUT_SECONDS=1.0,
    ):
        yield localstripe


# --- publishers ----------------------------------------------------------------------------


@pytest.fixture
def operator_actor():
    return operator_system_actor()


@pytest.fixture
def listed(db, operator_actor):
    """Acme's listed model (one version, $0.50/$1.50 per 1M), 30 % to Acme from February."""
    acme = OrganizationFactory(slug="acme")
    publisher = publisher_create(actor=operator_actor, organization=acme, display_name="Acme AI")
    version = ModelVersionFactory()
    TokenPriceFactory(
        model_version=version,
        input_per_million=Decimal("0.500000"),
        output_per_million=Decimal("1.500000"),
        effective_from=at(2026, 1, 1),
    )
    listing = Listing.objects.create(
        publisher=publisher, slug=version.model.slug, model=version.model
    )
    revenue_share_set(
        actor=operator_actor, listing=listing, percent=Decimal("30"), effective_from=at(2026, 2, 1)
    )
    return publisher, listing, version


def use(organization, version, *, prompt, completion, when=None):
    UsageEventFactory(
        organization=organization,
        model_version_id=version.pk,
        prompt_tokens=prompt,
        completion_tokens=completion,
        finished_at=when or at(2026, 2, 10),
    )
