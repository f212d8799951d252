"""The gateway's settings, read once from Django settings into a frozen object.

Every value has a default in controlplane/settings/base.py (section "Gateway") and an
environment variable of the same name; README's configuration table lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings


@dataclass(frozen=True)
class GatewaySettings:
    max_body_bytes: int
    connect_timeout: float
    first_byte_timeout: float
    idle_timeout: float
    answer_timeout: float
    scale_from_zero_wait: float
    scale_progress_interval: float
    org_rpm_limit: int
    org_tpm_limit: int
    auth_cache_seconds: float
    route_cache_seconds: float
    spend_cache_seconds: float
    usage_spool_dir: str
    usage_spool_after: float
    tokenizer_wait_seconds: float
    usage_synchronous_commit: bool
    load_report_seconds: float
    redis_url: str
    redis_prefix: str
    db_threads: int
    inline_prompt_bytes: int
    prompt_workers: int
    prompt_queue_per_organization: int
    max_choices: int
    tag_values_per_organization: int
    circuit_failures: int
    circuit_cooldown: float

    @classmethod
    def from_django(cls, **overrides) -> GatewaySettings:
        values = {
            "max_body_bytes": settings.GATEWAY_MAX_BODY_BYTES,
            "connect_timeout": settings.GATEWAY_CONNECT_TIMEOUT,
            "first_byte_timeout": settings.GATEWAY_FIRST_BYTE_TIMEOUT,
            "idle_timeout": settings.GATEWAY_IDLE_TIMEOUT,
            "answer_timeout": settings.GATEWAY_ANSWER_TIMEOUT,
            "scale_from_zero_wait": settings.GATEWAY_SCALE_FROM_ZERO_WAIT,
            "scale_progress_interval": settings.GATEWAY_SCALE_PROGRESS_INTERVAL,
            "org_rpm_limit": settings.GATEWAY_ORG_RPM_LIMIT,
            "org_tpm_limit": settings.GATEWAY_ORG_TPM_LIMIT,
            "auth_cache_seconds": settings.GATEWAY_AUTH_CACHE_SECONDS,
            "route_cache_seconds": settings.GATEWAY_ROUTE_CACHE_SECONDS,
            "spend_cache_seconds": settings.GATEWAY_SPEND_CACHE_SECONDS,
            "usage_spool_dir": settings.GATEWAY_USAGE_SPOOL_DIR,
            "usage_spool_after": settings.GATEWAY_USAGE_SPOOL_AFTER_SECONDS,
            "tokenizer_wait_seconds": settings.GATEWAY_TOKENIZER_WAIT_SECONDS,
            "usage_synchronous_commit": settings.GATEWAY_USAGE_SYNCHRONOUS_COMMIT,
            "load_report_seconds": settings.GATEWAY_LOAD_REPORT_SECONDS,
            "redis_url": settings.REDIS_URL,
            "redis_prefix": settings.GATEWAY_REDIS_PREFIX,
            "db_threads": settings.GATEWAY_DB_THREADS,
            "inline_prompt_bytes": settings.GATEWAY_INLINE_PROMPT_BYTES,
            "prompt_workers": settings.GATEWAY_PROMPT_WORKERS,
            "prompt_queue_per_organization": settings.GATEWAY_PROMPT_QUEUE_PER_ORGANIZATION,
            "max_choices": settings.GATEWAY_MAX_CHOICES,
            "tag_values_per_organization": settings.GATEWAY_TAG_VALUES_PER_ORGANIZATION,
            "circuit_failures": settings.GATEWAY_CIRCUIT_FAILURES,
            "circuit_cooldown": settings.GATEWAY_CIRCUIT_COOLDOWN_SECONDS,
        }
        values.update(overrides)
        return cls(**values)
