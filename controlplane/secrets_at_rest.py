"""Secrets we must be able to read back (an identity provider's client secret, a partner's API
credentials) are stored encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`).

Keys come from SECRETS_ENCRYPTION_KEYS: a comma-separated list of Fernet keys (generate one with
`python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"`).
The first key encrypts; every key decrypts (MultiFernet), so a key is rotated by putting a new
one first, running `manage.py rotate_encrypted_secrets` (re-encrypts every stored secret
with it), then dropping the old one. Unset (the embedded default), one key is derived from SECRET_KEY, so
`make run` needs no setup; `check --deploy` warns (sirocco.W002), because rotating SECRET_KEY
would then make every stored secret unreadable.

Callers store the token text (`encrypt`) and read the plain text back only where it is used
(`decrypt`); nothing returns it through an API.
"""

import base64
import hashlib
from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

# Every column that holds a token of this module, as (app_label.Model, field): what
# `manage.py rotate_encrypted_secrets` re-encrypts. A new encrypted column is added here.
ENCRYPTED_FIELDS = [("accounts.SingleSignOnConfiguration", "client_secret_encrypted")]


class SecretUnreadable(Exception):
    """A stored secret cannot be decrypted with any configured key (a key was dropped too soon,
    or the row was copied from another installation)."""


@cache
def _fernet() -> MultiFernet:
    keys = [key.strip() for key in settings.SECRETS_ENCRYPTION_KEYS if key.strip()]
    if not keys:
        # Domain-separated from SECRET_KEY's other uses (sessions, password reset tokens).
        digest = hashlib.sha256(b"sirocco.secrets_at_rest:" + settings.SECRET_KEY.encode()).digest()
        keys = [base64.urlsafe_b64encode(digest).decode()]
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except ValueError as error:
        raise ImproperlyConfigured(
            "SECRETS_ENCRYPTION_KEYS holds a value that is not a Fernet key (32 url-safe "
            "base64-encoded bytes). Generate one with Fernet.generate_key()."
        ) from error


def encrypt(plain_text: str) -> str:
    return _fernet().encrypt(plain_text.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken as error:
        raise SecretUnreadable(
            "A stored secret cannot be decrypted with SECRETS_ENCRYPTION_KEYS; was a key "
            "removed before the secrets were re-encrypted with its successor?"
        ) from error


def rotate(token: str) -> str:
    """The same secret encrypted with the first (newest) key."""
    try:
        return _fernet().rotate(token.encode()).decode()
    except InvalidToken as error:
        raise SecretUnreadable("A stored secret cannot be decrypted for rotation.") from error


@receiver(setting_changed)
def _forget_keys(*, setting, **kwargs):
    if setting in {"SECRETS_ENCRYPTION_KEYS", "SECRET_KEY"}:
        _fernet.cache_clear()
