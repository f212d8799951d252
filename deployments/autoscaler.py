"""The autoscaler: replicas from the gateway's in-flight figures.

desired = ceil(moving average of in-flight requests ÷ target per replica), clamped to
[min_replicas, max_replicas]. A deployment allowed to reach zero (min_replicas 0 and
scale_to_zero_after_seconds set) goes to zero once nothing was in flight and no request arrived
for that long; it comes back when the gateway asks (services.deployment_request_scale_up).
Scaling up is immediate; scaling down waits SCALE_DOWN_DELAY after the last change, so a burst
that ends does not make the replica count flap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from django.db.models import Q
from django.utils import timezone

from deployments import transitions
from deployments.models import Deployment, LoadReport

# A gateway process that stopped reporting (scaled in, crashed) no longer counts.
REPORT_STALE_SECONDS = 60
SCALE_DOWN_DELAY_SECONDS = 120


@dataclass(frozen=True)
class Decision:
    deployment_id: str
    replicas: int
    reason: str


def _load(deployment: Deployment, reports: list[LoadReport], now: datetime):
    fresh = [r for r in reports if (now - r.reported_at).total_seconds() <= REPORT_STALE_SECONDS]
    average = sum(r.in_flight_average for r in fresh)
    in_flight = sum(r.in_flight for r in fresh)
    last_request = max(
        [r.last_request_at for r in reports if r.last_request_at]
        + [t for t in (deployment.scale_up_requested_at, deployment.created_at) if t],
        default=None,
    )
    return average, in_flight, last_request


def decide(deployment: Deployment, reports: list[LoadReport], now: datetime) -> Decision | None:
    """What the replica count should be now, or None to leave it."""
    average, in_flight, last_request = _load(deployment, reports, now)
    current = deployment.desired_replicas
    wanted = math.ceil(average / deployment.target_in_flight_per_replica - 1e-9)
    wanted = max(wanted, math.ceil(in_flight / deployment.target_in_flight_per_replica - 1e-9))
    reason = (
        f"{average:.1f} requests in flight on average, target "
        f"{deployment.target_in_flight_per_replica} per replica"
    )
    idle_for = (now - last_request).total_seconds() if last_request else None
    can_zero = deployment.min_replicas == 0 and deployment.scale_to_zero_after_seconds is not None
    if can_zero and in_flight == 0 and idle_for is not None:
        if idle_for >= deployment.scale_to_zero_after_seconds:
            wanted, reason = 0, f"no request for {int(idle_for)} s"
        else:
            wanted = max(wanted, 1 if current else 0)
    elif current > 0 or deployment.min_replicas > 0:
        wanted = max(wanted, 1)
    wanted = min(max(wanted, deployment.min_replicas), deployment.max_replicas)
    if wanted == current:
        return None
    if wanted < current and deployment.last_scaled_at and wanted > 0:
        since = (now - deployment.last_scaled_at).total_seconds()
        if since < SCALE_DOWN_DELAY_SECONDS:
            return None
    if current == 0 and wanted > 0 and in_flight == 0 and average < 0.5:
        return None  # only a request (the gateway's scale-up call) wakes a sleeping deployment
    return Decision(str(deployment.pk), wanted, reason)


def autoscale(*, now: datetime | None = None) -> list[Decision]:
    """One tick over every deployment that can scale. Writes only where the count changes."""
    now = now or timezone.now()
    scalable = [
        deployment
        for deployment in Deployment.objects.filter(
            pool=None, status__in=(Deployment.Status.READY, Deployment.Status.SCALING)
        )
        # Something to decide: a range of replicas, or a count off its bounds.
        if deployment.min_replicas != deployment.max_replicas
        or deployment.desired_replicas != deployment.min_replicas
    ]
    if not scalable:
        return []
    reports: dict = {}
    members = dict(
        Deployment.objects.filter(pool__in=[d.pk for d in scalable]).values_list("pk", "pool_id")
    )
    for report in LoadReport.objects.filter(
        deployment_id__in=[d.pk for d in scalable] + list(members)
    ):
        owner = members.get(report.deployment_id, report.deployment_id)
        reports.setdefault(owner, []).append(report)
    decisions = []
    for deployment in scalable:
        decision = decide(deployment, reports.get(deployment.pk, []), now)
        if decision is not None and _apply(deployment, decision, now):
            decisions.append(decision)
    return decisions


def _apply(deployment: Deployment, decision: Decision, now: datetime) -> bool:
    up = decision.replicas > deployment.desired_replicas
    return transitions.scaled(
        deployment.pk,
        replicas=decision.replicas,
        reason="ScaledUp" if up else ("ScaledToZero" if not decision.replicas else "ScaledDown"),
        message=f"{deployment.desired_replicas} → {decision.replicas} replicas: {decision.reason}.",
        # Unless changed meanwhile (a request woke it, a customer scaled it).
        where=Q(desired_replicas=deployment.desired_replicas),
        now=now,
    )
