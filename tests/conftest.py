"""Shared pytest fixtures: the repository root, the read-only shared data, and tiny photo folders."""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def shared_path(*parts: str) -> Path:
    """Return a path under the shared data folder, skipping the test when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is missing: the shared data folder sits beside the repository in CI only")
    return path


@pytest.fixture
def shared():
    """The shared data folder (skips the test when it is missing)."""
    return shared_path()


def write_photo(path: Path, seed: int, size: int = 48, mode: str = "RGB", fmt: str | None = None) -> Path:
    """Write a small random-texture photo, so that tests need no real data."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    return path
