import io

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from accounts.models import APIKey, Membership, Organization, User
from controlplane.demo import DEMO_EMAIL, ensure_demo_api_key, ensure_demo_organization

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def private_var_dir(settings, tmp_path):
    settings.VAR_DIR = tmp_path


def test_bootstrap_demo_is_idempotent(settings):
    settings.SIROCCO_DEMO_PASSWORD = "s3cret-demo-pass"
    for _ in range(2):
        out = io.StringIO()
        call_command("bootstrap_demo", stdout=out)
    assert Organization.objects.filter(slug="demo").count() == 1
    user = User.objects.get(email=DEMO_EMAIL)
    assert user.check_password("s3cret-demo-pass")
    assert Membership.objects.get(user=user).role == "owner"


def test_bootstrap_demo_makes_up_and_keeps_a_password(settings, tmp_path):
    settings.SIROCCO_DEMO_PASSWORD = ""
    out = io.StringIO()
    call_command("bootstrap_demo", stdout=out)
    password = (tmp_path / "demo-password").read_text().strip()
    assert f"{DEMO_EMAIL} / {password}" in out.getvalue()
    assert User.objects.get(email=DEMO_EMAIL).check_password(password)
    call_command("bootstrap_demo", stdout=io.StringIO())
    assert User.objects.get(email=DEMO_EMAIL).check_password(password)


def test_create_api_key_prints_the_secret_alone_on_the_last_line(organization):
    out = io.StringIO()
    call_command(
        "create_api_key", "--org", organization.slug, "--name", "ci", "--rpm", "60", stdout=out
    )
    secret = out.getvalue().strip().splitlines()[-1]
    assert secret.startswith("sk-") and " " not in secret
    key = APIKey.objects.get(name="ci")
    assert key.rpm_limit == 60 and key.tpm_limit is None
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert client.get("/api/v1/organizations/current").json()["slug"] == organization.slug


def test_create_api_key_rejects_unknown_organization_and_bad_limits(organization):
    with pytest.raises(CommandError, match="No organization"):
        call_command("create_api_key", "--org", "nope", "--name", "x")
    with pytest.raises(CommandError, match="--tpm"):
        call_command("create_api_key", "--org", organization.slug, "--name", "x", "--tpm", "0")
    assert not APIKey.objects.filter(name="x").exists()


def test_demo_api_key_is_reused_until_revoked(tmp_path):
    organization, _user, _password = ensure_demo_organization()
    first = ensure_demo_api_key(organization)
    assert ensure_demo_api_key(organization) == first
    APIKey.objects.update(revoked_at="2020-01-01T00:00:00Z")
    assert ensure_demo_api_key(organization) != first
