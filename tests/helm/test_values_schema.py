"""Bad values stop `helm install` before anything reaches the cluster, with a message that
names the value to fix."""

import helm_python as helm
import pytest

from tests.helm.conftest import NAMESPACE, RELEASE

pytestmark = pytest.mark.nodb

SCHEMA_ERRORS = [
    ({"web": {"replicas": 0}}, "at '/web/replicas': minimum: got 0, want 1"),
    ({"wbe": {"replicas": 2}}, "additional properties 'wbe' not allowed"),
    ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of"),
    ({"image": {"tag": "latest version"}}, "at '/image/tag'"),
    ({"image": {"digest": "sha256:short"}}, "at '/image/digest'"),
    ({"worker": {"queues": ["fast"]}}, "at '/worker/queues/0': value must be one of"),
    ({"worker": {"queues": []}}, "at '/worker/queues': minItems"),
    ({"worker": {"concurrency": "4"}}, "at '/worker/concurrency': got string, want integer"),
    (
        {"gateway": {"resources": {"requests": {"cpu": "lots"}}}},
        "at '/gateway/resources/requests/cpu'",
    ),
    (
        {"gateway": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}},
        "targetCPUUtilizationPercentage",
    ),
    (
        {"gateway": {"terminationGracePeriodSeconds": 5}},
        "at '/gateway/terminationGracePeriodSeconds'",
    ),
    ({"web": {"pdb": {"maxUnavailable": 0}}}, "at '/web/pdb/maxUnavailable'"),
    ({"web": {"service": {"type": "ExternalName"}}}, "at '/web/service/type'"),
    ({"config": {"publicUrl": "sirocco.example.com"}}, "at '/config/publicUrl'"),
    ({"config": {"artifactStoreUrl": "gs://bucket/models"}}, "at '/config/artifactStoreUrl'"),
    ({"config": {"logLevel": "verbose"}}, "at '/config/logLevel': value must be one of"),
    ({"config": {"extraEnv": {"lower": "x"}}}, "at '/config/extraEnv'"),
    ({"config": {"extraEnv": {"PORT": 80}}}, "at '/config/extraEnv/PORT': got number, want string"),
    ({"secrets": {"create": True}}, "at '/secrets/databaseUrl': minLength: got 0, want 1"),
    (
        {"secrets": {"create": True, "databaseUrl": "mysql://db/sirocco", "redisUrl": "redis://r"}},
        "at '/secrets/databaseUrl'",
    ),
    (
        {
            "secrets": {
                "create": True,
                "databaseUrl": "postgres://db/s",
                "redisUrl": "redis://r",
                "stripeApiKey": "pk_live_publishable",
            }
        },
        "at '/secrets/stripeApiKey'",
    ),
    (
        {"podSecurityContext": {"runAsNonRoot": False}},
        "at '/podSecurityContext/runAsNonRoot': value must be true",
    ),
    (
        {"securityContext": {"allowPrivilegeEscalation": True}},
        "at '/securityContext/allowPrivilegeEscalation'",
    ),
    (
        {"gateway": {"organizationRequestsPerMinute": -1}},
        "at '/gateway/organizationRequestsPerMinute': minimum: got -1, want 0",
    ),
    ({"billing": {"period": "yearly"}}, "at '/billing/period': value must be one of"),
    ({"billing": {"taxRate": "20%"}}, "at '/billing/taxRate'"),
    ({"billing": {"taxRate": 0.2}}, "at '/billing/taxRate': got number, want string"),
    ({"provisioner": {"namespacePrefix": "Tenants_"}}, "at '/provisioner/namespacePrefix'"),
    ({"beat": {"replicas": 2}}, "additional properties 'replicas' not allowed"),
    ({"ingress": {"enabled": True, "hosts": [{"host": "Bad_Host"}]}}, "at '/ingress/hosts/0/host'"),
]

# Rules across several values, which the templates enforce with their own message.
TEMPLATE_ERRORS = [
    (
        {"secrets": {"databaseUrl": "postgres://db/sirocco"}},
        "secrets.databaseUrl is set but secrets.create is false, so it would be ignored: set "
        'secrets.create=true, or put the value in the Secret "sirocco" instead',
    ),
    (
        {
            "secrets": {
                "create": True,
                "existingSecret": "mine",
                "databaseUrl": "postgres://db/s",
                "redisUrl": "redis://r",
            }
        },
        "secrets.create=true makes the chart's own Secret, so secrets.existingSecret would be "
        "ignored: set one or the other",
    ),
    (
        {"ingress": {"enabled": True, "hosts": []}},
        "ingress.enabled=true needs at least one entry in ingress.hosts",
    ),
    (
        {"gateway": {"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}},
        "gateway.autoscaling.minReplicas (5) is above gateway.autoscaling.maxReplicas (3)",
    ),
    (
        {"config": {"extraEnv": {"LOG_LEVEL": "DEBUG"}}},
        "config.extraEnv.LOG_LEVEL is a setting the chart already sets",
    ),
    (
        {"config": {"extraEnv": {"DATABASE_URL": "postgres://db/s"}}},
        "config.extraEnv.DATABASE_URL is a setting the chart already sets",
    ),
]


@pytest.mark.parametrize(("values", "message"), SCHEMA_ERRORS)
def test_the_schema_rejects_bad_values_naming_them(chart, values, message):
    with pytest.raises(helm.HelmValuesError) as raised:
        chart.validate_schema(values)
    assert message in str(raised.value)
    # An install validates the same way before it renders anything.
    with pytest.raises(helm.HelmValuesError) as raised:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(raised.value)


def test_the_release_namespace_cannot_look_like_an_organizations(chart):
    with pytest.raises(helm.HelmRenderError) as raised:
        chart.render({}, name=RELEASE, namespace="sirocco-platform")
    assert (
        'the release\'s namespace "sirocco-platform" starts with provisioner.namespacePrefix '
        '"sirocco-"' in str(raised.value)
    )


@pytest.mark.parametrize(("values", "message"), TEMPLATE_ERRORS)
def test_contradictory_values_stop_the_render_with_a_message(chart, values, message):
    chart.validate_schema(values)
    with pytest.raises(helm.HelmRenderError) as raised:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(raised.value)


def test_the_default_values_fit_the_schema(chart):
    chart.validate_schema({})
    chart.validate_schema(chart.values)
