"""One camera's capture loop: open, grab, sample, retrieve, reopen with backoff.

The same loop runs in a reader thread of the serving process (``ingest.processes: 0``) and in
a capture process (``server/capture_host.py``); what it produces goes to a :class:`CaptureSink`
(the thread's queue, or a shared-memory ring and a pipe to the serving process), so both modes
sample, pace, loop and reconnect identically.

Frames that are not sampled are only ``grab()``-ed, never ``retrieve()``-d into an image (the
codec still decodes them; a colour conversion and a copy are saved). ``decode_ms`` is an EWMA of
the time per grabbed frame (grab, plus retrieve when sampled).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Protocol

import cv2
import numpy as np

from mlink.configs.schema import IngestConfig, StreamEntry
from mlink.server.backoff import Backoff
from mlink.server.frames import (
    FrameSampler,
    FrameSourceError,
    grab_failed_reason,
    hw_decode_used,
    is_live,
    nominal_fps,
    open_capture,
    open_hw_first,
    resolve_url,
)
from mlink.server.redact import redact

if TYPE_CHECKING:
    from mlink.models.assets import AssetStore

log = logging.getLogger("mlink.ingest")

EWMA = 0.05  # weight of a new sample in decode_ms (about the last 20 frames)
STATS_EVERY_S = 0.5  # how often decode_ms is reported when no frame is sampled


def ewma(average: float, sample: float) -> float:
    """``average`` moved by EWMA towards ``sample``; 0 means no sample yet (the first is taken whole)."""
    return sample if average == 0 else average + EWMA * (sample - average)


class CaptureSink(Protocol):
    """Where a capture loop reports: state changes and sampled frames."""

    def connected(self, live: bool, hw: str) -> None: ...
    def retrying(self, retry_at: float) -> None: ...
    def reconnecting(self) -> None: ...
    def looped(self) -> None: ...
    def ended(self) -> None: ...
    def error(self, msg: str) -> None: ...
    def stats(self, decode_ms: float) -> None: ...
    def frame(self, index: int, pts: float, wall: float, image: np.ndarray, stop: threading.Event) -> None: ...


class _Stopped(Exception):
    pass


class CaptureLoop:
    """Runs one camera until ``stop`` is set or a file that does not loop ends."""

    def __init__(
        self,
        stream: StreamEntry,
        settings: IngestConfig,
        sink: CaptureSink,
        stop: threading.Event,
        store: AssetStore | None = None,
    ) -> None:
        self.stream, self.settings, self.sink, self.stop, self.store = stream, settings, sink, stop, store
        self.id = stream.id
        self.safe_url = redact(stream.url)
        self.backoff = Backoff(settings.backoff_base_s, settings.backoff_max_s, settings.backoff_jitter)
        self.decode_ms = 0.0
        self._stats_at = 0.0

    def open(self) -> tuple[cv2.VideoCapture, bool, str]:
        """(capture, live, decoder used); raises FrameSourceError (or AssetError) when it cannot."""
        url = resolve_url(self.stream.url, self.store)  # asset:// and file:// made paths
        live = is_live(url)
        hw = self.settings.hw_decode == "auto"
        if live and not url.isdigit():
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                int(self.settings.open_timeout_s * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                int(self.settings.read_timeout_s * 1000),
            ]
            cap = open_hw_first(url, cv2.CAP_FFMPEG, params, hw)
            if not cap.isOpened():
                cap.release()
                raise FrameSourceError(
                    f"stream {redact(url)}: cannot open (unreachable, refused, unauthorised or not a video stream)"
                )
        else:
            cap = open_capture(url, hw=hw)
        return cap, live, hw_decode_used(cap)

    def _error(self, exc: BaseException | str) -> None:
        msg = redact(str(exc)) if isinstance(exc, (str, FrameSourceError)) else redact(f"{type(exc).__name__}: {exc}")
        self.sink.error(msg)
        log.warning("camera %s (%s): %s", self.id, self.safe_url, msg)

    def _wait_retry(self) -> None:
        delay = self.backoff.next()
        self.sink.retrying(time.time() + delay)
        log.info("camera %s: reopening in %.2fs", self.id, delay)
        if self.stop.wait(delay):
            raise _Stopped
        self.sink.reconnecting()

    def run(self) -> None:
        log.info("camera %s: starting (%s, %.3g fps)", self.id, self.safe_url, self.stream.fps)
        connected = False
        try:
            while not self.stop.is_set():
                try:
                    cap, live, hw = self.open()
                except Exception as exc:  # FrameSourceError, AssetError, OpenCV errors: all retried
                    self._error(exc)
                    self._wait_retry()
                    continue
                if not connected:  # not on a file's loop restart
                    connected = True
                    self.sink.connected(live, hw)
                    log.info("camera %s: connected (%s decode)", self.id, hw)
                try:
                    outcome = self._pump(cap, live)
                finally:
                    cap.release()
                if outcome == "eof":
                    if self.stream.loop:
                        self.sink.looped()
                        continue
                    self.sink.ended()
                    log.info("camera %s: end of file", self.id)
                    return
                if outcome == "stopped":
                    return
                connected = False
                self._error(outcome)
                self._wait_retry()
        except _Stopped:
            pass
        except Exception as exc:  # a bug must not pass silently either
            self._error(f"reader crashed: {type(exc).__name__}: {exc}")
            log.exception("camera %s: reader crashed", self.id)

    def _timed(self, started: float) -> None:
        ms = (time.perf_counter() - started) * 1000
        self.decode_ms = ewma(self.decode_ms, ms)
        now = time.monotonic()
        if now - self._stats_at >= STATS_EVERY_S:
            self._stats_at = now
            self.sink.stats(self.decode_ms)

    def _pump(self, cap: cv2.VideoCapture, live: bool) -> str:
        """Read until stop, end of file or failure: "stopped", "eof" or an error message."""
        sampler = FrameSampler(live, self.stream.fps, nominal_fps(cap), time.monotonic())
        anchor: float | None = None  # files with realtime: monotonic time of video t=0
        index = -1
        produced = 0
        while not self.stop.is_set():
            started = time.perf_counter()
            if not cap.grab():
                return grab_failed_reason(live, produced)
            index += 1
            now = time.monotonic()
            pts = sampler.due(index, now)
            if pts is None:
                self._timed(started)
                continue
            ok, image = cap.retrieve()
            self._timed(started)
            if not ok or image is None:
                if live:
                    return "decode failed"
                continue
            if self.settings.realtime and not live:
                anchor = now - pts if anchor is None else anchor
                delay = anchor + pts - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    return "stopped"
            self.sink.frame(index, round(pts, 4), time.time(), image, self.stop)
            if produced == 0:
                self.backoff.reset()
            produced += 1
        return "stopped"
