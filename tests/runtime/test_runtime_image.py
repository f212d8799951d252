"""The runtime's container image definition (no Docker engine here: the Dockerfile is read)."""

import ast
import importlib.metadata
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.nodb

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "runtime" / "Dockerfile"


def instructions(kind: str) -> list[str]:
    return [
        i["value"] for i in DockerfileParser(str(DOCKERFILE)).structure if i["instruction"] == kind
    ]


def image_requirements() -> list[str]:
    """What the build stage installs: the runtime extra plus the base names it lists."""
    build = " ".join(instructions("RUN"))
    base = ast.literal_eval(re.search(r"base = (\([^)]*\))", build).group(1))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"]["runtime"] + [
        d for d in project["dependencies"] if d.split("==")[0] in base
    ]


def test_torch_comes_from_the_cpu_index_at_the_pinned_version():
    build = " ".join(instructions("RUN"))
    assert "--index-url https://download.pytorch.org/whl/cpu -r torch.txt" in build
    assert "torch==2.13.0" in image_requirements()


def test_the_entrypoint_runs_the_runtime_cli_and_pods_pass_serve():
    assert json.loads(instructions("ENTRYPOINT")[-1]) == ["python", "-m", "runtime"]
    assert json.loads(instructions("CMD")[-1])[0] == "serve"
    assert instructions("USER")[-1] == "10001:10001"


def test_the_image_installs_every_module_the_runtime_imports():
    installed, pending = set(), [Requirement(r) for r in image_requirements()]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in installed:
            continue
        installed.add(name)
        for text in importlib.metadata.distribution(name).requires or []:
            sub = Requirement(text)
            extras = requirement.extras | {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                pending.append(sub)
    providers = importlib.metadata.packages_distributions()
    missing = set()
    for path in (ROOT / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in (m.split(".")[0] for m in modules):
                if module in sys.stdlib_module_names or module in {"runtime", "__future__"}:
                    continue
                if not {canonicalize_name(d) for d in providers.get(module, [])} & installed:
                    missing.add(f"{module} ({path.name})")
    assert not missing
