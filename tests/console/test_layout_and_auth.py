import re

import pytest
from django.test import Client

from accounts.roles import Role
from tests.factories import MembershipFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_pages_need_a_login(client):
    response = client.get("/api-keys/")
    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/api-keys/"


def test_login_with_email_and_password_then_logout(client, organization):
    user = UserFactory(email="ana@example.com")
    MembershipFactory(organization=organization, user=user, role=Role.DEVELOPER)

    page = client.get("/login/")
    assert page.status_code == 200
    assert b'type="email"' in page.content

    response = client.post(
        "/login/",
        {"username": "ana@example.com", "password": "correct horse battery staple", "next": "/"},
    )
    assert response.status_code == 302 and response["Location"] == "/"
    overview = client.get("/")
    assert overview.status_code == 200
    assert organization.name in overview.content.decode()

    assert client.get("/logout/").status_code == 405  # a link cannot log anyone out
    response = client.post("/logout/")
    assert response.status_code == 302 and response["Location"] == "/login/"
    assert client.get("/").status_code == 302


def test_a_wrong_password_says_so_and_keeps_the_email(client, organization):
    UserFactory(email="ana@example.com")
    response = client.post("/login/", {"username": "ana@example.com", "password": "nope"})
    assert response.status_code == 200
    body = response.content.decode()
    assert "do not match an account" in body
    assert 'value="ana@example.com"' in body


def test_a_user_without_an_organization_is_told_what_to_do(client):
    client.force_login(UserFactory())
    response = client.get("/")
    assert response.status_code == 403
    assert "not a member of any active organization" in response.content.decode()


def test_the_organization_switcher_changes_who_the_console_acts_for(
    console, organization, other_organization
):
    client = console(organization, Role.VIEWER)
    MembershipFactory(organization=other_organization, user=client.user, role=Role.OWNER)
    page = client.get("/settings/").content.decode()
    assert f">{other_organization.name}</option>" in page
    assert organization.name in re.search(r"<h1>(.*?)</h1>", page).group(1)

    response = client.post(
        "/organization/switch", {"organization": other_organization.pk, "next": "/settings/"}
    )
    assert response.status_code == 302 and response["Location"] == "/settings/"
    page = client.get("/settings/").content.decode()
    assert other_organization.name in re.search(r"<h1>(.*?)</h1>", page).group(1)
    assert "Owner" in page


def test_switching_to_an_organization_you_are_not_in_is_refused(
    console, organization, other_organization
):
    client = console(organization)
    response = client.post("/organization/switch", {"organization": other_organization.pk})
    assert response.status_code == 400
    assert client.get("/settings/").context["actor"].organization == organization
    assert client.post("/organization/switch", {"organization": "x"}).status_code == 400


def test_switching_from_an_object_page_lands_on_the_overview(
    console, organization, other_organization
):
    client = console(organization)
    MembershipFactory(organization=other_organization, user=client.user)
    response = client.post(
        "/organization/switch",
        {"organization": other_organization.pk, "next": "/api-keys/1/revoke"},
    )
    assert response["Location"] == "/"
    response = client.post(
        "/organization/switch",
        {"organization": other_organization.pk, "next": "https://evil.example.com/"},
    )
    assert response["Location"] == "/"


def test_the_layout_is_accessible_and_serves_its_own_assets(console, organization):
    body = console(organization).get("/").content.decode()
    assert '<html lang="en">' in body
    assert 'href="#main"' in body and 'id="main"' in body
    assert '<nav class="sidebar" aria-label="Console">' in body
    assert 'aria-current="page"' in body
    assert "/static/console/vendor/htmx-2.0.11.min.js" in body
    assert "/static/console/console.css" in body


def test_the_static_assets_are_served_by_the_app(client):
    for path in [
        "/static/console/console.css",
        "/static/console/console.js",
        "/static/console/vendor/htmx-2.0.11.min.js",
    ]:
        response = client.get(path)
        assert response.status_code == 200, path


def test_the_overview_shows_spend_deployments_and_what_to_do_next(console, organization):
    from tests.deployments.factories import DeploymentFactory

    client = console(organization, Role.DEVELOPER)
    body = client.get("/").content.decode()
    assert "Get started" in body and 'href="/models/?q=mixtral"' in body
    DeploymentFactory(organization=organization, name="my-mixtral")
    response = client.get("/")
    assert response.context["deployment_count"] == 1
    assert "my-mixtral" in response.content.decode()
    assert "Get started" not in response.content.decode()
    viewer = console(organization, Role.VIEWER).get("/").content.decode()
    assert "Get started" not in viewer and "my-mixtral" in viewer


def test_a_new_member_sets_a_password_through_the_emailed_link(console, organization, mailoutbox):
    client = console(organization, Role.ADMIN)
    client.post("/settings/members", {"email": "new@example.com", "role": "developer"})
    visitor = Client()
    assert "/password-reset/" in visitor.get("/login/").content.decode()
    response = visitor.post("/password-reset/", {"email": "new@example.com"})
    assert response["Location"] == "/password-reset/sent"
    assert len(mailoutbox) == 1 and mailoutbox[0].to == ["new@example.com"]
    link = re.search(r"http://testserver(/password-reset/\S+/)", mailoutbox[0].body).group(1)
    form_page = visitor.get(link, follow=True)
    assert form_page.context["validlink"]
    response = visitor.post(
        form_page.redirect_chain[-1][0],
        {"new_password1": "a long new passphrase", "new_password2": "a long new passphrase"},
    )
    assert response["Location"] == "/password-reset/complete"
    logged_in = visitor.post(
        "/login/", {"username": "new@example.com", "password": "a long new passphrase"}
    )
    assert logged_in.status_code == 302 and logged_in["Location"] == "/"
    assert visitor.get(link, follow=True).context["validlink"] is False  # used once


def test_a_reset_for_an_unknown_address_says_nothing_different(client, mailoutbox):
    response = client.post("/password-reset/", {"email": "nobody@example.com"})
    assert response["Location"] == "/password-reset/sent"
    assert mailoutbox == []
