"""Where the pipeline's time goes, per stage: what a throughput benchmark and an operator read.

The pipeline thread adds to these totals (seconds and frame counts per stage) as it serves;
readers take :meth:`StageTimes.snapshot`, a plain dict, and difference two of them over a
window. Stages: ``queue_wait`` (capture to the pipeline taking the frame), ``plan`` (the
planner's per-batch work, a period's included when it runs inline), ``model:<name>`` (each
executed model's share of its batch call), ``links`` (link prediction), ``rotation`` (hybrid
plans' rotating models and reuse), ``cache`` (writing results to Redis) and ``step`` (all of
it, per batch). Decode time is the ingest's (per camera, in its status).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any


class StageTimes:
    """Seconds and counts per stage; one writer (the pipeline thread), any number of readers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        self._count: Counter[str] = Counter()

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        with self._lock:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds
            self._count[stage] += count

    def add_each(self, pairs: Iterable[tuple[str, float]]) -> None:
        """:meth:`add` (one item) for every ``(stage, seconds)`` pair, under one lock: a batch's per-result figures."""
        with self._lock:
            for stage, seconds in pairs:
                self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds
                self._count[stage] += 1

    def snapshot(self) -> dict[str, dict[str, float]]:
        """``{stage: {"seconds": total, "count": n}}`` at this instant."""
        with self._lock:
            return {k: {"seconds": self._seconds[k], "count": float(self._count[k])} for k in sorted(self._seconds)}


def per_item_ms(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Milliseconds per counted item of each stage between two snapshots (stages with no items left out)."""
    out = {}
    for k, v in after.items():
        b = before.get(k, {"seconds": 0.0, "count": 0.0})
        n = v["count"] - b["count"]
        if n > 0:
            out[k] = 1000.0 * (v["seconds"] - b["seconds"]) / n
    return out
