from pathlib import Path

import pytest
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application
from django.test import Client

from accounts.roles import Role
from gateway.app import GatewayApp
from tests.factories import MembershipFactory
from tests.gateway.conftest import ServerThread


@pytest.fixture
def console(db):
    """A browser-like client logged in to the console as a new member of `organization`."""

    def login(organization, role=Role.OWNER):
        membership = MembershipFactory(organization=organization, role=role)
        client = Client()
        client.force_login(membership.user)
        client.user = membership.user
        return client

    return login


ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "console"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (no browser download: the machines are offline).

    Module-scoped on purpose: Playwright's sync API keeps an event loop running in this thread
    until it stops, and later modules (the gateway's) call asyncio.run() in the same thread.
    """
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    # Django's ORM refuses to run beside that loop, though the two never interleave here; the
    # override ends with the module so it cannot hide a real async-safety bug elsewhere.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            yield browser
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot under tests/artifacts/console/ (git-ignored) to look at."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def serve_console_and_gateway(tmp_path, **gateway_config) -> ServerThread:
    """Django (console, with its static files) and the gateway under /v1, as controlplane/asgi.py
    composes them, in a server thread."""
    django_app = ASGIStaticFilesHandler(get_asgi_application())
    gateway_app = GatewayApp(usage_spool_dir=str(tmp_path / "spool"), **gateway_config)

    async def app(scope, receive, send):
        if scope["type"] == "lifespan" or scope.get("path", "").startswith("/v1/"):
            await gateway_app(scope, receive, send)
        else:
            await django_app(scope, receive, send)

    return ServerThread(app)


@pytest.fixture
def console_and_gateway(tmp_path):
    server = serve_console_and_gateway(tmp_path)
    yield server
    server.stop()
