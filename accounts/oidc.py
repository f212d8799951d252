"""The relying-party side of OpenID Connect, for one organization's identity provider at a time.

Authlib does the protocol (https://docs.authlib.org/en/latest/client/django.html): the
authorization-code flow with PKCE (S256), a `state` and a `nonce` kept in the person's session
and checked on the way back, the code exchanged at the token endpoint with the client secret,
and the ID token's signature verified against the provider's JWKS, with its issuer, audience,
expiry and nonce. Each call builds a client from the organization's configuration (Authlib's
registry is per process; ours is per organization and changes at run time), so nothing about
one organization's provider is cached where another's flow could read it.

What Authlib leaves to us, and this module adds: discovery must name the configured issuer
exactly (OpenID Connect Discovery 1.0, section 4.3), the provider must offer the code flow and
S256, and a token response without an ID token is an error rather than a silent success.
"""

import time
from urllib.parse import urlsplit

import requests
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.django_client import OAuth
from authlib.integrations.django_client.apps import DjangoOAuth2App
from django.conf import settings
from django.urls import reverse
from joserfc.errors import JoseError

from accounts.models import SingleSignOnConfiguration
from controlplane.errors import ValidationFailed
from controlplane.secrets_at_rest import decrypt

SCOPES = "openid email profile"
# How long a started sign-in may take at the provider before its state is refused (seconds).
SIGN_IN_MAX_SECONDS = 10 * 60


class SignInFailed(Exception):
    """The provider's answer cannot sign anyone in. `reason` is a short code for logs and
    tests; `message` is what the person is shown (never a token, code or secret)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def redirect_uri(organization_slug: str) -> str:
    """The callback to register at the provider: absolute, from SIROCCO_PUBLIC_URL."""
    path = reverse("console:sso-callback", kwargs={"slug": organization_slug})
    return settings.SIROCCO_PUBLIC_URL.rstrip("/") + path


def check_issuer_url(issuer: str) -> str:
    """The issuer as stored: https (or http when SSO_ALLOW_HTTP_ISSUERS), no query or fragment."""
    parts = urlsplit(issuer.strip())
    allowed = {"https", "http"} if settings.SSO_ALLOW_HTTP_ISSUERS else {"https"}
    if parts.scheme not in allowed or not parts.netloc:
        raise ValidationFailed(
            "The issuer must be an https:// URL, such as https://login.example.com/realms/acme.",
            field="issuer",
        )
    if parts.query or parts.fragment:
        raise ValidationFailed(
            "The issuer has no query or fragment: give it exactly as the provider's discovery "
            "document names it.",
            field="issuer",
        )
    return issuer.strip()


def discover(issuer: str) -> dict:
    """The provider's discovery document, checked against what we need. Raises ValidationFailed
    (field `issuer`) saying what is wrong, for the person configuring it."""
    url = discovery_url(issuer)
    try:
        response = requests.get(url, timeout=settings.SSO_HTTP_TIMEOUT, allow_redirects=False)
        response.raise_for_status()
        metadata = response.json()
    except (requests.RequestException, ValueError) as error:
        raise ValidationFailed(
            f"Could not read the provider's discovery document at {url} "
            f"({type(error).__name__}). Check the issuer URL and that this platform can reach it.",
            field="issuer",
        ) from error
    if not isinstance(metadata, dict) or metadata.get("issuer") != issuer:
        raise ValidationFailed(
            f"The discovery document at {url} names the issuer "
            f"{metadata.get('issuer') if isinstance(metadata, dict) else None!r}, not {issuer!r}: "
            "give the issuer exactly as the provider names it.",
            field="issuer",
        )
    missing = [
        name
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri")
        if not metadata.get(name)
    ]
    if missing:
        raise ValidationFailed(
            f"The provider's discovery document lacks {', '.join(missing)}.", field="issuer"
        )
    if "code" not in metadata.get("response_types_supported", ["code"]):
        raise ValidationFailed(
            "The provider does not offer the authorization-code flow.", field="issuer"
        )
    methods = metadata.get("code_challenge_methods_supported")
    if methods is not None and "S256" not in methods:
        raise ValidationFailed(
            "The provider does not offer PKCE with S256, which sign-in requires.", field="issuer"
        )
    return metadata


# ID tokens must be signed with the provider's published keys: asymmetric algorithms only (an
# HMAC "signature" keyed with the client secret proves nothing the secret's holders, us
# included, could not forge), and never "none".
ID_TOKEN_ALGORITHMS = {
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
}


def _client(configuration: SingleSignOnConfiguration, metadata: dict) -> DjangoOAuth2App:
    offered = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
    metadata = {
        **metadata,
        "id_token_signing_alg_values_supported": [a for a in offered if a in ID_TOKEN_ALGORITHMS],
    }
    oauth = OAuth()
    client = oauth.register(
        # Authlib keys the session's state data by this name: one organization's state cannot
        # complete another's sign-in.
        name=f"sso-{configuration.organization_id}",
        client_id=configuration.client_id,
        client_secret=decrypt(configuration.client_secret_encrypted),
        client_kwargs={
            "scope": SCOPES,
            "code_challenge_method": "S256",
            "default_timeout": settings.SSO_HTTP_TIMEOUT,
        },
        **metadata,
    )
    client.framework.expires_in = SIGN_IN_MAX_SECONDS
    return client


def authorization_redirect(
    request, configuration: SingleSignOnConfiguration, *, login_hint: str = ""
):
    """The redirect to the provider's authorization endpoint; state, nonce and PKCE verifier
    are kept in the session."""
    metadata = discover(configuration.issuer)
    client = _client(configuration, metadata)
    extra = {"login_hint": login_hint} if login_hint else {}
    return client.authorize_redirect(
        request, redirect_uri(configuration.organization.slug), **extra
    )


def complete_sign_in(request, configuration: SingleSignOnConfiguration) -> dict:
    """Check the provider's answer to our redirect and return the ID token's verified claims."""
    if request.GET.get("error"):
        raise SignInFailed(
            "provider_error",
            f"The identity provider refused the sign-in ({request.GET['error'][:100]}).",
        )
    try:
        metadata = discover(configuration.issuer)
    except ValidationFailed as error:
        raise SignInFailed("discovery_failed", error.message) from error
    client = _client(configuration, metadata)
    # Authlib checks that the state was issued to this session, but not its age.
    started = request.session.get(f"_state_{client.name}_{request.GET.get('state', '')}")
    if not request.GET.get("state") or not started or started.get("exp", 0) < time.time():
        raise SignInFailed(
            "state_mismatch",
            "This sign-in was not started in this browser, or it took too long. Start again.",
        )
    try:
        token = client.authorize_access_token(request)
    except (AuthlibBaseError, JoseError) as error:
        reason = getattr(error, "error", "") or type(error).__name__
        raise SignInFailed(
            "token_rejected",
            f"The identity provider's answer could not be verified ({reason}). Start again.",
        ) from error
    except requests.RequestException as error:
        raise SignInFailed(
            "provider_unreachable",
            "The identity provider could not be reached to finish the sign-in. Try again.",
        ) from error
    claims = token.get("userinfo")
    if not claims:
        raise SignInFailed(
            "no_id_token", "The identity provider sent no ID token; sign-in needs OpenID Connect."
        )
    return dict(claims)
