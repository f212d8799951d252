"""Names vulture (`make lint`) cannot see being used: read by a framework through a dotted string
in settings, by a template, or written to a model field saved by name (`update_fields`).

Hooks that frameworks call by name everywhere (HTTP verbs, `get_*`, `filter_*`, `Meta`…) are in
pyproject.toml's [tool.vulture] ignore_names instead; add a name here only with its reason.
"""

from accounts.authentication import APIKeyAuthentication, OrganizationSessionAuthentication
from accounts.logins import client_ip, login_username
from console.views.catalog import HardwareOption
from controlplane.asgi import application
from controlplane.logging import JsonFormatter, RequestIdFilter
from controlplane.middleware import PrometheusMiddleware, RequestIdMiddleware
from controlplane.rest.exceptions import problem_exception_handler
from controlplane.rest.filters import StrictFilterBackend, StrictOrderingFilter
from controlplane.rest.renderers import CSPBrowsableAPIRenderer
from controlplane.rest.schema import (
    APIKeyScheme,
    ConsoleSessionScheme,
    MoneyFieldSchema,
    StrictFilterParameters,
    StrictSerializerSchema,
    add_problem_responses,
)

# Named by dotted path in controlplane/settings/base.py.
application
APIKeyAuthentication
OrganizationSessionAuthentication
JsonFormatter
RequestIdFilter
PrometheusMiddleware
RequestIdMiddleware
problem_exception_handler
StrictFilterBackend
StrictOrderingFilter
CSPBrowsableAPIRenderer
add_problem_responses
login_username  # AXES_USERNAME_CALLABLE
client_ip  # AXES_CLIENT_IP_CALLABLE

# Run by Django's system check framework (`@register` in controlplane/checks.py).
check_password_reset_mail
check_metrics_token

# drf-spectacular extensions register themselves by being subclassed.
APIKeyScheme
ConsoleSessionScheme
MoneyFieldSchema
StrictFilterParameters
StrictSerializerSchema

# Read by console/templates/console/catalog/model_detail.html.
HardwareOption.monthly

# Model fields set before a save(update_fields=[...]) that names them as strings.
_.closing_started_at
_.deleted_at
_.deprecated_at
_.emailed_at
_.facets
_.last_seen_at
_.last_sign_in_at
_.next_reconcile_at
_.paid_at
_.published_at
_.ready_replicas
_.approved_at
_.approved_by_label
_.required_memory_gb
_.reviewed_at
_.reviewed_by_label
_.search_text
_.submitted_at
_.updated_at

# Attributes of other libraries' objects, set for them to read.
_.accepted_media_type  # rest_framework Response: the renderer's content type
_.retries  # kubernetes.client.Configuration
_.pre_tokenizer  # tokenizers.Tokenizer
_.decoder  # tokenizers.Tokenizer
_.post_processor  # tokenizers.Tokenizer
_.should_exit  # uvicorn.Server
_._csp_update  # a response's policy change, read by django-csp's middleware

# controlplane/dbbounds.py turns a psycopg connection into its bounded subclass by assigning
# __class__ (psycopg's connect() takes no connection class); Python reads it, not our code.
_.__class__

# runtime/tokenizer.py: Jinja calls an extension's method by the name given to call_method().
_._body

# deployments/tasks.py: connected to Celery's worker_init signal.
_note_worker_process

# Read by console/templates/console/login.html (which organization's SSO to offer).
_.sso_organization
