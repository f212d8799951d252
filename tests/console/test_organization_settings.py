from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts.models import Membership
from accounts.roles import Role
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db


def test_everyone_sees_the_settings_page_but_only_writers_get_forms(console, organization):
    viewer = console(organization, Role.VIEWER).get("/settings/")
    assert viewer.status_code == 200
    body = viewer.content.decode()
    assert 'action="/settings/profile"' not in body
    assert 'action="/settings/members"' not in body
    assert 'action="/settings/budget"' not in body

    owner = console(organization, Role.OWNER).get("/settings/").content.decode()
    for action in ("/settings/profile", "/settings/members", "/settings/budget"):
        assert f'action="{action}"' in owner


def test_updating_the_profile(console, organization):
    client = console(organization, Role.ADMIN)
    response = client.post(
        "/settings/profile",
        {"name": "Acme AI", "billing_email": "ap@acme.example", "currency": "EUR"},
        follow=True,
    )
    assert "Saved the organization" in response.content.decode()
    organization.refresh_from_db()
    assert (organization.name, organization.currency) == ("Acme AI", "EUR")


def test_a_bad_profile_keeps_the_input_and_changes_nothing(console, organization):
    client = console(organization, Role.ADMIN)
    response = client.post(
        "/settings/profile", {"name": "Acme AI", "billing_email": "nope", "currency": "euro"}
    )
    assert response.status_code == 400
    form = response.context["profile_form"]
    assert set(form.errors) == {"billing_email", "currency"}
    assert 'value="Acme AI"' in response.content.decode()
    organization.refresh_from_db()
    assert organization.name != "Acme AI"


def test_the_budget_is_a_billing_permission(console, organization):
    assert (
        console(organization, Role.ADMIN)
        .post("/settings/budget", {"monthly_spend_limit": "10"})
        .status_code
        == 403
    )
    client = console(organization, Role.BILLING)
    client.post("/settings/budget", {"monthly_spend_limit": "250.50"})
    organization.refresh_from_db()
    assert organization.monthly_spend_limit == Decimal("250.50")
    response = client.post("/settings/budget", {"monthly_spend_limit": "-1"})
    assert response.status_code == 400
    assert response.context["budget_form"].errors["monthly_spend_limit"]
    client.post("/settings/budget", {"monthly_spend_limit": ""})
    organization.refresh_from_db()
    assert organization.monthly_spend_limit is None


def test_adding_changing_and_removing_members(console, organization):
    client = console(organization, Role.ADMIN)
    response = client.post(
        "/settings/members", {"email": "New@Example.com", "role": "developer"}, follow=True
    )
    assert "Added new@example.com" in response.content.decode()
    membership = Membership.objects.get(organization=organization, user__email="new@example.com")

    response = client.post("/settings/members", {"email": "new@example.com", "role": "viewer"})
    assert response.status_code == 400
    assert "already a member" in response.context["member_form"].errors["email"][0]

    client.post(f"/settings/members/{membership.pk}/role", {"role": "viewer"})
    membership.refresh_from_db()
    assert membership.role == Role.VIEWER

    # An admin cannot make an owner: the service's rule, shown as a message.
    response = client.post(
        f"/settings/members/{membership.pk}/role", {"role": "owner"}, follow=True
    )
    assert "cannot grant" in response.content.decode()
    membership.refresh_from_db()
    assert membership.role == Role.VIEWER

    client.post(f"/settings/members/{membership.pk}/remove")
    assert not Membership.objects.filter(pk=membership.pk).exists()


def test_the_last_owner_cannot_be_removed(console, organization):
    client = console(organization, Role.OWNER)
    me = Membership.objects.get(user=client.user)
    response = client.post(f"/settings/members/{me.pk}/remove", follow=True)
    assert "at least one owner" in response.content.decode()
    assert Membership.objects.filter(pk=me.pk).exists()


@pytest.mark.parametrize("role", [Role.DEVELOPER, Role.VIEWER, Role.BILLING])
def test_members_are_changed_only_by_owners_and_admins(console, organization, role):
    client = console(organization, role)
    other = MembershipFactory(organization=organization, role=Role.VIEWER)
    assert (
        client.post("/settings/members", {"email": "x@example.com", "role": "viewer"}).status_code
        == 403
    )
    assert (
        client.post(f"/settings/members/{other.pk}/role", {"role": "developer"}).status_code == 403
    )
    assert client.post(f"/settings/members/{other.pk}/remove").status_code == 403
    assert client.post("/settings/profile", {"name": "x", "currency": "USD"}).status_code == 403
    other.refresh_from_db()
    assert other.role == Role.VIEWER


def test_another_organizations_member_is_a_404(console, organization, other_organization):
    theirs = MembershipFactory(organization=other_organization, role=Role.VIEWER)
    client = console(organization, Role.OWNER)
    assert client.post(f"/settings/members/{theirs.pk}/remove").status_code == 404
    assert client.post(f"/settings/members/{theirs.pk}/role", {"role": "admin"}).status_code == 404


def test_the_settings_page_runs_a_constant_number_of_queries(console, organization):
    client = console(organization, Role.OWNER)

    def count():
        with CaptureQueriesContext(connection) as queries:
            assert client.get("/settings/").status_code == 200
        return len(queries)

    few = count()
    for _ in range(30):
        MembershipFactory(organization=organization, role=Role.VIEWER)
    assert count() == few
