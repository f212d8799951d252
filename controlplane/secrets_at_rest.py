"""Secrets we must be able to read back (identity providers' client secrets for single sign-on,
partner providers' credentials) are stored encrypted with Fernet (AES-128-CBC + HMAC-SHA256,
from `cryptography`), never home-made crypto.

One key list for the platform, PROVIDER_CREDENTIAL_KEYS: comma-separated Fernet keys (generate
one with `python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"`).
The first encrypts; every key decrypts (MultiFernet), so a key is rotated by putting a new one
first, running `manage.py rotate_encrypted_secrets` (re-encrypts every column listed in
ENCRYPTED_FIELDS with it), then dropping the old one. The database alone (a dump, a backup)
reveals no secret. Without keys nothing can be stored encrypted: the write is refused with a
message that says what to set.

Callers store the token text (`encrypt`) and read the plain text back only where it is used
(`decrypt`); nothing returns it through an API. (catalog/credentials.py wraps a decrypted
provider credential as a `Secret` whose repr hides it.)
"""

from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from controlplane.errors import ValidationFailed

# Every column that holds a token of this scheme, as (app_label.Model, field): what
# `manage.py rotate_encrypted_secrets` re-encrypts. A new encrypted column is added here.
ENCRYPTED_FIELDS = [
    ("accounts.SingleSignOnConfiguration", "client_secret_encrypted"),
    ("catalog.ProviderConnection", "credential_encrypted"),
]


class EncryptionKeysMissing(ValidationFailed):
    """No usable key is configured, so no secret can be stored (a 400 that says what to set)."""


class SecretUnreadable(Exception):
    """A stored secret cannot be decrypted with any configured key (a key was dropped too soon,
    or the row was copied from another installation)."""


@cache
def _fernet() -> MultiFernet:
    keys = [key.strip() for key in settings.PROVIDER_CREDENTIAL_KEYS if key.strip()]
    if not keys:
        raise EncryptionKeysMissing(
            "The platform has no key to encrypt secrets with: an operator sets "
            "PROVIDER_CREDENTIAL_KEYS (docs/operator-guide.md) and restarts."
        )
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except ValueError:
        raise EncryptionKeysMissing(
            "PROVIDER_CREDENTIAL_KEYS holds a value that is not a Fernet key (32 url-safe "
            "base64-encoded bytes); an operator must fix it."
        ) from None


@receiver(setting_changed)
def _forget_keys(*, setting, **kwargs):
    if setting == "PROVIDER_CREDENTIAL_KEYS":
        _fernet.cache_clear()


def encrypt(plain_text: str) -> str:
    return _fernet().encrypt(plain_text.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken as error:
        raise SecretUnreadable(
            "A stored secret cannot be decrypted with PROVIDER_CREDENTIAL_KEYS; was a key "
            "removed before `manage.py rotate_encrypted_secrets` re-encrypted with its successor?"
        ) from error


def rotate(token: str) -> str:
    """The same secret encrypted with the first (newest) key."""
    try:
        return _fernet().rotate(token.encode()).decode()
    except InvalidToken as error:
        raise SecretUnreadable("A stored secret cannot be decrypted for rotation.") from error
