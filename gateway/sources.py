"""What the gateway reads from the other apps, in one place: routes, models, spend limits and
prices, where the tokenizer files are, and where it reports load and the replicas that failed
it. Each runs in a gateway DB thread, except `spend_period_start` (no database: the billing
calendar)."""

from __future__ import annotations

from datetime import datetime

from billing.periods import period_containing
from billing.selectors import organization_spend_position, project_spend_position
from catalog.models import ModelArtifact, ModelVersion
from catalog.selectors import token_price_ceiling
from deployments.selectors import callable_models, route_for
from deployments.services import deployment_request_scale_up as request_scale_up
from deployments.services import load_report
from deployments.services import replica_unhealthy_report as report_unhealthy
from deployments.services import upstream_circuit_report as report_circuit
from gateway.tokenizer_files import TOKENIZER_FILES, TokenizerSource
from metering.tags import usage_tags_register

__all__ = [
    "callable_models",
    "load_report",
    "organization_spend_position",
    "project_spend_position",
    "report_circuit",
    "report_unhealthy",
    "request_scale_up",
    "route_for",
    "spend_period_start",
    "token_price_ceiling",
    "tokenizer_source",
    "usage_tags_register",
]


def spend_period_start(now: datetime) -> datetime:
    """Where the billing period containing `now` starts (spend limits are per period)."""
    return period_containing(now).start


def tokenizer_source(*, version_id: int) -> TokenizerSource | None:
    """Where the version's tokenizer files are and what the catalog recorded of them; None
    when it has no artifacts. Fetching them (gateway/tokenizer_files.py) is not a database
    call: it runs in a worker thread, not in a DB thread."""
    uri = ModelVersion.objects.filter(pk=version_id).values_list("artifact_uri", flat=True).first()
    if not uri:
        return None
    artifacts = ModelArtifact.objects.filter(version_id=version_id)
    if not artifacts.exists():
        return TokenizerSource(artifact_uri=uri, recorded=None)
    recorded = {
        path: (size, sha256)
        for path, size, sha256 in artifacts.filter(path__in=TOKENIZER_FILES).values_list(
            "path", "size_bytes", "sha256"
        )
    }
    return TokenizerSource(artifact_uri=uri, recorded=recorded)
