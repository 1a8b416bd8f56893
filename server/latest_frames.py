"""Each camera's latest frame and its result, kept for the snapshot route, encoded only when asked.

The pipeline thread tells :class:`LatestFrames` of every stored batch (a
:class:`~mlink.server.result_listeners.ResultListeners` listener): it keeps a reference to the
newest frame's image (ingest already owns a private copy of it) and the result JSON it stored,
and that is all it does there, so serving never pays for drawing or JPEG encoding. A request
draws (:func:`mlink.server.overlay.draw`), scales to at most ``max_width`` pixels and encodes,
once per frame and variant: the bytes are kept with the frame, so repeated requests (a
dashboard polling a grid) reuse them until a newer frame arrives.

Memory is bounded: one entry per camera of the running config (a camera removed by a reload is
dropped when the new camera list is published; a result of a camera not in it is not kept), and
each entry holds one frame and at most its two encodings.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from mlink.server.overlay import draw

if TYPE_CHECKING:
    from mlink.scheduler.serving import FrameResult
    from mlink.server.daemon import Daemon
    from mlink.server.snapshot import Snapshot

MAX_WIDTH = 960
JPEG_QUALITY = 85


@dataclass
class Held:
    """One camera's latest frame: the image as served, the result stored for it, and its encodings."""

    image: np.ndarray
    result: dict[str, Any]
    wall_time: float
    index: int
    jpeg: dict[bool, bytes] = field(default_factory=dict)  # drawn? -> JPEG bytes


class LatestFrames:
    """The latest frame per camera (see the module docstring); a listener and a reader."""

    def __init__(self, cameras: Iterable[str], max_width: int = MAX_WIDTH, quality: int = JPEG_QUALITY) -> None:
        if max_width < 16 or not 1 <= quality <= 100:
            raise ValueError(f"max_width must be >= 16 and quality in 1..100, got {max_width}, {quality}")
        self.max_width = max_width
        self.quality = quality
        self._cameras = frozenset(cameras)
        self._held: dict[str, Held] = {}  # entries replaced whole, by the pipeline thread
        self._encode = threading.Lock()  # one encoding at a time: requests never race to fill a cache
        self.encodes = 0  # how many JPEGs were encoded (a repeated request adds none)

    # -- the pipeline thread's side ---------------------------------------------------------
    def on_results(self, results: Sequence[FrameResult], stored: Sequence[dict[str, Any]]) -> None:
        """Keep each camera's newest frame of the batch; a revision of the held frame replaces
        its result (a rotating model ran on it); an older frame's revision is ignored."""
        for r, result in zip(results, stored):
            f = r.frame
            if f.camera not in self._cameras:
                continue
            held = self._held.get(f.camera)
            if held is not None and (f.wall_time, f.index) < (held.wall_time, held.index):
                continue
            self._held[f.camera] = Held(f.image, result, f.wall_time, f.index)
            if f.camera not in self._cameras:  # a reload removed it meanwhile (retain runs on its thread)
                self._held.pop(f.camera, None)

    def on_snapshot(self, snap: Snapshot) -> None:
        """Follow the published camera list: a camera a reload removed is forgotten."""
        self.retain(snap.cameras)

    def retain(self, cameras: Iterable[str]) -> None:
        self._cameras = frozenset(cameras)
        for camera in [c for c in self._held if c not in self._cameras]:
            self._held.pop(camera, None)

    # -- the request side -------------------------------------------------------------------
    def cameras(self) -> list[str]:
        """The cameras with a frame held (one entry each)."""
        return list(self._held)

    def held(self, camera: str) -> Held | None:
        return self._held.get(camera)

    def jpeg(self, camera: str, drawn: bool = True) -> bytes | None:
        """The camera's latest frame as JPEG, with its result drawn unless ``drawn`` is False;
        None when no frame of it is held."""
        held = self._held.get(camera)
        return None if held is None else self.encode(held, drawn)

    def encode(self, held: Held, drawn: bool = True) -> bytes:
        """``held`` as JPEG (drawn or not), encoded on the first call and kept with it."""
        cached = held.jpeg.get(drawn)
        if cached is not None:
            return cached
        with self._encode:
            cached = held.jpeg.get(drawn)
            if cached is None:
                image = self._scaled(held.image)  # drawn at the size it is shown: lines and text stay legible
                ok, buf = cv2.imencode(
                    ".jpg", draw(image, held.result) if drawn else image, [cv2.IMWRITE_JPEG_QUALITY, self.quality]
                )
                if not ok:
                    raise RuntimeError("the frame could not be encoded as JPEG")
                cached = held.jpeg[drawn] = buf.tobytes()
                self.encodes += 1
        return cached

    def _scaled(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if w <= self.max_width:
            return image
        return cv2.resize(image, (self.max_width, max(1, round(h * self.max_width / w))), interpolation=cv2.INTER_AREA)


def latest_frames(daemon: Daemon) -> LatestFrames:
    """The daemon's :class:`LatestFrames`, made and registered (results and snapshots) on first use."""
    for listener in daemon.result_listeners:
        owner = getattr(listener, "__self__", None)
        if isinstance(owner, LatestFrames):
            return owner
    frames = LatestFrames(daemon.snapshot.cameras)
    daemon.snapshot_listeners.append(frames.on_snapshot)
    daemon.result_listeners.add(frames.on_results)
    return frames
