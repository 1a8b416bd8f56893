"""Reader processes in front of the daemon: API reads that do not compete with serving.

The daemon's process runs the pipeline thread; an HTTP server in the same interpreter competes
with it for the interpreter lock (200 GET/s of the latest results cost the pipeline 22% of its
frames on 2 cores). With ``api.read_workers`` > 0, :class:`ReaderPool`:

- binds the public port itself and hands the listening socket to ``read_workers`` reader
  processes (:mod:`mlink.server.reader_app`), which all accept from it;
- starts a :class:`~mlink.server.snapshot_publish.SnapshotPublisher`, the daemon's snapshot
  listener that copies the published state to Redis, where the readers read it;
- gives the daemon's own app (every route, as without readers) a private unix socket
  (:attr:`ReaderPool.upstream`, in a 0700 folder) that the readers forward the routes they do
  not answer to (health, /metrics, reload, docs);
- supervises the readers: one that exits is started again (after a growing pause if it keeps
  dying) and counted; ``/healthz`` reports workers, alive and restarts (``status: degraded``
  while one is down; connections wait in the socket's backlog meanwhile, none is refused);
- on :meth:`close`, stops them (SIGTERM, then SIGKILL) and reaps them. Each also gets SIGTERM
  from the kernel if the daemon dies without closing (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from mlink.server.backoff import Backoff
from mlink.server.http_metrics import MULTIPROC_ENV, reader_metrics_dir
from mlink.server.reader_app import ENV
from mlink.server.redis_embedded import _die_with_parent
from mlink.server.snapshot_publish import SnapshotPublisher
from mlink.server.temp_dirs import private_dir

if TYPE_CHECKING:
    from mlink.server.daemon import Daemon

log = logging.getLogger("mlink.readers")


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on (host, port) that child processes can inherit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.next_start = 0.0
        self.backoff = Backoff(0.5, 30.0, jitter=0.0)  # grows while the worker dies within 10 s of its start


class ReaderPool:
    """``workers`` reader processes serving ``daemon``'s read routes on (host, port); see the module docstring.

    Start it after ``daemon.start()`` (it needs the daemon's cache), then serve the daemon's app
    (``create_app(daemon, readers=pool)``) on :attr:`upstream`.
    """

    def __init__(
        self, daemon: Daemon, workers: int, host: str, port: int, *, log_level: str = "warning", poll_s: float = 0.2
    ) -> None:
        if workers < 1:
            raise ValueError(f"a reader pool needs at least one worker, got {workers}")
        if daemon.cache is None:
            raise RuntimeError("start the daemon before its readers: they read its cache")
        self.daemon = daemon
        self.workers = [_Worker(i) for i in range(workers)]
        self.host, self.log_level, self.poll_s = host, log_level, poll_s
        self.restarts = 0
        self.last_exit: str | None = None
        self._dir = private_dir("mlink-api-")
        self.upstream = str(self._dir / "daemon.sock")
        self.metrics_dir = reader_metrics_dir(self._dir)  # the readers' request histograms (/metrics)
        self.sock = bind(host, port)
        self.port: int = self.sock.getsockname()[1]
        self.publisher = SnapshotPublisher(daemon, daemon.cache.url, daemon.cache.prefix)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="mlink-readers", daemon=True)

    def start(self) -> ReaderPool:
        self.publisher.start()
        for w in self.workers:
            self._spawn(w)
        self._thread.start()
        log.info("%d reader process(es) on %s:%d", len(self.workers), self.host, self.port)
        return self

    def _spawn(self, w: _Worker) -> None:
        cache = self.daemon.cache
        assert cache is not None
        settings = {
            "fd": self.sock.fileno(),
            "redis_url": cache.url,
            "prefix": cache.prefix,
            "upstream": self.upstream,
            "log_level": self.log_level,
        }
        w.proc = subprocess.Popen(
            [sys.executable, "-m", "mlink.server.reader_app"],
            env={**os.environ, ENV: json.dumps(settings), MULTIPROC_ENV: str(self.metrics_dir)},
            pass_fds=(self.sock.fileno(),),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C is the daemon's to handle; it stops the readers
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - a prctl only, safe between fork and exec
        )
        w.started_at = time.monotonic()

    def _supervise(self) -> None:
        while not self._stop.wait(self.poll_s):
            for w in self.workers:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self._check(w)

    def _check(self, w: _Worker) -> None:
        """Restart ``w`` if it exited (caller holds the lock)."""
        now = time.monotonic()
        if w.proc is not None:
            code = w.proc.poll()
            if code is None:
                if now - w.started_at > 10.0:
                    w.backoff.reset()
                return
            pause = w.backoff.next()
            self.last_exit = f"reader {w.index} (pid {w.proc.pid}) exited with code {code}"
            log.error("%s; starting it again in %.1f s", self.last_exit, pause)
            w.proc = None
            w.next_start = now + pause
        if now >= w.next_start:
            self._spawn(w)
            self.restarts += 1

    def health(self) -> dict[str, Any]:
        """For /healthz: workers, how many are alive, restarts so far and the last exit."""
        with self._lock:
            alive = sum(1 for w in self.workers if w.proc is not None and w.proc.poll() is None)
            return {
                "workers": len(self.workers),
                "alive": alive,
                "restarts": self.restarts,
                "last_exit": self.last_exit,
            }

    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self.workers if w.proc is not None]

    def close(self, timeout: float = 5.0) -> None:
        """Stop and reap every reader (SIGTERM, then SIGKILL), the publisher, the socket."""
        with self._lock:
            self._stop.set()
        self._thread.join(timeout)
        procs = [w.proc for w in self.workers if w.proc is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5.0)
        for w in self.workers:
            w.proc = None
        self.publisher.close()
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)
