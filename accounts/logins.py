"""How console and admin logins are told apart for brute-force lockout (django-axes).

Failures are counted per account name, whatever address they come from: 40 guesses at one
password must not get through, from one address or from many. Addresses are not locked (a
company's staff share one NAT address); they are recorded, taken from X-Forwarded-For when a
trusted proxy (the Ingress) put them there. Settings: LOGIN_FAILURE_LIMIT,
LOGIN_LOCKOUT_MINUTES, TRUSTED_PROXY_COUNT (controlplane/settings/base.py).
"""

from django.conf import settings


def login_username(request, credentials: dict | None) -> str:
    """The account a login names, as one key: `Ana@Example.com ` and `ana@example.com` are
    the same account, so they share one failure count."""
    if credentials and credentials.get("username"):
        name = credentials["username"]
    else:
        name = request.POST.get("username", "") if request is not None else ""
    return str(name).strip().lower()


def client_ip(request) -> str | None:
    """The caller's address: REMOTE_ADDR, or the entry that the trusted proxies in front of us
    appended to X-Forwarded-For (entries further left are whatever the client sent)."""
    count = settings.TRUSTED_PROXY_COUNT
    if count > 0:
        forwarded = [
            part.strip()
            for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")
            if part.strip()
        ]
        if len(forwarded) >= count:
            return forwarded[-count]
    return request.META.get("REMOTE_ADDR")
