import os
from pathlib import Path

import pytest
from django.test import Client

from accounts.roles import Role
from tests.factories import MembershipFactory


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


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright (no browser download: the machines are offline)."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does it)")
    # Playwright's sync API keeps an event loop in this thread; Django's ORM would refuse to
    # run next to it, though the two never actually interleave here.
    os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    from playwright.sync_api import sync_playwright

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
