"""Settings for every environment, read from the environment (12-factor).

Thin per-environment files (`test.py`) import this one and override a few values.
The embedded default (`make run`) needs no variables at all; production sets at least
SECRET_KEY, DATABASE_URL, CELERY_BROKER_URL and REDIS_URL (see README's configuration table).
"""

from datetime import timedelta
from pathlib import Path

import environ
from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured

env = environ.Env()

BASE_DIR = Path(__file__).resolve().parent.parent.parent
# Everything the embedded default writes (SQLite files, artifacts, logs) lives here.
VAR_DIR = Path(env.str("SIROCCO_VAR_DIR", default=str(BASE_DIR / "var")))

DEBUG = env.bool("DEBUG", default=False)

SECRET_KEY = env.str("SECRET_KEY", default="")
SECRET_KEY_FILE = VAR_DIR / "secret_key"
if not SECRET_KEY and SECRET_KEY_FILE.is_file():
    # `make run` generates this file and exports it; a management command run beside it
    # (`manage.py create_api_key` in another terminal) reads it, so it needs no variable either.
    SECRET_KEY = SECRET_KEY_FILE.read_text().strip()
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set SECRET_KEY to a long random string "
            "(`make run` generates one in var/secret_key), or DEBUG=true for local development."
        )
    SECRET_KEY = "insecure-debug-only-key"  # noqa: S105 - only ever used with DEBUG on

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
SIROCCO_PORT = env.int("SIROCCO_PORT", default=8000)
# The URL customers and the console use to reach the platform (console snippets, emails).
SIROCCO_PUBLIC_URL = env.str("SIROCCO_PUBLIC_URL", default=f"http://127.0.0.1:{SIROCCO_PORT}")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "csp",
    "controlplane",
    "accounts",
    "catalog",
    "deployments",
    "metering",
    "gateway",
    "billing",
    "console",
    # Last: its checks want the auth backends and middleware below.
    "axes",
]

MIDDLEWARE = [
    "controlplane.middleware.RequestIdMiddleware",
    "controlplane.middleware.PrometheusMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Turns a locked-out login into the lockout page (django-axes); last, as its docs say.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "controlplane.urls"
ASGI_APPLICATION = "controlplane.asgi.application"
WSGI_APPLICATION = "controlplane.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
# Embedded default: one SQLite file under var/. WAL plus IMMEDIATE transactions let the web
# process and the Celery worker write the same file without "database is locked" errors.
DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'sirocco.sqlite3'}")
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            # How long a write waits for another's write lock before it fails (a REST write
            # then answers 503 database_busy with Retry-After).
            "timeout": env.float("SQLITE_BUSY_TIMEOUT", default=20),
        }
    )
else:
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DATABASE_CONN_MAX_AGE", default=60))
    DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
    # A database that cannot be reached fails a request in seconds (a 503 with Retry-After)
    # rather than after the kernel's TCP retries (minutes); libpq's default is to wait forever.
    # https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNECT-CONNECT-TIMEOUT
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
        "connect_timeout", env.int("DATABASE_CONNECT_TIMEOUT", default=5)
    )
    # A server or network that vanishes under an open connection (no RST: a host gone, a
    # partition) is noticed by the kernel within about 30 s instead of TCP's ~15 minutes of
    # retransmissions. Safe for long statements: a live server acknowledges while it works.
    DATABASES["default"]["OPTIONS"].update(
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
        tcp_user_timeout=30_000,  # milliseconds
    )
# How long the web and gateway processes' statements may wait for a lock, and run, on
# PostgreSQL before the request answers 503 (controlplane/dbbounds.py; Celery workers unbound).
DATABASE_LOCK_TIMEOUT = env.float("DATABASE_LOCK_TIMEOUT", default=5)
DATABASE_STATEMENT_TIMEOUT = env.float("DATABASE_STATEMENT_TIMEOUT", default=10)
# Lets engineers (and CI jobs) that share one PostgreSQL server use separate test databases.
DATABASES["default"]["TEST"] = {"NAME": env.str("TEST_DATABASE_NAME", default=None)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, caches ---------------------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "sirocco",
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- Partner models -------------------------------------------------------------------------
# Fernet keys (44 characters of url-safe base64 each: `python -c "from cryptography.fernet
# import Fernet; print(Fernet.generate_key().decode())"`) that encrypt provider credentials
# at rest, and identity providers' client secrets (single sign-on, controlplane/secrets_at_rest.py);
# the first encrypts, all decrypt. To rotate: put a new key first, run
# `manage.py rotate_encrypted_secrets` (both kinds), then drop the old key (docs/security.md).
PROVIDER_CREDENTIAL_KEYS = env.list("PROVIDER_CREDENTIAL_KEYS", default=[])

# --- Gateway (/v1) ---------------------------------------------------------------------------
# Limits for each organization, on top of each key's own rpm_limit/tpm_limit (0: no limit).
GATEWAY_ORG_RPM_LIMIT = env.int("GATEWAY_ORG_RPM_LIMIT", default=10_000)
GATEWAY_ORG_TPM_LIMIT = env.int("GATEWAY_ORG_TPM_LIMIT", default=2_000_000)
GATEWAY_MAX_BODY_BYTES = env.int("GATEWAY_MAX_BODY_BYTES", default=4 * 1024 * 1024)
# Upstream timeouts, seconds: TCP connect; until the replica's response headers (for a
# non-streaming request: the whole generation); and between two reads of its body.
GATEWAY_CONNECT_TIMEOUT = env.float("GATEWAY_CONNECT_TIMEOUT", default=3.0)
GATEWAY_FIRST_BYTE_TIMEOUT = env.float("GATEWAY_FIRST_BYTE_TIMEOUT", default=600.0)
GATEWAY_IDLE_TIMEOUT = env.float("GATEWAY_IDLE_TIMEOUT", default=120.0)
# The most a streamed answer may last, however steadily it comes (a provider trickling forever).
GATEWAY_ANSWER_TIMEOUT = env.float("GATEWAY_ANSWER_TIMEOUT", default=3600.0)
# How long a request waits for a deployment at zero replicas to get one; streaming requests
# get an SSE comment with progress every GATEWAY_SCALE_PROGRESS_INTERVAL seconds meanwhile.
GATEWAY_SCALE_FROM_ZERO_WAIT = env.float("GATEWAY_SCALE_FROM_ZERO_WAIT", default=300.0)
GATEWAY_SCALE_PROGRESS_INTERVAL = env.float("GATEWAY_SCALE_PROGRESS_INTERVAL", default=5.0)
GATEWAY_AUTH_CACHE_SECONDS = env.float("GATEWAY_AUTH_CACHE_SECONDS", default=30.0)
GATEWAY_ROUTE_CACHE_SECONDS = env.float("GATEWAY_ROUTE_CACHE_SECONDS", default=2.0)
GATEWAY_SPEND_CACHE_SECONDS = env.float("GATEWAY_SPEND_CACHE_SECONDS", default=15.0)
# A response's last byte waits until its usage event is durable: committed to the database,
# or, when the database does not commit within GATEWAY_USAGE_SPOOL_AFTER_SECONDS, appended
# and fsynced to a spool file in GATEWAY_USAGE_SPOOL_DIR, shipped to the database once it
# answers (gateway/spool.py). The directory must be on a local filesystem (flock) that
# outlives the process: the chart mounts a volume there.
GATEWAY_USAGE_SPOOL_DIR = env.str("GATEWAY_USAGE_SPOOL_DIR", default=str(VAR_DIR / "usage-spool"))
GATEWAY_USAGE_SPOOL_AFTER_SECONDS = env.float("GATEWAY_USAGE_SPOOL_AFTER_SECONDS", default=0.5)
# A billed count (a stream broken before its usage) waits at most this long for the model's
# tokenizer files to be fetched; after that it is billed with the estimate (logged).
GATEWAY_TOKENIZER_WAIT_SECONDS = env.float("GATEWAY_TOKENIZER_WAIT_SECONDS", default=10.0)
# PostgreSQL only. On (the default), a usage event is on disk before its response ends. Off,
# the commit returns before the WAL is flushed: the gateway still waits for it (a crashed
# gateway loses nothing), but a crash of the database server itself may lose the last
# ~0.6 s of events. https://www.postgresql.org/docs/current/wal-async-commit.html
GATEWAY_USAGE_SYNCHRONOUS_COMMIT = env.bool("GATEWAY_USAGE_SYNCHRONOUS_COMMIT", default=True)
GATEWAY_LOAD_REPORT_SECONDS = env.float("GATEWAY_LOAD_REPORT_SECONDS", default=5.0)
# Redis keys and channels of the gateway (rate-limit buckets, key revocations) start with this.
GATEWAY_REDIS_PREFIX = env.str("GATEWAY_REDIS_PREFIX", default="sirocco:gateway:")
GATEWAY_DB_THREADS = env.int("GATEWAY_DB_THREADS", default=4)
# Request bodies above GATEWAY_INLINE_PROMPT_BYTES are parsed and tokenized in
# GATEWAY_PROMPT_WORKERS worker processes, shared round-robin between organizations; an
# organization with GATEWAY_PROMPT_QUEUE_PER_ORGANIZATION of them queued or running gets 429.
GATEWAY_INLINE_PROMPT_BYTES = env.int("GATEWAY_INLINE_PROMPT_BYTES", default=8192)
# The most choices (`n`) one request may ask for: each reserves max_tokens against the limits
# and the spend limit, and each is generated (and billed); above it, 400 naming `n`.
GATEWAY_MAX_CHOICES = env.int("GATEWAY_MAX_CHOICES", default=16)
# Circuit breakers per upstream (gateway/circuit.py): open after this many consecutive
# failures (refused connect, no first byte in time, 5xx); a probe is let through after the
# cool-down.
GATEWAY_CIRCUIT_FAILURES = env.int("GATEWAY_CIRCUIT_FAILURES", default=5)
GATEWAY_CIRCUIT_COOLDOWN_SECONDS = env.float("GATEWAY_CIRCUIT_COOLDOWN_SECONDS", default=10.0)
GATEWAY_PROMPT_WORKERS = env.int("GATEWAY_PROMPT_WORKERS", default=2)
GATEWAY_PROMPT_QUEUE_PER_ORGANIZATION = env.int("GATEWAY_PROMPT_QUEUE_PER_ORGANIZATION", default=8)
# Distinct `metadata` key=value pairs an organization's requests may use in all (a request
# adding a pair past it is a 400): keeps usage grouped by tag a bounded report.
GATEWAY_TAG_VALUES_PER_ORGANIZATION = env.int("GATEWAY_TAG_VALUES_PER_ORGANIZATION", default=10_000)

# --- Operations endpoints ---------------------------------------------------------------------
# /metrics (web and the standalone gateway) lists every tenant's deployments. Set: a scrape must
# send `Authorization: Bearer <METRICS_TOKEN>`. Unset: served to loopback clients only.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")

# --- Celery ---------------------------------------------------------------------------------
# Embedded default: kombu's SQLAlchemy transport on a SQLite file, so a real worker process
# runs with no broker server. Production: redis://... (or amqp://...).
CELERY_BROKER_URL = env.str(
    "CELERY_BROKER_URL", default=f"sqla+sqlite:///{VAR_DIR / 'celery-broker.sqlite3'}"
)
if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # Redis redelivers unacknowledged tasks after this long; it must exceed the longest task.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 16 * 60}
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
# Every periodic task of the platform, in one place (each app adds its entries here).
CELERY_BEAT_SCHEDULE: dict = {
    # Re-reconcile deployments that drifted or stalled; clean up what nothing owns.
    "deployments-reconcile-sweep": {
        "task": "deployments.tasks.reconcile_sweep",
        "schedule": env.float("DEPLOYMENTS_SWEEP_SECONDS", default=30.0),
    },
    # Resume deployments whose pass chain a killed worker broke (one query; no write when none).
    "deployments-reconcile-stalled": {
        "task": "deployments.tasks.reconcile_stalled",
        "schedule": env.float("DEPLOYMENTS_STALLED_CHECK_SECONDS", default=3.0),
    },
    # Replica counts from the gateway's in-flight reports (and scale to zero when idle).
    "deployments-autoscale-tick": {
        "task": "deployments.tasks.autoscale_tick",
        "schedule": env.float("DEPLOYMENTS_AUTOSCALE_SECONDS", default=10.0),
    },
}

# --- Deployments ------------------------------------------------------------------------------
# Where replicas run: `local` (runtime processes on this machine, the embedded default) or
# `kubernetes` (pods through the official client; kubeconfig or in-cluster config).
SIROCCO_PROVISIONER = env.str("SIROCCO_PROVISIONER", default="local")
# Kubernetes: a kubeconfig file (and context), else the in-cluster service account, else ~/.kube.
SIROCCO_KUBECONFIG = env.str("SIROCCO_KUBECONFIG", default="")
SIROCCO_KUBE_CONTEXT = env.str("SIROCCO_KUBE_CONTEXT", default="")
SIROCCO_K8S_REQUEST_TIMEOUT = env.float("SIROCCO_K8S_REQUEST_TIMEOUT", default=10.0)
SIROCCO_K8S_NAMESPACE_PREFIX = env.str("SIROCCO_K8S_NAMESPACE_PREFIX", default="sirocco-")
# Only the gateway's pods may reach model servers (their NetworkPolicy admits these labels).
SIROCCO_K8S_GATEWAY_NAMESPACE = env.str("SIROCCO_K8S_GATEWAY_NAMESPACE", default="sirocco")
SIROCCO_K8S_GATEWAY_POD_LABELS = env.dict(
    "SIROCCO_K8S_GATEWAY_POD_LABELS",
    default={"app.kubernetes.io/name": "sirocco", "app.kubernetes.io/component": "gateway"},
)
# The init container that copies weights from S3 into the pod (needs python and boto3).
SIROCCO_K8S_FETCHER_IMAGE = env.str("SIROCCO_K8S_FETCHER_IMAGE", default="sirocco/runtime:0.1.0")
SIROCCO_K8S_ARTIFACT_SECRET = env.str(
    "SIROCCO_K8S_ARTIFACT_SECRET", default="sirocco-artifact-store"
)
SIROCCO_K8S_AWS_ENDPOINT_URL = env.str("SIROCCO_K8S_AWS_ENDPOINT_URL", default="")
# The worker's rights inside each organization's namespace: this ClusterRole, bound there by a
# RoleBinding the provisioner applies with the namespace, to this account
# (system:serviceaccount:<namespace>:<name>). The chart sets both; empty: no binding.
SIROCCO_K8S_TENANT_ROLE = env.str("SIROCCO_K8S_TENANT_ROLE", default="")
SIROCCO_K8S_TENANT_ROLE_SUBJECT = env.str("SIROCCO_K8S_TENANT_ROLE_SUBJECT", default="")
# Model pods may connect to cluster DNS and to these CIDRs (minus the exceptions) on these TCP
# ports, nothing else: the artifact store their init container copies weights from. Default:
# HTTPS to the internet (S3), not to private ranges or the metadata service (169.254.0.0/16).
SIROCCO_K8S_ARTIFACT_EGRESS_CIDRS = env.list(
    "SIROCCO_K8S_ARTIFACT_EGRESS_CIDRS", default=["0.0.0.0/0"]
)
SIROCCO_K8S_ARTIFACT_EGRESS_EXCEPT = env.list(
    "SIROCCO_K8S_ARTIFACT_EGRESS_EXCEPT",
    default=["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16"],
)
SIROCCO_K8S_ARTIFACT_EGRESS_PORTS = env.list(
    "SIROCCO_K8S_ARTIFACT_EGRESS_PORTS", cast=int, default=[443]
)
DEPLOYMENTS_MAX_REPLICAS = env.int("DEPLOYMENTS_MAX_REPLICAS", default=16)
# The most fallback targets one deployment may name (each is tried in turn before the first
# byte; a long list only adds latency to a request that fails anyway).
DEPLOYMENTS_MAX_FALLBACKS = env.int("DEPLOYMENTS_MAX_FALLBACKS", default=3)
# Autoscaler: time constant of the in-flight moving average (the beat schedule sets how often
# it ticks: DEPLOYMENTS_AUTOSCALE_SECONDS, and the drift sweep: DEPLOYMENTS_SWEEP_SECONDS).
DEPLOYMENTS_LOAD_AVERAGE_SECONDS = env.float("DEPLOYMENTS_LOAD_AVERAGE_SECONDS", default=30.0)

# --- Auth -----------------------------------------------------------------------------------
AUTH_USER_MODEL = "accounts.User"
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
SESSION_COOKIE_HTTPONLY = True
# Brute-force lockout for the console and /admin/ logins (django-axes, its database handler:
# the same on SQLite and PostgreSQL, and every failure is a row operators can read in the admin).
# After LOGIN_FAILURE_LIMIT failures for one account within LOGIN_LOCKOUT_MINUTES, that account
# cannot log in for LOGIN_LOCKOUT_MINUTES (429 and a page that says so); operators unlock with
# `manage.py axes_reset_username EMAIL` or by deleting the attempt in the admin.
# https://django-axes.readthedocs.io/en/latest/4_configuration.html
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=10)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("LOGIN_LOCKOUT_MINUTES", default=15.0))
AXES_LOCKOUT_PARAMETERS = ["username"]
# axes.W006 wants the address in the lockout key, against attackers who rotate cookies or user
# agents; ours is the account name alone, which they cannot rotate, and locking addresses would
# lock out every member behind a company's NAT. Spraying many accounts from one address is for
# the Ingress's rate limits (docs/security.md).
SILENCED_SYSTEM_CHECKS = ["axes.W006"]
AXES_USERNAME_CALLABLE = "accounts.logins.login_username"
# The login forms' field (console and admin). Axes' default is the user model's USERNAME_FIELD
# ("email"), under which it files the name of a person who signed in without a form (single
# sign-on), so their success would not clear their failures.
AXES_USERNAME_FORM_FIELD = "username"
AXES_CLIENT_IP_CALLABLE = "accounts.logins.client_ip"
# A lockout lasts its cool-off, not "until the guessing stops": an attacker who keeps trying
# must not keep the account's owner out for good.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_RESET_ON_SUCCESS = True
AXES_ENABLE_ACCESS_FAILURE_LOG = True
AXES_LOCKOUT_TEMPLATE = "console/locked_out.html"
AXES_HTTP_RESPONSE_CODE = 429
# Not verbose: axes would log its version at every process start (each manage.py command's
# output included). Failures and lockouts are still logged; the attempt rows keep the user agent.
AXES_VERBOSE = False
# How many proxies in front of the web process append to X-Forwarded-For (the Ingress: 1).
TRUSTED_PROXY_COUNT = env.int("TRUSTED_PROXY_COUNT", default=0)
# Single sign-on (OpenID Connect, per organization: accounts/sso.py). Issuers must use https
# unless this is on (loopback providers in tests and development); discovery, JWKS and token
# calls to a provider give up after SSO_HTTP_TIMEOUT seconds.
SSO_ALLOW_HTTP_ISSUERS = env.bool("SSO_ALLOW_HTTP_ISSUERS", default=False)
SSO_HTTP_TIMEOUT = env.float("SSO_HTTP_TIMEOUT", default=10.0)

# --- Internationalisation -------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Static files ---------------------------------------------------------------------------
STATIC_URL = "/static/"
STATIC_ROOT = env.str("STATIC_ROOT", default=str(VAR_DIR / "static"))
Path(STATIC_ROOT).mkdir(parents=True, exist_ok=True)  # whitenoise warns on a missing root
# Serve straight from the apps' static folders unless an image ran collectstatic.
WHITENOISE_USE_FINDERS = env.bool("WHITENOISE_USE_FINDERS", default=True)

# --- REST API -------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.APIKeyAuthentication",
        "accounts.authentication.OrganizationSessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["accounts.permissions.IsOrganizationMember"],
    "DEFAULT_PAGINATION_CLASS": "controlplane.rest.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "controlplane.rest.filters.StrictFilterBackend",
        "controlplane.rest.filters.StrictOrderingFilter",
    ],
    # The API reads JSON only (the console posts its own forms): one body format to document,
    # validate and generate clients for. Anything else is a 415.
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "controlplane.rest.renderers.CSPBrowsableAPIRenderer",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "controlplane.rest.exceptions.problem_exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Sirocco API",
    "DESCRIPTION": "Models-as-a-service control plane: catalog, deployments, keys, usage, invoices.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Assets come from drf-spectacular-sidecar: the docs page works offline (no CDN).
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    # The schema and its docs are public: they describe the API, they hold no tenant data.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    # Choice sets that share a field name get names of their own (not "Type4b0Enum").
    "ENUM_NAME_OVERRIDES": {
        "DeploymentTypeEnum": "deployments.models.Deployment.Type",
        "ServingRuntimeNameEnum": "catalog.models.ServingRuntime.Name",
        "ListingChangeKindEnum": "catalog.models.ListingChange.Kind",
        "ListingChangeStatusEnum": "catalog.models.ListingChange.Status",
        "StatementLineKindEnum": "billing.models.StatementLine.Kind",
    },
    # Error responses (problem JSON) on every operation: controlplane/rest/schema.py.
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "controlplane.rest.schema.add_problem_responses",
    ],
}

# --- Model artifacts ----------------------------------------------------------------------
# s3://bucket/prefix (boto3: AWS_ENDPOINT_URL and the usual AWS_* variables apply) or
# file:///absolute/path. Empty: the embedded default, file://<SIROCCO_VAR_DIR>/artifacts.
ARTIFACT_STORE_URL = env.str("ARTIFACT_STORE_URL", default="")

# --- Logging --------------------------------------------------------------------------------
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOG_FORMAT = env.str("LOG_FORMAT", default="json")  # json | text
# Celery logs every task it receives and finishes, and beat every task it sends, at INFO: with
# beat's checks every few seconds that is a few lines a second for ever, which buries what
# `make run` prints (the login and key) and every log line worth reading. Those three loggers
# say WARNING and up (a failed task is an ERROR) unless LOG_LEVEL asks for DEBUG.
_celery_bookkeeping_level = (  # not CELERY_*: Celery reads those as its own settings
    LOG_LEVEL if LOG_LEVEL.upper() in {"DEBUG", "ERROR", "CRITICAL"} else "WARNING"
)
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "controlplane.logging.RequestIdFilter"}},
    "formatters": {
        "json": {"()": "controlplane.logging.JsonFormatter"},
        "text": {"format": "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "filters": ["request_id"],
            "formatter": LOG_FORMAT,
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        # Our middleware logs every request; Django's own 4xx warnings would duplicate it.
        "django.request": {"level": "ERROR"},
        "celery.worker.strategy": {"level": _celery_bookkeeping_level},
        "celery.app.trace": {"level": _celery_bookkeeping_level},
        "celery.beat": {"level": _celery_bookkeeping_level},
    },
}

# --- Security headers (production sits behind TLS termination) -------------------------------
# SECURE_SSL=true says the platform is reached over HTTPS only (TLS at the Ingress or a load
# balancer that sets X-Forwarded-Proto): cookies are then Secure, and browsers are told to use
# HTTPS for a year (HSTS). https://docs.djangoproject.com/en/5.2/ref/middleware/#http-strict-transport-security
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL = env.bool("SECURE_SSL", default=False)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=SECURE_SSL)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31_536_000 if SECURE_SSL else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
# Off by default even behind TLS: the Ingress redirects, and kubelet probes speak plain HTTP.
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
# Content-Security-Policy (django-csp): the console, the admin and the API docs load scripts,
# styles, images and fonts from this origin only, and run no inline script or style, so an
# injected tag or attribute does nothing even if an escaping bug ever let one through. The
# console's htmx and its own JS are files under /static/; htmx's injected indicator style is
# off (`htmx-config` in _skeleton.html). https://django-csp.readthedocs.io/en/latest/configuration.html
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "font-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}
X_FRAME_OPTIONS = "DENY"

# --- Mail (password reset links, budget alerts) --------------------------------------------
# The console backend (the default) writes mail to the log: fine on a laptop, a leak anywhere
# else, since a password-reset link is a login. The console refuses password resets with it
# unless DEBUG is on, and `manage.py check --deploy` fails on it (controlplane/checks.py).
EMAIL_BACKEND = env.str("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
# An SMTP server as one URL (smtp+tls://user:password@host:587): it sets EMAIL_BACKEND, EMAIL_HOST,
# EMAIL_PORT, EMAIL_HOST_USER, EMAIL_HOST_PASSWORD and EMAIL_USE_TLS/SSL together.
# https://django-environ.readthedocs.io/en/latest/types.html#environ-env-email-url
if env.str("EMAIL_URL", default=""):
    vars().update(env.email_url("EMAIL_URL"))
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="Sirocco <billing@sirocco.local>")

# --- Billing --------------------------------------------------------------------------------
# Length of a billing period: monthly (calendar months, UTC), weekly or daily.
BILLING_PERIOD = env.str("BILLING_PERIOD", default="monthly")
# A fraction: "0.2" adds 20 % tax on each invoice's rounded subtotal.
BILLING_TAX_RATE = env.str("BILLING_TAX_RATE", default="0")
BILLING_INVOICE_PREFIX = env.str("BILLING_INVOICE_PREFIX", default="SIR")
BILLING_INGEST_BATCH_SIZE = env.int("BILLING_INGEST_BATCH_SIZE", default=20000)
# Stripe is off while STRIPE_API_KEY is empty; invoices are still made and numbered.
# https://docs.stripe.com/keys
STRIPE_API_KEY = env.str("STRIPE_API_KEY", default="")
# https://docs.stripe.com/webhooks#verify-events (the endpoint's signing secret, whsec_...)
STRIPE_WEBHOOK_SECRET = env.str("STRIPE_WEBHOOK_SECRET", default="")
STRIPE_API_BASE = env.str("STRIPE_API_BASE", default="https://api.stripe.com")
STRIPE_TIMEOUT_SECONDS = env.float("STRIPE_TIMEOUT_SECONDS", default=20.0)
CELERY_BEAT_SCHEDULE.update(
    {
        "billing-ingest-usage": {"task": "billing.tasks.usage_events_ingest", "schedule": 5.0},
        "billing-ingest-replica-usage": {
            "task": "billing.tasks.replica_usage_ingest",
            "schedule": 60.0,
        },
        "billing-close-periods": {
            "task": "billing.tasks.billing_periods_close_due",
            "schedule": 600.0,
        },
        "billing-stripe-sync": {
            "task": "billing.tasks.invoices_stripe_sync_due",
            "schedule": 120.0,
        },
        "billing-statements-payout-due": {
            "task": "billing.tasks.statements_payout_due",
            "schedule": 300.0,
        },
    }
)

# --- Demo -----------------------------------------------------------------------------------
SIROCCO_DEMO_PASSWORD = env.str("SIROCCO_DEMO_PASSWORD", default="")
