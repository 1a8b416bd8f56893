"""What a camera's status says (``GET /api/v1/cameras``, /metrics, /readyz), and the rate
counter behind its fps figures; kept apart from ``server/ingest.py`` so the readers stay short."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class CameraStatus:
    id: str
    url: str  # redacted
    state: str  # connecting | connected | retrying | ended | stopped
    live: bool
    fps_target: float
    fps_in: float  # frames sampled into the queue per second (last few seconds)
    fps_processed: float  # frames the consumer reported processed per second
    frames_in: int
    frames_processed: int
    drops: int  # frames dropped from a full queue (oldest first)
    reconnects: int  # reopen tries after an open or read failure
    loops: int  # file restarts (loop: true)
    queued: int
    last_error: str | None  # redacted
    last_error_at: float | None
    last_frame_at: float | None
    retry_at: float | None  # unix time of the next reopen try while retrying
    capture: str = "thread"  # thread (in the serving process) | process (a capture process)
    hw_decode: str | None = None  # decoder of the open source: software | vaapi | d3d11 | mfx | any
    decode_ms: float = 0.0  # EWMA of ms per grabbed frame (grab, plus retrieve when sampled)
    queue_wait_ms: float = 0.0  # EWMA of ms from capture to the consumer taking the frame

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def healthy(self) -> bool:
        """Open or retrying: what /readyz asks of every stream. A file that ended (and does not
        loop) or a stopped reader delivers nothing more, so it is not healthy."""
        return self.state in ("connecting", "connected", "retrying")


class Rate:
    """Events per second over the last ``window`` seconds."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._t: deque[float] = deque()
        self._since = time.monotonic()
        self._lock = threading.Lock()

    def restart(self) -> None:
        with self._lock:
            self._t.clear()
            self._since = time.monotonic()

    def tick(self, n: int = 1) -> None:
        now = time.monotonic()
        with self._lock:
            self._t.extend([now] * n)
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._t and self._t[0] < now - self.window:
            self._t.popleft()

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            span = min(self.window, now - self._since)
            return len(self._t) / span if span > 0.05 else 0.0
