"""Which replica serves a request: cached routes, prefix-aware or least in-flight choice,
scale-from-zero asks, and reports of replicas that failed a request.

A route (`deployments.selectors.route_for`) is cached per (organization, model name) for
GATEWAY_ROUTE_CACHE_SECONDS; an older one keeps serving while a background read replaces it
(replica lists change slowly, and a dead replica costs only a refused connect, after which
another is tried). Unknown names are never served stale: a new deployment is callable as
soon as the cache expires. Requests that need a route while it is being read wait for that one
read (a burst on a cold cache is one query, not one per request).

Prefix-aware routing (a deployment's `routing_policy`, the default) sends a request to the
replica most likely to hold its prompt's prefix in its KV cache, as llm-d's and vLLM production
stack's routers do, so that a replica's automatic prefix cache is hit rather than each replica
computing every system prompt and conversation again. The rendered prompt's leading bytes are cut
into blocks keyed by a hash chained over the prefix (`prefix_keys`, like the runtime's block
keys); an approximate index per deployment maps keys to the replica that last served them
(learned from finished requests, LRU-bounded). The deepest key held by a replica within the load
bound wins ("hit"); a prefix nobody holds goes to the replica its first block hashes to among
those within the bound (rendezvous hashing: every gateway process agrees, so conversations that
share a system prompt meet on one replica; "miss"); a holder over the bound gives way to the least
loaded ("overloaded"). The bound is consistent hashing with bounded loads' (Mirrokni et al.): at
most LOAD_FACTOR × the mean in-flight count, so a hot prefix spills over instead of piling onto
one replica. A replica that reports no cached tokens where the index expected some (restarted, or
evicted under memory pressure), or that refuses connections, loses its entries.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from gateway import metrics
from gateway.singleflight import SingleFlight
from gateway.tokens import message_text

logger = logging.getLogger(__name__)

# A stale route older than this is re-read before use, not in the background.
STALE_LIMIT_SECONDS = 30
SCALE_UP_REPEAT_SECONDS = 10
# A replica that refused a connection is tried last for this long.
REFUSED_PENALTY_SECONDS = 5
# A replica that refused or reset a connection is reported to the control plane (it stops being
# listed as ready, and its deployment gets a reconcile pass) at most this often.
UNHEALTHY_REPORT_REPEAT_SECONDS = 5

# Prefix keys: blocks of the rendered prompt's bytes (~64 tokens each), the first 32 KiB only.
PREFIX_BLOCK_BYTES = 256
PREFIX_MAX_BLOCKS = 128
# The index remembers this many blocks per deployment, for this many deployments (LRU both).
PREFIX_INDEX_BLOCKS = 50_000
PREFIX_INDEX_DEPLOYMENTS = 1_000
# A replica takes a request for the prefix it holds while its in-flight count stays within this
# factor of the mean (consistent hashing with bounded loads' c).
LOAD_FACTOR = 1.25
# Blocks a replica must have been expected to hold before "it reported no cached tokens" means
# that it lost its cache.
LOST_CACHE_MIN_BLOCKS = 2


def prefix_keys(payload: dict, *, chat: bool) -> tuple[bytes, ...]:
    """Chained keys of the full leading blocks of the prompt as the replica will render it
    (messages' roles and text in order; a completion's prompt), each naming its whole prefix."""
    limit = PREFIX_BLOCK_BYTES * PREFIX_MAX_BLOCKS
    if chat:
        parts, size = [], 0
        for message in payload.get("messages") or ():
            if size >= limit or not isinstance(message, dict):
                break
            part = f"{message.get('role')}\x1f{message_text(message.get('content'))}\x1e".encode()
            parts.append(part)
            size += len(part)
        data = b"".join(parts)
    else:
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]  # a batch of prompts: routed by the first
        data = prompt.encode() if isinstance(prompt, str) else orjson.dumps(prompt)
    data = data[:limit]
    keys, parent = [], b""
    for start in range(0, len(data) - PREFIX_BLOCK_BYTES + 1, PREFIX_BLOCK_BYTES):
        parent = hashlib.blake2b(
            parent + data[start : start + PREFIX_BLOCK_BYTES], digest_size=12
        ).digest()
        keys.append(parent)
    return tuple(keys)


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
        self._reads = SingleFlight()
        self._models: dict[int, _Cached] = {}
        self._in_flight: dict[str, int] = {}
        self._scale_up_asked: dict[str, float] = {}
        self._refused_at: dict[str, float] = {}
        self._turn = itertools.count()
        # deployment id -> (prefix key -> endpoint of the replica that last served it)
        self._prefixes: OrderedDict[object, OrderedDict[bytes, str]] = OrderedDict()

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
        """Read a route; requests that need the same one meanwhile wait for this read."""
        return await self._reads.run(key, lambda: self._read(key))

    async def _read(self, key: tuple[int, str]):
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

    def pick(self, route, tried: set[str], keys: tuple[bytes, ...] = ()) -> str | None:
        """The endpoint for a request whose prompt has these prefix keys: by the deployment's
        policy, the replica holding its prefix within the load bound, or the ready replica with
        the fewest requests in flight here; one that refused a connection in the last few
        seconds only when no other is left."""
        best, best_load = None, None
        now = time.monotonic() if self._refused_at else 0.0
        replicas = route.replicas
        loads: dict[str, int] = {}  # candidates that did not refuse lately
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
            else:
                loads[endpoint] = load
            if best_load is None or load < best_load:
                best, best_load = endpoint, load
        if keys and len(loads) > 1 and route.prefix_aware:
            return self._by_prefix(route.deployment_id, keys, loads, best)
        return best

    def _by_prefix(self, deployment_id, keys: tuple[bytes, ...], loads: dict, least: str) -> str:
        # A holder at most one request ahead of the idlest replica is always within the bound
        # (at low load the mean alone would send a conversation's second request elsewhere).
        capacity = max(
            math.ceil(LOAD_FACTOR * (sum(loads.values()) + 1) / len(loads)),
            min(loads.values()) + 2,
        )
        within = {endpoint for endpoint, load in loads.items() if load + 1 <= capacity}
        index = self._prefixes.get(deployment_id)
        holder = None
        if index is not None:
            for key in reversed(keys):  # the deepest block a candidate holds
                endpoint = index.get(key)
                if endpoint in loads:
                    holder = endpoint
                    if endpoint in within:
                        _decided(deployment_id, "hit")
                        return endpoint
        if holder is not None:
            _decided(deployment_id, "overloaded")
            return least
        _decided(deployment_id, "miss")
        return max(within, key=lambda endpoint: _rendezvous(keys[0], endpoint))

    def observed(self, route, endpoint: str, keys: tuple[bytes, ...], cached_tokens) -> None:
        """A replica served a request with these prefix keys and reported `cached_tokens`
        (None: it reports none): it holds the prefix now. Reporting none cached where the index
        expected a prefix means it lost its cache (a restart, or eviction): its entries go."""
        if not keys or not route.prefix_aware:
            return
        deployment_id = route.deployment_id
        index = self._prefixes.get(deployment_id)
        if index is None:
            index = self._prefixes[deployment_id] = OrderedDict()
            if len(self._prefixes) > PREFIX_INDEX_DEPLOYMENTS:
                self._prefixes.popitem(last=False)
        else:
            self._prefixes.move_to_end(deployment_id)
        if cached_tokens == 0:
            expected = sum(1 for key in keys if index.get(key) == endpoint)
            if expected >= LOST_CACHE_MIN_BLOCKS:
                self._forget(deployment_id, endpoint)
        for key in keys:
            index[key] = endpoint
            index.move_to_end(key)
        while len(index) > PREFIX_INDEX_BLOCKS:
            index.popitem(last=False)

    def _forget(self, deployment_id, endpoint: str) -> None:
        index = self._prefixes.get(deployment_id)
        if index is not None:
            for key in [key for key, held_by in index.items() if held_by == endpoint]:
                del index[key]

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
        self._forget(deployment_id, endpoint)  # if it comes back, it comes back empty
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
        # Retried: a lost report (the database locked or restarting for a moment) leaves the
        # replica listed as ready to every other gateway process.
        try:
            await self._db.call_retrying(self._report_unhealthy, **report)
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


def _rendezvous(key: bytes, endpoint: str) -> bytes:
    return hashlib.blake2b(key + endpoint.encode(), digest_size=8).digest()


def _decided(deployment_id, decision: str) -> None:
    metrics.PREFIX_ROUTING.labels(str(deployment_id), decision).inc()
