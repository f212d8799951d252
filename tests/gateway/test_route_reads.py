"""The gateway's route cache under a burst: requests that need the same route while it is read
wait for that one read (a cold or expired cache costs one query, not one per request), and a
caller that goes away does not cancel the read the others wait for. RouteTable over the real
database threads; the route source is a plain function that counts its calls."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gateway.dbthreads import DbThreads
from gateway.routing import RouteTable

pytestmark = pytest.mark.nodb


class SlowSource:
    def __init__(self, seconds: float, fail: bool = False):
        self.seconds, self.fail = seconds, fail
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, *, organization_id: int, model: str):
        with self.lock:
            self.calls += 1
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("the database went away")
        return f"route of {model} for {organization_id}"


def _table(source) -> tuple[RouteTable, DbThreads]:
    db = DbThreads(4)
    table = RouteTable(db, ttl=60, route_for=source, callable_models=None, request_scale_up=None)
    return table, db


def test_a_burst_on_a_cold_cache_is_one_read():
    source = SlowSource(0.2)
    table, db = _table(source)

    async def burst():
        return await asyncio.gather(*(table.route(1, "chat") for _ in range(30)))

    try:
        routes = asyncio.run(burst())
    finally:
        db.stop()
    assert routes == ["route of chat for 1"] * 30
    assert source.calls == 1


def test_fresh_reads_join_one_in_flight_and_other_names_read_their_own():
    source = SlowSource(0.1)
    table, db = _table(source)

    async def burst():
        return await asyncio.gather(
            *(table.route(1, "chat", fresh=True) for _ in range(10)),
            table.route(2, "chat"),
            table.route(1, "other"),
        )

    try:
        routes = asyncio.run(burst())
    finally:
        db.stop()
    assert routes[-2:] == ["route of chat for 2", "route of other for 1"]
    assert source.calls == 3


def test_a_caller_that_goes_away_leaves_the_read_to_the_others():
    source = SlowSource(0.3)
    table, db = _table(source)

    async def run():
        first = asyncio.ensure_future(table.route(1, "chat"))
        await asyncio.sleep(0.05)  # its read is under way
        second = asyncio.ensure_future(table.route(1, "chat"))
        await asyncio.sleep(0.05)
        first.cancel()  # its client disconnected
        return await second, first.cancelled()

    try:
        route, cancelled = asyncio.run(run())
    finally:
        db.stop()
    assert (route, cancelled) == ("route of chat for 1", True)
    assert source.calls == 1


def test_a_failed_read_fails_its_waiters_and_the_next_request_reads_again():
    source = SlowSource(0.1, fail=True)
    table, db = _table(source)

    async def run():
        results = await asyncio.gather(
            *(table.route(1, "chat") for _ in range(5)), return_exceptions=True
        )
        source.fail = False
        return results, await table.route(1, "chat")

    try:
        results, route = asyncio.run(run())
    finally:
        db.stop()
    assert all(isinstance(result, RuntimeError) for result in results)
    assert route == "route of chat for 1"
    assert source.calls == 2
