"""Measuring a model in a benchmark: memory across load + warm-up, load time, per-frame latency.

One implementation for the zoo benchmark and the Table 4 cost table, so their figures mean the
same thing: the memory meter's delta and peak delta across loading and warming up (what the
scheduler's pool charges), the load time alone, and latencies over real frames, one per call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def p90(sorted_values: Sequence[float]) -> float:
    return sorted_values[int(0.9 * (len(sorted_values) - 1))]


def latency_ms(fn: Any, images: Sequence[Any]) -> list[float]:
    """Milliseconds of ``fn(image)`` for each image, sorted."""
    lat = []
    for img in images:
        t0 = time.perf_counter()
        fn(img)
        lat.append((time.perf_counter() - t0) * 1000)
    return sorted(lat)


def measure_loads(
    meter: Any, make: Any, warm: Any, unload: Any, repeats: int
) -> tuple[list[int], list[int], list[float], Any]:
    """``repeats`` times: ``make()`` (timed) then ``warm(obj)``, measured by ``meter``.

    Returns the peak deltas, end deltas, load seconds, and the object of the last round, still
    loaded (the earlier ones are unloaded and their memory released before the next round).
    """
    peaks, deltas, secs = [], [], []
    obj = None
    holder: dict[str, Any] = {}  # what the last load_and_warm made

    def load_and_warm() -> float:
        t0 = time.perf_counter()
        holder["obj"] = make()
        s = time.perf_counter() - t0
        warm(holder["obj"])
        return s

    for r in range(max(1, repeats)):
        s, m = meter.measure_call(load_and_warm)
        peaks.append(max(int(m.peak_delta), 0))
        deltas.append(int(m.delta))
        secs.append(float(s))
        obj = holder["obj"]
        if r < repeats - 1:
            unload(obj)
            obj = None
            holder.clear()
            meter.release()
    return peaks, deltas, secs, obj
