"""A re-plan handed to the pipeline thread: applied exactly once, or not at all.

A config reload that changes the plan queues a :class:`PlanRequest` and waits for the pipeline
thread to apply it between two batches. When the wait times out, the request is cancelled if it
has not started (the pipeline skips it, so a reply that says "the previous config keeps
running" stays true); once it has started it cannot be taken back halfway, so the caller waits
for it to finish. The state moves under one lock, so the two sides never both win.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from mlink.configs.schema import SiteConfig

QUEUED, APPLYING, DONE, CANCELLED = "queued", "applying", "done", "cancelled"


@dataclass
class PlanRequest:
    cfg: SiteConfig
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    state: str = QUEUED
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self) -> bool:
        """The pipeline thread takes the request: False when it was cancelled (skip it)."""
        with self._lock:
            if self.state != QUEUED:
                return False
            self.state = APPLYING
            return True

    def finish(self) -> None:
        with self._lock:
            self.state = DONE
        self.done.set()

    def cancel(self) -> bool:
        """The caller gives up waiting: True when the request will never be applied, False
        when the pipeline has already started it (wait on :attr:`done`)."""
        with self._lock:
            if self.state == QUEUED:
                self.state = CANCELLED
                self.done.set()
                return True
            return self.state == CANCELLED

    def wait(self, timeout: float) -> bool:
        """Wait for the outcome: True when applied (or failed, see :attr:`error`), False when
        cancelled because it had not started within ``timeout``; an apply in progress at the
        timeout is waited for to the end (it cannot be undone halfway)."""
        if self.done.wait(timeout) and self.state == DONE:
            return True
        if self.cancel():
            return False
        self.done.wait()
        return True
