"""Whether this installation can deliver mail, or only keeps it on the machine."""

from django.conf import settings

# Backends that never hand mail to a server: the console one prints it to the log (the
# settings' default), the file one writes it to disk, the dummy one drops it.
UNDELIVERED_BACKENDS = {
    "django.core.mail.backends.console.EmailBackend",
    "django.core.mail.backends.filebased.EmailBackend",
    "django.core.mail.backends.dummy.EmailBackend",
}


def mail_is_delivered() -> bool:
    return settings.EMAIL_BACKEND not in UNDELIVERED_BACKENDS


def password_reset_by_mail_allowed() -> bool:
    """A reset link is a login: only by real mail, or on a developer's machine (DEBUG)."""
    return mail_is_delivered() or settings.DEBUG
