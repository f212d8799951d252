"""API keys for /v1: `Authorization: Bearer sk-…` → organization, key, scopes, limits.

Checked on every request, so they are cached in process (by the secret's SHA-256, never the
secret itself). A cached key is re-read in the background once it is half as old as
GATEWAY_AUTH_CACHE_SECONDS and dropped when it is that old, so expiry, suspension and limit
changes propagate. Revocation must be faster than that: `accounts.signals.api_key_revoked`
drops the key in this process and publishes it on Redis for the other gateway processes
(see `gateway.revocation`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from django.utils import timezone

from accounts.models import APIKey
from accounts.selectors import api_key_by_secret
from gateway.errors import GatewayError, unauthorized
from gateway.singleflight import SingleFlight

logger = logging.getLogger(__name__)

# Unknown secrets are remembered briefly, so a client retrying a bad key does not cost a
# query per request. Safe: nobody can present a secret before it was created.
NEGATIVE_CACHE_SECONDS = 10
# Keys, and unknown secrets, kept at most; past that the oldest goes, in O(1). Unknown secrets
# have a cache of their own, so a flood of made-up secrets never evicts real keys.
MAX_CACHED = 50_000
MAX_UNKNOWN = 50_000
# How long a revocation is remembered, to refuse a key whose row was read just before it.
REVOCATION_MEMORY_SECONDS = 120
# How often the keys' last_used_at is written (the REST API's own touch is per minute too).
TOUCH_SECONDS = 60


@dataclass(frozen=True, slots=True)
class Caller:
    key_id: int
    organization_id: int
    display_prefix: str
    scopes: frozenset[str]
    rpm_limit: int | None
    tpm_limit: int | None
    expires_at: float | None  # unix time
    revoked: bool
    organization_active: bool
    # The key's project: its limits, and what it and the key may call (None: anything the
    # organization may call; otherwise only these model names).
    project_id: int | None = None
    project_rpm: int | None = None
    project_tpm: int | None = None
    allowed_models: frozenset[str] | None = None

    def may_call(self, model: str, route) -> bool:
        """Whether this key may call `model`, routed to `route`: it is on the allow-lists,
        and the deployment is the key's project's own or shared with the organization.
        A refusal reads exactly like an unknown model (404), so nothing leaks."""
        if self.allowed_models is not None and model not in self.allowed_models:
            return False
        owner = getattr(route, "project_id", None)
        return owner is None or owner == self.project_id or getattr(route, "shared", True)


@dataclass(slots=True)
class _Entry:
    caller: Caller
    fetched: float
    refreshing: bool = False


def _caller_from_key(key: APIKey) -> Caller:
    project = key.project  # None only for a key written by the previous release mid-upgrade
    return Caller(
        key_id=key.pk,
        organization_id=key.organization_id,
        display_prefix=key.display_prefix,
        scopes=frozenset(key.scopes),
        rpm_limit=key.rpm_limit,
        tpm_limit=key.tpm_limit,
        expires_at=key.expires_at.timestamp() if key.expires_at else None,
        revoked=key.revoked_at is not None,
        organization_active=key.organization.is_active,
        project_id=key.project_id,
        project_rpm=project.rpm_limit if project else None,
        project_tpm=project.tpm_limit if project else None,
        allowed_models=_allowed(project.allowed_models if project else [], key.allowed_models),
    )


def _allowed(project_list: list[str], key_list: list[str]) -> frozenset[str] | None:
    """The names both lists allow (an empty list allows everything)."""
    if not project_list and not key_list:
        return None
    if not project_list:
        return frozenset(key_list)
    if not key_list:
        return frozenset(project_list)
    return frozenset(project_list) & frozenset(key_list)


def _load(secret: str) -> Caller | None:
    key = api_key_by_secret(secret)
    return _caller_from_key(key) if key is not None else None


class KeyCache:
    def __init__(self, db, *, ttl: float):
        self._db = db
        self._ttl = ttl
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._unknown: OrderedDict[bytes, float] = OrderedDict()  # digest → when read
        self._digest_by_key_id: dict[int, bytes] = {}
        self._revoked_at: dict[int, float] = {}
        self._reads = SingleFlight()
        self.used: set[int] = set()  # keys used since the last touch_keys()

    async def authenticate(self, authorization: bytes | None) -> Caller:
        """The caller a request's Authorization header names; GatewayError 401/403 if none."""
        secret = _bearer_secret(authorization)
        digest = hashlib.sha256(secret.encode()).digest()
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry is not None:
            age = now - entry.fetched
            if age >= self._ttl:
                entry = None
            elif age >= self._ttl / 2 and not entry.refreshing:
                entry.refreshing = True
                asyncio.get_running_loop().create_task(self._refresh(digest, secret))
        if entry is not None:
            caller = _check(entry.caller)
        else:
            unknown_since = self._unknown.get(digest)
            if unknown_since is not None and now - unknown_since < NEGATIVE_CACHE_SECONDS:
                caller = _check(None)
            else:
                caller = _check(await self._fetch(digest, secret))
        self.used.add(caller.key_id)
        return caller

    def forget(self, key_id: int) -> None:
        """Drop a key now (it was revoked). Thread-safe enough: single dict operations."""
        now = time.monotonic()
        if len(self._revoked_at) > 1000:
            cutoff = now - REVOCATION_MEMORY_SECONDS
            self._revoked_at = {k: t for k, t in self._revoked_at.items() if t >= cutoff}
        self._revoked_at[key_id] = now
        digest = self._digest_by_key_id.pop(key_id, None)
        if digest is not None:
            self._entries.pop(digest, None)

    async def _refresh(self, digest: bytes, secret: str) -> None:
        try:
            await self._fetch(digest, secret)
        except Exception:
            # The cached entry keeps serving until it expires; the next request retries.
            logger.warning("re-reading an API key failed", exc_info=True)

    async def _fetch(self, digest: bytes, secret: str) -> Caller | None:
        """Read a key; requests with the same secret meanwhile wait for this read."""

        def failed() -> None:
            entry = self._entries.get(digest)
            if entry is not None:
                entry.refreshing = False

        return await self._reads.run(digest, lambda: self._read(digest, secret), on_failure=failed)

    async def _read(self, digest: bytes, secret: str) -> Caller | None:
        started = time.monotonic()
        caller = await self._db.call(_load, secret=secret)
        if caller is not None and self._revoked_at.get(caller.key_id, -1.0) >= started:
            # Revoked while we were reading the row: what we read may predate it.
            caller = dataclasses.replace(caller, revoked=True)
        self._store(digest, caller, started)
        return caller

    def _store(self, digest: bytes, caller: Caller | None, fetched: float) -> None:
        """Remember what a secret names; the oldest entry goes when full (O(1): both caches
        are in the order they were read, which is the order they expire in)."""
        if caller is None:
            known = self._entries.pop(digest, None)  # a key deleted since: no longer served
            if known is not None:
                self._digest_by_key_id.pop(known.caller.key_id, None)
            self._unknown[digest] = fetched
            self._unknown.move_to_end(digest)
            if len(self._unknown) > MAX_UNKNOWN:
                self._unknown.popitem(last=False)
            return
        self._unknown.pop(digest, None)
        self._entries[digest] = _Entry(caller, fetched)
        self._entries.move_to_end(digest)
        self._digest_by_key_id[caller.key_id] = digest
        if len(self._entries) > MAX_CACHED:
            evicted_digest, evicted = self._entries.popitem(last=False)
            if self._digest_by_key_id.get(evicted.caller.key_id) == evicted_digest:
                del self._digest_by_key_id[evicted.caller.key_id]


def _touch(*, key_ids: list[int]) -> None:
    APIKey.objects.filter(pk__in=key_ids).update(last_used_at=timezone.now())


async def touch_keys(cache: KeyCache, db) -> None:
    """Record when keys were last used (shown in the console), in one UPDATE."""
    used, cache.used = cache.used, set()
    if used:
        await db.call(_touch, key_ids=sorted(used))


async def touch_keys_forever(cache: KeyCache, db, interval: float = TOUCH_SECONDS) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await touch_keys(cache, db)
        except Exception:
            logger.warning("recording API key use failed", exc_info=True)


def _bearer_secret(authorization: bytes | None) -> str:
    if not authorization:
        raise unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer sk-…' "
            "(create one in the console or with `manage.py create_api_key`)."
        )
    scheme, _, secret = authorization.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise unauthorized("Malformed Authorization header. Send 'Authorization: Bearer sk-…'.")
    return secret.strip()


def _check(caller: Caller | None) -> Caller:
    if caller is None:
        raise unauthorized(
            "Incorrect API key provided. Check it was copied whole, or create a new one."
        )
    if caller.revoked:
        raise unauthorized(f"The API key {caller.display_prefix}… was revoked. Use another key.")
    if caller.expires_at is not None and caller.expires_at <= time.time():
        raise unauthorized(f"The API key {caller.display_prefix}… has expired. Create a new one.")
    if not caller.organization_active:
        raise unauthorized("This organization is suspended. Contact the platform operators.")
    if APIKey.Scope.INFERENCE not in caller.scopes:
        raise GatewayError(
            403,
            f"The API key {caller.display_prefix}… lacks the 'inference' scope that /v1 needs; "
            "use a key created with that scope.",
            type="permission_error",
            code="insufficient_scope",
        )
    return caller
