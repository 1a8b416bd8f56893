"""Capture processes: cameras decode outside the serving process's interpreter (issue 13).

One OpenCV reader thread per camera inside the serving process holds its interpreter and its
cores: 16 cameras decoded at 25 fps starved the pipeline (profiling and model loads 8x slower).
So, the way Frigate does it, decoding runs in capture processes, one per camera
(``ingest.processes: auto``) or N shared by the cameras (``processes: N``), and frames come back
through shared memory (``server/shm_ring.py``): the pipe carries only a slot index and the
frame's metadata, and the serving process copies the slot out on receipt (:class:`CaptureHost`).

Child side (:func:`child_main`): started with the ``spawn`` context (the serving process has
torch loaded, which must not be forked), limited to one OpenCV thread, it runs one
:class:`~mlink.server.capture.CaptureLoop` thread per camera it is given, and exits when told,
when its control pipe reaches EOF, or when its parent pid changes (the serving process died).
Its log lines go up the pipe and are logged by the serving process.

Parent side (:class:`CaptureHost`): a supervising thread starts the process, dispatches its
messages to its cameras' readers (:class:`HostedCamera`: the same sink methods a reader
thread calls), and when the process dies, marks its cameras ``retrying`` with the error,
removes their rings, waits the backoff and starts a new process for them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.spawn
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mlink.configs.schema import IngestConfig, StreamEntry
from mlink.server.backoff import Backoff
from mlink.server.shm_ring import RingClosed, ShmRing, unlink_name

if TYPE_CHECKING:
    from mlink.models.assets import AssetStore
    from mlink.server.capture import CaptureSink


class HostedCamera(Protocol):
    """What a capture host needs of a camera (``ingest.CameraReader``): who it is, what to
    decode, and the capture sink its messages are handed to."""

    id: str
    key: str  # unique per reader, across restarts of the camera
    serial: int
    safe_url: str
    stream: StreamEntry
    settings: IngestConfig

    @property
    def sink(self) -> CaptureSink: ...
    def is_ended(self) -> bool: ...


log = logging.getLogger("mlink.ingest")

PROCESS_PREFIX = "mlink-capture"
_serial = itertools.count()
_SINK_EVENTS = frozenset({"connected", "retrying", "reconnecting", "looped", "ended", "error", "stats"})


# -- spawn without the parent's __main__ ---------------------------------------------------------
# multiprocessing's spawn re-runs the parent's main script in the child (as __mp_main__). For the
# `mlink` console script that imports mlink.server.cli, hence torch: seconds and hundreds of MB per
# capture process. The capture target lives in this module, not in __main__, so our processes
# skip that step; every other process is spawned as usual.
_original_preparation = multiprocessing.spawn.get_preparation_data


def _preparation_data(name: str) -> dict[str, Any]:
    data = _original_preparation(name)
    if name.startswith(PROCESS_PREFIX):
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
    return data


multiprocessing.spawn.get_preparation_data = _preparation_data


# -- child side ------------------------------------------------------------------------------------
class _PipeLog(logging.Handler):
    """Log records of the capture process, sent to the serving process to be logged there."""

    def __init__(self, send: Any) -> None:
        super().__init__(logging.INFO)
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self._send(("log", record.levelno, record.getMessage()))


class _PipeSink:
    """A capture loop's sink in a capture process: frames into a shared-memory ring, all else as
    messages. A new frame shape (first frame, or a reconnect at another resolution) makes a new
    ring generation, announced before its first frame."""

    def __init__(self, key: str, prefix: str, slots: int, send: Any) -> None:
        self.key, self.prefix, self.slots, self.send = key, prefix, slots, send
        self.ring: ShmRing | None = None
        self.gen = -1

    def connected(self, live: bool, hw: str) -> None:
        self.send(("connected", self.key, live, hw))

    def retrying(self, retry_at: float) -> None:
        self.send(("retrying", self.key, retry_at))

    def reconnecting(self) -> None:
        self.send(("reconnecting", self.key))

    def looped(self) -> None:
        self.send(("looped", self.key))

    def ended(self) -> None:
        self.send(("ended", self.key))

    def error(self, msg: str) -> None:
        self.send(("error", self.key, msg))

    def stats(self, decode_ms: float) -> None:
        self.send(("stats", self.key, decode_ms))

    def frame(self, index: int, pts: float, wall: float, image: np.ndarray, stop: threading.Event) -> None:
        if self.ring is None or self.ring.shape != image.shape:
            if self.ring is not None:
                self.ring.close()  # the serving process unlinks it once it reads the new announcement
            self.gen += 1
            self.ring = ShmRing(f"{self.prefix}_{self.gen}", image.shape, self.slots, create=True)
            self.send(("ring", self.key, self.ring.name, image.shape, self.slots, self.gen))
        try:
            slot = self.ring.put(image, stop)
        except RingClosed:
            return
        self.send(("frame", self.key, slot, index, pts, wall))

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()


def _camera_thread(
    key: str,
    stream: StreamEntry,
    settings: IngestConfig,
    store: AssetStore | None,
    prefix: str,
    stop: threading.Event,
    send: Any,
) -> None:
    from mlink.server.capture import CaptureLoop

    sink = _PipeSink(key, prefix, settings.ring_slots, send)
    try:
        CaptureLoop(stream, settings, sink, stop, store).run()
    finally:
        sink.close()
        send(("stopped", key))


def _settle_process(nice: int) -> None:
    """A capture process's own settings: one OpenCV thread, group signals left to the daemon,
    and ``nice`` below the serving process's CPU priority."""
    import cv2

    cv2.setNumThreads(1)
    # A signal to the whole process group (Ctrl-C, `timeout`, systemd's stop) is the daemon's
    # to handle: it stops its cameras in order; a capture process ends on "exit", on its pipe
    # closing or when its parent is gone, never half-way through a frame on a stray signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if nice > 0:
        with contextlib.suppress(OSError):
            os.nice(nice)


def child_main(ctrl: Connection, out: Connection, parent_pid: int, nice: int = 0) -> None:
    """Entry point of a capture process (see the module docstring). ``nice``: how far below the
    serving process it runs, so that decoding frames nobody samples never starves serving."""
    _settle_process(nice)
    lock = threading.Lock()

    def send(msg: tuple[Any, ...]) -> None:
        try:
            with lock:
                out.send(msg)
        except (BrokenPipeError, EOFError, OSError):
            os._exit(0)  # the serving process is gone

    ingest_log = logging.getLogger("mlink.ingest")
    ingest_log.setLevel(logging.INFO)
    ingest_log.addHandler(_PipeLog(send))
    ingest_log.propagate = False
    cams: dict[str, tuple[threading.Thread, threading.Event]] = {}
    while os.getppid() == parent_pid:
        try:
            if not ctrl.poll(0.5):
                continue
            msg = ctrl.recv()
        except (EOFError, OSError):
            break
        if msg[0] == "start":
            _, key, stream, settings, store, prefix = msg
            stop = threading.Event()
            t = threading.Thread(
                target=_camera_thread, args=(key, stream, settings, store, prefix, stop, send), daemon=True
            )
            cams[key] = (t, stop)
            t.start()
        elif msg[0] == "stop" and msg[1] in cams:
            cams.pop(msg[1])[1].set()
        elif msg[0] == "exit":
            break
    for _, stop in cams.values():
        stop.set()
    deadline = time.monotonic() + 1.0
    for t, _ in cams.values():
        t.join(max(0.0, deadline - time.monotonic()))
    os._exit(0)  # a thread stuck in a network read must not keep the process alive


# -- parent side -----------------------------------------------------------------------------------
class _Rings:
    """The serving process's view of one camera's rings in one capture process incarnation."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ring: ShmRing | None = None
        self.gen = -1

    def announce(self, name: str, shape: tuple[int, ...], slots: int, gen: int) -> None:
        self.drop()
        self.ring = ShmRing(name, tuple(shape), slots, create=False)
        self.gen = gen

    def drop(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring.unlink()
            self.ring = None

    def remove_all(self) -> None:
        """After the writer stopped or died: the announced ring and the next name (which a
        writer killed between creating and announcing it would leave behind)."""
        self.drop()
        unlink_name(f"{self.prefix}_{self.gen + 1}")


def _reap(proc: Any, timeout: float) -> bool:
    """Wait up to ``timeout`` for ``proc`` to exit, then kill it; True if it exited by itself."""
    proc.join(timeout)
    if not proc.is_alive():
        return True
    proc.kill()
    proc.join(5)
    return False


class CaptureHost:
    """One capture process and the cameras it decodes; restarted with backoff when it dies."""

    def __init__(self, settings: IngestConfig, store: AssetStore | None = None) -> None:
        self.settings, self.store = settings, store
        self.serial = next(_serial)
        self.name = f"{PROCESS_PREFIX}-{self.serial}"
        self.members: dict[str, HostedCamera] = {}
        self._rings: dict[str, _Rings] = {}
        self._acks: dict[str, threading.Event] = {}
        self._lock = threading.RLock()  # members, rings, the control pipe
        self._stop = threading.Event()
        self._proc: Any = None
        self._ctrl: Connection | None = None
        self._out: Connection | None = None
        self._incarnation = 0
        self._backoff = Backoff(settings.backoff_base_s, settings.backoff_max_s, settings.backoff_jitter)
        self._thread = threading.Thread(target=self._supervise, name=f"{self.name}-supervisor", daemon=True)
        self._started = False

    # -- membership ----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        p = self._proc
        return p.pid if p is not None and p.is_alive() else None

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def attach(self, reader: HostedCamera) -> None:
        with self._lock:
            self.members[reader.key] = reader
            self._acks[reader.key] = threading.Event()
            if self._ctrl is not None:
                self._start_camera(reader)
            if not self._started:
                self._started = True
                self._thread.start()

    def request_stop(self, reader: HostedCamera) -> None:
        with self._lock:
            if reader.key in self.members:
                self._send(("stop", reader.key))

    def detach(self, reader: HostedCamera, timeout: float) -> bool:
        """Stop one camera; True if the capture process confirmed within ``timeout``."""
        self.request_stop(reader)
        ack = self._acks.get(reader.key)
        ok = ack.wait(timeout) if ack is not None and self.pid is not None else True
        with self._lock:
            self.members.pop(reader.key, None)
            self._acks.pop(reader.key, None)
            rings = self._rings.pop(reader.key, None)
        if rings is not None:
            rings.remove_all()
        return ok

    def close(self, timeout: float = 2.0) -> bool:
        """Stop the process and reap it (killed if it does not exit in ``timeout``); remove
        every ring it made. True if it exited by itself."""
        self._stop.set()
        with self._lock:
            self._send(("exit",))
            proc = self._proc
        clean = _reap(proc, timeout) if proc is not None else True
        if self._started and self._thread is not threading.current_thread():
            self._thread.join(timeout + 1)
        with self._lock:
            self._remove_rings()
            self.members.clear()
        self._close_pipes()
        return clean

    # -- process ---------------------------------------------------------------------------
    def _send(self, msg: tuple[Any, ...]) -> None:
        if self._ctrl is None:
            return
        with contextlib.suppress(BrokenPipeError, EOFError, OSError):  # died: the supervisor restarts it
            self._ctrl.send(msg)

    def _start_camera(self, reader: HostedCamera) -> None:
        prefix = f"mlk{os.getpid()}_{self.serial}_{self._incarnation}_{reader.serial}"
        self._rings[reader.key] = _Rings(prefix)
        self._send(("start", reader.key, reader.stream, reader.settings, self.store, prefix))

    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        ctrl_recv, ctrl_send = ctx.Pipe(duplex=False)
        out_recv, out_send = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=child_main,
            args=(ctrl_recv, out_send, os.getpid(), self.settings.capture_nice),
            name=f"{self.name}.{self._incarnation}",
        )
        proc.daemon = True
        with self._lock:
            if self._stop.is_set():
                return
            proc.start()
            ctrl_recv.close()  # only the child holds these ends: its death is EOF here
            out_send.close()
            self._proc, self._ctrl, self._out = proc, ctrl_send, out_recv
            for reader in self.members.values():
                if not reader.is_ended():  # a file that ended stays ended
                    self._start_camera(reader)

    def _remove_rings(self) -> None:
        """Every camera's rings of the process that stopped or died (called under the lock)."""
        for rings in self._rings.values():
            rings.remove_all()
        self._rings.clear()

    def _close_pipes(self) -> None:
        for conn in (self._ctrl, self._out):
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.close()
        self._ctrl = self._out = None

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self._spawn()
                self._pump()
            except Exception as exc:  # a failed spawn is retried like a crash
                log.exception("%s: %s", self.name, exc)
            if self._stop.is_set():
                return
            self._crashed()

    def _crashed(self) -> None:
        proc = self._proc
        code = None
        if proc is not None:
            _reap(proc, 2)
            code = proc.exitcode
        with self._lock:
            self._close_pipes()
            self._proc = None
            self._incarnation += 1
            self._remove_rings()
            members = list(self.members.values())
        why = f"capture process died (exit code {code})" if code is not None else "capture process failed to start"
        delay = self._backoff.next()
        for reader in members:
            reader.sink.error(why)
            reader.sink.retrying(time.time() + delay)
            log.warning("camera %s (%s): %s; restarting it in %.2fs", reader.id, reader.safe_url, why, delay)
        if self._stop.wait(delay):
            return
        for reader in members:
            reader.sink.reconnecting()

    def _pump(self) -> None:
        out = self._out
        if out is None:
            return
        while True:
            try:
                msg = out.recv()
            except (EOFError, OSError):
                return
            self._dispatch(msg)

    def _dispatch(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "log":
            log.log(msg[1], "%s", msg[2])
            return
        key = msg[1]
        with self._lock:
            reader = self.members.get(key)
            rings = self._rings.get(key)
        if reader is None or rings is None:
            if kind == "ring":  # a camera stopped meanwhile: its new ring is nobody's
                unlink_name(msg[2])
            return
        if kind == "frame":
            _, _, slot, index, pts, wall = msg
            if rings.ring is not None:
                image = rings.ring.take(slot)
                reader.sink.frame(index, pts, wall, image, self._stop)
                self._backoff.reset()
        elif kind == "ring":
            rings.announce(msg[2], msg[3], msg[4], msg[5])
        elif kind == "stopped":
            ack = self._acks.get(key)
            if ack is not None:
                ack.set()
        elif kind in _SINK_EVENTS:  # the sink methods of the same name, as a reader thread calls them
            getattr(reader.sink, kind)(*msg[2:])
