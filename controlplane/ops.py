"""Who may read the operations endpoint /metrics, on web and on the standalone gateway alike.

/metrics names every tenant's deployments with their request and token counts: it is for the
operators' Prometheus, not for the internet. With METRICS_TOKEN set, a scrape must send
`Authorization: Bearer <METRICS_TOKEN>` (Prometheus: `authorization.credentials_file`, see
docs/operator-guide.md). Without it, only this machine (a loopback client) may read it: the
embedded default on a laptop, or `kubectl port-forward`. The chart's Ingress never routes it.
"""

import hmac
import ipaddress

from django.conf import settings


def _is_loopback(host: str | None) -> bool:
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return False


def metrics_refusal(authorization: str | None, client_host: str | None) -> tuple[int, str] | None:
    """None when the caller may read /metrics; else the status and the message to answer."""
    token = settings.METRICS_TOKEN
    if token:
        scheme, _, supplied = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            supplied.strip().encode(), token.encode()
        ):
            return None
        return 401, "Metrics need 'Authorization: Bearer <METRICS_TOKEN>'."
    if _is_loopback(client_host):
        return None
    return 403, (
        "Metrics are served to this machine only while METRICS_TOKEN is unset. Set METRICS_TOKEN "
        "and scrape with 'Authorization: Bearer <token>'."
    )
