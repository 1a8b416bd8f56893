"""Table 4 harness: what every method shares (the context, results, budget checks), and the two
methods without learning: Standalone and Reducto.

Every method is run on the same frames of the evaluation stream under the same budget:

- accuracy: :func:`mlink.bench.table4_data.score` on the *scored* frames (the evaluation
  stream minus MLink's profiled frames), per node with the node's own metric against the
  oracle, averaged per model then over models; a model with no output scores 0;
- per-frame time: over every frame of the evaluation stream, the measured per-frame latencies
  of the models executed on that frame added up, plus the method's own overhead (link or head
  inference, filtering, the DQN's decisions), measured;
- executions: model executions over the evaluation stream, and the share saved against
  running every model on every frame;
- memory: the most the method holds at once, from the measured costs, which must not exceed
  the budget (:func:`check_budget` raises otherwise; the figure is in every result).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from mlink.bench.table4_costs import fitting_sets
from mlink.bench.table4_data import DILATE_3X3, PIXEL_LOW, FrameFeatures, Oracle, Protocol, score


class BudgetViolation(AssertionError):
    """A method held more memory at once than its budget allows."""


@dataclass
class Context:
    oracle: Oracle
    protocol: Protocol
    costs: dict[str, float]  # model -> measured memory bytes
    latency: dict[str, float]  # model -> measured per-frame latency, ms
    features: FrameFeatures
    options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    @property
    def models(self) -> list[str]:
        return self.oracle.models

    def opt(self, name: str, default: Any) -> Any:
        v = self.options.get(name)
        return default if v is None else v

    def stream_runs(self, positions: Sequence[int]) -> dict[str, list[int]]:
        """``positions`` grouped by camera, each in time order."""
        runs: dict[str, list[int]] = {}
        for p in sorted(positions):
            runs.setdefault(self.oracle.tuples.streams[p], []).append(p)
        return runs


def check_budget(method: str, memory: float, budget: float) -> None:
    if memory > budget + 1e-6:
        raise BudgetViolation(f"{method}: holds {memory:.0f} B at once, over the budget {budget:.0f} B")


def result(
    ctx: Context,
    method: str,
    budget: float,
    preds: Mapping[str, Sequence[Any]],
    frame_ms: float,
    executions: int,
    memory: float,
    *,
    memory_mode: str,
    runs: bool = True,
    notes: Iterable[str] = (),
    **extra: Any,
) -> dict[str, Any]:
    """One method's figures at one budget (accuracy on the scored frames, against the oracle)."""
    check_budget(method, memory, budget)
    sc = score(ctx.oracle, ctx.protocol.scored, dict(preds))
    n_all = len(ctx.protocol.eval) * len(ctx.models)
    return {
        "method": method,
        "budget_bytes": budget,
        "accuracy": sc["accuracy"],
        "accuracy_by_model": sc["by_model"],
        "accuracy_by_node": sc["by_node"],
        "ms_per_frame": frame_ms,
        "executions": int(executions),
        "executions_all_models": n_all,
        "executions_saved": 1.0 - executions / n_all if n_all else 0.0,
        "memory_bytes": float(memory),
        "memory_mode": memory_mode,
        "runs": runs,
        "scored_frames": len(ctx.protocol.scored),
        "eval_frames": len(ctx.protocol.eval),
        "notes": list(notes),
        **extra,
    }


def exact_preds(ctx: Context, models: Iterable[str], positions: Sequence[int]) -> dict[str, list[np.ndarray]]:
    return {k: ctx.oracle.exact(k, positions) for m in models for k in ctx.oracle.nodes_of(m)}


# -- Standalone ------------------------------------------------------------------------------------


def standalone(ctx: Context, budget: float) -> dict[str, Any]:
    """The most models that fit together, the fastest such set, on every frame; the others have
    no output (the paper's 33.3 / 66.7)."""
    sets = fitting_sets(ctx.costs, budget)
    best = min(sets, key=lambda s: (-len(s), sum(ctx.latency[m] for m in s), sorted(s)))
    ms = sum(ctx.latency[m] for m in best)
    return result(
        ctx,
        "Standalone",
        budget,
        exact_preds(ctx, best, ctx.protocol.scored),
        ms,
        len(best) * len(ctx.protocol.eval),
        sum(ctx.costs[m] for m in best),
        memory_mode="at once",
        runs=bool(best),
        notes=[] if best else ["no model fits the budget"],
        active=sorted(best),
    )


# -- Reducto ----------------------------------------------------------------------------------------

FEATURES = ("pixel", "area", "edge", "corner")
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def frame_diff(fx: FrameFeatures, feature: str, a: int, b: int) -> float:
    """Reducto's difference features between frames ``a`` and ``b`` (share of the frame changed)."""
    size = fx.grey.shape[1] * fx.grey.shape[2]
    if feature == "pixel":
        return float(np.count_nonzero(cv2.absdiff(fx.grey[a], fx.grey[b]) > PIXEL_LOW)) / size
    if feature == "area":
        delta = (cv2.absdiff(fx.blur[a], fx.blur[b]) > PIXEL_LOW).astype(np.uint8) * 255
        delta = cv2.dilate(delta, DILATE_3X3, iterations=2)
        contours, _ = cv2.findContours(delta, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        return float(sum(cv2.contourArea(c) for c in contours)) / size
    if feature == "edge":
        return float(_POPCOUNT[np.bitwise_xor(fx.edges[a], fx.edges[b])].sum()) / size
    if feature == "corner":
        return float(_POPCOUNT[np.bitwise_xor(fx.corners[a], fx.corners[b])].sum()) / size
    raise ValueError(f"unknown Reducto feature {feature!r}")


def filter_refs(
    fx: FrameFeatures, runs: Mapping[str, Sequence[int]], feature: str, threshold: float
) -> tuple[dict[int, int], float]:
    """Reducto's filter over each camera's frames: a frame is processed when its difference to
    the camera's last processed frame exceeds ``threshold`` (the first frame always is); else the
    last output is reused. Returns ({position: position whose output it gets}, seconds spent
    computing differences)."""
    ref: dict[int, int] = {}
    spent = 0.0
    for seq in runs.values():
        last = None
        for p in seq:
            if last is None:
                ref[p] = last = p
                continue
            t0 = time.perf_counter()
            d = frame_diff(fx, feature, last, p)
            spent += time.perf_counter() - t0
            if d > threshold:
                last = p
            ref[p] = last
    return ref, spent


def _model_acc(ctx: Context, model: str, ref: Mapping[int, int], positions: Sequence[int]) -> float:
    accs = []
    for k in ctx.oracle.nodes_of(model):
        spec = ctx.oracle.tuples.specs[k]
        vals = ctx.oracle.tuples.values[k]
        accs.append(np.mean([spec.accuracy(vals[ref[p]], vals[p]) for p in positions]))
    return float(np.mean(accs))


def tune_reducto(ctx: Context, target: float = 0.9, candidates: int = 24) -> dict[str, dict[str, Any]]:
    """Per model, the (feature, threshold) that filters the most training frames while keeping
    the model's accuracy on the training share at ``target`` (Reducto's per-query profiling)."""
    train = ctx.protocol.train
    runs = ctx.stream_runs(train)
    fx = ctx.features
    options: list[tuple[str, float, dict[int, int]]] = []
    for feature in FEATURES:
        diffs = [frame_diff(fx, feature, a, b) for seq in runs.values() for a, b in itertools.pairwise(seq)]
        qs = np.quantile(diffs, np.linspace(0.0, 0.98, candidates)) if diffs else np.array([])
        for thr in sorted({-1.0, *[float(q) for q in qs]}):
            ref, _ = filter_refs(fx, runs, feature, thr)
            options.append((feature, thr, ref))
    chosen: dict[str, dict[str, Any]] = {}
    for m in ctx.models:
        best = None
        for feature, thr, ref in options:
            acc = _model_acc(ctx, m, ref, train)
            filtered = 1.0 - len(set(ref.values())) / len(train)
            key = (acc >= target, filtered if acc >= target else acc, acc)
            if best is None or key > best[0]:
                best = (key, {"feature": feature, "threshold": thr, "train_accuracy": acc, "train_filtered": filtered})
        chosen[m] = best[1]  # type: ignore[index]
    return chosen


def reducto(ctx: Context, budget: float, tuned: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each model that fits the budget alone filters its frames with its tuned feature and
    threshold and reuses its last output on skipped frames; the models time-share the budget
    (one after another, over buffered frames, so loads amortise like profiling's and are not
    charged per frame). Models that do not fit alone have no output."""
    runnable = [m for m in ctx.models if ctx.costs[m] <= budget + 1e-9]
    runs = ctx.stream_runs(ctx.protocol.eval)
    scored = ctx.protocol.scored
    preds: dict[str, list[np.ndarray]] = {}
    run_ms = np.zeros(len(ctx.oracle.tuples))
    executions = 0
    diff_s = 0.0
    per_model: dict[str, Any] = {}
    for m in runnable:
        t = tuned[m]
        ref, spent = filter_refs(ctx.features, runs, t["feature"], t["threshold"])
        diff_s += spent
        processed = sorted(set(ref.values()))
        executions += len(processed)
        run_ms[processed] += ctx.latency[m]
        for k in ctx.oracle.nodes_of(m):
            vals = ctx.oracle.tuples.values[k]
            preds[k] = [vals[ref[p]] for p in scored]
        per_model[m] = {
            **t,
            "eval_processed": len(processed),
            "eval_filtered": 1.0 - len(processed) / len(ctx.protocol.eval),
        }
    n = len(ctx.protocol.eval)
    overhead = (ctx.features.map_ms if runnable else 0.0) + 1000.0 * diff_s / n
    frame_ms = float(run_ms[ctx.protocol.eval].mean()) + overhead
    return result(
        ctx,
        "Reducto",
        budget,
        preds,
        frame_ms,
        executions,
        max((ctx.costs[m] for m in runnable), default=0.0),
        memory_mode="time-shared",
        runs=bool(runnable),
        notes=[]
        if len(runnable) == len(ctx.models)
        else [f"{', '.join(sorted(set(ctx.models) - set(runnable)))} does not fit alone: no output"],
        filter_ms=overhead,
        models=per_model,
        active=sorted(runnable),
    )
