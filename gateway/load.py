"""In-flight requests per deployment, reported to the control plane for the autoscaler.

Every GATEWAY_LOAD_REPORT_SECONDS this process reports, for each deployment it served, the
time-averaged number of requests in flight over the interval (smoother than a snapshot),
the requests that started in it, and when the last one did. Reporting runs off the hot path:
the request path only adds and subtracts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Load:
    in_flight: int = 0
    area: float = 0.0  # in-flight x seconds since the last report
    changed: float = 0.0
    requests: int = 0
    last_request_at: datetime | None = None


class LoadTracker:
    def __init__(self):
        self._loads: dict = {}
        self.source = f"gateway:{socket.gethostname()}:{os.getpid()}"

    def started(self, deployment_id) -> None:
        now = time.monotonic()
        load = self._loads.get(deployment_id)
        if load is None:
            load = self._loads[deployment_id] = _Load(changed=now)
        load.area += load.in_flight * (now - load.changed)
        load.changed = now
        load.in_flight += 1
        load.requests += 1
        load.last_request_at = datetime.now(UTC)

    def finished(self, deployment_id) -> None:
        now = time.monotonic()
        load = self._loads[deployment_id]
        load.area += load.in_flight * (now - load.changed)
        load.changed = now
        load.in_flight -= 1

    def in_flight(self, deployment_id) -> int:
        load = self._loads.get(deployment_id)
        return load.in_flight if load else 0

    def take_reports(self, interval: float) -> list[dict]:
        """One report per deployment with traffic since the last call; resets the counters."""
        now = time.monotonic()
        reports = []
        for deployment_id, load in list(self._loads.items()):
            load.area += load.in_flight * (now - load.changed)
            load.changed = now
            reports.append(
                {
                    "deployment_id": deployment_id,
                    "in_flight": round(load.area / interval, 3) if interval > 0 else 0.0,
                    "requests": load.requests,
                    "last_request_at": load.last_request_at,
                }
            )
            if load.in_flight == 0 and load.requests == 0:
                # Reported idle once (the autoscaler saw zero); forget it until it is used.
                del self._loads[deployment_id]
            else:
                load.area = 0.0
                load.requests = 0
        return reports


async def report_load_forever(tracker: LoadTracker, db, report: Callable, interval: float):
    while True:
        await asyncio.sleep(interval)
        for entry in tracker.take_reports(interval):
            try:
                await db.call(report, source=tracker.source, **entry)
            except Exception:
                logger.warning("reporting load of %s failed", entry["deployment_id"], exc_info=True)
