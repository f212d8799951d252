"""Fixtures shared by the whole suite: tenants, members, keys, and API clients acting as them."""

import pytest
from rest_framework.test import APIClient

from accounts.actors import Actor
from accounts.models import APIKey
from accounts.roles import Role
from accounts.services import api_key_create
from tests.factories import MembershipFactory, OrganizationFactory


@pytest.fixture
def organization(db):
    return OrganizationFactory()


@pytest.fixture
def other_organization(db):
    return OrganizationFactory()


@pytest.fixture
def make_member(db):
    def make(organization, role=Role.OWNER):
        return MembershipFactory(organization=organization, role=role)

    return make


@pytest.fixture
def owner(organization, make_member):
    return make_member(organization, Role.OWNER).user


@pytest.fixture
def make_api_key(db):
    def make(organization, *, role=Role.ADMIN, scopes=None, **fields):
        key, secret = api_key_create(
            actor=Actor.system(organization),
            name=fields.pop("name", "test key"),
            scopes=scopes or [APIKey.Scope.INFERENCE, APIKey.Scope.MANAGEMENT],
            role=role,
            **fields,
        )
        return key, secret

    return make


@pytest.fixture
def key_client(make_api_key):
    """An API client authenticated by a fresh management key of `organization` with `role`."""

    def make(organization, role=Role.ADMIN):
        _key, secret = make_api_key(organization, role=role)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
        return client

    return make


@pytest.fixture
def api(organization, key_client):
    """An admin-role key client of `organization`."""
    return key_client(organization, Role.ADMIN)


@pytest.fixture
def session_client(db):
    """An API client logged in (console session) as a member with `role`."""

    def make(organization, role=Role.OWNER):
        membership = MembershipFactory(organization=organization, role=role)
        client = APIClient()
        client.force_login(membership.user)
        return client, membership.user

    return make
