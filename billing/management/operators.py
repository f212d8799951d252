from django.core.management.base import CommandError

from accounts.actors import Actor
from accounts.models import User
from accounts.roles import Role


def operator_actor(organization, email: str | None) -> Actor:
    """Who a billing command acts as: the operator named by --by (an existing user, so the
    audit log links to them), else the platform itself."""
    if not email:
        return Actor.system(organization)
    user = User.objects.filter(email__iexact=email.strip()).first()
    if user is None:
        raise CommandError(f"--by {email!r}: no user has that email; give your own login.")
    return Actor(organization=organization, role=Role.OWNER, user=user)
