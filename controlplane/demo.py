"""The demo organization `make run` and the quickstart use. Every step is idempotent."""

import os
import secrets
from pathlib import Path

from django.conf import settings
from django.db import transaction

from accounts.actors import Actor
from accounts.models import APIKey, Membership, Organization, User
from accounts.roles import Role
from accounts.selectors import api_key_by_secret
from accounts.services import api_key_create, organization_create

DEMO_ORG_SLUG = "demo"
DEMO_EMAIL = "demo@example.com"
DEMO_KEY_NAME = "demo key (make run)"


def demo_password_file() -> Path:
    return Path(settings.VAR_DIR) / "demo-password"


def demo_api_key_file() -> Path:
    return Path(settings.VAR_DIR) / "demo-api-key"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")


@transaction.atomic
def ensure_demo_organization() -> tuple[Organization, User, str | None]:
    """The `demo` organization and its owner. Returns the password when it was (re)set now.

    The password comes from SIROCCO_DEMO_PASSWORD (set again on every run), else one is made
    up for a new user and saved to var/demo-password (mode 0600) so `make run` can print it.
    """
    user = User.objects.filter(email=DEMO_EMAIL).first()
    password = None
    if user is None:
        password = settings.SIROCCO_DEMO_PASSWORD or secrets.token_urlsafe(12)
        user = User.objects.create_user(DEMO_EMAIL, password, full_name="Demo Owner")
    elif settings.SIROCCO_DEMO_PASSWORD and not user.check_password(settings.SIROCCO_DEMO_PASSWORD):
        password = settings.SIROCCO_DEMO_PASSWORD
        user.set_password(password)
        user.save(update_fields=["password"])
    if password and not settings.SIROCCO_DEMO_PASSWORD:
        _write_private(demo_password_file(), password)

    organization = Organization.objects.filter(slug=DEMO_ORG_SLUG).first()
    if organization is None:
        organization = organization_create(
            slug=DEMO_ORG_SLUG, name="Demo Organization", owner=user, billing_email=DEMO_EMAIL
        )
    Membership.objects.get_or_create(
        organization=organization, user=user, defaults={"role": Role.OWNER}
    )
    return organization, user, password


def ensure_demo_api_key(organization: Organization) -> str:
    """A working key for the demo: reuse the one saved in var/demo-api-key, else make one."""
    path = demo_api_key_file()
    if path.exists():
        secret = path.read_text().strip()
        key = api_key_by_secret(secret)
        if key is not None and key.organization_id == organization.pk and key.is_usable():
            return secret
    _key, secret = api_key_create(
        actor=Actor.system(organization),
        name=DEMO_KEY_NAME,
        scopes=[APIKey.Scope.INFERENCE, APIKey.Scope.MANAGEMENT],
        role=Role.ADMIN,
    )
    _write_private(path, secret)
    return secret


def demo_password_hint() -> str:
    if settings.SIROCCO_DEMO_PASSWORD:
        return "(the value of SIROCCO_DEMO_PASSWORD)"
    path = demo_password_file()
    return path.read_text().strip() if path.exists() else "(unknown: set SIROCCO_DEMO_PASSWORD)"
