"""Writes to the usage ledger: ingestion of the gateway's usage events and of dedicated replica
time. Every function here is idempotent and safe to run concurrently or to kill at any line.

One ingestion batch is one transaction: it takes un-ingested events (one batch at a time: an
advisory lock on PostgreSQL; SQLite has one writer anyway), rates them with the price in force
when each request finished, inserts the ledger rows (unique request id; conflicts ignored),
adds them to the rollups and the organizations' period spend, raises budget alerts, and marks
the events ingested.
"""

import logging
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from accounts.models import Organization
from billing.models import (
    BillingPeriod,
    DedicatedUsageRecord,
    PeriodSpend,
    ProjectPeriodSpend,
    ReplicaUsageCursor,
    UsageRecord,
    UsageRollup,
)
from billing.periods import Period, period_containing, period_kind, split_interval
from billing.rating import PriceBook, rate_gpu_seconds, rate_tokens, stored_amount
from catalog.models import DedicatedPrice, ProviderCost, TokenPrice
from deployments.models import Deployment, ReplicaUsage
from metering.models import UsageEvent

logger = logging.getLogger(__name__)

ZERO = Decimal(0)
_EVENT_FIELDS = (
    "id",
    "request_id",
    "organization_id",
    "api_key_id",
    "deployment_id",
    "model_version_id",
    "deployment_type",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "finished_at",
    "provider_connection_id",
    "project_id",
    "end_user",
    "tags",
)


def lock_periods(periods: Iterable[Period], *, now: datetime) -> dict[datetime, datetime]:
    """Create the periods' rows if missing and hold them FOR SHARE until the transaction ends;
    return where usage of each period goes: itself while open, else the period open `now`.

    Closing takes the same rows FOR UPDATE, so it waits for this transaction, and after it
    has marked a period `closing` every later writer sends that period's usage onward.
    """
    current = period_containing(now)
    wanted = sorted({*periods, current}, key=lambda p: p.start)
    BillingPeriod.objects.bulk_create(
        [BillingPeriod(start=p.start, end=p.end) for p in wanted], ignore_conflicts=True
    )
    starts = [p.start for p in wanted]
    if connection.vendor == "postgresql":
        # Django has no FOR SHARE; concurrent ingestions must not block one another.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT start, status FROM billing_billingperiod "
                "WHERE start = ANY(%s) ORDER BY start FOR SHARE",
                [starts],
            )
            statuses = dict(cursor.fetchall())
    else:  # SQLite runs one writing transaction at a time: nothing to lock.
        statuses = dict(
            BillingPeriod.objects.filter(start__in=starts).values_list("start", "status")
        )
    if statuses[current.start] != BillingPeriod.Status.OPEN:
        raise RuntimeError(f"the current billing period {current.label} is not open")
    return {
        start: start if status == BillingPeriod.Status.OPEN else current.start
        for start, status in statuses.items()
    }


def private_offer_book(pairs: Iterable[tuple[int, int]]) -> PriceBook:
    """The approved private offers of these (organization, version) pairs, by start; an
    offer past its expiry is a None entry, so `at` falls back to the list price."""
    from catalog.models import PrivateOffer

    pairs = set(pairs)
    book = PriceBook()
    for offer in PrivateOffer.objects.filter(
        status=PrivateOffer.Status.APPROVED,
        organization_id__in={org for org, _ in pairs},
        model_version_id__in={version for _, version in pairs},
    ).order_by("starts_at"):
        key = (offer.organization_id, offer.model_version_id)
        book.add(key, offer.starts_at, offer)
        if offer.expires_at is not None:
            book.add(key, offer.expires_at, None)
    return book


def provider_cost_book(version_ids: Iterable[int]) -> PriceBook:
    """Every provider cost of these (partner) versions, by the same in-force rule as prices."""
    book = PriceBook()
    for cost in ProviderCost.objects.filter(model_version_id__in=set(version_ids)).order_by(
        "effective_from", "id"
    ):
        book.add(cost.model_version_id, cost.effective_from, cost)
    return book


def token_price_book(version_ids: Iterable[int]) -> PriceBook:
    """Every token price of these versions, for catalog.selectors.token_price_at's rule."""
    book = PriceBook()
    for price in TokenPrice.objects.filter(model_version_id__in=set(version_ids)).order_by(
        "effective_from", "id"
    ):
        book.add(price.model_version_id, price.effective_from, price)
    return book


# The ledger row's columns, in the order the ingestion builds its tuples.
_RECORD_COLUMNS = (
    "request_id",
    "organization_id",
    "period_start",
    "occurred_at",
    "api_key_id",
    "deployment_id",
    "model_version_id",
    "deployment_type",
    "model",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "currency",
    "token_price_id",
    "input_price_per_million",
    "output_price_per_million",
    "cached_input_price_per_million",
    "amount",
    "provider_connection_id",
    "provider_cost_id",
    "provider_currency",
    "provider_cost",
    "ingested_at",
    "project_id",
    "end_user",
    "tags",
)


@transaction.atomic
def usage_events_ingest(*, batch_size: int | None = None, now: datetime | None = None) -> int:
    """Ingest one batch of the gateway's un-ingested usage events. Returns how many events it
    took (0 when there is no backlog)."""
    batch_size = batch_size or settings.BILLING_INGEST_BATCH_SIZE
    now = now or timezone.now()
    if connection.vendor == "postgresql":
        return _ingest_in_postgresql(batch_size=batch_size, now=now)
    # SQLite (the embedded default): the same ingestion row by row in Python.
    events = list(
        UsageEvent.objects.filter(ingested_at__isnull=True)
        .order_by("id")
        .select_for_update(skip_locked=True)
        .values_list(*_EVENT_FIELDS)[:batch_size]
    )
    if not events:
        return 0
    currencies = dict(
        Organization.objects.filter(id__in={e[2] for e in events}).values_list("id", "currency")
    )
    book = token_price_book(e[5] for e in events if e[5] is not None)
    offers = private_offer_book((e[2], e[5]) for e in events if e[5] is not None)
    costs = provider_cost_book(e[5] for e in events if e[5] is not None and e[12] is not None)
    # Periods and days per UTC date, not per event: a batch spans a few days at most.
    periods_by_date = {}
    for event in events:
        day = event[11].astimezone(UTC).date()
        if day not in periods_by_date:
            periods_by_date[day] = period_containing(event[11])
    destination = lock_periods(periods_by_date.values(), now=now)

    rows, derived = [], []
    for (
        _id,
        request_id,
        organization_id,
        api_key_id,
        deployment_id,
        version_id,
        deployment_type,
        model,
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        finished_at,
        provider_connection_id,
        project_id,
        end_user,
        tags,
    ) in events:
        currency = currencies.get(organization_id)
        if currency is None:
            logger.warning("usage event %s: organization %s is gone", request_id, organization_id)
            continue
        price = book.at(version_id, finished_at) if version_id is not None else None
        if price is not None and price.currency != currency:
            logger.warning(
                "usage event %s: the price of version %s is in %s, the organization pays in %s",
                request_id,
                version_id,
                price.currency,
                currency,
            )
            price = None
        input_price = price.input_per_million if price else ZERO
        output_price = price.output_per_million if price else ZERO
        # The customer's private offer, in force then, replaces the list price.
        offer = offers.at((organization_id, version_id), finished_at) if price else None
        if offer is not None and offer.currency == currency:
            input_price, output_price = offer.input_per_million, offer.output_per_million
        # Cached prompt tokens: the list's cached price, never over the input price in force.
        cached_price = price.cached_input_per_million if price else None
        if cached_price is not None:
            cached_price = min(cached_price, input_price)
        amount = rate_tokens(
            input_tokens=prompt_tokens,
            output_tokens=completion_tokens,
            input_per_million=input_price,
            output_per_million=output_price,
            cached_tokens=cached_tokens,
            cached_input_per_million=cached_price,
        )
        cost = None
        if provider_connection_id is not None and version_id is not None:
            cost = costs.at(version_id, finished_at)
        provider_cost = ZERO
        if cost is not None:
            provider_cost = rate_tokens(
                input_tokens=prompt_tokens,
                output_tokens=completion_tokens,
                input_per_million=cost.input_per_million,
                output_per_million=cost.output_per_million,
            )
        day = finished_at.astimezone(UTC).date()
        period_start = destination[periods_by_date[day].start]
        rows.append(
            (
                request_id,
                organization_id,
                period_start,
                finished_at,
                api_key_id,
                deployment_id,
                version_id,
                deployment_type,
                model,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                currency,
                price.pk if price else None,
                input_price,
                output_price,
                cached_price,
                stored_amount(amount),
                provider_connection_id,
                cost.pk if cost else None,
                cost.currency if cost else "",
                stored_amount(provider_cost),
                now,
                project_id,
                end_user,
                tags,
            )
        )
        rollup_key = (
            period_start,
            day,
            organization_id,
            version_id or 0,
            str(deployment_id) if deployment_id else "",
            api_key_id or 0,
            currency,
            input_price,
            output_price,
            input_price if cached_price is None else cached_price,
        )
        derived.append((rollup_key, prompt_tokens, completion_tokens, cached_tokens, amount))

    inserted = _insert_usage_records(rows)
    rollups: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    spend: dict[tuple, Decimal] = defaultdict(Decimal)
    project_spend: dict[tuple, Decimal] = defaultdict(Decimal)
    project_currencies: dict[int, str] = {}
    project_index = _RECORD_COLUMNS.index("project_id")
    for row, (key, prompt_tokens, completion_tokens, cached_tokens, amount) in zip(
        rows, derived, strict=True
    ):
        if row[0] not in inserted:
            continue  # in the ledger already: counted when it went in
        sums = rollups[key]
        sums[0] += 1
        sums[1] += prompt_tokens
        sums[2] += completion_tokens
        sums[3] += cached_tokens
        spend[(row[1], row[2])] += amount
        if row[project_index] is not None:
            project_spend[(row[project_index], row[2])] += amount
            project_currencies[row[project_index]] = currencies[row[1]]
    rollups_add(rollups)
    touched = spend_add(spend, currencies=currencies)
    touched_projects = project_spend_add(project_spend, currencies=project_currencies)
    from billing.budgets import budget_alerts_raise, project_budget_alerts_raise

    budget_alerts_raise(spend_rows=touched)
    project_budget_alerts_raise(spend_rows=touched_projects)
    UsageEvent.objects.filter(id__in=[e[0] for e in events]).update(ingested_at=now)
    return len(events)


_PERIOD_TRUNC = {"monthly": "month", "weekly": "week", "daily": "day"}


def _ingest_in_postgresql(*, batch_size: int, now: datetime) -> int:
    """The same ingestion as SQLite's Python path (usage_events_ingest), as set-based SQL: rating (the price in
    force by a range join, numeric arithmetic, exact), ledger insert, rollup and spend
    upserts happen in the database in one statement, with no row passing through Python.
    The tests run this path on PostgreSQL and the Python one on SQLite; both must agree with
    billing.rating.rate_tokens."""
    with _pg_cursor() as cursor:
        # Not waiting for the WAL flush at commit is safe here: a crash can only lose a whole
        # batch (ledger rows and "ingested" marks together), which the next run takes again.
        cursor.execute("SET LOCAL synchronous_commit TO OFF")
        # Room to group a whole batch for the rollups in memory, not in temporary files.
        cursor.execute("SET LOCAL work_mem TO '64MB'")
        # One ingestion at a time (a second worker returns at once; the next beat tick
        # continues): no row locks to write on the events, which the batch updates anyway.
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [_INGEST_LOCK])
        if not cursor.fetchone()[0]:
            return 0
        cursor.execute(
            f"SELECT id, finished_at FROM {UsageEvent._meta.db_table} "  # noqa: S608
            "WHERE ingested_at IS NULL ORDER BY id LIMIT %s",
            [batch_size],
        )
        taken = cursor.fetchall()
        if not taken:
            return 0
        naturals = {}
        for _, finished_at in taken:
            day = finished_at.astimezone(UTC).date()
            if day not in naturals:
                naturals[day] = period_containing(finished_at)
        destination = lock_periods(naturals.values(), now=now)
        ids = [pk for pk, _ in taken]
        cursor.execute(
            _INGEST_SQL.format(trunc=_PERIOD_TRUNC[period_kind()]),
            {
                "ids": ids,
                "natural": list(destination),
                "destination": list(destination.values()),
                "now": now,
            },
        )
        spend_rows, project_rows = [], []
        for kind, pk, owner, start, cur, amt in cursor.fetchall():
            if kind == "o":
                spend_rows.append(
                    PeriodSpend(
                        id=pk, organization_id=owner, period_start=start, currency=cur, amount=amt
                    )
                )
            else:
                project_rows.append(
                    ProjectPeriodSpend(
                        id=pk, project_id=owner, period_start=start, currency=cur, amount=amt
                    )
                )
    from billing.budgets import budget_alerts_raise, project_budget_alerts_raise

    budget_alerts_raise(spend_rows=spend_rows)
    project_budget_alerts_raise(spend_rows=project_rows)
    return len(ids)


# Key of the advisory lock that keeps ingestion batches one at a time (PostgreSQL).
_INGEST_LOCK = 0x5349_5243_0001

_INGEST_SQL = """
WITH marked AS (
    UPDATE gateway_usageevent SET ingested_at = %(now)s WHERE id = ANY(%(ids)s)
),
-- Each price with the moment the next one of its version starts: the price in force at t is
-- the one with effective_from <= t < until (effective_from is unique per version).
prices AS (
    SELECT id, model_version_id, currency, input_per_million, output_per_million,
        cached_input_per_million, effective_from,
        lead(effective_from, 1, 'infinity') OVER (
            PARTITION BY model_version_id ORDER BY effective_from
        ) AS until
    FROM catalog_tokenprice
    WHERE model_version_id IN (
        SELECT DISTINCT model_version_id FROM gateway_usageevent WHERE id = ANY(%(ids)s)
    )
),
-- Approved private offers of the batch's organizations (at most one in force at a time per
-- organization and version: catalog.offers): the customer's own rate replaces the list price.
offers AS (
    SELECT organization_id, model_version_id, currency, input_per_million,
        output_per_million, starts_at, COALESCE(expires_at, 'infinity') AS until
    FROM catalog_privateoffer
    WHERE status = 'approved' AND (organization_id, model_version_id) IN (
        SELECT organization_id, model_version_id FROM gateway_usageevent WHERE id = ANY(%(ids)s)
    )
),
-- What partner versions' providers charge us, by the same in-force rule.
costs AS (
    SELECT id, model_version_id, currency, input_per_million, output_per_million,
        effective_from,
        lead(effective_from, 1, 'infinity') OVER (
            PARTITION BY model_version_id ORDER BY effective_from
        ) AS until
    FROM catalog_providercost
    WHERE model_version_id IN (
        SELECT DISTINCT model_version_id FROM gateway_usageevent
        WHERE id = ANY(%(ids)s) AND provider_connection_id IS NOT NULL
    )
),
inserted AS (
    INSERT INTO billing_usagerecord (request_id, organization_id, period_start, occurred_at,
        api_key_id, deployment_id, model_version_id, deployment_type, model, input_tokens,
        output_tokens, cached_tokens, currency, token_price_id, input_price_per_million,
        output_price_per_million, cached_input_price_per_million, amount,
        provider_connection_id, provider_cost_id, provider_currency, provider_cost, ingested_at,
        project_id, end_user, tags)
    SELECT e.request_id, e.organization_id,
        (SELECT m.destination
         FROM unnest(%(natural)s::timestamptz[], %(destination)s::timestamptz[])
             AS m(natural_start, destination)
         WHERE m.natural_start = date_trunc('{trunc}', e.finished_at, 'UTC')),
        e.finished_at, e.api_key_id,
        e.deployment_id, e.model_version_id, e.deployment_type, e.model, e.prompt_tokens,
        e.completion_tokens, e.cached_tokens, o.currency, p.id,
        COALESCE(q.input_per_million, p.input_per_million, 0),
        COALESCE(q.output_per_million, p.output_per_million, 0),
        c.cached_price,
        -- billing.rating.rate_tokens: cached tokens (at most the prompt's) at the cached price
        -- when the list price has one.
        ((e.prompt_tokens - c.cached)::numeric
                * COALESCE(q.input_per_million, p.input_per_million, 0)
            + c.cached::numeric * COALESCE(c.cached_price, 0)
            + e.completion_tokens::numeric
                * COALESCE(q.output_per_million, p.output_per_million, 0)) / 1000000,
        e.provider_connection_id, pc.id, COALESCE(pc.currency, ''),
        (e.prompt_tokens::numeric * COALESCE(pc.input_per_million, 0)
            + e.completion_tokens::numeric * COALESCE(pc.output_per_million, 0)) / 1000000,
        %(now)s, e.project_id, e.end_user, e.tags
    FROM gateway_usageevent e
    JOIN accounts_organization o ON o.id = e.organization_id
    LEFT JOIN prices p
        ON p.model_version_id = e.model_version_id
        AND p.effective_from <= e.finished_at AND e.finished_at < p.until
        AND p.currency = o.currency
    LEFT JOIN offers q
        ON p.id IS NOT NULL AND q.organization_id = e.organization_id
        AND q.model_version_id = e.model_version_id
        AND q.starts_at <= e.finished_at AND e.finished_at < q.until
        AND q.currency = o.currency
    -- The list's cached price, never over the input price in force (an offer's may be lower);
    -- LEAST alone would ignore a NULL.
    CROSS JOIN LATERAL (
        SELECT CASE WHEN p.cached_input_per_million IS NULL THEN NULL
            ELSE least(p.cached_input_per_million,
                COALESCE(q.input_per_million, p.input_per_million)) END AS cached_price,
            CASE WHEN p.cached_input_per_million IS NULL THEN 0
            ELSE least(e.cached_tokens, e.prompt_tokens) END AS cached
    ) c
    LEFT JOIN costs pc
        ON e.provider_connection_id IS NOT NULL
        AND pc.model_version_id = e.model_version_id
        AND pc.effective_from <= e.finished_at AND e.finished_at < pc.until
    WHERE e.id = ANY(%(ids)s)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING *
),
rollups AS (
    INSERT INTO billing_usagerollup (period_start, day, organization_id, model_version_id,
        deployment_id, api_key_id, currency, input_price_per_million, output_price_per_million,
        cached_input_price_per_million, requests, input_tokens, output_tokens, cached_tokens)
    SELECT period_start, (occurred_at AT TIME ZONE 'UTC')::date, organization_id,
        COALESCE(model_version_id, 0), COALESCE(deployment_id::text, ''),
        COALESCE(api_key_id, 0), currency, input_price_per_million, output_price_per_million,
        COALESCE(cached_input_price_per_million, input_price_per_million),
        count(*), sum(input_tokens), sum(output_tokens), sum(cached_tokens)
    FROM inserted
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
    ORDER BY 3, 2, 1, 4, 5, 6, 7, 8, 9, 10
    ON CONFLICT (organization_id, day, period_start, model_version_id, deployment_id,
        api_key_id, currency, input_price_per_million, output_price_per_million,
        cached_input_price_per_million)
    DO UPDATE SET requests = billing_usagerollup.requests + excluded.requests,
        input_tokens = billing_usagerollup.input_tokens + excluded.input_tokens,
        output_tokens = billing_usagerollup.output_tokens + excluded.output_tokens,
        cached_tokens = billing_usagerollup.cached_tokens + excluded.cached_tokens
),
organization_spend AS (
    INSERT INTO billing_periodspend (organization_id, period_start, currency, amount, updated_at)
    SELECT organization_id, period_start, currency, sum(amount), %(now)s
    FROM inserted
    GROUP BY 1, 2, 3
    ORDER BY 1, 2
    ON CONFLICT (organization_id, period_start)
    DO UPDATE SET amount = billing_periodspend.amount + excluded.amount,
        updated_at = excluded.updated_at
    RETURNING id, organization_id, period_start, currency, amount
),
project_spend AS (
    INSERT INTO billing_projectperiodspend (project_id, period_start, currency, amount, updated_at)
    SELECT project_id, period_start, currency, sum(amount), %(now)s
    FROM inserted
    WHERE project_id IS NOT NULL
    GROUP BY 1, 2, 3
    ORDER BY 1, 2
    ON CONFLICT (project_id, period_start)
    DO UPDATE SET amount = billing_projectperiodspend.amount + excluded.amount,
        updated_at = excluded.updated_at
    RETURNING id, project_id, period_start, currency, amount
)
SELECT 'o', id, organization_id, period_start, currency, amount FROM organization_spend
UNION ALL
SELECT 'p', id, project_id, period_start, currency, amount FROM project_spend
"""


def _pg_cursor():
    """A psycopg cursor on Django's connection (same transaction) that binds parameters on the
    server: sending ten-thousand-element arrays as parameters, not as quoted SQL text."""
    connection.ensure_connection()
    return connection.connection.cursor()


def _insert_usage_records(rows: list[tuple]) -> set[str]:
    """Insert ledger rows, skipping request ids already in; returns the ids inserted now."""
    if not rows:
        return set()
    # SQLite runs one writer at a time, so what is not there now is not there at the insert.
    present = set(
        UsageRecord.objects.filter(request_id__in=[row[0] for row in rows]).values_list(
            "request_id", flat=True
        )
    )
    fresh = [row for row in rows if row[0] not in present]
    UsageRecord.objects.bulk_create(
        [UsageRecord(**dict(zip(_RECORD_COLUMNS, row, strict=True))) for row in fresh],
        ignore_conflicts=True,
        batch_size=2000,
    )
    return {row[0] for row in fresh}


_ROLLUP_KEY = (
    "period_start",
    "day",
    "organization_id",
    "model_version_id",
    "deployment_id",
    "api_key_id",
    "currency",
    "input_price_per_million",
    "output_price_per_million",
    "cached_input_price_per_million",
)
_ROLLUP_SUMS = ("requests", "input_tokens", "output_tokens", "cached_tokens")


def rollups_add(rollups: dict[tuple, list[int]]) -> None:
    """Add integer sums to the rollup rows (upsert: insert, or add to the existing row).
    SQLite's ingestion only: PostgreSQL's upserts the rollups inside its one statement."""
    if not rollups:
        return
    table = UsageRollup._meta.db_table
    columns = ", ".join((*_ROLLUP_KEY, *_ROLLUP_SUMS))
    placeholders = ", ".join(["%s"] * (len(_ROLLUP_KEY) + len(_ROLLUP_SUMS)))
    updates = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in _ROLLUP_SUMS)
    sql = (
        f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) "  # noqa: S608 - names are ours
        f"ON CONFLICT ({', '.join(_ROLLUP_KEY)}) DO UPDATE SET {updates}"
    )
    ops = connection.ops
    price_field = UsageRollup._meta.get_field("input_price_per_million")

    def adapt(key, sums):
        period_start, day, org, version, deployment, key_id, currency, p_in, p_out, p_cached = key
        return [
            ops.adapt_datetimefield_value(period_start),
            ops.adapt_datefield_value(day),
            org,
            version,
            deployment,
            key_id,
            currency,
            ops.adapt_decimalfield_value(p_in, price_field.max_digits, price_field.decimal_places),
            ops.adapt_decimalfield_value(p_out, price_field.max_digits, price_field.decimal_places),
            ops.adapt_decimalfield_value(
                p_cached, price_field.max_digits, price_field.decimal_places
            ),
            *sums,
        ]

    keys = sorted(rollups, key=_sortable)
    with connection.cursor() as cursor:
        cursor.executemany(sql, [adapt(key, rollups[key]) for key in keys])


def _sortable(key):
    return tuple(str(part) for part in key)


def spend_add(
    spend: dict[tuple[int, datetime], Decimal], *, currencies: dict[int, str]
) -> list[PeriodSpend]:
    """Add rated amounts to the organizations' period spend. Returns the updated rows."""
    return _period_spend_add(PeriodSpend, "organization_id", spend, currencies)


def project_spend_add(
    spend: dict[tuple[int, datetime], Decimal], *, currencies: dict[int, str]
) -> list[ProjectPeriodSpend]:
    """Add rated amounts to the projects' period spend (key: project id, period start).
    Returns the updated rows."""
    return _period_spend_add(ProjectPeriodSpend, "project_id", spend, currencies)


def _period_spend_add(model, owner: str, spend: dict, currencies: dict[int, str]) -> list:
    if not spend:
        return []
    keys = sorted(spend)
    now = timezone.now()
    if connection.vendor == "postgresql":
        # One upsert adding in the database (numeric: exact); rows lock in key order.
        table = model._meta.db_table
        with _pg_cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({owner}, period_start, currency, amount, "  # noqa: S608
                "updated_at) SELECT * FROM unnest(%s::bigint[], %s::timestamptz[], %s::text[], "
                f"%s::numeric[], %s::timestamptz[]) ON CONFLICT ({owner}, period_start) "
                f"DO UPDATE SET amount = {table}.amount + excluded.amount, "
                "updated_at = excluded.updated_at "
                f"RETURNING id, {owner}, period_start, currency, amount",
                [
                    [org for org, _ in keys],
                    [start for _, start in keys],
                    [currencies[org] for org, _ in keys],
                    [stored_amount(spend[key]) for key in keys],
                    [now] * len(keys),
                ],
            )
            return [
                model(**{"id": pk, owner: ident}, period_start=start, currency=cur, amount=amount)
                for pk, ident, start, cur, amount in cursor.fetchall()
            ]
    model.objects.bulk_create(
        [
            model(**{owner: ident}, period_start=start, currency=currencies[ident])
            for ident, start in keys
        ],
        ignore_conflicts=True,
    )
    rows = {
        (getattr(row, owner), row.period_start): row
        for row in model.objects.select_for_update()
        .filter(
            **{f"{owner}__in": {ident for ident, _ in keys}},
            period_start__in={start for _, start in keys},
        )
        .order_by(owner, "period_start")
    }
    touched = []
    for key in keys:
        row = rows[key]
        row.amount = stored_amount(row.amount + spend[key])
        row.updated_at = now
        touched.append(row)
    model.objects.bulk_update(touched, ["amount", "updated_at"])
    return touched


def _floor_second(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def _ceil_second(moment: datetime) -> datetime:
    floor = moment.replace(microsecond=0)
    return floor if floor == moment else floor + timedelta(seconds=1)


@transaction.atomic
def replica_usage_ingest(*, now: datetime | None = None, limit: int = 2000) -> int:
    """Cut dedicated replicas' running time (deployments' ReplicaUsage) into ledger segments.

    Ended intervals are taken whole; running ones up to the last whole hour, so a replica
    adds a row an hour while it runs. Boundaries are whole seconds (start rounded down, end
    up: a started second is billed) and segments break at UTC midnights and price changes.
    Each segment is priced for the model version its replica ran (recorded on the interval;
    during a rolling update old and new replicas run different ones), on its hardware
    profile, by catalog.selectors.dedicated_price_at's rule (from a PriceBook: no query per
    segment).
    Each interval's cursor row is locked while it is cut, so concurrent runs never overlap.
    Returns the number of segments written.
    """
    now = now or timezone.now()
    complete = ReplicaUsageCursor.objects.filter(complete=True).values("replica_usage_id")
    candidates = list(
        ReplicaUsage.objects.filter(deployment__type=Deployment.Type.DEDICATED)
        .exclude(pk__in=complete)
        .order_by("id")
        .values_list("id", "started_at")[:limit]
    )
    if not candidates:
        return 0
    ReplicaUsageCursor.objects.bulk_create(
        [
            ReplicaUsageCursor(replica_usage_id=pk, billed_until=_floor_second(started))
            for pk, started in candidates
        ],
        ignore_conflicts=True,
    )
    cursors = {
        c.replica_usage_id: c
        for c in ReplicaUsageCursor.objects.select_for_update(skip_locked=True).filter(
            replica_usage_id__in=[pk for pk, _ in candidates], complete=False
        )
    }
    usages = list(
        ReplicaUsage.objects.filter(pk__in=cursors)
        .select_related("deployment__organization", "hardware_profile")
        .order_by("id")
    )
    book = PriceBook()
    for price in DedicatedPrice.objects.filter(
        model_version_id__in={u.model_version_id for u in usages},
        hardware_profile_id__in={u.hardware_profile_id for u in usages},
    ).order_by("effective_from", "id"):
        book.add((price.model_version_id, price.hardware_profile_id), price.effective_from, price)

    pieces = []  # (usage, segment start, segment end)
    last_whole_hour = now.replace(minute=0, second=0, microsecond=0)
    for usage in usages:
        cursor = cursors[usage.pk]
        ended = usage.ended_at is not None
        end = _ceil_second(usage.ended_at) if ended else last_whole_hour
        start = cursor.billed_until
        key = (usage.model_version_id, usage.hardware_profile_id)
        if end > start:
            for a, b in split_interval(start, end, book.changes_between(key, start, end)):
                pieces.append((usage, a, b))
            cursor.billed_until = end
        cursor.complete = ended
    destination = (
        lock_periods({period_containing(a) for _, a, _ in pieces}, now=now) if pieces else {}
    )

    records = []
    spend: dict[tuple, Decimal] = defaultdict(Decimal)
    project_spend: dict[tuple, Decimal] = defaultdict(Decimal)
    currencies, project_currencies = {}, {}
    for usage, a, b in pieces:
        deployment, profile = usage.deployment, usage.hardware_profile
        organization = deployment.organization
        currencies[organization.pk] = organization.currency
        price = book.at((usage.model_version_id, profile.pk), a)
        if price is not None:
            per_hour, price_currency, price_id = price.per_hour, price.currency, price.pk
        else:  # no price for this version on this profile: the profile's list price
            per_hour, price_currency, price_id = profile.price_per_hour, profile.currency, None
        if price_currency != organization.currency:
            logger.warning(
                "replica usage %s: priced in %s, the organization pays in %s; not charged",
                usage.pk,
                price_currency,
                organization.currency,
            )
            per_hour, price_id = Decimal(0), None
        seconds = int((b - a).total_seconds())
        period_start = destination[period_containing(a).start]
        records.append(
            DedicatedUsageRecord(
                replica_usage_id=usage.pk,
                start=a,
                end=b,
                organization_id=organization.pk,
                period_start=period_start,
                deployment_id=deployment.pk,
                project_id=deployment.project_id,
                model_version_id=usage.model_version_id,
                hardware_profile_id=profile.pk,
                gpu_count=profile.gpu_count,
                replica_name=usage.replica_name,
                seconds=seconds,
                currency=organization.currency,
                dedicated_price_id=price_id,
                price_per_hour=per_hour,
                ingested_at=now,
            )
        )
        cost = rate_gpu_seconds(seconds=seconds, per_hour=per_hour)
        spend[(organization.pk, period_start)] += cost
        if deployment.project_id is not None:
            project_spend[(deployment.project_id, period_start)] += cost
            project_currencies[deployment.project_id] = organization.currency
    DedicatedUsageRecord.objects.bulk_create(records, ignore_conflicts=True)
    ReplicaUsageCursor.objects.bulk_update(cursors.values(), ["billed_until", "complete"])
    touched = spend_add(spend, currencies=currencies)
    touched_projects = project_spend_add(project_spend, currencies=project_currencies)
    from billing.budgets import budget_alerts_raise, project_budget_alerts_raise

    budget_alerts_raise(spend_rows=touched)
    project_budget_alerts_raise(spend_rows=touched_projects)
    return len(records)
