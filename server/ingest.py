"""Camera ingestion: one OpenCV reader thread per camera, sampled, queued, reconnecting.

Sources: files (looped when ``stream.loop``), RTSP / HTTP(S) / MJPEG URLs (FFmpeg backend, with
open and read timeouts), device indices (``"0"``), and ``asset://NAME`` sample videos.

Sampling at ``stream.fps``: files by video timestamp (frame index over the nominal fps, as in
``frames.read_frames``), live sources by wall clock. Frames that are not sampled are only
``grab()``-ed, never decoded into an image. With ``realtime`` a file is paced so that its sampled
frames come out at the sampled rate, as a camera's would; without it, as fast as it decodes.

Each camera has a bounded queue; when it is full the oldest frame is dropped (a consumer wants
the newest frame) and counted. Open and read failures put the camera in ``retrying`` and it
reopens after an exponential backoff (base, doubling, capped, with jitter); the backoff resets
once a frame arrives. Every camera has its own thread and queue, so a dead or slow camera never
stalls the others. Credentials in URLs are redacted (``rtsp://***@host``) in statuses, errors
and log lines.

Every sampled frame becomes one :class:`~mlink.scheduler.frame.FrameRecord` (camera, index,
video time, wall time of capture, image), the object the daemon serves and stores unchanged.

``Ingest.apply(streams)`` applies a new stream list as a diff: new cameras start, removed ones
stop, changed ones (url, fps, loop) restart, unchanged ones keep running untouched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import cv2

from mlink.configs.schema import IngestConfig, StreamEntry
from mlink.scheduler.frame import FrameRecord
from mlink.server.backoff import Backoff
from mlink.server.frames import FrameSampler, FrameSourceError, grab_failed_reason, is_live, open_capture, resolve_url
from mlink.server.redact import redact

if TYPE_CHECKING:
    from mlink.models.assets import AssetStore

log = logging.getLogger("mlink.ingest")


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def healthy(self) -> bool:
        """Open or retrying: what /readyz asks of every stream. A file that ended (and does not
        loop) or a stopped reader delivers nothing more, so it is not healthy."""
        return self.state in ("connecting", "connected", "retrying")


class _Rate:
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


class _Stopped(Exception):
    pass


class CameraReader:
    """One camera: a thread that opens, samples and queues frames, and reconnects on failure."""

    def __init__(
        self,
        stream: StreamEntry,
        settings: IngestConfig | None = None,
        *,
        store: AssetStore | None = None,
        notify: threading.Condition | None = None,
    ) -> None:
        self.stream = stream
        self.settings = settings or IngestConfig()
        self.store = store
        self.id = stream.id
        self.safe_url = redact(stream.url)
        self._notify = notify
        self._cond = threading.Condition()
        self._queue: deque[FrameRecord] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._slock = threading.Lock()
        self._state = "connecting"
        self._live = is_live(stream.url)
        self._frames_in = 0
        self._processed = 0
        self._drops = 0
        self._reconnects = 0
        self._loops = 0
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_frame_at: float | None = None
        self._retry_at: float | None = None
        self._rate_in = _Rate()
        self._rate_done = _Rate()
        self._backoff = Backoff(self.settings.backoff_base_s, self.settings.backoff_max_s, self.settings.backoff_jitter)

    # -- control ---------------------------------------------------------------------------
    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> CameraReader:
        if self._thread is not None:
            raise RuntimeError(f"camera {self.id}: reader already started (make a new one to restart)")
        self._thread = threading.Thread(target=self._run, name=f"mlink-ingest-{self.id}", daemon=True)
        self._thread.start()
        return self

    def signal_stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def stop(self, timeout: float = 3.0) -> bool:
        """Stop the thread; True if it ended within ``timeout`` (a read blocked on a dead network
        stream ends by itself at the read timeout; the thread is a daemon)."""
        self.signal_stop()
        ended = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            ended = not self._thread.is_alive()
        self._set(state="stopped", retry_at=None)
        return ended

    # -- consumer side ---------------------------------------------------------------------
    def get(self, timeout: float | None = None) -> FrameRecord | None:
        """The oldest queued frame, waiting up to ``timeout`` (None: forever, until stopped)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue or self._stop.is_set(), timeout):
                return None
            return self._queue.popleft() if self._queue else None

    def get_nowait(self) -> FrameRecord | None:
        with self._cond:
            return self._queue.popleft() if self._queue else None

    def mark_processed(self, n: int = 1) -> None:
        """The consumer reports frames it processed (status fps_processed, frames_processed)."""
        with self._slock:
            self._processed += n
        self._rate_done.tick(n)

    def status(self) -> CameraStatus:
        with self._cond:
            queued = len(self._queue)
        with self._slock:
            return CameraStatus(
                id=self.id,
                url=self.safe_url,
                state=self._state,
                live=self._live,
                fps_target=self.stream.fps,
                fps_in=round(self._rate_in.rate(), 3),
                fps_processed=round(self._rate_done.rate(), 3),
                frames_in=self._frames_in,
                frames_processed=self._processed,
                drops=self._drops,
                reconnects=self._reconnects,
                loops=self._loops,
                queued=queued,
                last_error=self._last_error,
                last_error_at=self._last_error_at,
                last_frame_at=self._last_frame_at,
                retry_at=self._retry_at,
            )

    # -- reader thread ---------------------------------------------------------------------
    def _set(self, **fields: Any) -> None:
        with self._slock:
            for k, v in fields.items():
                setattr(self, f"_{k}", v)

    def _push(self, frame: FrameRecord) -> None:
        with self._cond:
            if len(self._queue) >= self.settings.queue:
                self._queue.popleft()
                with self._slock:
                    self._drops += 1
            self._queue.append(frame)
            self._cond.notify()
        with self._slock:
            self._frames_in += 1
            self._last_frame_at = frame.wall_time
        self._rate_in.tick()
        if self._notify is not None:
            with self._notify:
                self._notify.notify_all()

    def _open(self) -> tuple[cv2.VideoCapture, bool]:
        url = resolve_url(self.stream.url, self.store)
        if url.lower().startswith("file://"):
            url = url[len("file://") :]
        live = is_live(url)
        if live and not url.isdigit():
            ms = int(self.settings.open_timeout_s * 1000)
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                ms,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                int(self.settings.read_timeout_s * 1000),
            ]
            cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
            if not cap.isOpened():
                cap.release()
                raise FrameSourceError(
                    f"stream {redact(url)}: cannot open (unreachable, refused, unauthorised or not a video stream)"
                )
            return cap, True
        return open_capture(url), live

    def _error(self, exc: BaseException | str) -> None:
        msg = redact(str(exc)) if isinstance(exc, (str, FrameSourceError)) else redact(f"{type(exc).__name__}: {exc}")
        self._set(last_error=msg, last_error_at=time.time())
        log.warning("camera %s (%s): %s", self.id, self.safe_url, msg)

    def _wait_retry(self) -> None:
        delay = self._backoff.next()
        self._set(state="retrying", retry_at=time.time() + delay)
        log.info("camera %s: reopening in %.2fs", self.id, delay)
        if self._stop.wait(delay):
            raise _Stopped
        self._set(reconnects=self._reconnects + 1)

    def _run(self) -> None:
        log.info("camera %s: starting (%s, %.3g fps)", self.id, self.safe_url, self.stream.fps)
        seq = 0
        try:
            while not self._stop.is_set():
                try:
                    cap, live = self._open()
                except Exception as exc:  # FrameSourceError, AssetError, OpenCV errors: all retried
                    self._error(exc)
                    self._wait_retry()
                    continue
                self._live = live
                if self._state != "connected":  # not on a file's loop restart
                    self._set(state="connected", retry_at=None)
                    self._rate_in.restart()
                    log.info("camera %s: connected", self.id)
                try:
                    outcome, seq = self._pump(cap, live, seq)
                finally:
                    cap.release()
                if outcome == "eof":
                    if self.stream.loop:
                        self._set(loops=self._loops + 1)
                        continue
                    self._set(state="ended")
                    log.info("camera %s: end of file", self.id)
                    return
                if outcome == "stopped":
                    return
                self._error(outcome)
                self._wait_retry()
        except _Stopped:
            pass
        except Exception as exc:  # a bug must not pass silently either
            self._error(f"reader crashed: {type(exc).__name__}: {exc}")
            log.exception("camera %s: reader crashed", self.id)
        finally:
            if self._stop.is_set():
                self._set(state="stopped", retry_at=None)

    def _pump(self, cap: cv2.VideoCapture, live: bool, seq: int) -> tuple[str, int]:
        """Read until stop, end of file or failure: ("stopped"|"eof"|error message, next seq)."""
        native = cap.get(cv2.CAP_PROP_FPS) or 0.0
        if native <= 0 or native > 1000:
            native = 25.0
        sampler = FrameSampler(live, self.stream.fps, native, time.monotonic())
        anchor: float | None = None  # files with realtime: monotonic time of video t=0
        index = -1
        produced = 0
        while not self._stop.is_set():
            if not cap.grab():
                return (grab_failed_reason(live, produced), seq)
            index += 1
            now = time.monotonic()
            pts = sampler.due(index, now)
            if pts is None:
                continue
            ok, image = cap.retrieve()
            if not ok or image is None:
                if live:
                    return ("decode failed", seq)
                continue
            if self.settings.realtime and not live:
                anchor = now - pts if anchor is None else anchor
                delay = anchor + pts - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return ("stopped", seq)
            self._push(FrameRecord(self.id, index, round(pts, 4), time.time(), image, seq=seq, loop=self._loops))
            seq += 1
            if produced == 0:
                self._backoff.reset()
            produced += 1
        return ("stopped", seq)


def _ingest_key(s: StreamEntry) -> tuple[Any, ...]:
    """What a reader depends on; other fields (accuracy_target) change without a restart."""
    return (s.url, s.fps, s.loop)


@dataclass
class ApplyResult:
    added: list[str]
    removed: list[str]
    restarted: list[str]
    unchanged: list[str]


class Ingest:
    """All cameras' readers; frames per camera or round-robin across them."""

    def __init__(self, settings: IngestConfig | None = None, *, store: AssetStore | None = None) -> None:
        self.settings = settings or IngestConfig()
        self.store = store
        self._readers: dict[str, CameraReader] = {}
        self._lock = threading.Lock()  # guards _readers (apply vs. readers of the dict)
        self._signal = threading.Condition()  # notified by every reader on a new frame
        self._rr = 0

    def apply(self, streams: Iterable[StreamEntry], settings: IngestConfig | None = None) -> ApplyResult:
        """Make the running readers match ``streams``; a new ``settings`` restarts every camera."""
        streams = list(streams)
        wanted = {s.id: s for s in streams}
        if len(wanted) != len(streams):
            raise ValueError("duplicate stream ids")
        new_settings = settings is not None and settings != self.settings
        if settings is not None:
            self.settings = settings
        with self._lock:
            old = dict(self._readers)
        added = [i for i in wanted if i not in old]
        removed = [i for i in old if i not in wanted]
        restarted = [
            i for i in wanted if i in old and (new_settings or _ingest_key(old[i].stream) != _ingest_key(wanted[i]))
        ]
        unchanged = [i for i in wanted if i in old and i not in restarted]
        stopping = [old[i] for i in removed + restarted]
        for r in stopping:  # signal all first: a slow stop must not delay the others
            r.signal_stop()
        for r in stopping:
            r.stop(timeout=1.0)
        with self._lock:
            for i in removed:
                del self._readers[i]
            for i in unchanged:
                self._readers[i].stream = wanted[i]  # e.g. a new accuracy target; the reader runs on
            fresh = {}
            for i in wanted:
                if i in added or i in restarted:
                    fresh[i] = CameraReader(wanted[i], self.settings, store=self.store, notify=self._signal)
            # keep the config's order for round-robin
            self._readers = {i: fresh[i] if i in fresh else self._readers[i] for i in wanted}
        for r in fresh.values():
            r.start()
        if added or removed or restarted:
            log.info("ingest: added %s, removed %s, restarted %s, unchanged %s", added, removed, restarted, unchanged)
        return ApplyResult(added, removed, restarted, unchanged)

    @property
    def cameras(self) -> list[str]:
        with self._lock:
            return list(self._readers)

    def reader(self, camera: str) -> CameraReader:
        with self._lock:
            return self._readers[camera]

    def get(self, camera: str, timeout: float | None = None) -> FrameRecord | None:
        return self.reader(camera).get(timeout)

    def next_frame(self, timeout: float | None = None) -> FrameRecord | None:
        """The next frame of any camera, round-robin (no camera starves another); None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._signal:
            while True:
                with self._lock:
                    readers = list(self._readers.values())
                n = len(readers)
                for k in range(n):
                    r = readers[(self._rr + k) % n]
                    f = r.get_nowait()
                    if f is not None:
                        self._rr = (self._rr + k + 1) % n
                        return f
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                # bounded wait: a reader added by apply() is seen even if nothing notifies
                self._signal.wait(0.5 if left is None else min(left, 0.5))

    def frames(self, stop: threading.Event | None = None) -> Iterator[FrameRecord]:
        """Round-robin frames of all cameras until ``stop`` is set."""
        while stop is None or not stop.is_set():
            f = self.next_frame(timeout=0.25)
            if f is not None:
                yield f

    def mark_processed(self, camera: str, n: int = 1) -> None:
        with self._lock:
            r = self._readers.get(camera)
        if r is not None:
            r.mark_processed(n)

    def status(self) -> dict[str, CameraStatus]:
        with self._lock:
            readers = list(self._readers.values())
        return {r.id: r.status() for r in readers}

    def close(self) -> None:
        with self._lock:
            readers = list(self._readers.values())
            self._readers = {}
        for r in readers:
            r.signal_stop()
        for r in readers:
            r.stop(timeout=2.0)

    def __enter__(self) -> Ingest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
