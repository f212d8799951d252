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

The same step reserves spend (gateway/budget.py): a request's worst-case cost is held against
its organization's spend limit together with its tokens, or the request is refused and nothing
is drawn; settlement releases the hold and adds the real cost. Amounts are integer
nano-units of the organization's currency (1e-9). In Redis an organization's period is one
hash: `settled` (what this gateway's requests cost since the period began) and `h:<process>`
(what each gateway process holds for requests in flight). A process's holds are dropped when
its heartbeat key expires, so a crashed process cannot keep a limit blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

import orjson
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


@dataclass(frozen=True, slots=True)
class SpendHold:
    """A worst-case cost to hold against an organization's spend limit (nano-units), and
    against its project's budget (`also`): the same cost on every counter, all or none."""

    key: str  # the organization's period, e.g. "s:7:1764547200"
    allowance: int  # what settled + held may reach, this hold included
    cost: int
    scope: str = "organization"  # whose limit `key` is: "organization" or "project"
    also: tuple[tuple[str, int, str], ...] = ()  # further (key, allowance, scope) counters

    def counters(self) -> tuple[tuple[str, int, str], ...]:
        return ((self.key, self.allowance, self.scope), *self.also)


@dataclass(slots=True)
class Admission:
    allowed: bool
    limits: list[Limit]
    levels: list[float]  # after admission (or now, when refused)
    wait_seconds: float = 0.0
    refused: Limit | None = None
    settled: bool = field(default=False)
    spend: SpendHold | None = None
    spend_refused: bool = False
    spend_left: int | None = None  # allowance - settled - held, before this hold
    # The counter `spend_left` is of: the one that refused, else the tightest.
    spend_scope: str | None = None

    @property
    def cause(self) -> str | None:
        """Why it was refused: "rate", "spend" or None."""
        if self.allowed:
            return None
        return "rate" if self.refused is not None else "spend"

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
    requests: int = 1,
    project_id: int | None = None,
    project_rpm: int | None = None,
    project_tpm: int | None = None,
) -> list[Limit]:
    """The buckets one request draws from; a missing or zero limit means none."""
    limits = []
    for scope, ident, rpm, tpm in (
        ("key", f"k:{key_id}", key_rpm, key_tpm),
        ("project", f"p:{project_id}", project_rpm, project_tpm),
        ("organization", f"o:{organization_id}", org_rpm, org_tpm),
    ):
        if rpm:
            limits.append(Limit(f"{ident}:r", scope, "requests", rpm, requests))
        if tpm:
            limits.append(Limit(f"{ident}:t", scope, "tokens", tpm, tokens))
    return limits


def combined(first: Admission, second: Admission) -> Admission:
    """One admission for a request admitted in two steps (a cheap bound, then the count):
    what settlement gives back is what both steps drew."""
    costs: dict[str, Limit] = {}
    for limit in (*first.limits, *second.limits):
        drawn = costs.get(limit.bucket)
        costs[limit.bucket] = (
            limit
            if drawn is None
            else Limit(limit.bucket, limit.scope, limit.kind, limit.limit, drawn.cost + limit.cost)
        )
    levels = dict(zip((limit.bucket for limit in first.limits), first.levels, strict=True))
    levels.update(zip((limit.bucket for limit in second.limits), second.levels, strict=True))
    holds = [hold for hold in (first.spend, second.spend) if hold is not None]
    spend = None
    if holds:
        spend = dataclasses.replace(holds[-1], cost=sum(hold.cost for hold in holds))
    return Admission(True, list(costs.values()), [levels[b] for b in costs], spend=spend)


class LocalRateLimiter:
    """In-process buckets and spend (the embedded default: one gateway process)."""

    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (level, at_ms)
        self._spend: dict[str, list[int]] = {}  # period key -> [settled, held]

    def _level(self, limit: Limit, now_ms: float) -> float:
        stored = self._buckets.get(limit.bucket)
        if stored is None:
            return float(limit.limit)
        level, at_ms = stored
        return min(float(limit.limit), level + (now_ms - at_ms) * limit.limit / WINDOW_MS)

    async def admit(self, limits: list[Limit], spend: SpendHold | None = None) -> Admission:
        now_ms = time.time() * 1000
        levels = [self._level(limit, now_ms) for limit in limits]
        refused, wait_seconds = _refusal(limits, levels)
        spend_left = spend_scope = None
        spend_short = False
        if spend is not None:
            for key, allowance, scope in spend.counters():
                settled, held = self._spend.get(key, (0, 0))
                left = allowance - settled - held
                if spend.cost > left:
                    spend_short, spend_left, spend_scope = True, left, scope
                    break
                if spend_left is None or left < spend_left:
                    spend_left, spend_scope = left, scope
        if refused is not None or spend_short:
            return Admission(
                False,
                limits,
                levels,
                wait_seconds,
                refused,
                spend=spend,
                spend_refused=refused is None,
                spend_left=spend_left,
                spend_scope=spend_scope,
            )
        after = []
        for limit, level in zip(limits, levels, strict=True):
            level = min(float(limit.limit), level - limit.cost)
            self._buckets[limit.bucket] = (level, now_ms)
            after.append(level)
        if spend is not None:
            for key, _allowance, _scope in spend.counters():
                self._spend.setdefault(key, [0, 0])[1] += spend.cost
        if len(self._buckets) > 100_000:
            self._forget_full(now_ms)
        return Admission(
            True, limits, after, spend=spend, spend_left=spend_left, spend_scope=spend_scope
        )

    async def settle(self, admission: Admission, used_tokens: int, spent: int = 0) -> None:
        """Give back the tokens not used and release the spend hold, adding `spent`."""
        if admission.settled or not admission.allowed:
            return
        admission.settled = True
        now_ms = time.time() * 1000
        for limit in admission.limits:
            if limit.kind == "tokens" and used_tokens != limit.cost:
                level = self._level(limit, now_ms) + (limit.cost - used_tokens)
                self._buckets[limit.bucket] = (min(float(limit.limit), level), now_ms)
        if admission.spend is not None:
            for key, _allowance, _scope in admission.spend.counters():
                entry = self._spend.setdefault(key, [0, 0])
                entry[0] += spent
                entry[1] -= admission.spend.cost

    async def spend_settled(self, key: str) -> int:
        """What this gateway's settled requests cost in the period `key` so far."""
        return self._spend.get(key, (0, 0))[0]

    async def close(self) -> None:
        pass

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


# One script per request. ARGV[1] is the plan, in JSON: "d" the (limit, cost) of each bucket to
# draw from (KEYS[1..#d]); "s" the (limit, give_back) of buckets to settle first (the next
# #s KEYS; give_back < 0 takes more); "p" an optional list of (allowance, cost) spend holds,
# one per counter (the organization's, the project's), on the next #p KEYS; "r" the
# (release, spent) of spend settlements on the KEYS after them; "i" this gateway process.
# ARGV[2] prefixes the processes' heartbeat keys. Everything is drawn or nothing. Returns
# strings (Lua numbers returned to Redis are truncated to integers): {allowed, spend allowed,
# spend left before this hold (of the refusing counter, else the tightest), that counter's
# index, levels...}.
_ADMIT_AND_SETTLE = """
local plan = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local draws, settles, settle_spend = plan.d, plan.s, plan.r
local held_field = 'h:' .. plan.i
local function current(key, limit)
  local stored = redis.call('HMGET', key, 'level', 'at')
  if not stored[1] then return limit end
  return math.min(limit, tonumber(stored[1]) + (now - tonumber(stored[2])) * limit / 60000)
end
local function store(key, limit, level)
  level = math.min(limit, level)
  redis.call('HSET', key, 'level', tostring(level), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((limit - level) * 60000 / limit) + 1000)
end
local function int(x) return string.format('%d', x) end
for i = 1, #settles do
  local key, limit = KEYS[#draws + i], settles[i][1]
  store(key, limit, current(key, limit) + settles[i][2])
end
local next_key = #draws + #settles + 1
local holds = plan.p or {}
local spend_keys = {}
for c = 1, #holds do
  spend_keys[c] = KEYS[next_key]
  next_key = next_key + 1
end
for i = 1, #settle_spend do
  local key = KEYS[next_key + i - 1]
  local release, spent = settle_spend[i][1], settle_spend[i][2]
  -- A hold dropped meanwhile (this process was taken for dead) is not released twice.
  if release ~= 0 and redis.call('HEXISTS', key, held_field) == 1 then
    if redis.call('HINCRBY', key, held_field, int(-release)) <= 0 then
      redis.call('HDEL', key, held_field)
    end
  end
  if spent ~= 0 then redis.call('HINCRBY', key, 'settled', int(spent)) end
  redis.call('PEXPIRE', key, plan.ttl)
end
local levels = {}
local allowed = 1
for i = 1, #draws do
  levels[i] = current(KEYS[i], draws[i][1])
  if levels[i] < draws[i][2] then allowed = 0 end
end
local spend_allowed, spend_left, spend_index = 1, nil, ''
local function used(spend_key)
  local total = 0
  local fields = redis.call('HGETALL', spend_key)
  for j = 2, #fields, 2 do total = total + tonumber(fields[j]) end
  return total, fields
end
for c = 1, #holds do
  local spend_key, allowance, cost = spend_keys[c], holds[c][1], holds[c][2]
  local total, fields = used(spend_key)
  if total + cost > allowance then
    -- Before refusing: drop the holds of gateway processes that stopped (no heartbeat).
    for j = 1, #fields, 2 do
      local name = fields[j]
      if string.sub(name, 1, 2) == 'h:' and
          redis.call('EXISTS', ARGV[2] .. string.sub(name, 3)) == 0 then
        redis.call('HDEL', spend_key, name)
      end
    end
    total = used(spend_key)
  end
  local left = allowance - total
  if total + cost > allowance then
    spend_allowed, spend_left, spend_index = 0, left, tostring(c)
    break
  end
  if spend_left == nil or left < spend_left then
    spend_left, spend_index = left, tostring(c)
  end
end
local result = {
  tostring(allowed * spend_allowed), tostring(spend_allowed),
  spend_left and int(spend_left) or '', spend_index
}
for i = 1, #draws do
  local level = levels[i]
  if allowed == 1 and spend_allowed == 1 then
    level = math.min(draws[i][1], level - draws[i][2])
    store(KEYS[i], draws[i][1], level)
  end
  result[#result + 1] = tostring(level)
end
if allowed == 1 and spend_allowed == 1 then
  for c = 1, #holds do
    if holds[c][2] ~= 0 then
      redis.call('HINCRBY', spend_keys[c], held_field, int(holds[c][2]))
      redis.call('PEXPIRE', spend_keys[c], plan.ttl)
    end
  end
end
return result
"""

# Settlements wait this long for the next admission to carry them (no round trip of their
# own); if none comes, they are sent alone.
SETTLE_DELAY_SECONDS = 0.02
# A period's spend hash outlives the longest period (a month) by days: it expires unused.
SPEND_KEY_TTL_MS = 40 * 24 * 3600 * 1000
# A gateway process renews its heartbeat this often; its holds are dropped HEARTBEAT_TTL
# after it stopped renewing (crash, kill -9).
HEARTBEAT_SECONDS = 5
HEARTBEAT_TTL_MS = 30_000


class RedisRateLimiter:
    """Buckets and spend in Redis, shared by every gateway process: one EVALSHA per request,
    which admits it and settles the requests that finished since the last one."""

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
        self._instance = uuid.uuid4().hex
        self._heartbeat_prefix = f"{prefix}gw:"
        self._script = self._redis.register_script(_ADMIT_AND_SETTLE)
        self._settlements: dict[str, list] = {}  # key -> [limit, give_back]
        self._spend_settlements: dict[str, list[int]] = {}  # key -> [release, spent]
        self._flush_timer: asyncio.TimerHandle | None = None
        self._heartbeat: asyncio.Task | None = None

    async def admit(self, limits: list[Limit], spend: SpendHold | None = None) -> Admission:
        if not limits and spend is None:
            return Admission(True, limits, [])
        if spend is not None and self._heartbeat is None:
            await self._beat()  # before the first hold: a hold never outlives its process
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat_forever())
        keys = [self._prefix + limit.bucket for limit in limits]
        plan: dict = {"d": [[limit.limit, limit.cost] for limit in limits], "i": self._instance}
        settlements, spend_settlements = self._take_settlements()
        plan["s"] = [[limit, give_back] for limit, give_back in settlements.values()]
        keys += settlements
        counters = spend.counters() if spend is not None else ()
        if counters:
            plan["p"] = [[allowance, spend.cost] for _key, allowance, _scope in counters]
            keys += [self._prefix + key for key, _allowance, _scope in counters]
        plan["r"] = list(spend_settlements.values())
        keys += spend_settlements
        plan["ttl"] = SPEND_KEY_TTL_MS
        try:
            result = await self._script(keys=keys, args=[_plan_json(plan), self._heartbeat_prefix])
        except BaseException:
            self._restore(settlements, spend_settlements)
            raise
        levels = [float(value) for value in result[4:]]
        spend_left = int(result[2]) if result[2] else None
        spend_scope = counters[int(result[3]) - 1][2] if result[3] else None
        if result[0] == b"1":
            return Admission(
                True, limits, levels, spend=spend, spend_left=spend_left, spend_scope=spend_scope
            )
        refused, wait_seconds = _refusal(limits, levels)
        return Admission(
            False,
            limits,
            levels,
            wait_seconds,
            refused,
            spend=spend,
            spend_refused=result[1] == b"0",
            spend_left=spend_left,
            spend_scope=spend_scope,
        )

    async def settle(self, admission: Admission, used_tokens: int, spent: int = 0) -> None:
        """Give back the tokens not used and release the spend hold, adding `spent`; sent
        with the next admission (or alone, SETTLE_DELAY_SECONDS later)."""
        if admission.settled or not admission.allowed:
            return
        admission.settled = True
        for limit in admission.limits:
            if limit.kind == "tokens" and used_tokens != limit.cost:
                entry = self._settlements.setdefault(self._prefix + limit.bucket, [limit.limit, 0])
                entry[1] += limit.cost - used_tokens
        if admission.spend is not None:
            for key, _allowance, _scope in admission.spend.counters():
                entry = self._spend_settlements.setdefault(self._prefix + key, [0, 0])
                entry[0] += admission.spend.cost
                entry[1] += spent
        if (self._settlements or self._spend_settlements) and self._flush_timer is None:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(
                SETTLE_DELAY_SECONDS, lambda: loop.create_task(self._flush_quietly())
            )

    async def spend_settled(self, key: str) -> int:
        """What the gateway's settled requests cost in the period `key` so far."""
        value = await self._redis.hget(self._prefix + key, "settled")
        return int(value) if value else 0

    async def flush(self) -> None:
        """Send the settlements no admission has carried yet."""
        settlements, spend_settlements = self._take_settlements()
        if not settlements and not spend_settlements:
            return
        plan = {
            "d": [],
            "s": [[limit, give_back] for limit, give_back in settlements.values()],
            "r": list(spend_settlements.values()),
            "i": self._instance,
            "ttl": SPEND_KEY_TTL_MS,
        }
        try:
            await self._script(
                keys=[*settlements, *spend_settlements],
                args=[_plan_json(plan), self._heartbeat_prefix],
            )
        except BaseException:
            self._restore(settlements, spend_settlements)
            raise

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await self.flush()
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    def _take_settlements(self) -> tuple[dict[str, list], dict[str, list[int]]]:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        settlements, self._settlements = self._settlements, {}
        spend_settlements, self._spend_settlements = self._spend_settlements, {}
        return settlements, spend_settlements

    def _restore(self, settlements: dict[str, list], spend_settlements: dict[str, list]) -> None:
        for key, (limit, give_back) in settlements.items():
            self._settlements.setdefault(key, [limit, 0])[1] += give_back
        for key, (release, spent) in spend_settlements.items():
            entry = self._spend_settlements.setdefault(key, [0, 0])
            entry[0] += release
            entry[1] += spent

    async def _beat(self) -> None:
        await self._redis.set(self._heartbeat_prefix + self._instance, 1, px=HEARTBEAT_TTL_MS)

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self._beat()
            except (redis.RedisError, OSError):
                logger.warning("renewing the gateway's heartbeat in Redis failed", exc_info=True)

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except (redis.RedisError, OSError):
            logger.warning("settling rate limits failed; the next admission retries", exc_info=True)


def _plan_json(plan: dict) -> bytes:
    # cjson decodes an empty JSON array as an empty table: `#` works on it either way.
    return orjson.dumps(plan)
