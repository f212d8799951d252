"""Provider credentials at rest: Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`) with
keys from the environment, never home-made crypto.

`PROVIDER_CREDENTIAL_KEYS` lists the keys, newest first: the first encrypts, every one
decrypts (`MultiFernet`), so rotation is: put a new key first, run
`manage.py provider_credentials_rotate` (re-encrypts every stored credential with the first
key), then drop the old key. The database alone (a dump, a backup) reveals no credential.

A decrypted credential travels as a `Secret`, whose repr and str hide it, so a log line or
an error report that formats the object it sits in shows `Secret('***')`.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings

from controlplane.errors import ValidationFailed


class Secret:
    """A credential in memory: `reveal()` gives the text; printing it never does."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class CredentialKeysMissing(ValidationFailed):
    pass


def _fernet() -> MultiFernet:
    keys = [key.strip() for key in settings.PROVIDER_CREDENTIAL_KEYS if key.strip()]
    if not keys:
        raise CredentialKeysMissing(
            "The platform has no key to encrypt provider credentials with: set "
            "PROVIDER_CREDENTIAL_KEYS (docs/security.md) and restart.",
            field="credential",
        )
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except ValueError as error:
        raise CredentialKeysMissing(
            f"PROVIDER_CREDENTIAL_KEYS holds a key that is not a Fernet key ({error}).",
            field="credential",
        ) from None


def encrypt(plaintext: str) -> str:
    return _fernet().encrypt(plaintext.encode()).decode("ascii")


def decrypt(token: str) -> Secret:
    """The credential; raises InvalidToken when no configured key decrypts it (a key was
    dropped before rotation finished)."""
    return Secret(_fernet().decrypt(token.encode("ascii")).decode())


def rotate(token: str) -> str:
    """The same credential encrypted with the first key (MultiFernet.rotate)."""
    return _fernet().rotate(token.encode("ascii")).decode("ascii")


__all__ = ["CredentialKeysMissing", "InvalidToken", "Secret", "decrypt", "encrypt", "rotate"]
