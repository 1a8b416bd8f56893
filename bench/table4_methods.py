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
- memory: the most the method holds at any instant, from the measured costs, which must not
  exceed the budget (:func:`check_budget` raises :class:`BudgetViolation` otherwise; the figure
  is in every result). A method that swaps models records its residency (:class:`Residency`):
  every load and unload, and the memory held at every instant, a load's instant counting the
  model being loaded together with everything still held;
- model swaps: every load a method's schedule makes is charged at the model's measured load
  time (``load_s`` of the cost table), spread over the evaluation frames
  (:func:`load_ms_per_frame`): ``ms_per_frame`` = execution + the method's overhead
  (``exec_ms_per_frame``) + ``load_ms_per_frame``; ``loads`` counts them;
- expected accuracy: where a method predicts its own accuracy before serving (Standalone
  trivially, Reducto from its tuning, MLink from its selector), ``expected_accuracy`` stands
  next to the measured ``accuracy``, in the same units (mean over models of the mean over each
  model's nodes); None where the method has no such figure.

Buffers (:meth:`Context.windows`): a method that time-shares models works over buffers of
``buffer_frames`` consecutive positions of the time-ordered evaluation stream (20 by default:
about 10 frames per camera on a two-camera site): the frames are buffered, then each model
needed in the buffer is loaded once and runs over its frames of the buffer. Outputs come out up
to one buffer late; that delay is not part of the per-frame time.

Reducto here: each model that fits the budget alone filters its frames with its tuned feature
and threshold and reuses its last output on skipped frames. Per buffer, the models with at
least one frame to process in it run one after another (:func:`time_share`): a model still held
from the previous buffer goes first and is not loaded again; every other one is loaded (oldest
held models unloaded first until it fits) and charged its load. When every runnable model fits
at once nothing is ever unloaded, so each is loaded once; when one model fits at a time, each
buffer costs a load per model it needs, less the one carried over.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlink.bench.table4_costs import fitting_sets
from mlink.bench.table4_data import FrameFeatures, Oracle, Protocol, score
from mlink.server.change import FEATURES, frame_diff  # Reducto's differences: one implementation


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
    load_s: dict[str, float] = field(default_factory=dict)  # model (and "mtl") -> measured load seconds

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

    @property
    def buffer_frames(self) -> int:
        return max(1, int(self.opt("buffer_frames", 20)))

    def windows(self, positions: Sequence[int]) -> list[list[int]]:
        """``positions`` in time order cut into consecutive buffers of ``buffer_frames``."""
        order = sorted(positions)
        b = self.buffer_frames
        return [order[i : i + b] for i in range(0, len(order), b)]

    def load_ms_per_frame(self, loads: Iterable[str]) -> float:
        """The load events' measured seconds, in ms per evaluation frame."""
        return load_ms_per_frame(self.load_s, loads, len(self.protocol.eval))


def load_ms_per_frame(load_s: Mapping[str, float], loads: Iterable[str], frames: int) -> float:
    """Total measured load time of ``loads`` (one entry per load event, a model may recur) in ms,
    spread over ``frames`` frames."""
    total = 0.0
    for m in loads:
        if m not in load_s:
            raise KeyError(f"no measured load time for {m!r}: cannot charge its load")
        total += float(load_s[m])
    return 1000.0 * total / frames if frames else 0.0


class Residency:
    """What a method holds on the device over time under ``budget``: every load (in order), and
    the most held at any instant. A load's instant holds the loaded model with everything still
    held (its measured cost is the peak of its load and warm-up)."""

    def __init__(self, costs: Mapping[str, float], budget: float) -> None:
        self.costs = dict(costs)
        self.budget = float(budget)
        self.held: list[str] = []  # load order, oldest first
        self.loads: list[str] = []
        self.peak = 0.0
        self.instants = 0

    @property
    def memory(self) -> float:
        return sum(self.costs[m] for m in self.held)

    def _instant(self) -> None:
        self.instants += 1
        self.peak = max(self.peak, self.memory)

    def unload(self, model: str) -> None:
        if model in self.held:
            self.held.remove(model)
            self._instant()

    def load(self, model: str, protect: Iterable[str] = ()) -> bool:
        """Make ``model`` resident. Nothing when it is held; else unload held models (the others
        oldest first, then those in ``protect``) until it fits next to what stays, and load it.
        Returns whether it was loaded."""
        if model in self.held:
            return False
        keep = set(protect)
        order = [m for m in self.held if m not in keep] + [m for m in self.held if m in keep]
        for victim in order:
            if self.memory + self.costs[model] <= self.budget + 1e-9:
                break
            self.unload(victim)
        self.held.append(model)
        self.loads.append(model)
        self._instant()
        return True

    def hold(self, models: Iterable[str]) -> None:
        """Exactly ``models`` resident: the others unloaded first, then each missing one loaded."""
        want = set(models)
        for m in [m for m in self.held if m not in want]:
            self.unload(m)
        for m in sorted(want - set(self.held)):
            self.load(m, protect=want)

    def charge(self) -> dict[str, Any]:
        """What :func:`result` reports of it (besides the load time)."""
        by_model: dict[str, int] = {}
        for m in self.loads:
            by_model[m] = by_model.get(m, 0) + 1
        return {"loads": len(self.loads), "loads_by_model": by_model, "memory_instants": self.instants}


def time_share(res: Residency, windows: Sequence[Sequence[int]], processed: Mapping[str, Iterable[int]]) -> None:
    """Per buffer, each model with a position of ``processed[model]`` in it runs once over them,
    one model after another: those still held first (no load), then each other one loaded
    (:meth:`Residency.load` unloads the oldest held until it fits)."""
    todo = {m: set(ps) for m, ps in processed.items()}
    for win in windows:
        need = [m for m in sorted(todo) if not todo[m].isdisjoint(win)]
        for m in sorted(need, key=lambda m: (m not in res.held, m)):
            res.load(m)


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
    residency: Residency | None = None,
    expected_accuracy: float | None = None,
    load_ms_per_frame: float | None = None,
    loads: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One method's figures at one budget (accuracy on the scored frames, against the oracle).

    ``frame_ms`` is execution + overhead per frame; the loads of ``residency`` are charged on
    top, and the most it held at any instant is checked against the budget with ``memory``.
    A method that schedules and charges its own loads passes no residency but
    ``load_ms_per_frame`` and ``loads``, with ``frame_ms`` already including that load time
    and ``memory`` the most it held at any instant."""
    res = residency if residency is not None else Residency({}, budget)
    memory = max(float(memory), res.peak)
    check_budget(method, memory, budget)
    charge = res.charge()
    if residency is None and load_ms_per_frame is not None:
        load_ms = float(load_ms_per_frame)
        frame_ms -= load_ms
        charge["loads"] = int(loads or 0)
        charge["loads_by_model"] = None
    else:
        load_ms = ctx.load_ms_per_frame(res.loads)
    sc = score(ctx.oracle, ctx.protocol.scored, dict(preds))
    n_all = len(ctx.protocol.eval) * len(ctx.models)
    return {
        "method": method,
        "budget_bytes": budget,
        "accuracy": sc["accuracy"],
        "expected_accuracy": None if expected_accuracy is None else float(expected_accuracy),
        "accuracy_by_model": sc["by_model"],
        "accuracy_by_node": sc["by_node"],
        "ms_per_frame": frame_ms + load_ms,
        "exec_ms_per_frame": frame_ms,
        "load_ms_per_frame": load_ms,
        **charge,
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
    res = Residency(ctx.costs, budget)
    res.hold(best)  # loaded once, held throughout
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
        residency=res,
        expected_accuracy=len(best) / len(ctx.models) if ctx.models else 0.0,
        expected_from="executed models count 1, the others have no output (0)",
        active=sorted(best),
    )


# -- Reducto ----------------------------------------------------------------------------------------


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
    over buffers of frames (:func:`time_share`), each load charged. Models that do not fit alone
    have no output. Expected accuracy: the tuned filters' accuracy on the training share, per
    model (0 for a model without output), averaged over models."""
    runnable = [m for m in ctx.models if ctx.costs[m] <= budget + 1e-9]
    runs = ctx.stream_runs(ctx.protocol.eval)
    scored = ctx.protocol.scored
    preds: dict[str, list[np.ndarray]] = {}
    run_ms = np.zeros(len(ctx.oracle.tuples))
    executions = 0
    diff_s = 0.0
    per_model: dict[str, Any] = {}
    processed_by: dict[str, list[int]] = {}
    for m in runnable:
        t = tuned[m]
        ref, spent = filter_refs(ctx.features, runs, t["feature"], t["threshold"])
        diff_s += spent
        processed = sorted(set(ref.values()))
        processed_by[m] = processed
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
    res = Residency(ctx.costs, budget)
    time_share(res, ctx.windows(ctx.protocol.eval), processed_by)
    expected = sum(float(tuned[m]["train_accuracy"]) for m in runnable) / len(ctx.models) if ctx.models else 0.0
    return result(
        ctx,
        "Reducto",
        budget,
        preds,
        frame_ms,
        executions,
        max((ctx.costs[m] for m in runnable), default=0.0),
        memory_mode=f"time-shared over buffers of {ctx.buffer_frames} frames",
        runs=bool(runnable),
        notes=[]
        if len(runnable) == len(ctx.models)
        else [f"{', '.join(sorted(set(ctx.models) - set(runnable)))} does not fit alone: no output"],
        residency=res,
        expected_accuracy=expected,
        expected_from="the tuned filters' accuracy on the training share (0 for a model without output)",
        buffer_frames=ctx.buffer_frames,
        filter_ms=overhead,
        models=per_model,
        active=sorted(runnable),
    )
