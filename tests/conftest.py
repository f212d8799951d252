"""Fixtures shared by the whole suite: tenants, members, keys, API clients acting as them, and
S3 on moto's server over loopback."""

import logging
import uuid

import pytest
from rest_framework.test import APIClient

from accounts.actors import Actor
from accounts.models import APIKey
from accounts.roles import Role
from accounts.services import api_key_create
from tests.factories import MembershipFactory, OrganizationFactory


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    """A test that drives Chromium checks the console's pages, scripts and flows: it gives the
    same answer on either database, so it is `backend_neutral` (pyproject.toml): `make test`
    runs it once, in the PostgreSQL + Redis pass, as production serves the console. (A `nodb`
    one, such as the quickstart on `make run`'s own SQLite, stays in the SQLite pass.)"""
    for item in items:
        nodb = item.get_closest_marker("nodb") is not None
        if "browser" in getattr(item, "fixturenames", ()) and not nodb:
            item.add_marker(pytest.mark.backend_neutral)
        elif nodb and item.get_closest_marker("backend_neutral"):
            raise pytest.UsageError(f"{item.nodeid}: nodb and backend_neutral: no pass runs it")


@pytest.fixture(autouse=True, scope="session")
def _api_key_uses_written_only_when_a_test_asks():
    """No background thread writing to the test database behind a test's back: tests call
    `recorder.flush()` where they check last_used_at (tests/accounts/test_api_keys.py)."""
    from accounts.key_use import recorder

    recorder.interval = 0


@pytest.fixture(autouse=True, scope="session")
def _postgres_empties_tables_by_delete():
    """A transactional test (live server, gateway, browser) ends with Django's flush of every
    table. On PostgreSQL that is one TRUNCATE of ~100 tables, which makes new files for each
    table and index: 0.3 s or more a test on the 2-core CI machine. DELETE FROM leaves the same
    empty tables (neither resets sequences here) in milliseconds; the foreign keys are deferred
    to the commit, when all are empty. The tables whose triggers refuse a DELETE (the billing
    ledger's immutability), and those whose foreign keys point at them, are still truncated;
    flushes that reset sequences keep Django's TRUNCATE ... RESTART IDENTITY."""
    from django.db.backends.postgresql.operations import DatabaseOperations

    truncate = DatabaseOperations.sql_flush
    refusing_delete: dict[str, set[str]] = {}  # database name → tables to truncate

    def tables_to_truncate(connection) -> set[str]:
        name = connection.settings_dict["NAME"]
        if name not in refusing_delete:
            with connection.cursor() as cursor:
                cursor.execute(  # user triggers that fire on DELETE (TRIGGER_TYPE_DELETE = 8)
                    "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                    "WHERE NOT t.tgisinternal AND t.tgtype & 8 <> 0"
                )
                found = {table for (table,) in cursor.fetchall()}
                cursor.execute(
                    "SELECT conrelid::regclass::text, confrelid::regclass::text "
                    "FROM pg_constraint WHERE contype = 'f'"
                )
                references = cursor.fetchall()
            while grown := {src for src, dst in references if dst in found} - found:
                found |= grown  # TRUNCATE needs the tables referring to a table with it
            refusing_delete[name] = found
        return refusing_delete[name]

    def sql_flush(self, style, tables, *, reset_sequences=False, allow_cascade=False):
        if reset_sequences or not tables:
            return truncate(
                self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade
            )
        truncated = tables_to_truncate(self.connection)
        statements = truncate(
            self,
            style,
            [table for table in tables if table in truncated],
            allow_cascade=allow_cascade,
        )
        kept = [table for table in tables if table not in truncated]
        return statements + [f"DELETE FROM {self.quote_name(t)};" for t in kept]  # noqa: S608

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DatabaseOperations, "sql_flush", sql_flush)
        yield


@pytest.fixture(autouse=True, scope="session")
def _gateways_stop_without_waiting_out_a_poll():
    """With Redis, a gateway's revocation listener looks at its stop flag every 0.5 s, so each
    stop (the `gateway` fixture stops its gateway twice a test) waited up to that long. Polling
    every 20 ms changes nothing a test sees but how soon a gateway closes."""
    from gateway import revocation

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(revocation, "POLL_SECONDS", 0.02)
        yield


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


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's S3 server on a free loopback port, for the whole session."""
    from moto.server import ThreadedMotoServer  # imported only by the tests that need S3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, moto_endpoint):
    """What an operator sets for an S3-compatible store; boto3 reads it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3_bucket(aws_env):
    """A fresh, empty bucket on moto's server."""
    import boto3

    bucket = f"sirocco-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def emulated_cluster(settings, tmp_path):
    """The kubernetes provisioner against an emulated API on loopback (tests/deployments/kube.py):
    deployments a live-server test creates reconcile there, and no runtime process starts."""
    from tests.deployments.kube import ClusterThread, SimulatedCluster, gpu_nodes

    with ClusterThread(SimulatedCluster(nodes=gpu_nodes(1, 8))) as running:
        settings.SIROCCO_PROVISIONER = "kubernetes"
        settings.SIROCCO_KUBECONFIG = str(running.kubeconfig(tmp_path / "kubeconfig"))
        settings.SIROCCO_K8S_REQUEST_TIMEOUT = 2.0
        yield running


# People of the test identity provider (tests/oidc_provider): username → what it asserts.
IDP_PEOPLE = [
    {"username": "ana", "password": "ana-at-the-idp", "email": "ana@acme.example"},
    {"username": "bruno", "password": "bruno-at-the-idp", "email": "bruno@acme.example"},
    {"username": "mallory", "password": "mallory-at-the-idp", "email": "mallory@evil.example"},
    {
        "username": "ursula",
        "password": "ursula-at-the-idp",
        "email": "ursula@acme.example",
        "first_name": "unverified",
    },
]
IDP_CLIENT_ID = "sirocco-acme"
IDP_CLIENT_SECRET = "idp-client-secret-8c1f0e6a2b"  # the secret no response may ever carry


@pytest.fixture(scope="session")
def oidc_provider():
    """A real OpenID Connect provider process on loopback (django-oauth-toolkit), for the REST
    tests: discovery and JWKS answer; its client has no usable redirect URI."""
    from tests.oidc_provider.process import start_provider

    provider = start_provider(
        people=IDP_PEOPLE,
        clients=[
            {
                "client_id": IDP_CLIENT_ID,
                "client_secret": IDP_CLIENT_SECRET,
                "redirect_uris": ["http://127.0.0.1:9/unused"],
            }
        ],
    )
    yield provider
    provider.stop()
