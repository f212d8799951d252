"""Who is acting, on behalf of which organization. Every service that writes takes one."""

from dataclasses import dataclass

from accounts.models import APIKey, Organization, User
from accounts.roles import Role, role_has_permission


@dataclass(frozen=True)
class Actor:
    organization: Organization
    role: str
    user: User | None = None
    api_key: APIKey | None = None
    request_id: str = ""
    # A console session opened through the organization's identity provider (not a password).
    signed_in_through_sso: bool = False

    @classmethod
    def system(cls, organization: Organization) -> "Actor":
        """The platform itself (Celery tasks, management commands): may do anything."""
        return cls(organization=organization, role=Role.OWNER)

    def can(self, permission: str) -> bool:
        return role_has_permission(self.role, permission)

    @property
    def label(self) -> str:
        if self.user is not None:
            return self.user.email
        if self.api_key is not None:
            return f"api-key {self.api_key.display_prefix}"
        return "system"
