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
