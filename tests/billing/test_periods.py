from datetime import UTC, datetime

import pytest

from billing.periods import period_containing, periods_in_month, split_interval

pytestmark = pytest.mark.nodb


def at(*args):
    return datetime(*args, tzinfo=UTC)


def test_monthly_periods_are_calendar_months():
    period = period_containing(at(2026, 12, 31, 23, 59), "monthly")
    assert (period.start, period.end) == (at(2026, 12, 1), at(2027, 1, 1))
    assert period.label == "2026-12"


def test_weekly_and_daily_periods():
    week = period_containing(at(2026, 3, 5, 12), "weekly")  # a Thursday
    assert (week.start, week.end) == (at(2026, 3, 2), at(2026, 3, 9))
    day = period_containing(at(2026, 3, 5, 12), "daily")
    assert (day.start, day.end, day.label) == (at(2026, 3, 5), at(2026, 3, 6), "2026-03-05")


def test_periods_in_month():
    assert [p.start for p in periods_in_month("2026-03", "monthly")] == [at(2026, 3, 1)]
    assert len(periods_in_month("2026-02", "daily")) == 28
    assert [p.start.day for p in periods_in_month("2026-03", "weekly")] == [2, 9, 16, 23, 30]
    with pytest.raises(ValueError, match="YYYY-MM"):
        periods_in_month("March")


def test_intervals_split_at_midnights_and_given_boundaries():
    parts = split_interval(at(2026, 1, 31, 22), at(2026, 2, 2, 1), [at(2026, 2, 1, 12)])
    assert parts == [
        (at(2026, 1, 31, 22), at(2026, 2, 1)),
        (at(2026, 2, 1), at(2026, 2, 1, 12)),
        (at(2026, 2, 1, 12), at(2026, 2, 2)),
        (at(2026, 2, 2), at(2026, 2, 2, 1)),
    ]
    assert split_interval(at(2026, 1, 1), at(2026, 1, 1)) == []
