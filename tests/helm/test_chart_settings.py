"""Every setting the control plane reads from its environment is set by the chart, baked into
the image, or deliberately left out of a cluster install: a new setting fails here until the
chart (values, ConfigMap or Secret) knows about it."""

import re

import pytest
from dockerfile_parse import DockerfileParser

from tests.helm.conftest import ROOT
from tests.helm.variants import VARIANTS

pytestmark = pytest.mark.nodb

SETTINGS_DIR = ROOT / "controlplane" / "settings"
TUNING = "a tuning knob whose default suits a cluster; config.extraEnv sets it"
# Settings a cluster install leaves at their defaults, and why.
NOT_SET_BY_THE_CHART = {
    "DEBUG": "off in production, which is the settings' default",
    "SIROCCO_DEMO_PASSWORD": "the demo organization is for `make run`, not for a cluster",
    "TEST_DATABASE_NAME": "only the test suite reads it",
    "CELERY_TASK_ALWAYS_EAGER": "only the test suite runs tasks in-process",
    "SIROCCO_KUBECONFIG": "in the cluster the worker uses its ServiceAccount (in-cluster config)",
    "SIROCCO_KUBE_CONTEXT": "in the cluster the worker uses its ServiceAccount (in-cluster config)",
    "STRIPE_API_BASE": "points Stripe calls at a stand-in (localstripe) in tests",
    "SIROCCO_K8S_REQUEST_TIMEOUT": TUNING,
    "DATABASE_CONNECT_TIMEOUT": TUNING,
    "DATABASE_LOCK_TIMEOUT": TUNING,
    "DATABASE_STATEMENT_TIMEOUT": TUNING,
    "SQLITE_BUSY_TIMEOUT": "a cluster runs PostgreSQL; SQLite is the embedded default's",
    "DEPLOYMENTS_MAX_REPLICAS": TUNING,
    "DEPLOYMENTS_LOAD_AVERAGE_SECONDS": TUNING,
    "BILLING_INGEST_BATCH_SIZE": TUNING,
    "STRIPE_TIMEOUT_SECONDS": TUNING,
    "DEPLOYMENTS_AUTOSCALE_SECONDS": TUNING,
    "DEPLOYMENTS_SWEEP_SECONDS": TUNING,
    "DEPLOYMENTS_STALLED_CHECK_SECONDS": TUNING,
    "GATEWAY_CONNECT_TIMEOUT": TUNING,
    "GATEWAY_IDLE_TIMEOUT": TUNING,
    "GATEWAY_ANSWER_TIMEOUT": TUNING,
    "GATEWAY_SCALE_PROGRESS_INTERVAL": TUNING,
    "GATEWAY_AUTH_CACHE_SECONDS": TUNING,
    "GATEWAY_ROUTE_CACHE_SECONDS": TUNING,
    "GATEWAY_SPEND_CACHE_SECONDS": TUNING,
    "GATEWAY_USAGE_SPOOL_AFTER_SECONDS": TUNING,
    "GATEWAY_TOKENIZER_WAIT_SECONDS": TUNING,
    "GATEWAY_LOAD_REPORT_SECONDS": TUNING,
    "GATEWAY_DB_THREADS": TUNING,
    "GATEWAY_INLINE_PROMPT_BYTES": TUNING,
    "GATEWAY_PROMPT_WORKERS": TUNING,
    "GATEWAY_PROMPT_QUEUE_PER_ORGANIZATION": TUNING,
    "GATEWAY_USAGE_SYNCHRONOUS_COMMIT": "a durability trade-off an operator opts into (config.extraEnv)",
    "GATEWAY_REDIS_PREFIX": "only installations that share one Redis server need different ones",
    "SESSION_COOKIE_SECURE": "follows SECURE_SSL (config.secureSsl)",
    "LOGIN_FAILURE_LIMIT": TUNING,
    "LOGIN_LOCKOUT_MINUTES": TUNING,
    "SECURE_HSTS_SECONDS": "a year when SECURE_SSL is on; config.extraEnv changes it",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "the operator's domain policy (config.extraEnv)",
    "SECURE_HSTS_PRELOAD": "the operator's domain policy (config.extraEnv)",
    "SECURE_SSL_REDIRECT": "the Ingress redirects to HTTPS; kubelet probes speak plain HTTP",
    "DEPLOYMENTS_MAX_FALLBACKS": TUNING,
    "GATEWAY_CIRCUIT_FAILURES": TUNING,
    "GATEWAY_CIRCUIT_COOLDOWN_SECONDS": TUNING,
    "GATEWAY_MAX_CHOICES": TUNING,
    "GATEWAY_TAG_VALUES_PER_ORGANIZATION": TUNING,
    "SSO_HTTP_TIMEOUT": TUNING,
    "SSO_ALLOW_HTTP_ISSUERS": "for a provider on a private network only; issuers use https",
}
ENV_READ = re.compile(
    r"""(?:\benv(?:\.\w+)?\(|os\.environ\.get\(|os\.getenv\(|os\.environ\[)\s*["']([A-Z][A-Z0-9_]*)["']"""
)


def settings_read_from_the_environment() -> set[str]:
    names = set()
    for path in SETTINGS_DIR.glob("*.py"):
        if path.name != "test.py":
            names |= set(ENV_READ.findall(path.read_text()))
    return names


@pytest.fixture(scope="module")
def provided(render) -> set[str]:
    """Variables a pod of the chart gets, over every variant, plus the image's own ENV."""
    names = set(DockerfileParser(str(ROOT / "Dockerfile")).envs)
    for values in VARIANTS.values():
        rendered = render(values)
        for config_map in rendered.of_kind("ConfigMap"):
            names |= set(config_map["data"])
        for deployment in rendered.of_kind("Deployment"):
            for container in deployment["spec"]["template"]["spec"]["containers"]:
                names |= {variable["name"] for variable in container.get("env", [])}
    return names


def test_the_parser_finds_the_settings_that_are_read():
    # Guards the regular expression: these are read in settings/base.py today.
    assert {"SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL", "ALLOWED_HOSTS"} <= (
        settings_read_from_the_environment()
    )


def test_every_setting_reaches_the_pods_or_is_left_out_on_purpose(provided):
    missing = settings_read_from_the_environment() - provided - set(NOT_SET_BY_THE_CHART)
    assert not missing, (
        f"settings the Helm chart does not set: {sorted(missing)}. Add each to "
        "helm/sirocco (values.yaml, values.schema.json and the ConfigMap in _helpers.tpl, or "
        "the Secret keys), or to NOT_SET_BY_THE_CHART here with the reason."
    )


def test_every_variable_in_the_readmes_table_reaches_the_pods_or_is_left_out(provided):
    readme = (ROOT / "README.md").read_text()
    first_cells = re.findall(r"^\| (`[^|]*)\|", readme, flags=re.MULTILINE)
    documented = {name for cell in first_cells for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", cell)}
    assert documented, "README.md has a configuration table"
    missing = documented - provided - set(NOT_SET_BY_THE_CHART)
    assert not missing, (
        f"README's configuration table names variables the chart never sets: {sorted(missing)}"
    )
