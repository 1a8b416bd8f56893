"""Who hears of every result the daemon stored: the hook that keeps the pipeline thread's code small.

The daemon calls its :class:`ResultListeners` once per stored batch (first-served results and
a hybrid plan's revisions alike), right after the cache write, with the results and the JSON
objects it stored. A listener runs on the pipeline thread, so it must only hand things off (keep
a reference, put on a queue): no encoding, no I/O. One that raises is logged and skipped, and
serving goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlink.scheduler.serving import FrameResult

log = logging.getLogger("mlink.daemon")

ResultListener = Callable[[Sequence["FrameResult"], Sequence[dict[str, Any]]], None]


class ResultListeners:
    """The listeners of one daemon; :meth:`add` from any thread, called from the pipeline thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: tuple[ResultListener, ...] = ()  # replaced, never mutated: calls read it unlocked

    def add(self, listener: ResultListener) -> None:
        with self._lock:
            self._listeners = (*self._listeners, listener)

    def remove(self, listener: ResultListener) -> None:
        with self._lock:
            self._listeners = tuple(x for x in self._listeners if x is not listener)

    def __iter__(self) -> Iterator[ResultListener]:
        return iter(self._listeners)

    def __call__(self, results: Sequence[FrameResult], stored: Sequence[dict[str, Any]]) -> None:
        for listener in self._listeners:
            try:
                listener(results, stored)
            except Exception:
                log.exception("result listener %r failed; the results are stored", listener)
