"""The Helm chart renders, lints and validates, and the rendered objects keep the promises the
operator guide makes (processes, hooks, probes, security, settings)."""

import helm_python as helm
import kubernetes_validate
import pytest
from dockerfile_parse import DockerfileParser

from tests.helm.conftest import CHART_DIR, NAMESPACE, ROOT
from tests.helm.variants import VARIANTS

pytestmark = pytest.mark.nodb

KUBERNETES_VERSION = "1.31"
ANY_ADDRESS = "0.0.0.0"  # noqa: S104 - in a pod, the server listens on the pod's address
COMPONENTS = ("web", "gateway", "worker", "beat", "watcher")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, render):
    return request.param, render(VARIANTS[request.param])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_helm_lint_finds_no_errors_or_warnings(name):
    report = helm.lint(
        CHART_DIR,
        VARIANTS[name],
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBERNETES_VERSION}.0",
    )
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and findings == [], report


def test_every_object_validates_against_the_kubernetes_schemas_in_strict_mode(variant):
    name, rendered = variant
    for obj in rendered.objects:
        # Strict mode rejects any field the schema does not know: a typo fails here.
        validated = kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        assert validated == KUBERNETES_VERSION, (name, obj["kind"])


def test_the_default_release_has_exactly_these_objects(render):
    rendered = render()
    assert sorted(rendered.by_key) == sorted(
        [
            ("ConfigMap", "sirocco"),
            ("Deployment", "sirocco-web"),
            ("Deployment", "sirocco-gateway"),
            ("Deployment", "sirocco-worker"),
            ("Deployment", "sirocco-beat"),
            ("Deployment", "sirocco-watcher"),
            ("Job", "sirocco-migrate"),
            ("Service", "sirocco-web"),
            ("Service", "sirocco-gateway"),
            ("HorizontalPodAutoscaler", "sirocco-gateway"),
            ("PodDisruptionBudget", "sirocco-web"),
            ("PodDisruptionBudget", "sirocco-gateway"),
            ("PodDisruptionBudget", "sirocco-worker"),
            ("ServiceAccount", "sirocco"),
            ("ServiceAccount", "sirocco-provisioner"),
            ("ClusterRole", "sirocco-sirocco-provisioner"),
            ("ClusterRole", "sirocco-sirocco-provisioner-tenant"),
            ("ClusterRoleBinding", "sirocco-sirocco-provisioner"),
            ("ValidatingAdmissionPolicy", "sirocco-sirocco-provisioner"),
            ("ValidatingAdmissionPolicyBinding", "sirocco-sirocco-provisioner"),
        ]
    )
    # No Secret by default: the credentials stay out of Helm's release history.
    assert rendered.of_kind("Secret") == []


def test_each_process_runs_its_command(render):
    rendered = render()
    commands = {c: rendered.container(c)["command"] for c in (*COMPONENTS, "migrate")}
    assert commands == {
        "web": [
            "uvicorn",
            "controlplane.asgi:application",
            "--host",
            ANY_ADDRESS,
            "--port",
            "8000",
        ],
        "gateway": [
            "uvicorn",
            "gateway.asgi:application",
            "--host",
            ANY_ADDRESS,
            "--port",
            "8000",
            "--timeout-graceful-shutdown",
            "110",
        ],
        "worker": [
            "celery",
            "-A",
            "controlplane",
            "worker",
            "-Q",
            "default,provisioning,billing",
            "--concurrency",
            "2",
        ],
        "beat": ["celery", "-A", "controlplane", "beat"],
        "watcher": ["python", "manage.py", "watch_replicas"],
        "migrate": ["python", "manage.py", "migrate", "--noinput"],
    }
    minimal = render(VARIANTS["minimal"]).container("worker")["command"]
    assert minimal[-4:] == ["-Q", "provisioning", "--concurrency", "8"]


def test_all_processes_run_the_same_image(variant):
    _name, rendered = variant
    images = {
        container["image"]
        for obj in rendered.of_kind("Deployment") + rendered.of_kind("Job")
        for container in obj["spec"]["template"]["spec"]["containers"]
    }
    assert len(images) == 1


def test_the_image_is_the_app_version_or_the_pinned_digest(render):
    assert render().container("web")["image"] == "sirocco/controlplane:0.1.0"
    pinned = render(VARIANTS["scheduling"])
    container = pinned.container("web")
    assert container["image"] == "registry.example.com/platform/sirocco@sha256:" + "ab" * 32
    assert container["imagePullPolicy"] == "Always"
    assert pinned.deployment("web")["spec"]["template"]["spec"]["imagePullSecrets"] == [
        {"name": "registry-credentials"}
    ]


def test_beat_and_the_watcher_are_single_replicas_replaced_not_rolled(variant):
    _name, rendered = variant
    for component in ("beat", "watcher"):
        deployment = rendered.deployment(component)
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_migrations_run_as_a_hook_after_the_settings_they_read(render):
    rendered = render(VARIANTS["chart-managed-secret"])
    job = rendered.get("Job", "sirocco-migrate")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    # The Job runs before the release's ordinary objects exist: what it reads must be hooks
    # with a lower weight, restored on rollback too.
    for settings in (rendered.get("ConfigMap", "sirocco"), rendered.get("Secret", "sirocco")):
        hook = settings["metadata"]["annotations"]
        assert set(hook["helm.sh/hook"].split(",")) >= {"pre-install", "pre-upgrade"}
        assert "pre-rollback" in hook["helm.sh/hook"]
        assert int(hook["helm.sh/hook-weight"]) < int(annotations["helm.sh/hook-weight"])
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # The release's ServiceAccounts don't exist yet when the hook runs.
    assert "serviceAccountName" not in pod
    assert pod["automountServiceAccountToken"] is False
    assert ("Job", "sirocco-migrate") not in render(VARIANTS["minimal"]).by_key


def test_web_and_gateway_probe_healthz_and_readyz_with_an_allowed_host(variant):
    _name, rendered = variant
    allowed = rendered.config()["ALLOWED_HOSTS"].split(",")
    for component in ("web", "gateway"):
        container = rendered.container(component)
        assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
        paths = {
            probe: container[probe]["httpGet"]["path"]
            for probe in ("startupProbe", "livenessProbe", "readinessProbe")
        }
        assert paths == {
            "startupProbe": "/healthz",
            "livenessProbe": "/healthz",
            "readinessProbe": "/readyz",
        }
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            # The kubelet would send the pod IP as Host, which Django rejects with a 400.
            (header,) = container[probe]["httpGet"]["httpHeaders"]
            assert header["name"] == "Host" and header["value"] in allowed


def test_the_worker_is_restarted_when_it_stops_answering_pings(render):
    probe = render().container("worker")["livenessProbe"]
    assert "inspect ping" in probe["exec"]["command"][-1]
    assert "livenessProbe" not in render(VARIANTS["minimal"]).container("worker")


def test_every_pod_runs_as_the_images_non_root_user_on_a_read_only_root(variant):
    _name, rendered = variant
    image_user = DockerfileParser(str(ROOT / "Dockerfile")).structure
    (user,) = [i["value"] for i in image_user if i["instruction"] == "USER"]
    uid = int(user.split(":")[0])
    for pod in rendered.pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"] == {"drop": ["ALL"]}
            # The only writable places are emptyDirs, /tmp and the settings' SIROCCO_VAR_DIR,
            # and the gateway's usage spool.
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            spool = {"/var/lib/sirocco/usage-spool"} if container["name"] == "gateway" else set()
            assert mounts == {"/tmp", "/var/lib/sirocco", *spool}
            requests = container["resources"]["requests"]
            assert {"cpu", "memory"} <= set(requests)
            assert "memory" in container["resources"]["limits"]


def test_only_the_worker_and_the_watcher_get_a_kubernetes_api_token(variant):
    _name, rendered = variant
    prefix = rendered.fullname
    tokens = {
        obj["metadata"]["name"]: obj["spec"]["template"]["spec"]["automountServiceAccountToken"]
        for obj in rendered.of_kind("Deployment") + rendered.of_kind("Job")
    }
    assert {n for n, mounted in tokens.items() if mounted} == {
        f"{prefix}-worker",
        f"{prefix}-watcher",
    }
    for component in ("worker", "watcher"):
        pod = rendered.get("Deployment", f"{prefix}-{component}")["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == f"{prefix}-provisioner"
    for binding in rendered.of_kind("ClusterRoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": f"{prefix}-provisioner", "namespace": NAMESPACE}
        ]
        assert binding["roleRef"]["name"] == rendered.of_kind("ClusterRole")[0]["metadata"]["name"]
    for account in rendered.of_kind("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


def test_rbac_can_be_left_to_the_operator(render):
    rendered = render(VARIANTS["minimal"])
    assert rendered.of_kind("ClusterRole") == rendered.of_kind("ClusterRoleBinding") == []


def test_cluster_scoped_names_differ_between_namespaces(render):
    first = render().of_kind("ClusterRole")[0]["metadata"]["name"]
    second = render(namespace="staging").of_kind("ClusterRole")[0]["metadata"]["name"]
    assert first != second


def test_services_and_budgets_select_exactly_their_deployments_pods(variant):
    _name, rendered = variant
    deployments = rendered.of_kind("Deployment")
    for obj in rendered.of_kind("Service") + rendered.of_kind("PodDisruptionBudget"):
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        matches = [
            d
            for d in deployments
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, obj["metadata"]["name"]
        if obj["kind"] == "Service":
            (container,) = matches[0]["spec"]["template"]["spec"]["containers"]
            port_names = {p["name"] for p in container["ports"]}
            assert {p["targetPort"] for p in obj["spec"]["ports"]} <= port_names


def test_selectors_leave_out_labels_that_change_between_versions(variant):
    # A Deployment's selector is immutable: a version label in it would break every upgrade.
    _name, rendered = variant
    for deployment in rendered.of_kind("Deployment"):
        assert set(deployment["spec"]["selector"]["matchLabels"]) == {
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/component",
        }


def test_the_gateway_autoscales_unless_told_otherwise(render):
    rendered = render()
    hpa = rendered.get("HorizontalPodAutoscaler", "sirocco-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sirocco-gateway",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    # The autoscaler owns the replica count: a fixed one would fight it on every upgrade.
    assert "replicas" not in rendered.deployment("gateway")["spec"]
    fixed = render(VARIANTS["minimal"])
    assert fixed.of_kind("HorizontalPodAutoscaler") == []
    assert fixed.deployment("gateway")["spec"]["replicas"] == 3


def test_the_gateway_drains_streams_before_it_stops(render):
    rendered = render()
    pod = rendered.deployment("gateway")["spec"]["template"]["spec"]
    container = rendered.container("gateway")
    graceful = int(
        container["command"][container["command"].index("--timeout-graceful-shutdown") + 1]
    )
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + graceful < pod["terminationGracePeriodSeconds"]


def test_budgets_exist_for_the_replicated_processes_only(render):
    names = {b["metadata"]["name"] for b in render().of_kind("PodDisruptionBudget")}
    assert names == {"sirocco-web", "sirocco-gateway", "sirocco-worker"}
    names = {
        b["metadata"]["name"] for b in render(VARIANTS["minimal"]).of_kind("PodDisruptionBudget")
    }
    assert names == {"sirocco-gateway"}


def test_every_container_reads_the_settings_and_the_credentials(variant):
    name, rendered = variant
    prefix = rendered.fullname
    secret_name = {"existing-secret": "sirocco-credentials"}.get(name, prefix)
    for obj in rendered.of_kind("Deployment") + rendered.of_kind("Job"):
        (container,) = obj["spec"]["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"configMapRef": {"name": prefix}}]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
        assert {ref["name"] for ref in refs.values()} == {secret_name}
        assert {ref["key"] for ref in refs.values()} == set(refs)
        required = {n for n, ref in refs.items() if not ref.get("optional")}
        assert required == {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"}
        assert set(refs) - required == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "STRIPE_API_KEY",
            "STRIPE_WEBHOOK_SECRET",
            "EMAIL_URL",
            "METRICS_TOKEN",
            "PROVIDER_CREDENTIAL_KEYS",
        }


def test_the_configmap_holds_the_settings_for_this_cluster(render):
    config = render().config()
    assert config["SIROCCO_PROVISIONER"] == "kubernetes"
    assert config["SECURE_SSL"] == "true"  # Secure cookies and HSTS behind TLS
    assert "SIROCCO_PUBLIC_URL" not in config
    stores = render(VARIANTS["chart-managed-secret"]).config()
    assert stores["ARTIFACT_STORE_URL"] == "s3://sirocco-weights/models"
    assert stores["AWS_ENDPOINT_URL"] == "https://minio.storage:9000"
    assert stores["AWS_DEFAULT_REGION"] == "us-east-1"
    custom = render(VARIANTS["scheduling"]).config()
    assert custom["SIROCCO_PUBLIC_URL"] == "https://maas.example.com"
    assert custom["CSRF_TRUSTED_ORIGINS"] == "https://maas.example.com"
    assert {"maas.example.com", "maas.internal", "localhost", "maas-gateway.sirocco.svc"} <= set(
        custom["ALLOWED_HOSTS"].split(",")
    )
    assert custom["TZ"] == "UTC"
    assert custom["LOG_LEVEL"] == "WARNING"
    assert custom["DEFAULT_FROM_EMAIL"] == "billing@example.com"


def test_the_chart_made_secret_holds_every_credential(render):
    secret = render(VARIANTS["chart-managed-secret"]).get("Secret", "sirocco")
    data = secret["stringData"]
    assert data["DATABASE_URL"] == "postgres://sirocco:pw@postgres.db:5432/sirocco"
    # No broker URL given: the Redis server carries the Celery queues too.
    assert data["CELERY_BROKER_URL"] == data["REDIS_URL"] == "redis://redis.db:6379/0"
    assert data["STRIPE_API_KEY"] == "sk_test_example"
    assert data["STRIPE_WEBHOOK_SECRET"] == "whsec_example"
    assert data["EMAIL_URL"] == "smtp+tls://alerts:pw@smtp.example.com:587"
    assert data["AWS_ACCESS_KEY_ID"] == "AKIAEXAMPLE"
    # Generated when not given (and kept across upgrades by looking up the live Secret).
    assert len(data["SECRET_KEY"]) == 64 and data["SECRET_KEY"].isalnum()


def test_a_settings_change_restarts_the_pods(render):
    def checksum(values):
        pod = render(values).deployment("web")["spec"]["template"]["metadata"]
        return pod["annotations"]["checksum/config"]

    assert checksum({}) != checksum({"config": {"logLevel": "DEBUG"}})
    assert checksum({}) == checksum({"web": {"replicas": 3}})


def test_the_ingress_sends_the_openai_api_to_the_gateway_and_the_console_to_web(render):
    rendered = render(VARIANTS["ingress-tls"])
    ingress = rendered.get("Ingress", "sirocco")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["metadata"]["annotations"] == {
        "nginx.ingress.kubernetes.io/proxy-buffering": "off"
    }
    for rule in ingress["spec"]["rules"]:
        routes = {
            p["path"]: (p["backend"]["service"]["name"], p["backend"]["service"]["port"]["name"])
            for p in rule["http"]["paths"]
        }
        assert routes["/v1"] == ("sirocco-gateway", "http")
        assert (
            routes["/"] == routes["/api/"] == ("sirocco-web", "http")
        )  # tests/helm/test_ingress.py
    config = rendered.config()
    # TLS on the first host: the public URL is https and its origin is trusted for forms.
    assert config["SIROCCO_PUBLIC_URL"] == "https://ai.example.com"
    assert config["CSRF_TRUSTED_ORIGINS"] == "https://ai.example.com"
    assert {"ai.example.com", "api.ai.example.com"} <= set(config["ALLOWED_HOSTS"].split(","))
    assert rendered.get("Service", "sirocco-web")["spec"]["ports"][0]["port"] == 8080
    assert render().of_kind("Ingress") == []


def test_scheduling_and_annotations_reach_the_pods(render):
    rendered = render(VARIANTS["scheduling"])
    web = rendered.deployment("web")["spec"]["template"]
    values = VARIANTS["scheduling"]["web"]
    assert web["spec"]["nodeSelector"] == values["nodeSelector"]
    assert web["spec"]["tolerations"] == values["tolerations"]
    assert web["spec"]["affinity"] == values["affinity"]
    assert web["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert web["metadata"]["labels"]["team"] == "platform"
    for account in rendered.of_kind("ServiceAccount"):
        assert (
            account["metadata"]["annotations"]
            == VARIANTS["scheduling"]["serviceAccount"]["annotations"]
        )


def test_notes_tell_the_operator_what_to_do_next(render):
    notes = render().notes
    assert "kubectl -n sirocco create secret generic sirocco" in notes
    assert "port-forward svc/sirocco-web" in notes
    assert "config.artifactStoreUrl is empty" in notes
    notes = render(VARIANTS["ingress-tls"]).notes
    assert "https://ai.example.com/v1/" in notes
    assert "create secret generic" not in render(VARIANTS["chart-managed-secret"]).notes


def test_the_provisioner_lets_exactly_the_gateways_pods_reach_model_servers(variant):
    # Model servers' NetworkPolicy admits pods with these labels from this namespace only.
    _name, rendered = variant
    config = rendered.config()
    assert config["SIROCCO_K8S_GATEWAY_NAMESPACE"] == NAMESPACE
    labels = dict(
        pair.split("=", 1) for pair in config["SIROCCO_K8S_GATEWAY_POD_LABELS"].split(",")
    )
    gateway_pods = rendered.deployment("gateway")["spec"]["template"]["metadata"]["labels"]
    assert labels.items() <= gateway_pods.items()
    others = [rendered.deployment(c)["spec"]["template"]["metadata"]["labels"] for c in COMPONENTS]
    assert sum(labels.items() <= pod.items() for pod in others) == 1


def test_the_provisioner_and_billing_settings_come_from_values(render):
    config = render().config()
    assert config["SIROCCO_K8S_NAMESPACE_PREFIX"] == "sirocco-"
    assert config["SIROCCO_K8S_FETCHER_IMAGE"] == "sirocco/runtime:0.1.0"
    assert "SIROCCO_K8S_AWS_ENDPOINT_URL" not in config
    assert (config["BILLING_PERIOD"], config["BILLING_TAX_RATE"]) == ("monthly", "0")
    assert (config["GATEWAY_ORG_RPM_LIMIT"], config["GATEWAY_ORG_TPM_LIMIT"]) == (
        "10000",
        "2000000",
    )
    # Large counts stay integers (Helm's numbers are floats: 5e+07 would not parse).
    limits = render({"gateway": {"organizationTokensPerMinute": 50_000_000}}).config()
    assert limits["GATEWAY_ORG_TPM_LIMIT"] == "50000000"
    # Inference pods reach the same S3 endpoint as the control plane unless told otherwise.
    stores = render(VARIANTS["chart-managed-secret"]).config()
    assert stores["SIROCCO_K8S_AWS_ENDPOINT_URL"] == "https://minio.storage:9000"
    own = render({"provisioner": {"awsEndpointUrl": "http://minio.internal:9000"}}).config()
    assert own["SIROCCO_K8S_AWS_ENDPOINT_URL"] == "http://minio.internal:9000"


HOST_PATH = {"path": "/mnt/local-ssd/sirocco-usage-spool", "type": "DirectoryOrCreate"}


def test_the_gateway_spools_usage_on_its_own_volume(render):
    """GATEWAY_USAGE_SPOOL_DIR is the gateway's usage-spool mount, whose source the values
    choose: emptyDir by default, a hostPath or a claim to outlive the pod."""
    for values, source in (
        ({}, {"emptyDir": {}}),
        (
            # null drops the default's emptyDir (Helm merges maps)
            {"gateway": {"usageSpool": {"volume": {"emptyDir": None, "hostPath": HOST_PATH}}}},
            {"hostPath": HOST_PATH},
        ),
    ):
        rendered = render(values)
        container = rendered.container("gateway")
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "usage-spool"]
        assert rendered.config()["GATEWAY_USAGE_SPOOL_DIR"] == mount["mountPath"]
        pod = rendered.deployment("gateway")["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "usage-spool"]
        assert volume == {"name": "usage-spool", **source}
