"""The console's foundation pages in a real headless Chromium, against a live server."""

import re

import pytest

from accounts.roles import Role
from tests.console.conftest import screenshot
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
PASSWORD = "correct horse battery staple"


def log_in(page, live_server, email):
    page.goto(f"{live_server.url}/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{live_server.url}/")


def test_login_keys_settings_and_switcher(page, live_server):
    organization = OrganizationFactory(name="Acme AI")
    other = OrganizationFactory(name="Beta Labs")
    user = UserFactory(email="owner@acme.example", full_name="Olivia Owner")
    MembershipFactory(organization=organization, user=user, role=Role.OWNER)
    MembershipFactory(organization=other, user=user, role=Role.VIEWER)

    page.goto(f"{live_server.url}/api-keys/")
    assert page.url.endswith("/login/?next=/api-keys/")
    page.get_by_label("Email").fill("owner@acme.example")
    page.get_by_label("Password").fill("wrong password")
    page.get_by_role("button", name="Log in").click()
    assert page.get_by_role("alert").inner_text().startswith("That email and password")
    screenshot(page, "login-error")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r".*/api-keys/$"))

    page.get_by_label("Name").fill("backend")
    page.get_by_label("Requests per minute").fill("600")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-secret").inner_text()
    assert re.fullmatch(r"sk-[A-Za-z0-9]{52}", secret)
    screenshot(page, "api-keys-created")
    page.reload()
    assert page.locator("#new-secret").count() == 0

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Revoke backend").click()
    page.get_by_text("It stops working now").wait_for()
    screenshot(page, "api-keys-revoked")

    page.get_by_role("link", name="Organization").click()
    page.get_by_label("Email", exact=True).fill("dev@acme.example")
    page.get_by_label("Role", exact=True).select_option("developer")
    page.get_by_role("button", name="Add member").click()
    page.get_by_text("Added dev@acme.example").wait_for()
    page.get_by_label("Monthly spend limit").fill("-5")
    page.get_by_role("button", name="Save limit").click()
    assert page.get_by_label("Monthly spend limit").input_value() == "-5"
    screenshot(page, "settings-error")

    page.get_by_label("Organization", exact=True).select_option(label="Beta Labs")
    # Locator waits, not wait_for_function: the CSP forbids the eval() that would need.
    page.locator("h1", has_text="Beta Labs").wait_for()
    assert page.get_by_role("button", name="Add member").count() == 0
    screenshot(page, "settings-viewer")
