"""One read at a time per key: callers that need a value while it is being read wait for that
read, so a burst on a cold or expired cache is one query, not one per request. The read runs as
a task of its own: a caller that goes away (its client disconnected) does not cancel it for the
others, and its failure reaches every caller waiting for it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable


class SingleFlight:
    def __init__(self):
        self._reading: dict[Hashable, asyncio.Task] = {}

    async def run(
        self,
        key: Hashable,
        read: Callable[[], Awaitable],
        *,
        on_failure: Callable[[], None] | None = None,
    ):
        """`read()`'s result, from the read under way for `key` if there is one; `on_failure`
        runs once when that read fails or is cancelled."""
        task = self._reading.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(read())
            self._reading[key] = task
            task.add_done_callback(lambda done: self._done(key, done, on_failure))
        return await asyncio.shield(task)

    def _done(self, key: Hashable, task: asyncio.Task, on_failure) -> None:
        if self._reading.get(key) is task:
            del self._reading[key]
        # Retrieved here, even when every caller went away before it failed.
        if (task.cancelled() or task.exception() is not None) and on_failure is not None:
            on_failure()
