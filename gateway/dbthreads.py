"""Django ORM calls from the event loop: a few threads that own their database connections.

The ORM is synchronous; running it on the event loop would stall every request. These
threads run selectors for the caches (keys, routes, spend limits) and close their connections
when the gateway stops (a test database can only be dropped once nobody holds it open).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

from django.db import InterfaceError, OperationalError, close_old_connections, connections

_STOP = object()
CALL_TIMEOUT = 10.0


# call_retrying's waits before each retry; None: the last try.
RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, None)


class DatabaseUnavailable(Exception):
    """The control plane's database did not answer in time, or refused the connection: the
    request gets a 503 with Retry-After (gateway/exchange.py), not a 500."""


class DbThreads:
    def __init__(self, count: int, *, name: str = "gateway-db"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True)
            for index in range(count)
        ]
        for thread in self._threads:
            thread.start()

    async def call(self, function: Callable[..., Any], /, **kwargs) -> Any:
        """The function's result; DatabaseUnavailable if it takes over CALL_TIMEOUT seconds
        (the thread finishes it anyway; the request does not wait for a hung database) or the
        database cannot be reached (OperationalError, InterfaceError: down, restarting, a
        connection it closed)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((function, kwargs, future, loop))
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                return await asyncio.shield(future)
        except TimeoutError:
            raise DatabaseUnavailable(f"{function.__name__} took over {CALL_TIMEOUT}s") from None
        except (OperationalError, InterfaceError) as error:
            raise DatabaseUnavailable(f"{function.__name__}: {error}") from error

    async def call_retrying(self, function: Callable[..., Any], /, **kwargs) -> Any:
        """`call`, tried again after 0.25, 0.5, 1 and 2 s when it fails: for a background write
        a request does not wait for (a report whose loss would leave stale state behind, when
        the database is briefly locked or restarting); the last failure is raised."""
        for delay in RETRY_DELAYS:
            try:
                return await self.call(function, **kwargs)
            except Exception:
                if delay is None:
                    raise
            await asyncio.sleep(delay)

    def stop(self, timeout: float = 5) -> None:
        for _ in self._threads:
            self._queue.put(_STOP)
        for thread in self._threads:
            thread.join(timeout)

    def _work(self) -> None:
        try:
            while (item := self._queue.get()) is not _STOP:
                function, kwargs, future, loop = item
                # Drops a connection the server closed or that outlived CONN_MAX_AGE.
                close_old_connections()
                try:
                    result, error = function(**kwargs), None
                except BaseException as exc:
                    result, error = None, exc
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                    loop.call_soon_threadsafe(_settle, future, result, error)
        finally:
            connections.close_all()


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
