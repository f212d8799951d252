"""The gateway's key cache under a burst: requests with the same secret while it is read wait
for that one read, and one whose client goes away mid-read does not cancel it for the others
(they used to get its CancelledError). KeyCache over the real database threads and database."""

from __future__ import annotations

import asyncio

from gateway.auth import KeyCache
from gateway.dbthreads import DbThreads


def test_a_caller_that_goes_away_leaves_the_key_read_to_the_others(
    transactional_db, organization, inference_key
):
    key, secret = inference_key(organization)
    db = DbThreads(2)
    cache = KeyCache(db, ttl=60)
    header = f"Bearer {secret}".encode()

    async def run():
        # The first request's read is under way when the others arrive; then it goes away.
        first = asyncio.ensure_future(cache.authenticate(header))
        await asyncio.sleep(0)
        others = [asyncio.ensure_future(cache.authenticate(header)) for _ in range(5)]
        await asyncio.sleep(0)
        first.cancel()
        callers = await asyncio.gather(*others)
        return callers, first.cancelled()

    try:
        callers, cancelled = asyncio.run(run())
    finally:
        db.stop()
    assert cancelled
    assert {caller.key_id for caller in callers} == {key.id}
