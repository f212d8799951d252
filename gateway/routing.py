"""Which replica serves a request: cached routes, least in-flight choice, scale-from-zero asks,
and reports of replicas that failed a request.

A route (`deployments.selectors.route_for`) is cached per (organization, model name) for
GATEWAY_ROUTE_CACHE_SECONDS; an older one keeps serving while a background read replaces it
(replica lists change slowly, and a dead replica costs only a refused connect, after which
another is tried). Unknown names are never served stale: a new deployment is callable as
soon as the cache expires.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# A stale route older than this is re-read before use, not in the background.
STALE_LIMIT_SECONDS = 30
SCALE_UP_REPEAT_SECONDS = 10
# A replica that refused a connection is tried last for this long.
REFUSED_PENALTY_SECONDS = 5
# A replica that refused or reset a connection is reported to the control plane (it stops being
# listed as ready, and its deployment gets a reconcile pass) at most this often.
UNHEALTHY_REPORT_REPEAT_SECONDS = 5


@dataclass(slots=True)
class _Cached:
    value: object
    fetched: float
    refreshing: bool = False


class RouteTable:
    def __init__(
        self,
        db,
        *,
        ttl: float,
        route_for: Callable,
        callable_models: Callable,
        request_scale_up: Callable,
        report_unhealthy: Callable | None = None,
    ):
        self._db = db
        self._ttl = ttl
        self._route_for = route_for
        self._callable_models = callable_models
        self._request_scale_up = request_scale_up
        self._report_unhealthy = report_unhealthy
        self._reported_at: dict[str, float] = {}
        self._reports: set[asyncio.Task] = set()
        self._routes: dict[tuple[int, str], _Cached] = {}
        self._models: dict[int, _Cached] = {}
        self._in_flight: dict[str, int] = {}
        self._scale_up_asked: dict[str, float] = {}
        self._refused_at: dict[str, float] = {}
        self._turn = itertools.count()

    async def route(self, organization_id: int, model: str, *, fresh: bool = False):
        """The Route for the organization's model name, or None (→ 404)."""
        key = (organization_id, model)
        cached = self._routes.get(key)
        if cached is not None and not fresh:
            age = time.monotonic() - cached.fetched
            if age < self._ttl:
                return cached.value
            if cached.value is not None and age < STALE_LIMIT_SECONDS:
                if not cached.refreshing:
                    cached.refreshing = True
                    asyncio.get_running_loop().create_task(self._refresh(key))
                return cached.value
        return await self._fetch(key)

    async def _fetch(self, key: tuple[int, str]):
        organization_id, model = key
        fetched = time.monotonic()
        route = await self._db.call(self._route_for, organization_id=organization_id, model=model)
        self._routes[key] = _Cached(route, fetched)
        if len(self._routes) > 100_000:
            self._routes = {k: v for k, v in self._routes.items() if v.value is not None}
        return route

    async def _refresh(self, key: tuple[int, str]) -> None:
        try:
            await self._fetch(key)
        except Exception:
            logger.warning("re-reading the route for %s failed", key[1], exc_info=True)
            cached = self._routes.get(key)
            if cached is not None:
                cached.refreshing = False

    async def models(self, organization_id: int) -> list[tuple[str, int]]:
        cached = self._models.get(organization_id)
        if cached is not None and time.monotonic() - cached.fetched < self._ttl:
            return cached.value
        fetched = time.monotonic()
        models = await self._db.call(self._callable_models, organization_id=organization_id)
        self._models[organization_id] = _Cached(models, fetched)
        return models

    def pick(self, route, tried: set[str]) -> str | None:
        """The endpoint of the ready replica with the fewest requests in flight here; one that
        refused a connection in the last few seconds only when no other is left."""
        best, best_load = None, None
        now = time.monotonic() if self._refused_at else 0.0
        replicas = route.replicas
        # Start at a rotating offset so equal loads spread over replicas.
        offset = next(self._turn) % len(replicas) if replicas else 0
        for index in range(len(replicas)):
            _name, endpoint = replicas[(offset + index) % len(replicas)]
            if endpoint in tried:
                continue
            load = self._in_flight.get(endpoint, 0)
            if (
                self._refused_at
                and now - self._refused_at.get(endpoint, -1e9) < REFUSED_PENALTY_SECONDS
            ):
                load += 1_000_000
            if best_load is None or load < best_load:
                best, best_load = endpoint, load
        return best

    def acquire(self, endpoint: str) -> None:
        self._in_flight[endpoint] = self._in_flight.get(endpoint, 0) + 1

    def release(self, endpoint: str) -> None:
        self._in_flight[endpoint] -= 1

    def refused(self, endpoint: str) -> bool:
        """Set a replica aside after a refused connect; True when it was not already."""
        now = time.monotonic()
        fresh = now - self._refused_at.get(endpoint, -1e9) >= REFUSED_PENALTY_SECONDS
        self._refused_at[endpoint] = now
        if len(self._refused_at) > 1000:
            cutoff = time.monotonic() - REFUSED_PENALTY_SECONDS
            self._refused_at = {e: t for e, t in self._refused_at.items() if t >= cutoff}
        return fresh

    def unhealthy(self, deployment_id, endpoint: str, why: str) -> None:
        """A replica refused a connection or reset one mid-answer: try it last from now on, and
        tell the control plane (in the background, at most every few seconds per replica),
        which stops listing it as ready to every gateway process and reconciles its deployment
        at once (restarting it, or finding it healthy again)."""
        now = time.monotonic()
        self._refused_at[endpoint] = now
        if self._report_unhealthy is None:
            return
        if now - self._reported_at.get(endpoint, -1e9) < UNHEALTHY_REPORT_REPEAT_SECONDS:
            return
        self._reported_at[endpoint] = now
        if len(self._reported_at) > 1000:
            cutoff = now - UNHEALTHY_REPORT_REPEAT_SECONDS
            self._reported_at = {e: t for e, t in self._reported_at.items() if t >= cutoff}
        task = asyncio.get_running_loop().create_task(
            self._report(deployment_id=deployment_id, endpoint=endpoint, why=why)
        )
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report(self, **report) -> None:
        try:
            await self._db.call(self._report_unhealthy, **report)
        except Exception:  # the reconciler's own checks still find it
            logger.warning("reporting replica %s as unhealthy failed", report, exc_info=True)

    async def ask_for_replicas(self, deployment_id) -> None:
        """Ask the control plane to scale the deployment up from zero (at most every 10 s)."""
        key = str(deployment_id)
        now = time.monotonic()
        if now - self._scale_up_asked.get(key, -1e9) < SCALE_UP_REPEAT_SECONDS:
            return
        self._scale_up_asked[key] = now
        await self._db.call(self._request_scale_up, deployment_id=deployment_id)
