import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts.actors import Actor
from accounts.roles import Role
from accounts.services import api_key_create, audit_record
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db


def seed(organization, rows):
    actor = Actor.system(organization)
    for i in range(rows):
        MembershipFactory(organization=organization, role=Role.VIEWER)
        key, _ = api_key_create(actor=actor, name=f"k{i}")
        audit_record(actor=actor, action="test.seed", target=key)


def count_queries(client, path):
    with CaptureQueriesContext(connection) as queries:
        response = client.get(path)
    assert response.status_code == 200
    return len(queries)


@pytest.mark.parametrize(
    "path", ["/api/v1/members", "/api/v1/api-keys?page_size=500", "/api/v1/audit-log?page_size=500"]
)
def test_lists_run_a_constant_number_of_queries(organization, key_client, path):
    client = key_client(organization, Role.OWNER)
    seed(organization, 1)
    few = count_queries(client, path)
    seed(organization, 199)
    many = count_queries(client, path)
    assert few == many
