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


@pytest.fixture(autouse=True, scope="session")
def _api_key_uses_written_only_when_a_test_asks():
    """No background thread writing to the test database behind a test's back: tests call
    `recorder.flush()` where they check last_used_at (tests/accounts/test_api_keys.py)."""
    from accounts.key_use import recorder

    recorder.interval = 0


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
