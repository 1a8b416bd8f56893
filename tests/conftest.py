"""Shared fixtures: a verified asset store over the mirror, and real frames of the sample videos."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mlink.models.assets import AssetStore
from mlink.server.frames import read_frames

REPO = Path(__file__).resolve().parents[1]


def _mirror() -> Path | None:
    env = os.environ.get("MLINK_ASSET_MIRROR")
    if env:
        return Path(env)
    sibling = REPO.parent / "shared" / "assets"
    return sibling if sibling.is_dir() else None


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> AssetStore:
    """The project's store, cached under MLINK_HOME when set (CI reuses it), offline."""
    home = Path(os.environ["MLINK_HOME"]) if os.environ.get("MLINK_HOME") else tmp_path_factory.mktemp("mlink-home")
    return AssetStore(home=home, mirror=_mirror(), offline=True)


def sample_frames(
    store: AssetStore, video: str, n: int, fps: float | None = None, start: float = 0.0
) -> list[np.ndarray]:
    return [f.image for f in read_frames(str(store.path(video)), sample_fps=fps, max_frames=n, start=start)]


@pytest.fixture(scope="session")
def vtest_frames(store: AssetStore) -> list[np.ndarray]:
    """Eight frames of vtest.avi, 0.5 s apart (pedestrians on walkways)."""
    return sample_frames(store, "vtest", 8, fps=2.0)


@pytest.fixture(scope="session")
def market_frames(store: AssetStore) -> list[np.ndarray]:
    """Eight frames of market-street.mp4, 1 s apart (street, streetcars, people)."""
    return sample_frames(store, "market_street", 8, fps=1.0)


@pytest.fixture(scope="session")
def megamind_frames(store: AssetStore) -> list[np.ndarray]:
    """Six frames of Megamind.avi, from 2 s in, 0.5 s apart."""
    return sample_frames(store, "megamind", 6, fps=2.0, start=2.0)
