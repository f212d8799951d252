"""Provider credentials at rest: the platform's one encryption scheme and key list
(controlplane/secrets_at_rest.py: Fernet, keys from PROVIDER_CREDENTIAL_KEYS, rotated with
`manage.py rotate_encrypted_secrets`); this module only wraps a decrypted credential as a
`Secret` for the gateway.

A decrypted credential travels as a `Secret`, whose repr and str hide it, so a log line or
an error report that formats the object it sits in shows `Secret('***')`.
"""

from __future__ import annotations

from controlplane.secrets_at_rest import EncryptionKeysMissing, SecretUnreadable, encrypt
from controlplane.secrets_at_rest import decrypt as decrypt_text


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


def decrypt(token: str) -> Secret:
    """The credential; raises SecretUnreadable when no configured key decrypts it (a key was
    dropped before rotation finished), EncryptionKeysMissing when none is configured."""
    return Secret(decrypt_text(token))


__all__ = ["EncryptionKeysMissing", "Secret", "SecretUnreadable", "decrypt", "encrypt"]
