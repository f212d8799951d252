"""Prometheus metrics per deployment. In-flight also feeds the autoscaler (see gateway.load)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

IN_FLIGHT = Gauge(
    "sirocco_gateway_in_flight_requests",
    "Requests being served by a replica of the deployment, in this gateway process",
    ["deployment"],
)
REQUESTS = Counter(
    "sirocco_gateway_requests_total",
    "Requests that reached a replica, by final status",
    ["deployment", "status"],
)
TOKENS = Counter("sirocco_gateway_tokens_total", "Tokens served, as billed", ["deployment", "kind"])
LATENCY = Histogram(
    "sirocco_gateway_request_duration_seconds",
    "From the request's arrival to its last byte",
    ["deployment"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
TTFT = Histogram(
    "sirocco_gateway_time_to_first_token_seconds",
    "From the request's arrival to its first generated text (streaming requests)",
    ["deployment"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
USAGE_SPOOL_BYTES = Gauge(
    "sirocco_gateway_usage_spool_bytes",
    "Usage events in this process's spool files, waiting for the database to take them",
)
PREFIX_ROUTING = Counter(
    "sirocco_gateway_prefix_routing_total",
    "Prefix-aware routing decisions: hit (a replica holding the prompt's prefix), miss (none "
    "known: consistent hash), overloaded (the holder was over the load bound: least loaded)",
    ["deployment", "decision"],
)
REFUSED = Counter(
    "sirocco_gateway_refused_total",
    "Requests answered by the gateway itself, without reaching a replica, by status",
    ["status"],
)

CIRCUIT_STATE = Gauge(
    "sirocco_gateway_circuit_state",
    "Circuit breaker of an upstream in this gateway process: 0 closed, 1 half-open (a probe "
    "allowed), 2 open (no request sent)",
    ["upstream"],
)
CIRCUIT_TRANSITIONS = Counter(
    "sirocco_gateway_circuit_transitions_total",
    "Circuit breaker state changes of an upstream in this gateway process, by new state",
    ["upstream", "state"],
)
FALLBACKS = Counter(
    "sirocco_gateway_fallbacks_total",
    "Requests passed on to a deployment's next fallback target, by why the previous failed",
    ["deployment", "reason"],
)


class DeploymentMetrics:
    """The labelled children of one deployment, looked up once (labels() is not free)."""

    __slots__ = (
        "_label",
        "cached_tokens",
        "completion_tokens",
        "in_flight",
        "latency",
        "prompt_tokens",
        "ttft",
    )

    def __init__(self, deployment_id: str):
        self._label = deployment_id
        self.in_flight = IN_FLIGHT.labels(deployment_id)
        self.prompt_tokens = TOKENS.labels(deployment_id, "prompt")
        self.completion_tokens = TOKENS.labels(deployment_id, "completion")
        # Prompt tokens the replica read from its prefix cache: the hit rate is cached / prompt.
        self.cached_tokens = TOKENS.labels(deployment_id, "cached")
        self.latency = LATENCY.labels(deployment_id)
        self.ttft = TTFT.labels(deployment_id)

    def finished(self, status: int) -> None:
        REQUESTS.labels(self._label, str(status)).inc()


_by_deployment: dict[str, DeploymentMetrics] = {}


def for_deployment(deployment_id: str) -> DeploymentMetrics:
    metrics = _by_deployment.get(deployment_id)
    if metrics is None:
        metrics = _by_deployment[deployment_id] = DeploymentMetrics(deployment_id)
    return metrics
