"""The worker's RBAC grants what the Kubernetes provisioner uses, and nothing more: the calls it
made on no namespace through the ClusterRole bound cluster-wide, the calls it made inside an
organization's namespace through the tenant role it binds there (and nowhere else)."""

import json

import celpy
import pytest

from tests.helm.conftest import NAMESPACE, ROOT
from tests.helm.variants import VARIANTS

pytestmark = pytest.mark.nodb

# Written by the Kubernetes provisioner's tests (tests/deployments/conftest.py): every request
# it made to the emulated API server, as {"rules": [{"scope", "apiGroup", "resource", "verbs"}]}.
OBSERVED_VERBS = ROOT / "tests" / "deployments" / "observed_k8s_verbs.json"
CLUSTER_ROLE = f"{NAMESPACE}-sirocco-provisioner"
TENANT_ROLE = f"{CLUSTER_ROLE}-tenant"
# A new namespace's RoleBinding is written before the worker has any right there: that one
# namespaced write is granted cluster-wide (and held to the tenant role by `bind`).
BOOTSTRAP = {("rbac.authorization.k8s.io", "rolebindings")}

# What the provisioner manages (issue 5), and what it only reads.
MANAGED = {
    ("", "namespaces"),
    ("", "resourcequotas"),
    ("", "services"),
    ("apps", "deployments"),
    ("networking.k8s.io", "networkpolicies"),
    ("policy", "poddisruptionbudgets"),
    ("rbac.authorization.k8s.io", "rolebindings"),
}
READ_ONLY = {("", "pods"), ("", "events")}
READ_VERBS = {"get", "list", "watch"}


def role_rules(rendered, name: str) -> set[tuple[str, str, str]]:
    """(group, resource, verb) for every permission a ClusterRole grants (no resourceNames)."""
    role = rendered.get("ClusterRole", name)
    grants = set()
    for rule in role["rules"]:
        if "resourceNames" in rule:
            continue  # the `bind` rule, checked on its own
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    grants.add((group, resource, verb))
    return grants


def granted_rules(rendered) -> set[tuple[str, str, str]]:
    return role_rules(rendered, CLUSTER_ROLE) | role_rules(rendered, TENANT_ROLE)


def observed_verbs(scope: str) -> set[tuple[str, str, str]]:
    rules = json.loads(OBSERVED_VERBS.read_text())["rules"]
    return {
        (rule["apiGroup"], rule["resource"], verb)
        for rule in rules
        if rule["scope"] == scope
        for verb in rule["verbs"]
    }


def with_create_for_apply(calls: set[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
    # Server-side apply is a PATCH; when it creates the object the API server also checks
    # "create" for it (k8s.io/apiserver/pkg/endpoints/handlers/patch.go), which an emulated
    # API server does not, so every applied resource needs both.
    return calls | {
        (group, resource, "create") for group, resource, verb in calls if verb == "patch"
    }


def test_each_role_grants_the_calls_made_where_it_applies_and_no_more(render):
    rendered = render()
    namespaced = with_create_for_apply(observed_verbs("namespace"))
    cluster = with_create_for_apply(observed_verbs("cluster"))
    assert cluster and namespaced, f"{OBSERVED_VERBS} lists no requests"
    bootstrap = {call for call in namespaced if call[:2] in BOOTSTRAP}
    assert role_rules(rendered, CLUSTER_ROLE) == cluster | bootstrap
    assert role_rules(rendered, TENANT_ROLE) == namespaced - bootstrap
    # Cluster-wide, nothing namespaced is written, nor read one by one: only listed (and pods
    # watched) across namespaces, by the drift sweep and the watcher.
    for group, resource, verb in role_rules(rendered, CLUSTER_ROLE):
        if (group, resource) not in {("", "namespaces"), *BOOTSTRAP}:
            assert verb in {"list", "watch"}, (group, resource, verb)


def test_the_worker_may_bind_the_tenant_role_only(render):
    rendered = render()
    role = rendered.get("ClusterRole", CLUSTER_ROLE)
    [bind] = [rule for rule in role["rules"] if "resourceNames" in rule]
    assert bind == {
        "apiGroups": ["rbac.authorization.k8s.io"],
        "resources": ["clusterroles"],
        "verbs": ["bind"],
        "resourceNames": [TENANT_ROLE],
    }
    # The tenant role is bound cluster-wide by no one: only in the namespaces the worker makes.
    bound = [b["roleRef"]["name"] for b in rendered.of_kind("ClusterRoleBinding")]
    assert bound == [CLUSTER_ROLE]
    config = rendered.config()
    assert config["SIROCCO_K8S_TENANT_ROLE"] == TENANT_ROLE
    assert config["SIROCCO_K8S_TENANT_ROLE_SUBJECT"] == (
        f"system:serviceaccount:{NAMESPACE}:sirocco-provisioner"
    )


def test_the_roles_name_no_wildcards_and_no_other_resources(render):
    granted = granted_rules(render())
    assert granted, "the default release has a ClusterRole with rules"
    for group, resource, verb in granted:
        assert "*" not in (group, resource, verb)
        assert (group, resource) in MANAGED | READ_ONLY, (group, resource)
        if (group, resource) in READ_ONLY:
            assert verb in READ_VERBS, (group, resource, verb)


def admission_request(
    *, resource: str, name: str, namespace: str = "", user: str, operation: str = "DELETE"
) -> dict:
    """The parts of an admission request the policy reads, as the API server fills them."""
    group = {
        "deployments": "apps",
        "networkpolicies": "networking.k8s.io",
        "rolebindings": "rbac.authorization.k8s.io",
    }.get(resource, "")
    return {
        "operation": operation,
        "resource": {"group": group, "version": "v1", "resource": resource},
        "name": name,
        "namespace": namespace,
        "userInfo": {"username": user},
    }


def evaluate(expression: str, request: dict, obj: dict | None = None) -> bool:
    environment = celpy.Environment()
    program = environment.program(environment.compile(expression))
    activation = {"request": celpy.json_to_cel(request), "object": celpy.json_to_cel(obj)}
    return bool(program.evaluate(activation))


def test_an_admission_policy_holds_the_provisioner_to_the_organizations_namespaces(render):
    rendered = render()
    (policy,) = rendered.of_kind("ValidatingAdmissionPolicy")
    (binding,) = rendered.of_kind("ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    # It covers every resource the ClusterRole lets the provisioner change.
    matched = {
        (group, resource)
        for rule in spec["matchConstraints"]["resourceRules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    writable = {(g, r) for g, r, verb in granted_rules(rendered) if verb not in READ_VERBS}
    assert writable <= matched
    for rule in spec["matchConstraints"]["resourceRules"]:
        assert set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE"}

    (condition,) = spec["matchConditions"]
    validation, binding_rule = spec["validations"]
    provisioner = f"system:serviceaccount:{NAMESPACE}:sirocco-provisioner"
    cases = [
        ("namespaces", "sirocco-acme", "", True),
        ("namespaces", "kube-system", "", False),
        ("namespaces", NAMESPACE, "", False),  # the control plane's own namespace
        ("deployments", "mixtral", "sirocco-acme", True),
        ("deployments", "coredns", "kube-system", False),
        ("services", "sirocco-web", NAMESPACE, False),
        ("networkpolicies", "mixtral-gateway-only", "sirocco-acme", True),
    ]
    for resource, name, namespace, allowed in cases:
        request = admission_request(
            resource=resource, name=name, namespace=namespace, user=provisioner
        )
        assert evaluate(condition["expression"], request)
        assert evaluate(validation["expression"], request) is allowed, (resource, namespace, name)
    # A RoleBinding it writes binds the tenant role to its own account, nothing else.
    own = {"kind": "ServiceAccount", "name": "sirocco-provisioner", "namespace": NAMESPACE}
    tenant = {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": TENANT_ROLE}
    bindings = [
        ({"roleRef": tenant, "subjects": [own]}, True),
        ({"roleRef": {**tenant, "name": "cluster-admin"}, "subjects": [own]}, False),
        ({"roleRef": tenant, "subjects": [{**own, "namespace": "sirocco-acme"}]}, False),
        ({"roleRef": tenant, "subjects": [own, {"kind": "User", "name": "mallory"}]}, False),
    ]
    for obj, allowed in bindings:
        request = admission_request(
            resource="rolebindings",
            name="sirocco-provisioner",
            namespace="sirocco-acme",
            user=provisioner,
            operation="CREATE",
        )
        assert evaluate(validation["expression"], request, obj)
        assert evaluate(binding_rule["expression"], request, obj) is allowed, obj
    # Everyone else (people, other controllers) is not this policy's business.
    someone = admission_request(resource="namespaces", name="kube-system", user="admin")
    assert not evaluate(condition["expression"], someone)


def test_the_admission_policy_goes_with_the_rbac_it_narrows(render):
    assert render(VARIANTS["minimal"]).of_kind("ValidatingAdmissionPolicy") == []
    off = render({"rbac": {"create": True, "restrictToTenantNamespaces": False}})
    assert off.of_kind("ValidatingAdmissionPolicy") == []
    assert off.of_kind("ClusterRole")
