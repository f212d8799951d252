"""Hard spend limits, held before a request runs: a request that could take its organization
past its limit is refused with 429 insufficient_quota.

Admission holds the request's worst case, (prompt + n x max_tokens) at the highest price in
force until it can finish, against the limit, in the same atomic step as the rate limits
(gateway/limits.py: one Redis script in production, in process on the embedded default), and
settlement releases the hold and adds the real cost once the usage is known. What a request
may take is therefore

    limit - (spend the database knew) - (settled by the gateway since) - (held by others)

where the database's figure (billing.selectors.organization_spend_position: the ingested
total plus the not-yet-ingested events) is read in a DB thread and cached for
GATEWAY_SPEND_CACHE_SECONDS, and the gateway's own `settled` counter is read just *before*
it, so a request settled around the read is counted twice rather than missed. The overshoot
bound this gives is stated in docs/architecture.md ("Spend limits").

A project's monthly budget is a second counter held in the same step: its position
(billing.selectors.project_spend_position) is read and cached the same way, under the key
"s:p<project id>:<period start>", and a request is admitted only if its worst case fits both
the organization's limit and its project's budget (gateway/limits.py: all or none).

Amounts are integer nano-units (1e-9) of the organization's currency, rounded up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from gateway.limits import SpendHold

logger = logging.getLogger(__name__)

NANOS = Decimal(1_000_000_000)
# A request admitted now is rated at the price in force when it finishes: hold at the highest
# price starting within this long (longer than the gateway's first-byte timeout).
PRICE_HORIZON = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class SpendPosition:
    key: str  # the organization's period: "s:<organization id>:<period start, unix>"
    allowance: int | None  # nano-units; None: no limit
    currency: str
    scope: str = "organization"  # whose limit `key` is
    # A further counter held with the same cost: the project's (key, allowance, scope).
    also: tuple[tuple[str, int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class TokenPrice:
    """Nano-units per million tokens (exact: catalog prices have six decimal places)."""

    input_per_million: int
    output_per_million: int
    currency: str

    def cost(self, input_tokens: int, output_tokens: int) -> int:
        """Nano-units, rounded up."""
        total = input_tokens * self.input_per_million + output_tokens * self.output_per_million
        return -(-total // 1_000_000)


def to_nanos(amount: Decimal) -> int:
    return math.ceil(amount * NANOS)


class SpendLimits:
    def __init__(
        self,
        db,
        limiter,
        *,
        ttl: float,
        spend_position: Callable,
        token_price: Callable,
        project_spend_position: Callable | None = None,
        period_start: Callable[[datetime], datetime],
    ):
        self._db = db
        self._limiter = limiter
        self._ttl = ttl
        self._spend_position = spend_position
        self._token_price = token_price
        self._period_start = period_start
        self._project_spend_position = project_spend_position
        self._positions: dict[tuple[str, int], tuple[SpendPosition | None, float]] = {}
        self._prices: dict[int, tuple[TokenPrice | None, float]] = {}
        self._refreshing: set[tuple[str, int]] = set()
        self._fetching: dict[tuple[str, int], asyncio.Future] = {}

    async def position(
        self, organization_id: int, project_id: int | None = None
    ) -> SpendPosition | None:
        """Where the organization, and the caller's project, stand (cached; re-read in the
        background); None when the organization is gone."""
        organization = await self._cached_position("position", organization_id)
        if project_id is None or self._project_spend_position is None or organization is None:
            return organization
        project = await self._cached_position("project", project_id)
        if project is None or project.allowance is None:
            return organization
        if organization.allowance is None:
            return SpendPosition(project.key, project.allowance, organization.currency, "project")
        return dataclasses.replace(
            organization, also=((project.key, project.allowance, "project"),)
        )

    async def _cached_position(self, kind: str, ident: int) -> SpendPosition | None:
        cached = self._positions.get((kind, ident))
        if cached is None or (
            cached[0] is not None and cached[0].key != self._key(ident, kind=kind)
        ):  # a new period started: its figure is needed now
            return await self._fetch_position(kind, ident)
        position, fetched = cached
        self._refresh_later((kind, ident), fetched, lambda ident: self._fetch_position(kind, ident))
        return position

    async def price(self, version_id: int | None) -> TokenPrice | None:
        """The price a request to this version is held at (cached); None: not priced."""
        if version_id is None:
            return None
        cached = self._prices.get(version_id)
        if cached is None:
            return await self._fetch_price(version_id)
        price, fetched = cached
        self._refresh_later(("price", version_id), fetched, self._fetch_price)
        return price

    def hold(
        self,
        position: SpendPosition | None,
        price: TokenPrice | None,
        *,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> SpendHold | None:
        """The hold for a request's worst case; None when no limit applies."""
        if position is None or position.allowance is None:
            return None
        cost = 0
        if price is not None and price.currency == position.currency:
            cost = price.cost(prompt_tokens, completion_tokens)
        # Even an unpriced request needs some headroom: a limit reached refuses everything.
        return SpendHold(
            position.key, position.allowance, max(cost, 1), position.scope, position.also
        )

    @staticmethod
    def spent(
        hold: SpendHold | None,
        price: TokenPrice | None,
        *,
        currency: str,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> int:
        """What a finished request cost (what its settlement adds to `settled`)."""
        if hold is None or price is None or price.currency != currency:
            return 0
        return price.cost(prompt_tokens, completion_tokens)

    def _key(self, ident: int, now: datetime | None = None, *, kind: str = "position") -> str:
        start = self._period_start(now or datetime.now(UTC))
        owner = f"p{ident}" if kind == "project" else str(ident)
        return f"s:{owner}:{int(start.timestamp())}"

    def _refresh_later(self, what: tuple[str, int], fetched: float, fetch) -> None:
        if time.monotonic() - fetched >= self._ttl and what not in self._refreshing:
            self._refreshing.add(what)
            asyncio.get_running_loop().create_task(self._refresh(what, fetch))

    async def _refresh(self, what: tuple[str, int], fetch) -> None:
        try:
            await fetch(what[1])
        except Exception:
            logger.warning("re-reading the spend limits (%s %s) failed", *what, exc_info=True)
        finally:
            self._refreshing.discard(what)

    async def _fetch_position(self, kind: str, ident: int) -> SpendPosition | None:
        return await self._once((kind, ident), lambda ident: self._read_position(ident, kind=kind))

    async def _fetch_price(self, version_id: int) -> TokenPrice | None:
        return await self._once(("price", version_id), self._read_price)

    async def _once(self, what: tuple[str, int], read):
        """One read of `what` at a time, however many requests wait for it."""
        pending = self._fetching.get(what)
        if pending is None:
            pending = asyncio.ensure_future(read(what[1]))
            self._fetching[what] = pending
            pending.add_done_callback(lambda _: self._fetching.pop(what, None))
        return await asyncio.shield(pending)

    async def _read_position(self, ident: int, *, kind: str) -> SpendPosition | None:
        """The organization's (kind "position") or a project's ("project") position."""
        fetched = time.monotonic()
        now = datetime.now(UTC)
        key = self._key(ident, now, kind=kind)
        if kind == "project":
            read = self._project_spend_position
            arguments = {"project_id": ident}
        else:
            read = self._spend_position
            arguments = {"organization_id": ident}
        row = await self._db.call(read, now=now, **arguments)
        position = None
        if row is not None and row.limit is None:
            position = SpendPosition(key, None, row.currency)
        elif row is not None:
            # The gateway's settled counter first, then the database again (see the module
            # docstring): a request settled between the two reads is counted twice, never
            # missed. Organizations without a limit never need the counter.
            settled = await self._limiter.spend_settled(key)
            row = await self._db.call(read, now=now, **arguments)
            if row is not None:
                allowance = None
                if row.limit is not None:
                    allowance = to_nanos(row.limit) - to_nanos(row.spend) + settled
                position = SpendPosition(key, allowance, row.currency)
        self._positions[(kind, ident)] = (position, fetched)
        return position

    async def _read_price(self, version_id: int) -> TokenPrice | None:
        fetched = time.monotonic()
        row = await self._db.call(
            self._token_price,
            version_id=version_id,
            now=datetime.now(UTC),
            horizon=PRICE_HORIZON,
        )
        price = None
        if row is not None:
            input_price, output_price, currency = row
            price = TokenPrice(to_nanos(input_price), to_nanos(output_price), currency)
        self._prices[version_id] = (price, fetched)
        return price
