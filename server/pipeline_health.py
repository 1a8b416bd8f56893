"""Whether the daemon's pipeline is alive and ready: what /healthz and /readyz report.

The pipeline thread is the daemon's one worker (server/daemon.py): if it dies, nothing is served
while the HTTP API still answers, so its health is part of the process's health. A failing step
is retried a bounded number of times (:class:`StepGuard`: a transient error such as a model's
out-of-memory should not end the process); past that the thread ends with the error recorded,
``/healthz`` answers 503 with the reason, and ``mlink serve`` exits non-zero so its supervisor
(systemd, a container restart policy) starts it again. The embedded Redis's own health
(``EmbeddedRedis.health()`` where it has one) is part of it too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol, TypeVar

from mlink.server.cache import ResultCache
from mlink.server.ingest import Ingest
from mlink.server.snapshot import Snapshot

log = logging.getLogger("mlink.daemon")

T = TypeVar("T")


class Daemon(Protocol):
    """What health reads of :class:`mlink.server.daemon.Daemon` (which imports this module)."""

    @property
    def state(self) -> str: ...
    @property
    def error(self) -> str | None: ...
    @property
    def _thread(self) -> threading.Thread | None: ...
    @property
    def _redis(self) -> object: ...
    @property
    def cache(self) -> ResultCache | None: ...
    @property
    def snapshot(self) -> Snapshot: ...
    @property
    def ingest(self) -> Ingest | None: ...


class StepGuard:
    """Runs one pipeline step, retrying it (same batch) up to ``retries`` times in a row.

    A step that still fails after that raises, which ends the pipeline thread. A step that
    stored its results calls :meth:`committed`: if it fails after that point it is not run
    again (that would store the batch's results twice), but the failure still counts towards
    ``retries`` failures in a row, so a step that keeps failing ends the thread all the same.
    """

    def __init__(self, stop: threading.Event, retries: int = 3, backoff_s: float = 0.5) -> None:
        self.stop = stop
        self.retries = retries
        self.backoff_s = backoff_s
        self.failed_total = 0  # steps that raised, retried or not
        self.failed_in_row = 0
        self._committed = False

    def committed(self) -> None:
        """Called by the running step once its results are stored: from here on, not retried."""
        self._committed = True

    def run(self, step: Callable[[T], None], batch: T) -> None:
        self._committed = False
        while True:
            try:
                step(batch)
                self.failed_in_row = 0
                return
            except Exception:
                self.failed_total += 1
                self.failed_in_row += 1
                if self.failed_in_row >= self.retries or self.stop.is_set():
                    raise
                if self._committed:
                    log.exception("pipeline step failed after storing its results; not run again")
                    return
                log.exception("pipeline step failed (attempt %d of %d); retrying", self.failed_in_row, self.retries)
                self.stop.wait(self.backoff_s * self.failed_in_row)


def pipeline_problem(daemon: Daemon) -> str | None:
    """Why the pipeline thread is not running, or None while it runs (or was stopped on purpose)."""
    thread = daemon._thread
    if daemon.state == "stopped" or thread is None:
        return None
    if daemon.state == "failed" or not thread.is_alive():
        return f"pipeline: the pipeline thread ended ({daemon.error or 'no error recorded'})"
    return None


def redis_problem(daemon: Daemon) -> str | None:
    """The embedded Redis's own account of itself, where it gives one."""
    check = getattr(daemon._redis, "health", None)
    if check is None:
        return None
    try:
        ok, why = check()
    except Exception as exc:  # a health check that fails is itself an answer
        ok, why = False, f"health check failed: {type(exc).__name__}"
    return None if ok else f"cache: embedded Redis {why}"


def health(daemon: Daemon) -> tuple[bool, list[str]]:
    """(alive, reasons): False when the pipeline thread died or the embedded Redis cannot recover."""
    reasons = [r for r in (pipeline_problem(daemon), redis_problem(daemon)) if r]
    return not reasons, reasons


def readiness(daemon: Daemon) -> tuple[bool, list[str]]:
    """(ready, reasons): Redis reachable, a plan loaded, the pipeline running, every camera
    open or retrying."""
    reasons = []
    if daemon.cache is None or not daemon.cache.ping():
        reasons.append("cache: Redis is not reachable")
    if (dead := pipeline_problem(daemon)) is not None:
        reasons.append(dead)
    elif daemon.snapshot.plan is None:
        reasons.append(f"plan: not loaded yet (daemon is {daemon.state}{': ' + daemon.error if daemon.error else ''})")
    if daemon.ingest is not None:
        for cam, st in daemon.ingest.status().items():
            if not st.healthy:
                reasons.append(f"camera {cam}: {st.state}")
    return not reasons, reasons
