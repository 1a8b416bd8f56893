"""Model calls take turns: one inference at a time on the pool's device, first come first served.

Serving (the pipeline thread) and a period's profiling (the period worker,
:mod:`~mlink.scheduler.period_worker`) run models of the same pool at the same time. Left alone,
their calls would overlap on the device: on the CPU they split the cores, so every serving
batch runs slower for as long as the period lasts; on a GPU their activations add up. Instead
each ``infer`` call holds :class:`CallLock` for one batch, so the two threads' calls interleave
per batch: a serving batch waits at most one profiling batch, never a whole model's profile.

The lock is a ticket lock (FIFO): ``threading.Lock`` makes no promise of order, and a thread
that releases and re-acquires at once (the worker, batch after batch) could starve the other.
It is re-entrant for its holder (a model whose ``infer`` calls another pinned model's).
"""

from __future__ import annotations

import threading
from typing import Any


class CallLock:
    """A re-entrant FIFO lock: waiters get it in the order they asked (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket that may hold the lock now
        self._owner: int | None = None
        self._depth = 0
        self.calls = 0  # completed acquisitions (for metrics and tests)
        self.waited = 0  # acquisitions that had to wait for another thread

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            ticket = self._next
            self._next += 1
            if ticket != self._serving:
                self.waited += 1
            while ticket != self._serving:
                self._cond.wait()
            self._owner, self._depth = me, 1
            self.calls += 1

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("CallLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._serving += 1
                self._cond.notify_all()

    def __enter__(self) -> CallLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class TakingTurns:
    """A loaded model whose ``infer`` holds ``lock`` for the call; everything else is the model's.

    What :meth:`ModelPool.pin <mlink.scheduler.pool.ModelPool.pin>` yields, so every caller
    (serving, profiling, the hybrid rotation) takes turns without knowing it.
    """

    __slots__ = ("_lock", "_model")

    def __init__(self, model: Any, lock: CallLock) -> None:
        self._model = model
        self._lock = lock

    def infer(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._model.infer(*args, **kwargs)

    @property
    def wrapped(self) -> Any:
        """The model itself."""
        return self._model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)
