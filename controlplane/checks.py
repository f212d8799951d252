"""Our own system checks, run by `manage.py check` (and `check --deploy` for the deploy ones)
beside Django's: settings that are fine on a laptop and dangerous in production."""

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

from controlplane.mail import mail_is_delivered


@register(Tags.security, deploy=True)
def check_metrics_token(app_configs, **kwargs):
    if settings.METRICS_TOKEN:
        return []
    return [
        Warning(
            "METRICS_TOKEN is not set: /metrics answers loopback clients only, so Prometheus "
            "cannot scrape it (and a reverse proxy on the same host would make it public).",
            hint="Set METRICS_TOKEN (the chart: secrets.metricsToken) and scrape with "
            "'Authorization: Bearer <token>' (docs/operator-guide.md).",
            id="sirocco.W001",
        )
    ]


@register(Tags.security, deploy=True)
def check_password_reset_mail(app_configs, **kwargs):
    if mail_is_delivered() or settings.DEBUG:
        return []
    return [
        Error(
            f"EMAIL_BACKEND is {settings.EMAIL_BACKEND}: mail is not delivered, so password "
            "reset (how new members set a password) is switched off, and budget alerts reach "
            "nobody.",
            hint="Set EMAIL_URL (smtp+tls://user:password@host:587) or EMAIL_BACKEND to a "
            "backend that sends mail (the chart: secrets.emailUrl).",
            id="sirocco.E001",
        )
    ]
