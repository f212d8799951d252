"""When API keys were last used, recorded off the request path.

REST authentication only notes a key's use in memory; a thread writes the noted uses once a
minute in one UPDATE (the gateway does the same for /v1: gateway/auth.py). So a read request
never writes: a database that is read-only, locked by a long write or down does not fail a GET
for the sake of a "last used" column, and a busy API costs one UPDATE a minute, not one per
request. A write that fails keeps the uses for the next minute; the uses of the last minute
before the process exits are written on the way out when the database lets them.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from datetime import datetime

from django.db import connections

from accounts.services import api_keys_touch

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 60.0


class KeyUseRecorder:
    def __init__(self, interval: float = FLUSH_SECONDS):
        self.interval = interval
        self._lock = threading.Lock()
        self._used: dict[int, datetime] = {}
        self._thread: threading.Thread | None = None

    def note(self, key_id: int, at: datetime) -> None:
        with self._lock:
            self._used[key_id] = at
            if self._thread is None and self.interval:  # 0: written only by flush()
                self._thread = threading.Thread(target=self._run, name="api-key-use", daemon=True)
                self._thread.start()
                atexit.register(self.flush)

    def flush(self) -> int:
        """Write the noted uses now; returns how many keys were written."""
        with self._lock:
            used, self._used = self._used, {}
        if not used:
            return 0
        try:
            api_keys_touch(used=used)
        except Exception:
            with self._lock:  # keep them for the next try; a newer use noted meanwhile wins
                self._used = {**used, **self._used}
            logger.warning("recording API key use failed; trying again later", exc_info=True)
            return 0
        return len(used)

    def _after_fork(self) -> None:
        # A forked child has no copy of the thread; it starts its own on its first use.
        self._lock = threading.Lock()
        self._used, self._thread = {}, None

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.flush()
            # This thread's connection is idle for a minute now: give it back.
            connections.close_all()


recorder = KeyUseRecorder()
os.register_at_fork(after_in_child=recorder._after_fork)
