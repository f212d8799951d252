from pathlib import Path

import pytest

from runtime.tiny_moe import build_tiny_moe


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """The tiny MoE checkpoint, built once per test session."""
    return build_tiny_moe(tmp_path_factory.mktemp("tiny-moe"))
