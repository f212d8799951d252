"""Usage events made durable with group commit.

Each request hands its event to one writer thread and waits for the commit before its response
ends. The writer takes everything that queued up while the previous commit ran and writes it
as one INSERT in one transaction: under load many requests share one commit (durability does
not cost a round trip per request); when idle, an event is written as soon as it arrives.
Writing is idempotent (unique request_id, conflicts ignored), so a batch retried after an
error that happened after COMMIT does not double-count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import defaultdict

from django.db import DatabaseError, close_old_connections, connection, transaction

from gateway.models import UsageEvent

logger = logging.getLogger(__name__)

MAX_BATCH = 1000
_STOP = object()


class UsageWriter:
    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="gateway-usage", daemon=True)
        self._thread.start()

    def submit(self, event: UsageEvent) -> asyncio.Future:
        """Queue one event; the future resolves once it is committed."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((event, future, loop))
        return future

    def stop(self, timeout: float = 10) -> None:
        """Write what is queued, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            stopping = False
            while not stopping:
                item = self._queue.get()
                batch = []
                while item is not _STOP:
                    batch.append(item)
                    if len(batch) >= MAX_BATCH:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                stopping = item is _STOP
                if batch:
                    self._write(batch)
        finally:
            connection.close()

    def _write(self, batch: list) -> None:
        delay = 0.05
        while True:
            try:
                with transaction.atomic():
                    UsageEvent.objects.bulk_create(
                        [event for event, _, _ in batch], ignore_conflicts=True
                    )
                break
            except DatabaseError:
                # Keep the events and retry: a request that reached a replica must be billed.
                logger.exception("writing %d usage events failed; retrying", len(batch))
                close_old_connections()
                with contextlib.suppress(DatabaseError):
                    connection.close()
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        by_loop = defaultdict(list)
        for _, future, loop in batch:
            by_loop[loop].append(future)
        for loop, futures in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_resolve_all, futures)


def _resolve_all(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(True)
