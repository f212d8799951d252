"""The project layout keeps promises DESIGN.md makes."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.nodb


def top_level_modules():
    for path in ROOT.iterdir():
        if path.name.startswith(".") or path.name in {"tests", "bench", "var", "docs", "helm"}:
            continue
        if path.is_dir() and (path / "__init__.py").exists():
            yield path.name
        elif path.suffix == ".py":
            yield path.stem


def test_no_top_level_package_shadows_the_standard_library():
    # A package named `platform` (say) hides the stdlib module and breaks uuid, Celery, gunicorn.
    clashes = sorted(set(top_level_modules()) & sys.stdlib_module_names)
    assert clashes == [], f"top-level names that shadow the standard library: {clashes}"


def test_the_layout_has_every_app():
    names = set(top_level_modules())
    expected = {
        "controlplane",
        "accounts",
        "catalog",
        "deployments",
        "gateway",
        "billing",
        "console",
    }
    assert expected <= names


def test_runtime_imports_nothing_from_the_control_plane():
    control_plane = {
        "controlplane",
        "accounts",
        "catalog",
        "deployments",
        "gateway",
        "billing",
        "console",
        "django",
    }
    offenders = []
    for path in (ROOT / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in control_plane
            ]
    assert offenders == []


# The control plane's apps, and which of them each may import: the edges of the app graph.
# `gateway` writes usage events and `billing` ingests them; both depend on `metering`, which owns
# them, and `billing` never imports the gateway. `runtime` is the pod image's program, a library
# here (catalog reads its manifest format; the gateway counts tokens with its tokenizer, so that
# it counts the prompt a replica renders).
MAY_IMPORT = {
    "accounts": set(),
    "catalog": {"accounts", "runtime"},
    "deployments": {"accounts", "catalog"},
    "metering": {"accounts"},
    "billing": {"accounts", "catalog", "deployments", "metering"},
    "gateway": {"accounts", "catalog", "deployments", "metering", "billing", "runtime"},
    "console": {"accounts", "catalog", "deployments", "metering", "billing"},
}
# What the apps share from the project package: none of these imports an app. The rest of
# `controlplane` (urls, asgi, celery, settings, demo, commands) composes the apps, and no app
# imports it.
CONTROLPLANE_SHARED = {
    "controlplane.dbbounds",  # the gateway's own process bounds its database waits too
    "controlplane.errors",
    "controlplane.health",  # the gateway's /readyz asks the database as the web's does
    "controlplane.logging",
    "controlplane.mail",
    "controlplane.ops",
    "controlplane.rest",
    "controlplane.secrets_at_rest",  # secrets stored encrypted (identity providers', partners')
    "controlplane.spreadsheets",
}


def imported_top_levels(path: Path) -> set[str]:
    """Dotted names imported by a file, at any depth (imports inside functions count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _is_shared(name: str) -> bool:
    return any(name == shared or name.startswith(shared + ".") for shared in CONTROLPLANE_SHARED)


def test_the_app_dependency_graph_is_acyclic():
    # Kahn's algorithm over MAY_IMPORT: whatever cannot be ordered sits on a cycle.
    remaining = {app: set(deps) & set(MAY_IMPORT) for app, deps in MAY_IMPORT.items()}
    while ready := [app for app, deps in remaining.items() if not deps]:
        for app in ready:
            del remaining[app]
        for deps in remaining.values():
            deps.difference_update(ready)
    assert remaining == {}, f"apps on a dependency cycle: {sorted(remaining)}"


def test_apps_import_only_what_the_graph_allows():
    apps = set(MAY_IMPORT)
    assert apps <= set(top_level_modules())
    offenders = []
    for app, allowed in MAY_IMPORT.items():
        for path in (ROOT / app).rglob("*.py"):
            for name in imported_top_levels(path):
                top = name.split(".")[0]
                if top == "controlplane" and not _is_shared(name):
                    offenders.append(f"{path.relative_to(ROOT)}: {name} (project composition)")
                elif top in apps | {"runtime"} and top != app and top not in allowed:
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


def test_what_the_apps_share_from_controlplane_imports_no_app():
    apps = set(MAY_IMPORT)
    offenders = []
    for path in (ROOT / "controlplane").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if not _is_shared(module.removesuffix(".__init__")):
            continue
        offenders += [
            f"{module}: {name}" for name in imported_top_levels(path) if name.split(".")[0] in apps
        ]
    assert offenders == []
