"""The examples in docs/operator-guide.md work: its values file renders, its manifests validate."""

import re
import textwrap

import kubernetes_validate
import pytest
import yaml

from tests.helm.conftest import ROOT

pytestmark = pytest.mark.nodb

GUIDE = ROOT / "docs" / "operator-guide.md"


def yaml_examples() -> list[dict]:
    blocks = re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    return [yaml.safe_load(textwrap.dedent(block)) for block in blocks]


def test_the_guides_values_file_installs(render):
    (values,) = [example for example in yaml_examples() if "image" in example]
    rendered = render(values)
    assert rendered.get("Ingress", "sirocco")["spec"]["rules"][0]["host"] == "ai.example.com"
    assert rendered.config()["SIROCCO_PUBLIC_URL"] == "https://ai.example.com"
    for obj in rendered.objects:
        kubernetes_validate.validate(obj, "1.31", strict=True)


def test_the_guides_manifests_validate_against_kubernetes():
    manifests = [example for example in yaml_examples() if "kind" in example]
    assert {m["kind"] for m in manifests} == {"CronJob"}
    for manifest in manifests:
        kubernetes_validate.validate(manifest, "1.31", strict=True)
