"""REST authentication: `Authorization: Bearer sk-…` API keys, or a console session."""

from django.utils import timezone
from rest_framework import authentication, exceptions

from accounts.key_use import recorder as key_use
from accounts.models import APIKey
from accounts.selectors import api_key_by_secret


class APIKeyPrincipal:
    """`request.user` for key-authenticated requests: the key acts, not a person."""

    is_authenticated = True
    is_anonymous = False
    is_staff = False
    pk = None

    def __init__(self, api_key: APIKey):
        self.api_key = api_key

    def __str__(self):
        return f"api-key {self.api_key.display_prefix}"


class APIKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1").split()
        if not header or header[0].lower() != self.keyword.lower():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed(
                "Malformed Authorization header. Send 'Authorization: Bearer sk-…'."
            )
        key = api_key_by_secret(header[1])
        if key is None:
            raise exceptions.AuthenticationFailed(
                "Invalid API key. Check it was copied whole, or create a new one in the console."
            )
        if key.revoked_at is not None:
            raise exceptions.AuthenticationFailed(
                f"This API key was revoked on {key.revoked_at:%Y-%m-%d %H:%M} UTC. Use another key."
            )
        if key.expires_at is not None and key.expires_at <= timezone.now():
            raise exceptions.AuthenticationFailed(
                f"This API key expired on {key.expires_at:%Y-%m-%d %H:%M} UTC. Create a new one."
            )
        if not key.organization.is_active:
            raise exceptions.AuthenticationFailed(
                "This organization is suspended. Contact the platform operators."
            )
        if not key.has_scope(APIKey.Scope.MANAGEMENT):
            raise exceptions.PermissionDenied(
                "This API key has only the 'inference' scope; the REST API needs a key with "
                "the 'management' scope."
            )
        key_use.note(key.pk, timezone.now())  # written off the request path
        return APIKeyPrincipal(key), key

    def authenticate_header(self, request):
        return f'{self.keyword} realm="sirocco"'


class OrganizationSessionAuthentication(authentication.SessionAuthentication):
    """The console's session, for the browsable API and the console's own fetches (CSRF on)."""
