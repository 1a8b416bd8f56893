"""Table 4 harness, MLink (hybrid): what one budget's run holds (:class:`State`) and the frame
differences every budget shares (:class:`Diffs`), for :mod:`mlink.bench.table4_hybrid`."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any

from mlink.bench.table4_methods import FEATURES, Context, frame_diff
from mlink.links.temporal import ReuseModel
from mlink.scheduler.hybrid import Modes


class Diffs:
    """Reducto's four differences between two positions, computed once and timed."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.cache: dict[tuple[int, int], tuple[float, ...]] = {}
        self.seconds = 0.0

    def __call__(self, a: int, b: int) -> tuple[float, ...]:
        key = (a, b) if a <= b else (b, a)
        hit = self.cache.get(key)
        if hit is None:
            t0 = time.perf_counter()
            hit = tuple(frame_diff(self.ctx.features, f, key[0], key[1]) for f in FEATURES)
            self.seconds += time.perf_counter() - t0
            self.cache[key] = hit
        return hit


@dataclass
class State:
    """One budget's run: its links trajectory, what is real where, and the charges."""

    budget: float
    links: str  # "tuned" or "frozen"
    reuse: ReuseModel
    history: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (model, camera) -> real positions
    preds: dict[str, dict[int, Any]] = field(default_factory=dict)  # node -> position -> output (revised)
    first: dict[str, dict[int, Any]] = field(default_factory=dict)  # node -> position -> output (on arrival)
    expected: dict[str, dict[int, float]] = field(default_factory=dict)  # node -> position -> expected acc
    exec_ms: float = 0.0
    load_ms: float = 0.0
    loads: int = 0
    executions: int = 0
    bank_ms: float = 0.0
    memory: float = 0.0
    periods: list[dict[str, Any]] = field(default_factory=list)
    link_ms: float = 0.0
    fixed_ms: float = 0.0
    modes: Modes | None = None  # the last period's  # this period's fixed charges per frame (:meth:`Hybrid.period_ms`)

    def is_real(self, model: str, camera: str, p: int) -> bool:
        seq = self.history.get((model, camera), [])
        i = bisect.bisect_left(seq, p)
        return i < len(seq) and seq[i] == p

    def prior(self, model: str, camera: str, before: int) -> int | None:
        """The last position before ``before`` where ``model`` really ran on ``camera``."""
        seq = self.history.get((model, camera), [])
        i = bisect.bisect_left(seq, before)
        return seq[i - 1] if i else None

    def real(self, model: str, camera: str, p: int) -> None:
        bisect.insort(self.history.setdefault((model, camera), []), p)
