"""Frame source on real videos: sampling by time, clear errors for unreadable input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlink.models.assets import AssetStore
from mlink.server.frames import FrameSourceError, read_frames, resolve_url


def test_sampling_by_time_on_vtest(store: AssetStore) -> None:
    frames = list(read_frames(str(store.path("vtest")), sample_fps=2.0, max_frames=6))
    assert [f.index for f in frames] == [0, 5, 10, 15, 20, 25]  # vtest is 10 fps
    assert np.allclose([f.timestamp for f in frames], [0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert all(f.image.shape == (576, 768, 3) and f.image.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[0].image, frames[-1].image)


def test_sampling_a_29_97_fps_video_keeps_the_rate(store: AssetStore) -> None:
    frames = list(read_frames(str(store.path("market_street")), sample_fps=1.0, max_frames=5, start=3.0))
    ts = [f.timestamp for f in frames]
    assert ts[0] >= 3.0 and np.allclose(np.diff(ts), 1.0, atol=0.04)


def test_every_frame_when_no_rate_and_end_of_file(store: AssetStore) -> None:
    frames = list(read_frames(str(store.path("megamind"))))
    assert len(frames) == 270
    assert [f.index for f in frames[:3]] == [0, 1, 2]


def test_missing_and_unreadable_videos(tmp_path: Path) -> None:
    with pytest.raises(FrameSourceError, match="no such file"):
        list(read_frames(str(tmp_path / "nope.mp4")))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(FrameSourceError, match=r"junk\.mp4"):
        list(read_frames(str(junk)))


def test_asset_urls_resolve_through_the_store(store: AssetStore) -> None:
    assert resolve_url("asset://vtest", store) == str(store.path("vtest"))
    assert resolve_url("rtsp://cam/stream", store) == "rtsp://cam/stream"
