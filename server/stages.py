"""Where the pipeline's time goes, per stage: what a throughput benchmark and an operator read.

The pipeline thread adds to these totals (seconds and frame counts per stage) as it serves;
readers take :meth:`StageTimes.snapshot`, a plain dict, and difference two of them over a
window. Stages: ``queue_wait`` (capture to the pipeline taking the frame), ``plan`` (the
planner's per-batch work, a period's included when it runs inline), ``model:<name>`` (each
executed model's share of its batch call), ``links`` (link prediction), ``rotation`` (hybrid
plans' rotating models and reuse), ``cache`` (writing results to Redis), ``end_to_end`` (a
frame's capture to its result in the cache) and ``step`` (all of it, per batch). Decode time is
the ingest's (per camera, in its status). The per-item figures (:meth:`StageTimes.add_each`)
also go into histograms (:mod:`~mlink.server.stage_histograms`), which ``/metrics`` shows.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

from mlink.server.stage_histograms import StageHistograms


class StageTimes:
    """Seconds and counts per stage; one writer (the pipeline thread), any number of readers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        self._count: Counter[str] = Counter()
        self.histograms = StageHistograms()

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        with self._lock:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds
            self._count[stage] += count

    def add_each(self, pairs: Iterable[tuple[str, float]]) -> None:
        """:meth:`add` (one item) for every ``(stage, seconds)`` pair, under one lock: a batch's
        per-result figures; each is also observed in the stage's histogram, if it has one."""
        with self._lock:
            for stage, seconds in pairs:
                self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds
                self._count[stage] += 1
                self.histograms.observe(stage, seconds)

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
