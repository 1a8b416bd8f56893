"""Table 4 harness, MLink (hybrid): what one budget's run holds (:class:`State`), the frame
differences every budget shares (:class:`Diffs`) and the result row a run makes
(:func:`hybrid_result`), for :mod:`mlink.bench.table4_hybrid`."""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlink.bench.table4_methods import FEATURES, Context, frame_diff, result
from mlink.links.temporal import ReuseModel
from mlink.scheduler.hybrid import LinkAudit, Modes

METHOD = "MLink (hybrid)"


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
    fixed_ms: float = 0.0  # this period's fixed charges per frame (:meth:`Hybrid.period_ms`)
    modes: Modes | None = None  # the last period's
    audit: LinkAudit = field(default_factory=LinkAudit)  # the links' accuracy measured while serving
    rotated: list[tuple[int, frozenset[str]]] = field(default_factory=list)  # frames rotation ran on, not yet taught
    held: str | None = None  # the rotating model left loaded by the last buffer (no load to run it next)

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


def hybrid_result(hy: Any, st: State, meta: Mapping[str, Any]) -> dict[str, Any]:
    from mlink.bench.table4_data import score

    ctx = hy.ctx
    scored = ctx.protocol.scored
    n_eval = len(ctx.protocol.eval)
    preds = {k: [v.get(p) for p in scored] for k, v in st.preds.items()}
    first = score(ctx.oracle, scored, {k: [v.get(p) for p in scored] for k, v in st.first.items()})
    exp_by_model = {
        m: float(np.mean([np.mean([st.expected[k].get(p, 0.0) for p in scored]) for k in ctx.oracle.nodes_of(m)]))
        for m in ctx.models
    }
    diff_ms = 1000.0 * hy.diffs.seconds / n_eval  # every difference any budget computed, charged to each
    frame_ms = (st.exec_ms + st.load_ms + st.link_ms) / n_eval + ctx.features.map_ms + diff_ms
    modes_count: dict[str, int] = {}
    for per in st.periods:
        label = "; ".join(f"{k}: {'+'.join(v) or '-'}" for k, v in per["modes"].items())
        modes_count[label] = modes_count.get(label, 0) + 1
    return result(
        ctx,
        METHOD,
        st.budget,
        preds,
        frame_ms,
        st.executions,
        st.memory,
        memory_mode="resident at once + one rotating model at a time; profiling one model at a time",
        runs=True,
        notes=[]
        if st.links == "tuned"
        else ["a model does not fit alone: links not fine-tuned, that model never runs"],
        expected_accuracy=float(np.mean(list(exp_by_model.values()))),
        expected_by_model=exp_by_model,
        accuracy_first=first["accuracy"],
        load_ms_per_frame=st.load_ms / n_eval,
        loads=st.loads,
        link_ms_per_frame=st.link_ms / n_eval,
        trigger_ms_per_frame=diff_ms,
        modes=modes_count,
        periods=st.periods,
        hybrid=dict(meta),
    )
