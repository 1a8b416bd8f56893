"""Frame source on real videos: sampling by time, clear errors for unreadable input."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from mlink.models.assets import AssetStore
from mlink.server.frames import FrameSourceError, hw_decode_used, open_capture, read_frames, resolve_url
from mlink.server.shm_ring import RingClosed, ShmRing, unlink_name


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


def test_hardware_decode_is_asked_for_and_falls_back_to_software(store: AssetStore) -> None:
    path = str(store.path("vtest"))
    with_hw, plain = open_capture(path, hw=True), open_capture(path)
    try:
        ok_hw, a = with_hw.read()
        ok, b = plain.read()
        assert ok_hw and ok and a.shape == b.shape == (576, 768, 3)
        # this host has no VAAPI/D3D11/MFX: OpenCV opened it in software and says so
        assert hw_decode_used(with_hw) in ("software", "vaapi", "d3d11", "mfx", "any")
        assert hw_decode_used(plain) == "software"
    finally:
        with_hw.release()
        plain.release()


def test_shm_ring_hands_frames_over_and_waits_for_a_free_slot(vtest_frames: list[np.ndarray]) -> None:
    name = f"mlktest{os.getpid()}"
    shape = vtest_frames[0].shape
    writer = ShmRing(name, shape, 2, create=True)
    reader = ShmRing(name, shape, 2, create=False)
    try:
        assert ShmRing.bytes_for(shape, 2) == 64 + 2 * 576 * 768 * 3  # the bound per camera
        slots = [writer.put(vtest_frames[0]), writer.put(vtest_frames[1])]
        assert slots == [0, 1]
        stop = threading.Event()
        stop.set()
        with pytest.raises(RingClosed):  # both slots unread: a third frame must wait
            writer.put(vtest_frames[2], stop)
        first = reader.take(0)
        assert np.array_equal(first, vtest_frames[0])
        assert writer.put(vtest_frames[2], stop) == 0  # slot 0 was handed back
        assert np.array_equal(reader.take(1), vtest_frames[1]) and np.array_equal(reader.take(0), vtest_frames[2])
        assert np.array_equal(first, vtest_frames[0])  # a copy: reusing the slot did not change it
        with pytest.raises(ValueError, match="does not fit"):
            writer.put(vtest_frames[0][:100])
    finally:
        reader.close()
        writer.close()
        writer.unlink()
    assert not unlink_name(name) and f"{name}" not in os.listdir("/dev/shm")
