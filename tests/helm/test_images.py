"""The container images: pinned bases, a non-root user, and a control-plane image that carries
what the chart's processes need and nothing else. (No Docker engine runs in the test
environment, so these read the Dockerfiles rather than build them.)"""

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

from tests.helm.conftest import ROOT

pytestmark = pytest.mark.nodb

DOCKERFILES = sorted(
    path
    for path in ROOT.rglob("Dockerfile")
    if not {".venv", "var", "node_modules", ".git"} & set(path.relative_to(ROOT).parts)
)
# A base is pinned by digest, or by a tag with a full version (python:3.11.14-slim-bookworm).
PINNED = re.compile(r"@sha256:[0-9a-f]{64}$|:[^/@]*\d+\.\d+\.\d+[^/@]*$")


def stages(dockerfile: Path) -> list[dict]:
    """Each FROM with its base image (ARG defaults substituted), stage name and instructions."""
    parser = DockerfileParser(str(dockerfile))
    args, found = {}, []
    for instruction in parser.structure:
        kind, value = instruction["instruction"], instruction["value"].strip()
        if kind == "ARG" and not found and "=" in value:
            name, default = value.split("=", 1)
            args[name] = default.strip("\"'")
        elif kind == "FROM":
            words = re.sub(r"--platform=\S+\s+", "", value).split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), words[0])
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            found.append({"image": image, "name": name, "instructions": []})
        elif found:
            found[-1]["instructions"].append((kind, value))
    return found


def test_the_control_plane_and_runtime_images_have_dockerfiles():
    assert ROOT / "Dockerfile" in DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_base_image_is_pinned(dockerfile):
    found = stages(dockerfile)
    names = {stage["name"] for stage in found if stage["name"]}
    for stage in found:
        if stage["image"] in names:
            continue
        assert PINNED.search(stage["image"]), (
            f"{dockerfile.name}: base {stage['image']!r} is not pinned to a digest or exact version"
        )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_final_stage_runs_as_a_numeric_non_root_user(dockerfile):
    final = stages(dockerfile)[-1]
    users = [value for kind, value in final["instructions"] if kind == "USER"]
    assert users, f"{dockerfile}: the final stage runs as root (no USER)"
    uid = users[-1].split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, f"{dockerfile}: USER {users[-1]}"


def control_plane_image() -> dict:
    return stages(ROOT / "Dockerfile")[-1]


def test_the_control_plane_image_serves_collected_static_files():
    env = DockerfileParser(str(ROOT / "Dockerfile")).envs
    assert env["WHITENOISE_USE_FINDERS"] == "false"
    assert env["STATIC_ROOT"]
    runs = " ".join(value for kind, value in control_plane_image()["instructions"] if kind == "RUN")
    assert "manage.py collectstatic --noinput" in runs


def test_the_control_plane_image_writes_only_where_the_chart_mounts_volumes(render):
    env = DockerfileParser(str(ROOT / "Dockerfile")).envs
    mounts = {m["mountPath"] for m in render().container("web")["volumeMounts"]}
    assert env["SIROCCO_VAR_DIR"] in mounts
    assert env["DJANGO_SETTINGS_MODULE"] == "controlplane.settings.base"


def test_the_control_plane_image_starts_web_like_the_chart(render):
    (cmd,) = [value for kind, value in control_plane_image()["instructions"] if kind == "CMD"]
    assert json.loads(cmd) == render().container("web")["command"]


def test_the_control_plane_image_installs_the_runtime_dependencies_only():
    builder = stages(ROOT / "Dockerfile")[0]
    runs = " ".join(value for kind, value in builder["instructions"] if kind == "RUN")
    assert '["project"]["dependencies"]' in runs and "--only-binary=:all:" in runs
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[=<>~!; ]", dep, maxsplit=1)[0].lower() for dep in dependencies}
    # Inference happens in the runtime image; torch would add gigabytes to every process.
    assert not names & {"torch", "transformers", "vllm"}


# The packages the control-plane processes run; `runtime` is the inference image's program.
CONTROL_PLANE_PACKAGES = (
    "controlplane",
    "accounts",
    "catalog",
    "deployments",
    "metering",
    "gateway",
    "billing",
    "console",
)


def installed_closure(requirements: list[str]) -> set[str]:
    """Distributions a `pip install` of these requirements brings, extras included."""
    extras_of: dict[str, set[str]] = {}
    pending = [Requirement(text) for text in requirements]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in extras_of and set(requirement.extras) <= extras_of[name]:
            continue
        extras = extras_of.setdefault(name, set())
        extras |= requirement.extras
        for text in importlib.metadata.distribution(name).requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras | {""}):
                pending.append(sub)
    return set(extras_of)


def imported_top_level_modules(package: Path):
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                yield name.split(".")[0], path.relative_to(ROOT)


def test_the_control_plane_image_has_every_module_its_processes_import():
    # The image installs project.dependencies alone: a module that comes only with the dev or
    # runtime extras (installed here, absent there) would crash the process that imports it.
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    installed = installed_closure(dependencies)
    providers = importlib.metadata.packages_distributions()
    first_party = {*CONTROL_PLANE_PACKAGES, "runtime"}
    missing: dict[str, set[str]] = {}
    for package in CONTROL_PLANE_PACKAGES:
        for module, path in imported_top_level_modules(ROOT / package):
            if module in sys.stdlib_module_names or module in first_party or module == "__future__":
                continue
            if not {canonicalize_name(d) for d in providers.get(module, [])} & installed:
                missing.setdefault(module, set()).add(str(path))
    assert not missing, (
        f"imported by the control plane but not installed by project.dependencies: {missing}"
    )


def test_the_build_context_lets_in_every_app_and_nothing_else():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the context is an allow-list: secrets in var/ or .env stay out"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    apps = {
        path.name
        for path in ROOT.iterdir()
        if path.is_dir() and (path / "__init__.py").exists() and path.name not in {"tests", "bench"}
    }
    assert apps <= allowed, f"packages missing from .dockerignore: {sorted(apps - allowed)}"
    assert {"manage.py", "pyproject.toml"} <= allowed
