"""Shared fixtures: difftool.testing's (tiny recipes, in-process plugins, the CLI) and the real data."""

from pathlib import Path

import pytest

from difftool.testing import TINY_RECIPE, cli, plugin, tiny_recipe, tiny_sd, tiny_sdxl  # noqa: F401 (fixtures)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BUTTERFLIES = SHARED_DATA / "smithsonian-butterflies-64"


@pytest.fixture
def butterflies() -> Path:
    """The 64 real butterfly images in shared/data; skips where they are absent."""
    if not BUTTERFLIES.is_dir():
        pytest.skip("shared/data/smithsonian-butterflies-64 is not on this machine")
    return BUTTERFLIES
