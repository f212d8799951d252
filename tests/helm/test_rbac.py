"""The worker's ClusterRole grants what the Kubernetes provisioner uses, and nothing more."""

import json

import celpy
import pytest

from tests.helm.conftest import NAMESPACE, ROOT
from tests.helm.variants import VARIANTS

pytestmark = pytest.mark.nodb

# Written by the Kubernetes provisioner's tests (tests/deployments/conftest.py): every request
# it made to the emulated API server, as {"rules": [{"apiGroup", "resource", "verbs"}]}.
OBSERVED_VERBS = ROOT / "tests" / "deployments" / "observed_k8s_verbs.json"

# What the provisioner manages (issue 5), and what it only reads.
MANAGED = {
    ("", "namespaces"),
    ("", "resourcequotas"),
    ("", "services"),
    ("apps", "deployments"),
    ("networking.k8s.io", "networkpolicies"),
    ("policy", "poddisruptionbudgets"),
}
READ_ONLY = {("", "pods"), ("", "events")}
READ_VERBS = {"get", "list", "watch"}


def granted_rules(rendered) -> set[tuple[str, str, str]]:
    """(group, resource, verb) for every permission the ClusterRole grants."""
    (role,) = rendered.of_kind("ClusterRole")
    grants = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, (
            f"a rule with more than groups, resources and verbs is not least privilege: {rule}"
        )
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    grants.add((group, resource, verb))
    return grants


def observed_verbs() -> set[tuple[str, str, str]]:
    rules = json.loads(OBSERVED_VERBS.read_text())["rules"]
    return {(rule["apiGroup"], rule["resource"], verb) for rule in rules for verb in rule["verbs"]}


def test_the_cluster_role_grants_every_verb_the_provisioner_used_and_no_more(render):
    if not OBSERVED_VERBS.exists():
        pytest.skip(
            f"{OBSERVED_VERBS.relative_to(ROOT)} does not exist yet: the Kubernetes "
            "provisioner's tests (issue 5) write it; until then there is nothing to compare with"
        )
    observed = observed_verbs()
    assert observed, f"{OBSERVED_VERBS} lists no requests"
    # Server-side apply is a PATCH; when it creates the object the API server also checks
    # "create" for it (k8s.io/apiserver/pkg/endpoints/handlers/patch.go), which an emulated
    # API server does not, so every applied resource needs both.
    needed = observed | {
        (group, resource, "create") for group, resource, verb in observed if verb == "patch"
    }
    granted = granted_rules(render())
    assert granted == needed, (
        f"missing: {sorted(needed - granted)}; not used by the provisioner: {sorted(granted - needed)}"
    )


def test_the_cluster_role_names_no_wildcards_and_no_other_resources(render):
    granted = granted_rules(render())
    assert granted, "the default release has a ClusterRole with rules"
    for group, resource, verb in granted:
        assert "*" not in (group, resource, verb)
        assert (group, resource) in MANAGED | READ_ONLY, (group, resource)
        if (group, resource) in READ_ONLY:
            assert verb in READ_VERBS, (group, resource, verb)


def admission_request(*, resource: str, name: str, namespace: str = "", user: str) -> dict:
    """The parts of an admission request the policy reads, as the API server fills them."""
    group = {"deployments": "apps", "networkpolicies": "networking.k8s.io"}.get(resource, "")
    return {
        "operation": "DELETE",
        "resource": {"group": group, "version": "v1", "resource": resource},
        "name": name,
        "namespace": namespace,
        "userInfo": {"username": user},
    }


def evaluate(expression: str, request: dict) -> bool:
    environment = celpy.Environment()
    program = environment.program(environment.compile(expression))
    return bool(program.evaluate({"request": celpy.json_to_cel(request)}))


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
    (validation,) = spec["validations"]
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
    # Everyone else (people, other controllers) is not this policy's business.
    someone = admission_request(resource="namespaces", name="kube-system", user="admin")
    assert not evaluate(condition["expression"], someone)


def test_the_admission_policy_goes_with_the_rbac_it_narrows(render):
    assert render(VARIANTS["minimal"]).of_kind("ValidatingAdmissionPolicy") == []
    off = render({"rbac": {"create": True, "restrictToTenantNamespaces": False}})
    assert off.of_kind("ValidatingAdmissionPolicy") == []
    assert off.of_kind("ClusterRole")
