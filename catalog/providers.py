"""Partner-hosted models: the operator's provider connections, which provider model serves a
partner version, and what the provider charges us for it. Writes are operator-only services,
each audited (the audit row never holds a credential, only whether one was set); reads are
selectors the API, the console, deployments and the gateway share.

A connection's credential is encrypted on the way in (catalog.credentials) and decrypted only
for the gateway (`partner_target`), which sends it to the provider and nowhere else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import ProtectedError, QuerySet

from accounts.actors import Actor
from catalog import credentials
from catalog.credentials import Secret
from catalog.models import Model, ModelVersion, ProviderConnection, ProviderCost, ProviderModel
from catalog.permissions import require_operator
from catalog.services import _audit, _check_effective_from
from controlplane.errors import Conflict, ValidationFailed

CONNECTION_FIELDS = {
    "display_name",
    "base_url",
    "requests_per_minute",
    "tokens_per_minute",
    "tenant_share_percent",
    "timeout_seconds",
    "is_active",
}

logger = logging.getLogger(__name__)

NEEDS_CONNECTION = "needs_connection"
AVAILABLE = "available"


@dataclass(frozen=True)
class PartnerTarget:
    """What the gateway needs to send a request to a partner version's provider. Plain data
    (cached by the gateway with the route); the credential is a `Secret`."""

    connection_id: int
    connection_name: str
    kind: str
    base_url: str
    provider_model_id: str
    credential: Secret
    requests_per_minute: int | None
    tokens_per_minute: int | None
    tenant_share_percent: int
    timeout_seconds: int


def _check_kind(kind) -> str:
    if kind not in ProviderConnection.Kind.values:
        raise ValidationFailed(
            f"Unknown provider kind {kind!r}. Use one of: "
            f"{', '.join(ProviderConnection.Kind.values)}.",
            field="kind",
        )
    return kind


def _check_base_url(url) -> str:
    if not isinstance(url, str):
        raise ValidationFailed("base_url must be a URL.", field="base_url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValidationFailed(
            f"base_url must be an http:// or https:// URL with a host (got {url[:100]!r}), "
            "e.g. https://api.mistral.ai/v1.",
            field="base_url",
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValidationFailed(
            "base_url takes no query, fragment or user:password (the credential has its own "
            "field, which is stored encrypted).",
            field="base_url",
        )
    return url.rstrip("/")


def _set_credential(connection: ProviderConnection, credential) -> None:
    if credential is None:
        return
    if not isinstance(credential, str):
        raise ValidationFailed("credential must be a string.", field="credential")
    credential = credential.strip()
    connection.credential_encrypted = credentials.encrypt(credential) if credential else ""


def _full_clean(connection: ProviderConnection) -> None:
    try:
        connection.full_clean()
    except ValidationError as error:
        field, messages = next(iter(error.message_dict.items()))
        raise ValidationFailed(messages[0], field=field) from None


@transaction.atomic
def provider_connection_create(
    *,
    actor: Actor,
    name: str,
    kind: str,
    base_url: str,
    display_name: str = "",
    credential: str | None = None,
    **fields,
) -> ProviderConnection:
    """Register our account with a provider. The credential is encrypted before it is saved."""
    require_operator(actor)
    unknown = set(fields) - CONNECTION_FIELDS
    if unknown:
        raise ValidationFailed(f"Unknown field {sorted(unknown)[0]!r}.", field=sorted(unknown)[0])
    if ProviderConnection.objects.filter(name=name).exists():
        raise Conflict(f"A provider connection named {name!r} exists already.", field="name")
    connection = ProviderConnection(
        name=name,
        kind=_check_kind(kind),
        base_url=_check_base_url(base_url),
        display_name=display_name or name,
        **fields,
    )
    _set_credential(connection, credential)
    _full_clean(connection)
    connection.save()
    _audit(
        actor,
        "catalog.provider_connection.create",
        connection,
        {"kind": kind, "base_url": connection.base_url, "credential_set": bool(credential)},
    )
    return connection


@transaction.atomic
def provider_connection_update(
    *, actor: Actor, connection: ProviderConnection, credential: str | None = None, **fields
) -> ProviderConnection:
    """Change a connection; a given `credential` replaces the stored one ("" removes it)."""
    require_operator(actor)
    unknown = set(fields) - CONNECTION_FIELDS
    if unknown:
        raise ValidationFailed(
            f"{sorted(unknown)[0]!r} cannot be changed (a connection's kind is fixed: make "
            "another connection for another kind).",
            field=sorted(unknown)[0],
        )
    if "base_url" in fields:
        fields["base_url"] = _check_base_url(fields["base_url"])
    for name, value in fields.items():
        setattr(connection, name, value)
    _set_credential(connection, credential)
    _full_clean(connection)
    connection.save()
    changes = {name: value for name, value in fields.items()}
    if credential is not None:
        changes["credential_set"] = bool(credential.strip())
    _audit(actor, "catalog.provider_connection.update", connection, changes)
    return connection


@transaction.atomic
def provider_connection_delete(*, actor: Actor, connection: ProviderConnection) -> None:
    require_operator(actor)
    try:
        connection.delete()
    except ProtectedError:
        raise Conflict(
            f"{connection.name} still serves partner models; map them to another connection first.",
            code="connection_in_use",
        ) from None
    _audit(actor, "catalog.provider_connection.delete", connection)


def _partner_version(version: ModelVersion) -> None:
    if not version.is_partner:
        raise ValidationFailed(
            f"{version.model.slug} is self-hosted: its versions are served by our replicas, "
            "not by a provider.",
            field="model",
        )


@transaction.atomic
def provider_model_set(
    *,
    actor: Actor,
    version: ModelVersion,
    provider_model_id: str,
    kind: str | None = None,
    connection: ProviderConnection | None = None,
) -> ProviderModel:
    """Map a partner version to the provider's model id on a connection of the right kind
    (`kind` defaults to the mapping's when one exists, else to the connection's)."""
    require_operator(actor)
    _partner_version(version)
    existing = ProviderModel.objects.filter(model_version=version).first()
    if kind is None:  # the API the version needs, as mapped before; else the connection's
        kind = existing.kind if existing else connection.kind if connection else None
    if kind is None:
        raise ValidationFailed("Give the provider kind or a connection.", field="kind")
    _check_kind(kind)
    if connection is not None and connection.kind != kind:
        raise ValidationFailed(
            f"{version.model.slug} {version.version} is served by a {kind} API; connection "
            f"{connection.name} is {connection.kind}. Choose a {kind} connection.",
            field="connection",
        )
    if not isinstance(provider_model_id, str) or not provider_model_id.strip():
        raise ValidationFailed("Give the provider's model id.", field="provider_model_id")
    mapping = existing or ProviderModel(model_version=version)
    mapping.kind = kind
    mapping.provider_model_id = provider_model_id.strip()
    mapping.connection = connection
    mapping.save()
    _audit(
        actor,
        "catalog.provider_model.set",
        version,
        {
            "kind": kind,
            "provider_model_id": mapping.provider_model_id,
            "connection": connection.name if connection else None,
        },
    )
    return mapping


@transaction.atomic
def provider_cost_set(
    *,
    actor: Actor,
    version: ModelVersion,
    currency: str,
    input_per_million: Decimal,
    output_per_million: Decimal,
    effective_from: datetime | None = None,
    allow_past: bool = False,
) -> ProviderCost:
    """What the provider charges us for the version, from `effective_from` on. Like prices,
    costs are never edited: a new one starts."""
    require_operator(actor)
    _partner_version(version)
    for name, value in (
        ("input_per_million", input_per_million),
        ("output_per_million", output_per_million),
    ):
        if not isinstance(value, Decimal):
            raise ValidationFailed(f"{name} must be a Decimal, never a float.", field=name)
    if not currency:
        raise ValidationFailed("Give the cost's currency (ISO 4217).", field="currency")
    effective_from = _check_effective_from(effective_from, allow_past=allow_past)
    if ProviderCost.objects.filter(model_version=version, effective_from=effective_from).exists():
        raise Conflict("A cost starting at that moment exists already.", field="effective_from")
    cost = ProviderCost(
        model_version=version,
        currency=currency,
        input_per_million=input_per_million,
        output_per_million=output_per_million,
        effective_from=effective_from,
    )
    try:
        cost.full_clean()
    except ValidationError as error:
        field, messages = next(iter(error.message_dict.items()))
        raise ValidationFailed(messages[0], field=field) from None
    cost.save()
    _audit(
        actor,
        "catalog.provider_cost.set",
        version,
        {
            "currency": currency,
            "input_per_million": input_per_million,
            "output_per_million": output_per_million,
            "effective_from": effective_from,
        },
    )
    return cost


# --- reads ------------------------------------------------------------------------------------


def provider_connection_list() -> QuerySet[ProviderConnection]:
    return ProviderConnection.objects.order_by("name")


def partner_status(version: ModelVersion) -> str | None:
    """None for a self-hosted version; else `available`, or `needs_connection` while no
    active connection with a credential serves it."""
    if version.model.hosting != Model.Hosting.PARTNER:
        return None
    mapping = getattr(version, "provider_model", None)
    if mapping is None or mapping.needs_connection:
        return NEEDS_CONNECTION
    return AVAILABLE


def partner_target(*, version_id: int) -> PartnerTarget | None:
    """The provider to send a partner version's requests to, credential decrypted; None when
    it has no usable connection (the gateway answers 503 `provider_not_connected`)."""
    mapping = (
        ProviderModel.objects.filter(model_version_id=version_id)
        .select_related("connection")
        .first()
    )
    if mapping is None or mapping.needs_connection:
        return None
    connection = mapping.connection
    try:
        credential = credentials.decrypt(connection.credential_encrypted)
    except (credentials.SecretUnreadable, credentials.EncryptionKeysMissing):
        logger.error(
            "the credential of provider connection %s cannot be decrypted with "
            "PROVIDER_CREDENTIAL_KEYS (a key dropped before rotate_encrypted_secrets ran?)",
            connection.name,
        )
        return None
    return PartnerTarget(
        connection_id=connection.pk,
        connection_name=connection.name,
        kind=connection.kind,
        base_url=connection.base_url,
        provider_model_id=mapping.provider_model_id,
        credential=credential,
        requests_per_minute=connection.requests_per_minute,
        tokens_per_minute=connection.tokens_per_minute,
        tenant_share_percent=connection.tenant_share_percent,
        timeout_seconds=connection.timeout_seconds,
    )
