"""The chart rendered by Helm's own library (helm-python-sdk embeds it: no `helm` binary)."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "sirocco"
RELEASE = "sirocco"
NAMESPACE = "sirocco"


@dataclass
class Rendered:
    """What `helm install` would send to the cluster, parsed, plus its NOTES.txt."""

    objects: list[dict]
    notes: str
    # The release's full name, which every object name starts with.
    fullname: str
    by_key: dict[tuple[str, str], dict] = field(init=False)

    def __post_init__(self):
        self.by_key = {}
        for obj in self.objects:
            key = (obj["kind"], obj["metadata"]["name"])
            assert key not in self.by_key, f"two objects named {key}"
            self.by_key[key] = obj

    def get(self, kind: str, name: str) -> dict:
        return self.by_key[(kind, name)]

    def of_kind(self, kind: str) -> list[dict]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def deployment(self, component: str) -> dict:
        return self.get("Deployment", f"{self.fullname}-{component}")

    def container(self, component: str) -> dict:
        workload = (
            self.get("Job", f"{self.fullname}-migrate")
            if component == "migrate"
            else self.deployment(component)
        )
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        return container

    def config(self) -> dict[str, str]:
        return self.get("ConfigMap", self.fullname)["data"]

    def pod_specs(self) -> list[dict]:
        return [
            obj["spec"]["template"]["spec"]
            for obj in self.of_kind("Deployment") + self.of_kind("Job")
        ]


def parse_manifests(manifests: dict[str, str], *, fullname: str) -> Rendered:
    objects, notes = [], ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(objects=objects, notes=notes, fullname=fullname)


@pytest.fixture(scope="session")
def chart():
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart):
    """render(values) -> Rendered; each distinct set of values is rendered once per session."""
    cache: dict[str, Rendered] = {}

    def render_values(values: dict | None = None, *, namespace: str = NAMESPACE) -> Rendered:
        key = json.dumps([values or {}, namespace], sort_keys=True)
        if key not in cache:
            values = values or {}
            manifests = chart.render(values, name=RELEASE, namespace=namespace)
            fullname = values.get("fullnameOverride") or RELEASE
            cache[key] = parse_manifests(manifests, fullname=fullname)
        return cache[key]

    return render_values
