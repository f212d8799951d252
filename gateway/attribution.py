"""Cost attribution a request carries: OpenAI's `user` field and `metadata` tags, stored on its
usage event and reported as `group_by` dimensions (/api/v1/usage, the console's charts).

Both are bounded, with a 400 in OpenAI's format past a bound: a request's own tags by number
and length (OpenAI's own bounds for `metadata`: 16 pairs, keys up to 64 characters, values up
to 512), and an organization's tags by cardinality (distinct keys, and distinct key=value
pairs, GATEWAY_TAG_VALUES_PER_ORGANIZATION), so a report grouped by tag stays a bounded list
however many requests there are. The cardinality is checked against metering.UsageTag, the
registry of pairs the organization has used: a pair is registered once, the first time a
request carries it (a database call on that request only); pairs this process has seen are
remembered, so a known pair costs nothing.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable

from gateway.errors import bad_request

MAX_USER_LENGTH = 256
MAX_TAGS = 16
MAX_TAG_KEY_LENGTH = 64
MAX_TAG_VALUE_LENGTH = 512
MAX_TAG_KEYS_PER_ORGANIZATION = 64
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.:-]+$")
# Organizations whose known pairs are remembered in this process (least recently used go).
_REMEMBERED_ORGANIZATIONS = 10_000


def read_attribution(payload: dict) -> tuple[str | None, dict[str, str] | None]:
    """The request's `user` and `metadata` (None when absent or empty); 400 past a bound."""
    user = payload.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise bad_request("`user` must be a string (your end user's id).", param="user")
        if len(user) > MAX_USER_LENGTH:
            raise bad_request(
                f"`user` is {len(user)} characters long; the most is {MAX_USER_LENGTH}.",
                param="user",
            )
        user = user or None
    metadata = payload.get("metadata")
    if metadata is None:
        return user, None
    if not isinstance(metadata, dict):
        raise bad_request(
            "`metadata` must be an object of string keys and string values.", param="metadata"
        )
    if len(metadata) > MAX_TAGS:
        raise bad_request(
            f"`metadata` has {len(metadata)} keys; a request may carry at most {MAX_TAGS}.",
            param="metadata",
            code="metadata_too_many_keys",
        )
    for key, value in metadata.items():
        if not key or len(key) > MAX_TAG_KEY_LENGTH or not _TAG_KEY.match(key):
            raise bad_request(
                f"`metadata` key {key[:80]!r} is not allowed: use 1 to {MAX_TAG_KEY_LENGTH} "
                "letters, digits, '_', '-', '.' or ':'.",
                param="metadata",
                code="metadata_invalid_key",
            )
        if not isinstance(value, str):
            raise bad_request(f"`metadata.{key}` must be a string.", param=f"metadata.{key}")
        if len(value) > MAX_TAG_VALUE_LENGTH:
            raise bad_request(
                f"`metadata.{key}` is {len(value)} characters long; the most is "
                f"{MAX_TAG_VALUE_LENGTH}.",
                param=f"metadata.{key}",
                code="metadata_value_too_long",
            )
    return user, (dict(sorted(metadata.items())) or None)


def without_metadata(payload: dict) -> dict:
    """The body a replica gets: everything but the tags."""
    return {name: value for name, value in payload.items() if name != "metadata"}


class TagRegistry:
    """Checks and registers an organization's tag pairs (per-organization cardinality)."""

    def __init__(self, db, *, register: Callable, max_values: int):
        self._db = db
        self._register = register
        self._max_values = max_values
        self._known: OrderedDict[int, set[tuple[str, str]]] = OrderedDict()

    async def admit(self, organization_id: int, tags: dict[str, str] | None) -> None:
        """Nothing when the pairs are known or fit the organization's bounds (registered
        now); a 400 when they would take it past one."""
        if not tags:
            return
        known = self._known.get(organization_id)
        pairs = set(tags.items())
        if known is not None:
            self._known.move_to_end(organization_id)
            if pairs <= known:
                return
        refusal = await self._db.call(
            self._register,
            organization_id=organization_id,
            pairs=sorted(pairs),
            max_keys=MAX_TAG_KEYS_PER_ORGANIZATION,
            max_values=self._max_values,
        )
        if refusal is not None:
            raise bad_request(refusal, param="metadata", code="metadata_cardinality_exceeded")
        if known is None:
            known = self._known[organization_id] = set()
            if len(self._known) > _REMEMBERED_ORGANIZATIONS:
                self._known.popitem(last=False)
        known |= pairs
