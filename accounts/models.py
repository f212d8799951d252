import hashlib
import hmac

from django.contrib.auth.models import AbstractBaseUser, BaseUserManager, PermissionsMixin
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone

from accounts.roles import Role

slug_validator = RegexValidator(
    r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$",
    "Use 1-40 lowercase letters, digits or hyphens, starting and ending with a letter or digit.",
)


class UserManager(BaseUserManager):
    use_in_migrations = True

    def create_user(self, email, password=None, **fields):
        if not email:
            raise ValueError("Users need an email address.")
        user = self.model(email=self.normalize_email(email).lower(), **fields)
        user.set_password(password)
        user.save(using=self._db)
        return user

    def create_superuser(self, email, password=None, **fields):
        fields.update(is_staff=True, is_superuser=True)
        return self.create_user(email, password, **fields)


class User(AbstractBaseUser, PermissionsMixin):
    """A person. Logs in with an email address; belongs to organizations through Memberships."""

    email = models.EmailField(unique=True)
    full_name = models.CharField(max_length=200, blank=True)
    is_active = models.BooleanField(default=True)
    is_staff = models.BooleanField(default=False, help_text="Operators: may use the admin.")
    date_joined = models.DateTimeField(default=timezone.now)

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS: list[str] = []

    objects = UserManager()

    def __str__(self):
        return self.email


class Organization(models.Model):
    """A tenant: owns deployments, keys, usage and invoices. Quotas live here too."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        SUSPENDED = "suspended", "Suspended"

    slug = models.SlugField(max_length=40, unique=True, validators=[slug_validator])
    name = models.CharField(max_length=200)
    billing_email = models.EmailField(blank=True)
    currency = models.CharField(
        max_length=3,
        default="USD",
        validators=[RegexValidator(r"^[A-Z]{3}$", "Use an ISO 4217 code such as USD or EUR.")],
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    max_gpus = models.PositiveIntegerField(
        default=8, help_text="Most GPUs all of the organization's dedicated replicas may hold."
    )
    max_deployments = models.PositiveIntegerField(default=10)
    monthly_spend_limit = models.DecimalField(
        max_digits=14,
        decimal_places=2,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="Hard limit in the organization's currency; empty means no limit.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self):
        return self.slug

    @property
    def is_active(self) -> bool:
        return self.status == self.Status.ACTIVE


class Project(models.Model):
    """A team's corner of an organization: its own keys, members with a project role,
    rpm/tpm limits, a monthly budget and an allow-list of model names. Every organization has
    exactly one default project (made with the organization, see accounts.signals), which
    holds every key and deployment made without naming a project.

    `allowed_models` empty means every model the organization may call; otherwise only the
    named ones (the `model` a request sends: a deployment's name), and anything else is a 404
    for the project's keys.
    """

    DEFAULT_NAME = "Default"
    MAX_ALLOWED_MODELS = 100

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="projects"
    )
    name = models.CharField(max_length=100)
    description = models.CharField(max_length=300, blank=True)
    is_default = models.BooleanField(default=False, editable=False)
    rpm_limit = models.PositiveIntegerField(null=True, blank=True)
    tpm_limit = models.PositiveIntegerField(null=True, blank=True)
    monthly_budget = models.DecimalField(
        max_digits=14,
        decimal_places=2,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="Hard limit in the organization's currency; empty means no project limit.",
    )
    allowed_models = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-is_default", "name", "id"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "name"], name="unique_project_name"),
            models.UniqueConstraint(
                fields=["organization"],
                condition=models.Q(is_default=True),
                name="one_default_project",
            ),
        ]

    def __str__(self):
        return f"{self.organization_id}/{self.name}"


def default_project_id(organization_id: int) -> int:
    """The organization's default project (made with the organization)."""
    return (
        Project.objects.filter(organization_id=organization_id, is_default=True)
        .values_list("id", flat=True)
        .get()
    )


class Membership(models.Model):
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="memberships"
    )
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.VIEWER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization", "user"], name="unique_membership")
        ]
        ordering = ["created_at", "id"]

    def __str__(self):
        return f"{self.user} in {self.organization} as {self.role}"


class MemberRemoval(models.Model):
    """A person an organization removed: single sign-on does not provision them again just in
    time (their domain would let it) until someone adds them back (accounts.services)."""

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="member_removals"
    )
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="removals")
    removed_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization", "user"], name="unique_member_removal")
        ]

    def __str__(self):
        return f"{self.user} removed from {self.organization}"


class ProjectMembership(models.Model):
    """A person's role in one project, from the same permission table as the organization's.
    It adds to what their organization role grants, inside this project only."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="project_memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.VIEWER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "user"], name="unique_project_membership")
        ]
        ordering = ["created_at", "id"]

    def __str__(self):
        return f"{self.user} in project {self.project_id} as {self.role}"


class APIKey(models.Model):
    """A secret for the REST API and the gateway. Only its SHA-256 is stored.

    The secret is `sk-` + a 12-character lookup prefix + 40 random characters; the prefix is
    shown in lists so people can tell their keys apart, and finds the row without scanning.
    SHA-256 (not a slow password hash) is right here: the secret has ~240 bits of entropy, and
    the gateway checks it on every request.
    """

    class Scope(models.TextChoices):
        INFERENCE = "inference", "Inference (/v1)"
        MANAGEMENT = "management", "Management (/api/v1)"

    PREFIX_LENGTH = 12
    SECRET_LENGTH = 40

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="api_keys"
    )
    # The project the key's usage is attributed to, and whose limits, budget and allow-list
    # apply. Filled with the organization's default project when a writer names none. Null
    # only for a key the previous release wrote while this one migrated (it acts as the
    # default project's); the column becomes NOT NULL a release later.
    project = models.ForeignKey(
        Project, on_delete=models.PROTECT, related_name="api_keys", null=True
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=PREFIX_LENGTH, unique=True)
    secret_hash = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    role = models.CharField(
        max_length=16,
        choices=Role.choices,
        default=Role.DEVELOPER,
        help_text="What a management-scoped key may do in the REST API.",
    )
    rpm_limit = models.PositiveIntegerField(null=True, blank=True)
    tpm_limit = models.PositiveIntegerField(null=True, blank=True)
    # Empty: whatever the project allows; otherwise only these model names (within the
    # project's own list).
    allowed_models = models.JSONField(default=list, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"{self.name} ({self.display_prefix}…)"

    def save(self, *args, **kwargs):
        if self.project_id is None and self.organization_id is not None:
            self.project_id = default_project_id(self.organization_id)
        super().save(*args, **kwargs)

    @property
    def display_prefix(self) -> str:
        return f"sk-{self.prefix}"

    @staticmethod
    def hash_secret(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(self.secret_hash, self.hash_secret(secret))

    def is_usable(self, now=None) -> bool:
        now = now or timezone.now()
        return (
            self.revoked_at is None
            and (self.expires_at is None or self.expires_at > now)
            and self.organization.is_active
        )

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


class AuditLogEntry(models.Model):
    """Who did what to which object, when. Written by services, never edited."""

    organization = models.ForeignKey(
        Organization, null=True, on_delete=models.CASCADE, related_name="audit_log"
    )
    actor_user = models.ForeignKey(User, null=True, on_delete=models.SET_NULL, related_name="+")
    actor_api_key = models.ForeignKey(
        APIKey, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Kept as text too, so the entry still says who it was after a user or key is deleted.
    actor_label = models.CharField(max_length=200)
    action = models.CharField(max_length=64)
    target_type = models.CharField(max_length=64)
    target_id = models.CharField(max_length=64)
    target_repr = models.CharField(max_length=200, blank=True)
    changes = models.JSONField(default=dict, blank=True)
    request_id = models.CharField(max_length=128, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["organization", "-created_at"])]
        verbose_name_plural = "audit log entries"

    def __str__(self):
        return (
            f"{self.created_at:%Y-%m-%d %H:%M} {self.actor_label} {self.action} {self.target_repr}"
        )


class SingleSignOnConfiguration(models.Model):
    """An organization's OpenID Connect identity provider (one per organization).

    The client secret is stored encrypted (controlplane/secrets_at_rest.py) and read back only
    to call the provider's token endpoint; no serializer, form or log line carries it.
    """

    organization = models.OneToOneField(
        Organization, on_delete=models.CASCADE, related_name="sso_configuration"
    )
    enabled = models.BooleanField(default=False)
    issuer = models.URLField(
        max_length=500, help_text="The provider's issuer identifier, exactly as its discovery says."
    )
    client_id = models.CharField(max_length=255)
    client_secret_encrypted = models.TextField(blank=True)
    allowed_email_domains = models.JSONField(
        default=list, help_text="Only people whose verified email is in one of these may sign in."
    )
    default_role = models.CharField(
        max_length=16,
        choices=Role.choices,
        default=Role.VIEWER,
        help_text="The role of a person who signs in for the first time (just-in-time).",
    )
    password_login_enabled = models.BooleanField(
        default=True,
        help_text="Off: members act for this organization only through single sign-on.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self):
        return f"single sign-on of {self.organization}"

    @property
    def enforced(self) -> bool:
        """Whether single sign-on is the only way to act for the organization."""
        return self.enabled and not self.password_login_enabled


class SingleSignOnIdentity(models.Model):
    """Which person an identity provider's subject is, in one organization.

    People are found by (issuer, subject) after their first sign-in, never by email again: an
    email address the provider later gives to someone else must not open the first person's
    account. The issuer is part of the key because a new provider may reuse subjects.
    """

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="sso_identities"
    )
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="sso_identities")
    issuer = models.CharField(max_length=500)
    subject = models.CharField(max_length=255)
    created_at = models.DateTimeField(auto_now_add=True)
    last_sign_in_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "issuer", "subject"], name="unique_sso_subject"
            ),
            models.UniqueConstraint(
                fields=["organization", "issuer", "user"], name="unique_sso_user"
            ),
        ]
        verbose_name_plural = "single sign-on identities"

    def __str__(self):
        return f"{self.user} as {self.subject} at {self.issuer}"
