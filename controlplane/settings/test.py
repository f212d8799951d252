"""Test settings: the base settings plus what makes the suite fast and self-contained."""

import os

if not os.environ.get("SECRET_KEY"):
    os.environ["SECRET_KEY"] = "test-only-secret-key-not-for-production"  # noqa: S105

from controlplane.settings.base import *  # noqa: F403

# Two keys, so that tests can rotate: the first encrypts, both decrypt.
PROVIDER_CREDENTIAL_KEYS = env.list(  # noqa: F405
    "PROVIDER_CREDENTIAL_KEYS",
    default=[
        "2zq0cYl1N3T6mXo8ZpGZbT6s3P4nqS0n0JYd3QmYw2c=",
        "T8cLhJbQ1y3m0O5u4bq9bq1mQzN3pWf6xk7u1m2j3k4=",
    ],
)

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=True)  # noqa: F405
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
LOG_FORMAT = "text"
LOGGING["handlers"]["console"]["formatter"] = "text"  # noqa: F405
LOGGING["root"]["level"] = "WARNING"  # noqa: F405
# Each test process spools usage in a directory of its own: an orphaned spool file of another
# run (a killed one) must not be adopted and shipped into this run's database. The spool
# makes the directory only if it ever spools.
if "GATEWAY_USAGE_SPOOL_DIR" not in os.environ:
    import secrets
    import tempfile

    GATEWAY_USAGE_SPOOL_DIR = os.path.join(
        tempfile.gettempdir(), f"sirocco-test-usage-spool-{os.getpid()}-{secrets.token_hex(4)}"
    )
