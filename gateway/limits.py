"""Requests and tokens per minute, per key and per organization: token buckets.

Each limit is a bucket holding up to `limit` units that refills continuously at limit/60 per
second (OpenAI's limits replenish the same way, and its `x-ratelimit-reset-*` headers mean
"until the bucket is full again"). Admission takes 1 request and the reserved tokens (prompt
tokens + max_tokens) from every bucket at once, or from none; settlement gives back what the
request did not use, or takes what it used beyond the reservation. Production keeps the buckets
in Redis and runs one Lua script per request, atomically: it applies the settlements of the
requests that finished since the last admission (at most SETTLE_DELAY_SECONDS old), then
admits or refuses; concurrent gateway processes never admit more than the limit. The embedded
default keeps the buckets in process (the event loop is single-threaded, so each step is
atomic there too). Both share this module's interface.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

import redis.asyncio

logger = logging.getLogger(__name__)

WINDOW_MS = 60_000
REDIS_CONNECTIONS = 32  # per gateway process


@dataclass(frozen=True, slots=True)
class Limit:
    bucket: str  # e.g. "k:42:t"
    scope: str  # "key" | "organization"
    kind: str  # "requests" | "tokens"
    limit: int
    cost: int


@dataclass(slots=True)
class Admission:
    allowed: bool
    limits: list[Limit]
    levels: list[float]  # after admission (or now, when refused)
    wait_seconds: float = 0.0
    refused: Limit | None = None
    settled: bool = field(default=False)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """OpenAI's x-ratelimit-* headers, for the tightest limit of each kind."""
        headers = []
        for kind in ("requests", "tokens"):
            tightest = None
            for limit, level in zip(self.limits, self.levels, strict=True):
                if limit.kind == kind and (tightest is None or level < tightest[1]):
                    tightest = (limit, level)
            if tightest is None:
                continue
            limit, level = tightest
            remaining = max(0, math.floor(level))
            reset = (limit.limit - level) * 60 / limit.limit
            headers += [
                (f"x-ratelimit-limit-{kind}".encode(), str(limit.limit).encode()),
                (f"x-ratelimit-remaining-{kind}".encode(), str(remaining).encode()),
                (f"x-ratelimit-reset-{kind}".encode(), format_duration(reset).encode()),
            ]
        return headers


def format_duration(seconds: float) -> str:
    """Like OpenAI's reset headers: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def limits_for(
    *,
    key_id: int,
    key_rpm: int | None,
    key_tpm: int | None,
    organization_id: int,
    org_rpm: int,
    org_tpm: int,
    tokens: int,
) -> list[Limit]:
    """The buckets one request draws from; a missing or zero limit means none."""
    limits = []
    for scope, ident, rpm, tpm in (
        ("key", f"k:{key_id}", key_rpm, key_tpm),
        ("organization", f"o:{organization_id}", org_rpm, org_tpm),
    ):
        if rpm:
            limits.append(Limit(f"{ident}:r", scope, "requests", rpm, 1))
        if tpm:
            limits.append(Limit(f"{ident}:t", scope, "tokens", tpm, tokens))
    return limits


class LocalRateLimiter:
    """In-process buckets (the embedded default: one gateway process)."""

    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (level, at_ms)

    def _level(self, limit: Limit, now_ms: float) -> float:
        stored = self._buckets.get(limit.bucket)
        if stored is None:
            return float(limit.limit)
        level, at_ms = stored
        return min(float(limit.limit), level + (now_ms - at_ms) * limit.limit / WINDOW_MS)

    async def admit(self, limits: list[Limit]) -> Admission:
        now_ms = time.time() * 1000
        levels = [self._level(limit, now_ms) for limit in limits]
        refused, wait_seconds = _refusal(limits, levels)
        if refused is not None:
            return Admission(False, limits, levels, wait_seconds, refused)
        after = []
        for limit, level in zip(limits, levels, strict=True):
            self._buckets[limit.bucket] = (level - limit.cost, now_ms)
            after.append(level - limit.cost)
        if len(self._buckets) > 100_000:
            self._forget_full(now_ms)
        return Admission(True, limits, after)

    async def settle(self, admission: Admission, used_tokens: int) -> None:
        if admission.settled or not admission.allowed:
            return
        admission.settled = True
        now_ms = time.time() * 1000
        for limit in admission.limits:
            if limit.kind == "tokens" and used_tokens != limit.cost:
                level = self._level(limit, now_ms) + (limit.cost - used_tokens)
                self._buckets[limit.bucket] = (min(float(limit.limit), level), now_ms)

    def _forget_full(self, now_ms: float) -> None:
        # A bucket untouched for a whole window is full again: forgetting it changes nothing.
        self._buckets = {
            name: (level, at)
            for name, (level, at) in self._buckets.items()
            if now_ms - at < WINDOW_MS
        }


def _refusal(limits: list[Limit], levels: list[float]) -> tuple[Limit | None, float]:
    """The limit that refuses the request for longest, and how long (inf: it never fits)."""
    refused, wait = None, 0.0
    for limit, level in zip(limits, levels, strict=True):
        if level < limit.cost:
            needed = (
                math.inf
                if limit.cost > limit.limit
                else (limit.cost - level) * WINDOW_MS / limit.limit / 1000
            )
            if refused is None or needed > wait:
                refused, wait = limit, needed
    return refused, wait


# One script for both steps. ARGV[1] = n. KEYS[1..n] are the buckets to draw from, with
# (limit, cost) pairs from ARGV[2]; the KEYS after them get settlements first, with
# (limit, give_back) pairs (give_back < 0 takes more). n = 0 only settles. Returns the
# admission and the drawn buckets' levels as strings (Lua numbers returned to Redis are
# truncated to integers): {allowed, levels...}.
_ADMIT_AND_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local n = tonumber(ARGV[1])
local function current(key, limit)
  local stored = redis.call('HMGET', key, 'level', 'at')
  if not stored[1] then return limit end
  return math.min(limit, tonumber(stored[1]) + (now - tonumber(stored[2])) * limit / 60000)
end
local function store(key, limit, level)
  redis.call('HSET', key, 'level', tostring(level), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((limit - level) * 60000 / limit) + 1000)
end
for i = n + 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  store(KEYS[i], limit, math.min(limit, current(KEYS[i], limit) + tonumber(ARGV[2 * i + 1])))
end
local levels = {}
local allowed = 1
for i = 1, n do
  levels[i] = current(KEYS[i], tonumber(ARGV[2 * i]))
  if levels[i] < tonumber(ARGV[2 * i + 1]) then allowed = 0 end
end
local result = {tostring(allowed)}
for i = 1, n do
  local level = levels[i]
  if allowed == 1 then
    level = level - tonumber(ARGV[2 * i + 1])
    store(KEYS[i], tonumber(ARGV[2 * i]), level)
  end
  result[#result + 1] = tostring(level)
end
return result
"""

# Settlements wait this long for the next admission to carry them (no round trip of their
# own); if none comes, they are sent alone.
SETTLE_DELAY_SECONDS = 0.02


class RedisRateLimiter:
    """Buckets in Redis, shared by every gateway process: one EVALSHA per request, which
    admits it and settles the requests that finished since the last one."""

    def __init__(self, url: str, *, prefix: str):
        # A bounded pool that makes a burst wait for a connection (each command holds one
        # until its answer), rather than opening one per concurrent request or failing.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS,
            timeout=5,
            socket_timeout=2,
            socket_connect_timeout=2,
        )
        self._redis = redis.asyncio.Redis(connection_pool=pool)
        self._prefix = f"{prefix}rl:"
        self._script = self._redis.register_script(_ADMIT_AND_SETTLE)
        self._settlements: dict[str, list] = {}  # key -> [limit, give_back]
        self._flush_timer: asyncio.TimerHandle | None = None

    async def admit(self, limits: list[Limit]) -> Admission:
        if not limits:
            return Admission(True, limits, [])
        keys = [self._prefix + limit.bucket for limit in limits]
        args = [len(limits)] + [value for limit in limits for value in (limit.limit, limit.cost)]
        settlements = self._take_settlements()
        for key, (limit, give_back) in settlements.items():
            keys.append(key)
            args += [limit, give_back]
        try:
            result = await self._script(keys=keys, args=args)
        except BaseException:
            self._restore(settlements)
            raise
        levels = [float(value) for value in result[1:]]
        if result[0] == b"1":
            return Admission(True, limits, levels)
        refused, wait_seconds = _refusal(limits, levels)
        return Admission(False, limits, levels, wait_seconds, refused)

    async def settle(self, admission: Admission, used_tokens: int) -> None:
        if admission.settled or not admission.allowed:
            return
        admission.settled = True
        for limit in admission.limits:
            if limit.kind == "tokens" and used_tokens != limit.cost:
                entry = self._settlements.setdefault(self._prefix + limit.bucket, [limit.limit, 0])
                entry[1] += limit.cost - used_tokens
        if self._settlements and self._flush_timer is None:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(
                SETTLE_DELAY_SECONDS, lambda: loop.create_task(self._flush_quietly())
            )

    async def flush(self) -> None:
        """Send the settlements no admission has carried yet."""
        settlements = self._take_settlements()
        if not settlements:
            return
        args = [0]
        for limit, give_back in settlements.values():
            args += [limit, give_back]
        try:
            await self._script(keys=list(settlements), args=args)
        except BaseException:
            self._restore(settlements)
            raise

    async def close(self) -> None:
        await self.flush()
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    def _take_settlements(self) -> dict[str, list]:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        settlements, self._settlements = self._settlements, {}
        return settlements

    def _restore(self, settlements: dict[str, list]) -> None:
        for key, (limit, give_back) in settlements.items():
            self._settlements.setdefault(key, [limit, 0])[1] += give_back

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except (redis.RedisError, OSError):
            logger.warning("settling rate limits failed; the next admission retries", exc_info=True)
