"""Brute force on the console and /admin/ logins (django-axes): an account is locked after
LOGIN_FAILURE_LIMIT failures, the right password included, every failure is recorded, and an
operator can unlock it. (In Chromium: tests/console/test_browser_lockout.py.)"""

import pytest
from axes.models import AccessAttempt, AccessFailureLog
from django.core.management import call_command
from django.test import Client

from tests.factories import UserFactory

pytestmark = pytest.mark.django_db
PASSWORD = "correct horse battery staple"


@pytest.fixture
def limit(settings):
    settings.AXES_FAILURE_LIMIT = 5
    return 5


@pytest.mark.parametrize("path", ["/login/", "/admin/login/"])
def test_guessing_locks_the_account_even_for_the_right_password(client, limit, path):
    user = UserFactory(email="ana@example.com", is_staff=True)
    for attempt in range(limit - 1):
        response = client.post(path, {"username": user.email, "password": f"guess {attempt}"})
        assert response.status_code == 200  # the form again, with its error
    # Other spellings of the same address count against the same account.
    response = client.post(path, {"username": " ANA@example.com", "password": "guess"})
    assert response.status_code == 429
    response = client.post(path, {"username": user.email, "password": PASSWORD})
    assert response.status_code == 429
    body = response.content.decode()
    assert "Too many failed logins" in body and "try again in 15 minutes" in body
    assert "_auth_user_id" not in client.session
    assert AccessFailureLog.objects.filter(username="ana@example.com").count() == limit
    [attempt] = AccessAttempt.objects.all()
    assert attempt.failures_since_start == limit

    # Another account, from the same address, is not affected.
    other = UserFactory(is_staff=True)
    assert Client().post(path, {"username": other.email, "password": PASSWORD}).status_code == 302


def test_an_operator_unlocks_an_account(client, limit):
    user = UserFactory(email="bo@example.com")
    for attempt in range(limit):
        client.post("/login/", {"username": user.email, "password": f"guess {attempt}"})
    assert client.post("/login/", {"username": user.email, "password": PASSWORD}).status_code == 429
    call_command("axes_reset_username", user.email)
    response = client.post("/login/", {"username": user.email, "password": PASSWORD})
    assert response.status_code == 302


def test_a_success_before_the_limit_clears_the_count(client, limit):
    user = UserFactory()
    for _ in range(limit - 1):
        client.post("/login/", {"username": user.email, "password": "nope"})
    assert client.post("/login/", {"username": user.email, "password": PASSWORD}).status_code == 302
    client.post("/logout/")
    for _ in range(limit - 1):
        client.post("/login/", {"username": user.email, "password": "nope"})
    assert client.post("/login/", {"username": user.email, "password": PASSWORD}).status_code == 302


def test_the_address_recorded_is_the_one_the_trusted_proxy_saw(client, limit, settings):
    settings.TRUSTED_PROXY_COUNT = 1
    client.post(
        "/login/",
        {"username": "x@example.com", "password": "nope"},
        HTTP_X_FORWARDED_FOR="6.6.6.6, 203.0.113.9",  # the client forged the first entry
    )
    assert AccessFailureLog.objects.get().ip_address == "203.0.113.9"
