"""A password-reset link is a login: it goes by real mail or nowhere. With the console mail
backend (mail printed to the log, the settings' default) the console refuses to make one
unless DEBUG is on, and the deploy check fails."""

import re

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from tests.factories import UserFactory

pytestmark = pytest.mark.django_db
CONSOLE_MAIL = "django.core.mail.backends.console.EmailBackend"


def test_no_reset_link_is_written_to_the_log(client, settings, capsys, caplog):
    settings.EMAIL_BACKEND = CONSOLE_MAIL
    settings.DEBUG = False
    staff = UserFactory(is_staff=True, is_superuser=True)
    page = client.get("/password-reset/")
    assert page.status_code == 503
    assert "no mail server" in page.content.decode()
    response = client.post("/password-reset/", {"email": staff.email})
    assert response.status_code == 503
    assert "manage.py changepassword" in response.content.decode()
    printed = capsys.readouterr()
    logged = caplog.text
    for text in (printed.out, printed.err, logged):
        assert not re.search(r"/password-reset/[^/\s]+/[^/\s]+/", text), text
    assert "password reset refused" in logged


def test_with_debug_on_the_console_backend_is_allowed(client, settings, capsys):
    settings.EMAIL_BACKEND = CONSOLE_MAIL
    settings.DEBUG = True
    user = UserFactory()
    response = client.post("/password-reset/", {"email": user.email})
    assert response.status_code == 302
    assert "/password-reset/" in capsys.readouterr().out  # a developer's own machine


def test_the_deploy_check_fails_without_a_mail_server(settings):
    settings.EMAIL_BACKEND = CONSOLE_MAIL
    settings.DEBUG = False
    with pytest.raises(SystemCheckError, match=r"sirocco\.E001"):
        call_command("check", "--deploy")
    call_command("check")  # a laptop's plain check still passes
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    call_command("check", "--deploy", "--fail-level", "ERROR")


def test_adding_a_member_says_how_they_get_a_password(console, organization, settings):
    from accounts.roles import Role

    client = console(organization, Role.ADMIN)
    response = client.post("/settings/members", {"email": "a@example.com", "role": "viewer"})
    assert "Forgot your password?" in str(list(response.wsgi_request._messages))
    settings.EMAIL_BACKEND = CONSOLE_MAIL
    settings.DEBUG = False
    response = client.post("/settings/members", {"email": "b@example.com", "role": "viewer"})
    assert "a platform operator" in str(list(response.wsgi_request._messages))
