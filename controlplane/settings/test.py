"""Test settings: the base settings plus what makes the suite fast and self-contained."""

import os

if not os.environ.get("SECRET_KEY"):
    os.environ["SECRET_KEY"] = "test-only-secret-key-not-for-production"  # noqa: S105

from controlplane.settings.base import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=True)  # noqa: F405
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
LOG_FORMAT = "text"
LOGGING["handlers"]["console"]["formatter"] = "text"  # noqa: F405
LOGGING["root"]["level"] = "WARNING"  # noqa: F405
# Each test process spools usage in a directory of its own: an orphaned spool file of another
# run (a killed one) must not be adopted and shipped into this run's database.
if "GATEWAY_USAGE_SPOOL_DIR" not in os.environ:
    import atexit
    import contextlib
    import tempfile

    GATEWAY_USAGE_SPOOL_DIR = tempfile.mkdtemp(prefix="sirocco-test-usage-spool-")

    def _remove_if_empty(path=GATEWAY_USAGE_SPOOL_DIR):
        with contextlib.suppress(OSError):
            os.rmdir(path)

    atexit.register(_remove_if_empty)
