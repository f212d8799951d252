"""The playground's Embeddings tab in a real headless Chromium: the console and the gateway on
one uvicorn (as the web process serves them), a real runtime process serving the tiny
embedding model behind it."""

from decimal import Decimal

import pytest
from playwright.sync_api import expect

from accounts.roles import Role
from metering.models import UsageEvent
from tests.catalog.factories import ModelFactory, ModelVersionFactory, TokenPriceFactory
from tests.console.conftest import screenshot
from tests.console.test_browser_foundation import log_in
from tests.deployments.factories import DeploymentFactory, ReplicaFactory
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory
from tests.gateway import conftest as gateway_fixtures
from tests.gateway.conftest import EMBEDDING_SERVED_NAME

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
# The gateway tests' session fixtures: the tiny embedding model and its runtime process.
tiny_embedding_dir = gateway_fixtures.tiny_embedding_dir
embedding_runtime = gateway_fixtures.embedding_runtime


def test_the_embeddings_tab_embeds_through_the_gateway(
    page,
    console_and_gateway,
    embedding_runtime,
    tiny_embedding_dir,
):
    organization = OrganizationFactory(slug="acme", name="Acme")
    user = UserFactory(email="dev@acme.example")
    MembershipFactory(organization=organization, user=user, role=Role.OWNER)
    model = ModelFactory(
        slug="embed-tiny", display_name="Embed tiny", tasks=["embeddings"], context_length=512
    )
    version = ModelVersionFactory(
        model=model,
        version="v1",
        served_model_name=EMBEDDING_SERVED_NAME,
        artifact_uri=str(tiny_embedding_dir),
        runtime_args={"max_model_len": 512},
    )
    TokenPriceFactory(
        model_version=version, input_per_million=Decimal("0.02"), output_per_million=0
    )
    deployment = DeploymentFactory(organization=organization, name="vectors", model_version=version)
    ReplicaFactory(deployment=deployment, endpoint=embedding_runtime)

    log_in(page, console_and_gateway, "dev@acme.example")
    page.goto(f"{console_and_gateway.url}/deployments/{deployment.pk}/playground")
    # An embedding model opens on the Embeddings tab.
    expect(page.get_by_role("link", name="Embeddings")).to_have_attribute("aria-current", "page")
    page.get_by_label("Texts, one per line").fill(
        "The cat sat on the mat.\nA feline rested on a rug.\nStock prices fell sharply."
    )
    page.get_by_label("Dimensions").fill("64")
    page.get_by_role("button", name="Embed").click()
    expect(page.locator("#embed-usage")).to_contain_text("input tokens")
    rows = page.locator("#embed-vectors tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.first.locator("td").nth(2)).to_have_text("64")
    expect(rows.first.locator("td").nth(3)).to_have_text("1.0000")
    diagonal = page.locator("#embed-similarity tbody tr").nth(1).locator("td").nth(1)
    expect(diagonal).to_have_text("1.000")
    screenshot(page, "playground-embeddings")

    # base64 answers are decoded in the page; a refused `dimensions` shows the gateway's error.
    page.get_by_label("Encoding").select_option("base64")
    page.get_by_label("Dimensions").fill("")
    page.get_by_role("button", name="Embed").click()
    expect(rows.first.locator("td").nth(2)).to_have_text("128")
    page.get_by_label("Dimensions").fill("48")
    page.get_by_role("button", name="Embed").click()
    expect(page.locator("#embed-error")).to_contain_text("matryoshka")
    rows_billed = list(UsageEvent.objects.order_by("started_at"))
    assert [row.status_code for row in rows_billed] == [200, 200, 400]
    assert rows_billed[0].prompt_tokens > 0 and rows_billed[0].completion_tokens == 0

    # The chat tab says why it does not chat.
    page.get_by_role("link", name="Chat").click()
    expect(page.get_by_role("note")).to_contain_text("is an embedding model")
