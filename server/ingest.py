"""Camera ingestion: cameras decoded, sampled, queued and reconnected, outside the serving
process's interpreter by default.

Sources: files (looped when ``stream.loop``), RTSP / HTTP(S) / MJPEG URLs (FFmpeg backend, with
open and read timeouts), device indices (``"0"``), and ``asset://NAME`` sample videos.

Where decoding runs (``ingest.processes``): ``auto`` (default), a capture process per camera;
``N``, cameras spread over N capture processes; ``0``, a reader thread per camera in this process
(tests, tiny sites). Capture processes (``server/capture_host.py``) hand sampled frames over in a
shared-memory ring per camera (``server/shm_ring.py``; ``ring_slots`` x frame bytes, e.g. 3 x
1.3 MB for 768x576, 3 x 6.2 MB for 1080p); the serving process copies each frame out of its slot
on receipt, so a FrameRecord's image is an ordinary array the daemon owns for as long as it keeps
it (results, cache), and the slot is free again at once. Memory per camera is thus bounded by
``(ring_slots + queue) x frame bytes``. A capture process that dies puts its cameras in
``retrying`` and is started again after the backoff. Hardware decoding is asked for when
``hw_decode: auto`` (software otherwise, or when the host has none); status says which.

Sampling at ``stream.fps`` (``server/capture.py``, the same loop in both modes): files by video
timestamp (frame index over the nominal fps, as in ``frames.read_frames``), live sources by wall
clock. Frames that are not sampled are only ``grab()``-ed, never retrieved into an image. With
``realtime`` a file is paced so that its sampled frames come out at the sampled rate, as a
camera's would; without it, as fast as it decodes.

Each camera has a bounded queue; when it is full the oldest frame is dropped (a consumer wants
the newest frame) and counted. Open and read failures put the camera in ``retrying`` and it
reopens after an exponential backoff (base, doubling, capped, with jitter); the backoff resets
once a frame arrives. Every camera has its own loop and queue, so a dead or slow camera never
stalls the others. Credentials in URLs are redacted (``rtsp://***@host``) in statuses, errors
and log lines.

Every sampled frame becomes one :class:`~mlink.scheduler.frame.FrameRecord` (camera, index,
video time, wall time of capture, image), the object the daemon serves and stores unchanged.
Status adds per-stage times: ``decode_ms`` (per grabbed frame) and ``queue_wait_ms`` (capture
to the consumer taking it).

``Ingest.apply(streams)`` applies a new stream list as a diff: new cameras start, removed ones
stop, changed ones (url, fps, loop) restart, unchanged ones keep running untouched.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mlink.configs.schema import IngestConfig, StreamEntry
from mlink.scheduler.frame import FrameRecord
from mlink.server.camera_status import CameraStatus, Rate
from mlink.server.capture import CaptureLoop, ewma
from mlink.server.capture_host import CaptureHost
from mlink.server.frames import is_live
from mlink.server.redact import redact

if TYPE_CHECKING:
    from mlink.models.assets import AssetStore

log = logging.getLogger("mlink.ingest")
_serials = itertools.count()


class CameraReader:
    """One camera: its queue and status in the serving process, and what decodes it: a reader
    thread here (``ingest.processes: 0``), or a capture process (``server/capture_host.py``;
    its own unless the :class:`Ingest` shares one between cameras). Either way the capture
    loop (``server/capture.py``) reports through the sink methods below."""

    def __init__(
        self,
        stream: StreamEntry,
        settings: IngestConfig | None = None,
        *,
        store: AssetStore | None = None,
        notify: threading.Condition | None = None,
        host: CaptureHost | None = None,
    ) -> None:
        self.stream = stream
        self.settings = settings or IngestConfig()
        self.store = store
        self.id = stream.id
        self.serial = next(_serials)
        self.key = f"{self.id}#{self.serial}"  # unique across restarts of a camera
        self.safe_url = redact(stream.url)
        self._notify = notify
        self._cond = threading.Condition()
        self._queue: deque[FrameRecord] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._own_host = host is None and self.settings.processes != 0
        self._host = CaptureHost(self.settings, store) if self._own_host else host
        self._started = False
        self._slock = threading.Lock()
        self._state = "connecting"
        self._live = is_live(stream.url)
        self._hw: str | None = None
        self._seq = 0
        self._frames_in = 0
        self._processed = 0
        self._drops = 0
        self._reconnects = 0
        self._loops = 0
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_frame_at: float | None = None
        self._retry_at: float | None = None
        self._decode_ms = 0.0
        self._queue_wait_ms = 0.0
        self._rate_in = Rate()
        self._rate_done = Rate()

    # -- control ---------------------------------------------------------------------------
    @property
    def thread(self) -> threading.Thread | None:
        """The reader thread (in-process mode) or the capture process's supervising thread."""
        return self._host.thread if self._host is not None else self._thread

    @property
    def pid(self) -> int | None:
        """The capture process decoding this camera (None in-process or while it restarts)."""
        return self._host.pid if self._host is not None else None

    @property
    def alive(self) -> bool:
        if self._host is not None:
            return self._started and not self._stop.is_set() and self._host.thread.is_alive()
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> CameraReader:
        if self._started:
            raise RuntimeError(f"camera {self.id}: reader already started (make a new one to restart)")
        self._started = True
        if self._host is not None:
            self._host.attach(self)
            return self
        self._thread = threading.Thread(target=self._run, name=f"mlink-ingest-{self.id}", daemon=True)
        self._thread.start()
        return self

    def signal_stop(self) -> None:
        self._stop.set()
        if self._host is not None:
            self._host.request_stop(self)
        with self._cond:
            self._cond.notify_all()

    def stop(self, timeout: float = 3.0) -> bool:
        """Stop decoding; True if it ended within ``timeout`` (a read blocked on a dead network
        stream ends by itself at the read timeout; the thread is a daemon, and a capture process
        of this camera alone is killed)."""
        self.signal_stop()
        ended = True
        if self._own_host and self._host is not None:
            ended = self._host.close(timeout)  # the process goes with the camera
        elif self._host is not None:
            ended = self._host.detach(self, timeout)
        elif self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            ended = not self._thread.is_alive()
        self._set(state="stopped", retry_at=None)
        return ended

    # -- consumer side ---------------------------------------------------------------------
    def _taken(self, f: FrameRecord | None) -> FrameRecord | None:
        if f is not None:
            ms = max(0.0, (time.time() - f.wall_time) * 1000)
            with self._slock:
                self._queue_wait_ms = ewma(self._queue_wait_ms, ms)
        return f

    def get(self, timeout: float | None = None) -> FrameRecord | None:
        """The oldest queued frame, waiting up to ``timeout`` (None: forever, until stopped)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue or self._stop.is_set(), timeout):
                return None
            return self._taken(self._queue.popleft() if self._queue else None)

    def get_nowait(self) -> FrameRecord | None:
        with self._cond:
            return self._taken(self._queue.popleft() if self._queue else None)

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
                capture="thread" if self._host is None else "process",
                hw_decode=self._hw,
                decode_ms=round(self._decode_ms, 3),
                queue_wait_ms=round(self._queue_wait_ms, 3),
            )

    # -- the capture loop's sink (called by the reader thread or the capture host) ---------
    @property
    def sink(self) -> CameraReader:
        return self

    def is_ended(self) -> bool:
        with self._slock:
            return self._state == "ended"

    def _set(self, **fields: Any) -> None:
        with self._slock:
            for k, v in fields.items():
                setattr(self, f"_{k}", v)

    def connected(self, live: bool, hw: str) -> None:
        self._set(state="connected", retry_at=None, live=live, hw=hw)
        self._rate_in.restart()

    def retrying(self, retry_at: float) -> None:
        if not self._stop.is_set():
            self._set(state="retrying", retry_at=retry_at)

    def reconnecting(self) -> None:
        with self._slock:
            self._reconnects += 1

    def looped(self) -> None:
        with self._slock:
            self._loops += 1

    def ended(self) -> None:
        self._set(state="ended")

    def error(self, msg: str) -> None:
        self._set(last_error=msg, last_error_at=time.time())

    def stats(self, decode_ms: float) -> None:
        self._set(decode_ms=decode_ms)

    def frame(
        self, index: int, pts: float, wall: float, image: np.ndarray, stop: threading.Event | None = None
    ) -> None:
        with self._slock:
            seq, loop = self._seq, self._loops
            self._seq += 1
        self._push(FrameRecord(self.id, index, pts, wall, image, seq=seq, loop=loop))

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

    def _run(self) -> None:
        try:
            CaptureLoop(self.stream, self.settings, self, self._stop, self.store).run()
        finally:
            if self._stop.is_set():
                self._set(state="stopped", retry_at=None)


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
        self._hosts: list[CaptureHost] = []  # shared capture processes (processes: N)

    def _host_for_new_camera(self) -> CaptureHost | None:
        """processes: N: the shared capture process with the fewest cameras, a new one while
        fewer than N run. (0: none, a reader thread; auto: none here, each reader starts its own.)"""
        n = self.settings.processes
        if n == "auto" or n == 0:
            return None
        load = {id(h): sum(1 for r in self._readers.values() if r._host is h) for h in self._hosts}
        idle = [h for h in self._hosts if load[id(h)] == 0]
        if idle:
            return idle[0]
        if len(self._hosts) < int(n):
            self._hosts.append(CaptureHost(self.settings, self.store))
            return self._hosts[-1]
        return min(self._hosts, key=lambda h: load[id(h)])

    def _close_idle_hosts(self) -> None:
        """Stop and reap shared capture processes no camera uses any more (or of old settings)."""
        with self._lock:
            used = {id(r._host) for r in self._readers.values()}
            idle = [h for h in self._hosts if id(h) not in used or h.settings != self.settings]
            self._hosts = [h for h in self._hosts if h not in idle]
        for h in idle:
            h.close()

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
            for i in restarted:
                del self._readers[i]
        self._close_idle_hosts()
        with self._lock:
            fresh = {}
            for i in wanted:
                if i in added or i in restarted:
                    fresh[i] = CameraReader(
                        wanted[i],
                        self.settings,
                        store=self.store,
                        notify=self._signal,
                        host=self._host_for_new_camera(),
                    )
                    self._readers[i] = fresh[i]
            # keep the config's order for round-robin
            self._readers = {i: self._readers[i] for i in wanted}
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
        self._close_idle_hosts()

    def __enter__(self) -> Ingest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
