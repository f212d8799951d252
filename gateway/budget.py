"""Hard spend limits: an organization over its limit is refused with 429 insufficient_quota.

Whether an organization is blocked is billing's answer; it is cached per organization for
GATEWAY_SPEND_CACHE_SECONDS and re-read in the background, so the check costs nothing on
the request path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class SpendLimits:
    def __init__(self, db, *, ttl: float, spend_blocked: Callable[..., bool]):
        self._db = db
        self._ttl = ttl
        self._spend_blocked = spend_blocked
        self._cache: dict[int, tuple[bool, float]] = {}
        self._refreshing: set[int] = set()

    async def blocked(self, organization_id: int) -> bool:
        cached = self._cache.get(organization_id)
        if cached is None:
            return await self._fetch(organization_id)
        blocked, fetched = cached
        if time.monotonic() - fetched >= self._ttl and organization_id not in self._refreshing:
            self._refreshing.add(organization_id)
            asyncio.get_running_loop().create_task(self._refresh(organization_id))
        return blocked

    async def _fetch(self, organization_id: int) -> bool:
        fetched = time.monotonic()
        blocked = await self._db.call(self._spend_blocked, organization_id=organization_id)
        self._cache[organization_id] = (bool(blocked), fetched)
        return bool(blocked)

    async def _refresh(self, organization_id: int) -> None:
        try:
            await self._fetch(organization_id)
        except Exception:
            logger.warning(
                "re-reading the spend limit of %s failed", organization_id, exc_info=True
            )
        finally:
            self._refreshing.discard(organization_id)
