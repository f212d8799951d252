"""What the gateway reads from the other apps, in one place: routes, models, spend limits,
tokenizer files, and where it reports load. Each runs in a gateway DB thread."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings

from billing.selectors import organization_spend_blocked
from catalog.models import ModelVersion
from deployments.selectors import callable_models, route_for
from deployments.services import deployment_request_scale_up as request_scale_up
from deployments.services import load_report

__all__ = [
    "callable_models",
    "load_report",
    "organization_spend_blocked",
    "request_scale_up",
    "route_for",
    "tokenizer_folder",
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tokenizer_folder(*, version_id: int) -> Path | None:
    """A local folder with the version's tokenizer files, or None when it has no artifacts.

    A local (or file://) artifact folder is read in place; from S3 only the tokenizer files
    are fetched (never the weights), into var/gateway-tokenizers/<version id>/.
    """
    uri = ModelVersion.objects.filter(pk=version_id).values_list("artifact_uri", flat=True).first()
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        folder = Path(parsed.path if parsed.scheme else uri)
        return folder if (folder / "tokenizer.json").exists() else None
    if parsed.scheme != "s3":
        return None
    import boto3

    folder = Path(settings.VAR_DIR) / "gateway-tokenizers" / str(version_id)
    folder.mkdir(parents=True, exist_ok=True)
    client = boto3.client("s3")
    prefix = parsed.path.strip("/")
    for name in TOKENIZER_FILES:
        target = folder / name
        if target.exists():
            continue
        try:
            client.download_file(parsed.netloc, f"{prefix}/{name}" if prefix else name, str(target))
        except client.exceptions.ClientError:
            if name == "tokenizer.json":
                return None  # without it there is nothing to count with
    return folder
