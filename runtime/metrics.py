"""Prometheus metrics under vLLM's names, so the autoscaler and dashboards read both runtimes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runtime.engine import EngineListener

# vLLM's buckets for vllm:time_to_first_token_seconds.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)


class PrometheusListener(EngineListener):
    def __init__(self, model_name: str, registry: CollectorRegistry):
        def labelled(metric):
            return metric.labels(model_name=model_name)

        label = ["model_name"]
        self.running = labelled(
            Gauge(
                "vllm:num_requests_running",
                "Requests in the running batch.",
                label,
                registry=registry,
            )
        )
        self.waiting = labelled(
            Gauge(
                "vllm:num_requests_waiting",
                "Requests waiting to be scheduled.",
                label,
                registry=registry,
            )
        )
        self.kv_cache_usage = labelled(
            Gauge(
                "vllm:kv_cache_usage_perc",
                "Fraction of KV-cache blocks in use (1 = full).",
                label,
                registry=registry,
            )
        )
        self.prompt_tokens = labelled(
            Counter("vllm:prompt_tokens", "Prompt tokens processed.", label, registry=registry)
        )
        # vLLM v1's prefix-cache counters, in tokens: hit rate = hits / queries.
        self.prefix_cache_queries = labelled(
            Counter(
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                label,
                registry=registry,
            )
        )
        self.prefix_cache_hits = labelled(
            Counter(
                "vllm:prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                label,
                registry=registry,
            )
        )
        self.preemptions = labelled(
            Counter(
                "vllm:num_preemptions",
                "Sequences preempted for want of KV-cache blocks.",
                label,
                registry=registry,
            )
        )
        self.generation_tokens = labelled(
            Counter("vllm:generation_tokens", "Tokens generated.", label, registry=registry)
        )
        self.time_to_first_token = labelled(
            Histogram(
                "vllm:time_to_first_token_seconds",
                "Seconds from arrival to the first generated token.",
                label,
                buckets=TTFT_BUCKETS,
                registry=registry,
            )
        )
        self.e2e_latency = labelled(
            Histogram(
                "vllm:e2e_request_latency_seconds",
                "Seconds from arrival to the last token.",
                label,
                buckets=E2E_BUCKETS,
                registry=registry,
            )
        )
        self._request_success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=registry,
        )
        self._model_name = model_name

    def on_step(self, *, running: int, waiting: int, kv_cache_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_cache_usage.set(kv_cache_usage)

    def on_prompt(self, *, tokens: int) -> None:
        self.prompt_tokens.inc(tokens)

    def on_prefix_cache(self, *, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_cache_queries.inc(queried_tokens)
        self.prefix_cache_hits.inc(hit_tokens)

    def on_preemption(self) -> None:
        self.preemptions.inc()

    def on_generated(self, *, tokens: int) -> None:
        self.generation_tokens.inc(tokens)

    def on_first_token(self, *, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def on_finished(self, *, reason: str, seconds: float, prompt_tokens: int, tokens: int) -> None:
        self.e2e_latency.observe(seconds)
        self._request_success.labels(model_name=self._model_name, finished_reason=reason).inc()
