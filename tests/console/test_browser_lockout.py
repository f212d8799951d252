"""Login lockout in a real headless Chromium against a live server: after the failure limit,
even the right password is refused with a page that says why and what to do."""

import pytest
from axes.models import AccessFailureLog
from django.core.management import call_command

from tests.console.conftest import screenshot
from tests.factories import MembershipFactory, UserFactory

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
PASSWORD = "correct horse battery staple"


def submit(page, email, password):
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_load_state()


def test_login_lockout_in_the_browser(page, live_server, settings):
    settings.AXES_FAILURE_LIMIT = 4
    user = UserFactory(email="owner@acme.example")
    MembershipFactory(user=user)
    page.goto(f"{live_server.url}/login/")
    for attempt in range(3):
        submit(page, user.email, f"wrong {attempt}")
        assert page.get_by_role("alert").inner_text().startswith("That email and password")
    submit(page, user.email, "wrong again")
    assert page.get_by_role("heading", name="Too many failed logins").is_visible()
    assert "try again in 15 minutes" in page.get_by_role("alert").inner_text()
    screenshot(page, "login-locked-out")

    page.goto(f"{live_server.url}/login/")
    submit(page, user.email, PASSWORD)  # the right password, too late
    assert page.get_by_role("heading", name="Too many failed logins").is_visible()
    assert page.url.endswith("/login/")
    assert AccessFailureLog.objects.filter(username=user.email).count() == 4

    call_command("axes_reset_username", user.email)  # the operator unlocks it
    page.goto(f"{live_server.url}/login/")
    submit(page, user.email, PASSWORD)
    page.wait_for_url(f"{live_server.url}/")
