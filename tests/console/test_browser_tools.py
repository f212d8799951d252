"""The playground with a tool schema and a JSON schema in a real headless Chromium: the console
and the gateway on one uvicorn, a real runtime process serving the random-weight tiny MoE behind
it. Tool calls show with their parsed arguments and take a result back; a JSON answer shows
parsed. The model page lists each version's features."""

from decimal import Decimal

import pytest
from playwright.sync_api import expect

from accounts.roles import Role
from catalog.models import ServingRuntime
from metering.models import UsageEvent
from tests.catalog.factories import ModelFactory, ModelVersionFactory, TokenPriceFactory
from tests.console.conftest import screenshot
from tests.console.test_browser_foundation import log_in
from tests.deployments.factories import DeploymentFactory, ReplicaFactory
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory
from tests.gateway import conftest as gateway_fixtures
from tests.gateway.conftest import RUNTIME_SERVED_NAME

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
# The gateway tests' session fixtures: the tiny MoE and its runtime process.
tiny_moe_dir = gateway_fixtures.tiny_moe_dir
runtime_process = gateway_fixtures.runtime_process


def test_the_playground_calls_tools_and_parses_json(
    page, console_and_gateway, runtime_process, tiny_moe_dir
):
    organization = OrganizationFactory(slug="acme", name="Acme")
    user = UserFactory(email="dev@acme.example")
    MembershipFactory(organization=organization, user=user, role=Role.OWNER)
    model = ModelFactory(slug="mixtral-tiny", display_name="Mixtral tiny", context_length=2048)
    builtin, _ = ServingRuntime.objects.get_or_create(
        name=ServingRuntime.Name.BUILTIN,
        defaults={"display_name": "Sirocco builtin runtime (CPU)", "image": "sirocco/runtime"},
    )
    version = ModelVersionFactory(
        model=model,
        version="v1",
        serving_runtime=builtin,
        served_model_name=RUNTIME_SERVED_NAME,
        artifact_uri=str(tiny_moe_dir),
        runtime_args={"max_model_len": 2048},
    )
    TokenPriceFactory(model_version=version, input_per_million=Decimal("0.1"))
    deployment = DeploymentFactory(organization=organization, name="chat", model_version=version)
    ReplicaFactory(deployment=deployment, endpoint=runtime_process)

    log_in(page, console_and_gateway, "dev@acme.example")

    # The model page lists what each version serves.
    page.goto(f"{console_and_gateway.url}/models/mixtral-tiny/")
    expect(page.locator("dl.facts")).to_contain_text("structured outputs (json_schema, strict)")
    expect(page.locator("dl.facts")).to_contain_text("tool calling: auto, required, named")
    screenshot(page, "model-features")

    page.goto(f"{console_and_gateway.url}/deployments/{deployment.pk}/playground")
    page.get_by_role("button", name="Insert an example tool").click()
    page.get_by_label("Tool choice").select_option("required")
    page.get_by_label("Max tokens").fill("80")
    page.get_by_label("Message").fill("What is the weather in Paris?")
    page.get_by_role("button", name="Send").click()
    call = page.locator(".tool-call").first
    expect(call).to_contain_text("get_weather", timeout=120_000)
    # The arguments parse (the grammar saw to it) and show indented.
    expect(call.locator("pre")).to_contain_text('"unit": "')
    expect(call.locator("pre")).not_to_contain_text("not valid JSON")
    screenshot(page, "playground-tool-call")

    # The tool's result goes back; the model answers in text (tool choice none).
    page.get_by_label("Tool choice").select_option("none")
    page.get_by_label("Max tokens").fill("12")
    call.get_by_role("textbox").fill('{"temperature": 21}')
    call.get_by_role("button", name="Send result").click()
    expect(page.locator(".msg.assistant")).to_have_count(2, timeout=120_000)
    expect(page.locator("#chat-usage")).to_contain_text("completion tokens", timeout=120_000)
    assert page.locator(".msg.error").count() == 0

    # A JSON schema: the answer shows parsed.
    page.get_by_role("button", name="New conversation").click()
    page.get_by_label("Tools").fill("")
    page.get_by_label("Response format").select_option("json_schema")
    page.get_by_role("button", name="Insert an example schema").click()
    page.get_by_label("Max tokens").fill("60")
    page.get_by_label("Message").fill("Review a film.")
    page.get_by_role("button", name="Send").click()
    parsed = page.locator(".parsed-json")
    expect(parsed).to_contain_text("parsed JSON", timeout=120_000)
    expect(parsed.locator("pre")).to_contain_text('"rating": ')
    screenshot(page, "playground-json-schema")

    # A schema the gateway refuses shows its error, naming the parameter's problem.
    page.get_by_label("JSON schema").fill('{"type": "object", "not": {}}')
    page.get_by_label("Message").fill("Again.")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".msg.error")).to_contain_text("`not`")
    statuses = sorted(row.status_code for row in UsageEvent.objects.all())
    assert statuses == [200, 200, 200]  # the refused request never reached a replica
