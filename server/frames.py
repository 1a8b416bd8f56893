"""Frame source: decode a video file or stream with OpenCV and sample it at a fixed rate.

Sampling is by timestamp, not by frame count, so a 10 fps file and a 30 fps camera sampled at
1 fps both give one frame per second of video. Timestamps are the frame index over the nominal
fps (25 when the source reports none). :class:`FrameSampler` is the same sampling for the
capture loop (``server/capture.py``), which grabs frame by frame and samples live streams by
wall time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

from mlink.configs.schema import ASSET_NAME
from mlink.server.redact import redact

if TYPE_CHECKING:
    from mlink.models.assets import AssetStore


class FrameSourceError(RuntimeError):
    """A video could not be opened or decoded; the message names it and says why."""


_LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "rtmps://", "http://", "https://", "udp://", "tcp://", "srt://")


def is_live(url: str) -> bool:
    """Network streams and device indices are live (sampled by wall clock); files are not."""
    return url.isdigit() or url.lower().startswith(_LIVE_SCHEMES)


@dataclass(frozen=True)
class Frame:
    index: int  # index of the decoded frame in the source
    timestamp: float  # seconds from the start of the source
    image: np.ndarray  # HxWx3 uint8 BGR


# CAP_PROP_HW_ACCELERATION values OpenCV reports after opening (cv2.VIDEO_ACCELERATION_*)
_HW_NAMES = {0: "software", 1: "any", 2: "d3d11", 3: "vaapi", 4: "mfx"}
HW_PARAMS = [cv2.CAP_PROP_HW_ACCELERATION, cv2.VIDEO_ACCELERATION_ANY]


def hw_decode_used(cap: cv2.VideoCapture) -> str:
    """Which decoder an opened capture uses: "software", or the hardware API OpenCV picked
    ("vaapi", "d3d11", "mfx"; "any" when the backend does not say which)."""
    value = int(cap.get(cv2.CAP_PROP_HW_ACCELERATION) or 0)
    return _HW_NAMES.get(value, f"hw{value}")


def open_hw_first(source: str | int, api: int, params: list[int], hw: bool) -> cv2.VideoCapture:
    """Open with hardware decoding asked for (``VIDEO_ACCELERATION_ANY``) when ``hw``; a backend
    that refuses the request is opened again in software, silently (most hosts have no VAAPI)."""
    if hw and not (isinstance(source, int) or (isinstance(source, str) and source.isdigit())):
        cap = cv2.VideoCapture(source, api, [*params, *HW_PARAMS])
        if cap.isOpened():
            return cap
        cap.release()
    return cv2.VideoCapture(source, api, params) if params else cv2.VideoCapture(source, api)


def open_capture(url: str | int, hw: bool = False) -> cv2.VideoCapture:
    """Open a file path, URL or device index; raise FrameSourceError if OpenCV cannot. With
    ``hw``, hardware decoding is asked for first (see :func:`open_hw_first`)."""
    if isinstance(url, str) and "://" not in url and not url.isdigit():
        path = Path(url)
        if not path.is_file():
            raise FrameSourceError(f"video {redact(url)}: no such file")
    source: str | int = int(url) if isinstance(url, str) and url.isdigit() else url
    cap = open_hw_first(source, cv2.CAP_ANY, [], hw)
    if not cap.isOpened():
        cap.release()
        raise FrameSourceError(
            f"video {redact(str(url))}: OpenCV cannot open it (unknown format, bad URL or unreachable)"
        )
    return cap


def resolve_url(url: str, store: AssetStore | None = None) -> str:
    """``asset://NAME`` -> verified local path of that sample video (a name of the manifest, never
    a path: ``asset://../..`` is refused here too, not only by the config); ``file:///p`` -> ``/p``
    (the path the config checked against ``ingest.allowed_dirs``); anything else unchanged."""
    if url.startswith("asset://"):
        from mlink.models.assets import default_store

        name = url.removeprefix("asset://")
        if not ASSET_NAME.fullmatch(name):
            raise FrameSourceError(f"asset://{name}: not an asset name (letters, digits, _ . -)")
        return str((store or default_store()).path(name))
    if url.lower().startswith("file://"):
        return unquote(urlsplit(url).path)
    return url


def nominal_fps(cap: cv2.VideoCapture) -> float:
    """The rate a capture reports, or 25 when it reports none or an absurd one (streams without
    a nominal rate: timestamps still advance sanely)."""
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    return 25.0 if fps <= 0 or fps > 1000 else fps


def read_frames(
    url: str | int,
    sample_fps: float | None = None,
    max_frames: int | None = None,
    start: float = 0.0,
) -> Iterator[Frame]:
    """Yield frames sampled at ``sample_fps`` (every frame when None), from ``start`` seconds.

    Raises FrameSourceError when the source cannot be opened or yields no frame at all.
    """
    if sample_fps is not None and sample_fps <= 0:
        raise ValueError(f"sample_fps must be > 0, got {sample_fps}")
    cap = open_capture(url)
    try:
        native_fps = nominal_fps(cap)
        period = 1.0 / sample_fps if sample_fps else 0.0
        next_t = start
        index = -1
        yielded = 0
        while max_frames is None or yielded < max_frames:
            ok, image = cap.read()
            if not ok or image is None:
                break
            index += 1
            # Index over nominal fps: exact for files, and unlike CAP_PROP_POS_MSEC the same
            # across OpenCV backends (some report the position of the *next* frame).
            t = index / native_fps
            if t + 1e-6 < next_t:
                continue
            next_t = max(next_t + period, t) if period else t
            yielded += 1
            yield Frame(index=index, timestamp=round(t, 4), image=image)
        if yielded == 0 and index < 0:
            raise FrameSourceError(f"video {redact(str(url))}: opened but no frame could be decoded")
    finally:
        cap.release()


def grab_failed_reason(live: bool, produced: int) -> str:
    """Why a reader's grab failed: a live stream stopped, a file had no frame, or it ended."""
    if live:
        return "read failed: the stream stopped sending frames (closed, timed out or lost)"
    if produced == 0:
        return "opened but no frame could be decoded"
    return "eof"


class FrameSampler:
    """Which grabbed frames a camera reader keeps, ``fps`` of them a second: by video time for
    files (frame ``index`` / the file's ``native`` rate), by wall (monotonic) time for live streams."""

    def __init__(self, live: bool, fps: float, native: float, opened: float) -> None:
        self.live = live
        self.period = 1.0 / fps
        self.native = native
        self.opened = opened
        self.next_t = 0.0  # files: next sampled video time
        self.next_due = opened  # live: next sampled wall (monotonic) time

    def due(self, index: int, now: float) -> float | None:
        """The frame's time (video seconds; for live streams, seconds since opening), or None to skip it."""
        if self.live:
            if now < self.next_due:
                return None
            # on average fps; never two samples closer than half a period (network bursts)
            self.next_due = max(self.next_due + self.period, now + self.period / 2)
            return now - self.opened
        t = index / self.native
        if t + 1e-6 < self.next_t:
            return None
        self.next_t = max(self.next_t + self.period, t)
        return t
