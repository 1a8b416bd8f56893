"""How ``mlink serve`` ends: on SIGTERM/SIGINT cleanly (exit 0), on a dead pipeline visibly (exit 1).

uvicorn catches SIGTERM and SIGINT while it serves, shuts the HTTP server down, then raises the
signal again after putting the previous handlers back; with Python's default SIGTERM handler
that killed the process there (exit status 143) before the daemon's stop ran, so the result
buffer was neither flushed nor counted and Redis was ended only by the parent-death signal.
:class:`StopSignals` installs handlers that raise :class:`StopRequested` instead (once: a
second signal during the stop is ignored), so the caller's ``finally`` stops the daemon and the
command returns 0, whether the signal came while uvicorn served or before it started.

:func:`serve_until_stopped` runs the HTTP server and watches the pipeline thread
(:func:`~mlink.server.pipeline_health.pipeline_problem`): when it has died, the server is shut
down and the reason returned, and the command exits non-zero so that a supervisor (systemd's
``Restart=``, a container restart policy) starts the daemon again.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

from mlink.server.pipeline_health import pipeline_problem
from mlink.server.temp_dirs import sweep_stale

if TYPE_CHECKING:
    import uvicorn

    from mlink.server.daemon import Daemon

log = logging.getLogger("mlink.serve")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived: stop everything and exit 0. A BaseException, as
    KeyboardInterrupt is, so that no ``except Exception`` on the way (a start that reports its
    failure, a retry loop) swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGTERM/SIGINT handlers: the first raises :class:`StopRequested` in the main thread;
    later ones, and any once :meth:`stopping` was called, are logged and ignored (a stop is
    under way and must not be cut short)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._stopping = False

    def install(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        return self

    def stopping(self) -> None:
        self._stopping = True

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._stopping or self.received is not None:
            log.warning("%s during the stop: ignored, still stopping", name)
            return
        self.received = signum
        log.info("%s: stopping", name)
        raise StopRequested(signum)


def begin_serving() -> StopSignals:
    """What ``mlink serve`` does before it starts anything: remove the temporary folders of
    daemons that were killed (``kill -9`` leaves them; see :mod:`mlink.server.temp_dirs`) and
    install the stop signals' handlers."""
    sweep_stale()
    return StopSignals().install()


def serve_until_stopped(server: uvicorn.Server, daemon: Daemon, every_s: float = 0.5) -> str | None:
    """Run ``server`` until it stops (a signal: :class:`StopRequested` propagates) or the
    pipeline thread dies; returns why the pipeline died, or None."""
    died: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(every_s):
            problem = pipeline_problem(daemon)
            if problem is not None:
                log.error("%s: shutting down so that a supervisor restarts the daemon", problem)
                died.append(problem)
                server.should_exit = True
                return

    watcher = threading.Thread(target=watch, name="mlink-pipeline-watch", daemon=True)
    watcher.start()
    try:
        server.run()
    finally:
        done.set()
        watcher.join(every_s * 4)
    return died[0] if died else None
