"""Circuit breakers, one per upstream: a replica's endpoint, or a provider connection.

A dead upstream should cost nothing: after `failures` consecutive failures (a refused or
timed-out connect, no first byte in time, a 5xx) its circuit *opens* and no request is sent
to it, not even a connect attempt; the request goes to another replica, or to the
deployment's fallbacks (gateway/fallback.py). After `cooldown` seconds the circuit is
*half-open*: one request at a time is let through as a probe; its success *closes* the
circuit, its failure opens it again for another cool-down. A 429 is neither (the upstream is
alive and asks us to slow down), nor is a client's own error.

State is per gateway process (each process learns on its own, in `failures` requests); that
is enough for its purpose, and it needs no shared store on the request path. Each change is
exported on /metrics (`sirocco_gateway_circuit_state`) and reported to the control plane in
the background (`deployments.services.upstream_circuit_report`: the deployment page shows it),
as unhealthy replicas are reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway import metrics

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
_GAUGE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
# Breakers kept per process; closed ones beyond this are forgotten (they hold nothing).
MAX_BREAKERS = 10_000


@dataclass(slots=True)
class _Breaker:
    state: str = CLOSED
    failures: int = 0  # consecutive
    opened_at: float = 0.0
    probing: bool = False  # a half-open probe is in flight


class Breakers:
    """The circuit breakers of one gateway process. `on_change(upstream, context, state,
    failures)` is called on every state change (the gateway reports it)."""

    def __init__(self, *, failures: int, cooldown: float, on_change: Callable | None = None):
        self.failures = max(1, failures)
        self.cooldown = cooldown
        self._on_change = on_change
        self._breakers: dict[str, _Breaker] = {}

    def available(self, upstream: str) -> bool:
        """Whether a request may be sent now (no side effect: see `begin`)."""
        breaker = self._breakers.get(upstream)
        if breaker is None or breaker.state == CLOSED:
            return True
        if breaker.state == OPEN:
            return time.monotonic() - breaker.opened_at >= self.cooldown
        return not breaker.probing

    def begin(self, upstream: str, context=None) -> bool:
        """A request is about to be sent to `upstream`: False (send nothing) while its circuit
        is open; past the cool-down this request is the half-open probe."""
        breaker = self._breakers.get(upstream)
        if breaker is None or breaker.state == CLOSED:
            return True
        if not self.available(upstream):
            return False
        if breaker.state == OPEN:
            self._move(upstream, breaker, HALF_OPEN, context)
        breaker.probing = True
        return True

    def success(self, upstream: str, context=None) -> None:
        breaker = self._breakers.get(upstream)
        if breaker is None:
            return
        breaker.failures = 0
        breaker.probing = False
        if breaker.state != CLOSED:
            self._move(upstream, breaker, CLOSED, context)

    def failure(self, upstream: str, context=None) -> None:
        breaker = self._breakers.get(upstream)
        if breaker is None:
            if len(self._breakers) >= MAX_BREAKERS:
                self._forget_closed()
            breaker = self._breakers[upstream] = _Breaker()
        breaker.failures += 1
        breaker.probing = False
        if breaker.state == HALF_OPEN or (
            breaker.state == CLOSED and breaker.failures >= self.failures
        ):
            breaker.opened_at = time.monotonic()
            self._move(upstream, breaker, OPEN, context)

    def neither(self, upstream: str) -> None:
        """An answer that says nothing about the upstream's health (a 429): a probe ends."""
        breaker = self._breakers.get(upstream)
        if breaker is not None:
            breaker.probing = False

    def state(self, upstream: str) -> str:
        breaker = self._breakers.get(upstream)
        return breaker.state if breaker is not None else CLOSED

    def _move(self, upstream: str, breaker: _Breaker, state: str, context) -> None:
        breaker.state = state
        metrics.CIRCUIT_STATE.labels(upstream).set(_GAUGE[state])
        metrics.CIRCUIT_TRANSITIONS.labels(upstream, state).inc()
        if self._on_change is not None:
            self._on_change(upstream, context, state, breaker.failures)

    def _forget_closed(self) -> None:
        self._breakers = {u: b for u, b in self._breakers.items() if b.state != CLOSED}
