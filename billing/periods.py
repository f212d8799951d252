"""Billing periods and the boundaries usage is split at. All calendars are UTC.

BILLING_PERIOD chooses the length: `monthly` (calendar months, the default), `weekly` (ISO weeks,
Monday to Monday) or `daily`. Every period starts and ends on a UTC midnight, so a day of usage
never straddles two periods.
"""

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from django.conf import settings

PERIOD_KINDS = ("monthly", "weekly", "daily")


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime  # exclusive

    def __contains__(self, moment: datetime) -> bool:
        return self.start <= moment < self.end

    @property
    def label(self) -> str:
        if self.end - self.start == timedelta(days=1):
            return f"{self.start:%Y-%m-%d}"
        if self.start.day == 1 and self.end.day == 1 and self.end.month != self.start.month:
            return f"{self.start:%Y-%m}"
        return f"{self.start:%Y-%m-%d}..{self.end - timedelta(days=1):%Y-%m-%d}"


def period_kind() -> str:
    kind = getattr(settings, "BILLING_PERIOD", "monthly")
    if kind not in PERIOD_KINDS:
        raise ValueError(f"BILLING_PERIOD={kind!r}: use one of {', '.join(PERIOD_KINDS)}")
    return kind


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def _next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def period_containing(moment: datetime, kind: str | None = None) -> Period:
    kind = kind or period_kind()
    day = moment.astimezone(UTC).date()
    if kind == "monthly":
        first = day.replace(day=1)
        return Period(_midnight(first), _midnight(_next_month(first)))
    if kind == "weekly":
        monday = day - timedelta(days=day.weekday())
        return Period(_midnight(monday), _midnight(monday + timedelta(days=7)))
    return Period(_midnight(day), _midnight(day + timedelta(days=1)))


def period_starting(start: datetime, kind: str | None = None) -> Period:
    period = period_containing(start, kind)
    if period.start != start:
        raise ValueError(f"{start.isoformat()} does not start a billing period")
    return period


def periods_in_month(month: str, kind: str | None = None) -> list[Period]:
    """The periods that start in calendar month `YYYY-MM` (one, for monthly billing)."""
    try:
        first = datetime.strptime(month, "%Y-%m").date()
    except ValueError:
        raise ValueError(f"{month!r} is not a month: use YYYY-MM, such as 2026-03") from None
    periods = []
    moment = _midnight(first)
    end = _midnight(_next_month(first))
    while moment < end:
        period = period_containing(moment, kind)
        if period.start >= moment:
            periods.append(period)
        moment = period.end
    return periods


def day_boundaries(start: datetime, end: datetime) -> Iterator[datetime]:
    """The UTC midnights strictly inside (start, end)."""
    moment = _midnight(start.astimezone(UTC).date() + timedelta(days=1))
    while moment < end:
        yield moment
        moment += timedelta(days=1)


def split_interval(
    start: datetime, end: datetime, extra_boundaries: Iterator[datetime] | list = ()
) -> list[tuple[datetime, datetime]]:
    """[start, end) cut at every UTC midnight inside it and at `extra_boundaries` inside it."""
    cuts = sorted({*day_boundaries(start, end), *(b for b in extra_boundaries if start < b < end)})
    edges = [start, *cuts, end]
    return [(a, b) for a, b in itertools.pairwise(edges) if a < b]
