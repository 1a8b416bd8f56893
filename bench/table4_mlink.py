"""Table 4 harness, MLink: links on the first share, periods with profiling, re-selection, serving.

The protocol of the paper, with the daemon's own pieces (:class:`LinkSet`,
:class:`~mlink.scheduler.planner.LinkAccuracy`, :func:`~mlink.scheduler.planner.select_models`,
:func:`~mlink.scheduler.selection.keep_or_switch`):

1. the training share (first 10% of the frames in time order) is split as the planner splits a
   first profile: 80% train the links and ensembles (``LinkSet.train``, which keeps its own
   validation split), 20% are held out to measure accuracies on;
2. every period starts by profiling its first frames (``profile_share``, at least two) through
   all models one after another (each model fits the budget alone; the profiling is charged to
   the period: those frames cost every model's latency); as the planner does, half of those
   tuples fine-tune the links (``LinkSet.fine_tune``) and half join a sliding window of
   held-out tuples (the most recent ``max(held out, 50)``) on which p(h_{A,j}) is re-measured;
3. the selector (the paper's activation-probability greedy, or the objective-driven one) picks
   the active set under the budget from the measured costs (no extra cost margin: the budget
   and the costs come from one measured table), with the planner's hysteresis
   (``switch_margin`` of the site config);
4. the rest of the period is served: the active models' outputs are exact (models are
   deterministic, so the oracle's outputs are what they would return), every other node is
   predicted by its ensemble from the active models' outputs (``LinkSet.predict_tuples`` is
   the serving path, batched).

Under a budget some model does not fit even alone, that model can never be profiled, so the
links cannot be fine-tuned on complete tuples: those budgets use the links as first trained
(the planner does the same: it skips fine-tuning when a model could not be profiled).

Per-frame time: served frames cost the active models' latencies plus the measured time of the
link ensembles on one frame (``LinkSet.predict``, the daemon's per-frame call); profiled frames
cost every profiled model's latency. Fine-tuning and selection run once a period on the host
and are reported separately (seconds per period), not per frame. Links live in host memory
(the planner does not charge them against the device budget); their size is reported.

Model swaps, charged at each model's measured load time (spread over the evaluation frames) and
checked against the budget at every instant (:class:`~mlink.bench.table4_methods.Residency`):
at the start of each period, profiling runs the models one after another, those still resident
from the last period first (no load), then each other one loaded, unloading what it needs room
from (models profiled earlier in the period first, then the last period's active set); then the
chosen active set is held: every model of it not resident at that moment is loaded (the others
are unloaded). So a period costs a load per profiled model not resident, plus a load per active
model evicted for profiling or newly switched in.

Expected beside measured: each period's choice comes with the selector's Eq. 1 objective
(``expected_objective``, the expected mean over models of each model's mean node accuracy, in
the units of ``accuracy``); ``expected_accuracy`` is its mean over the periods weighted by the
frames each period serves, i.e. the expected accuracy of the scored output.

Diagnostic (``hindsight``, on by default): every fixed active set is also served through the
same links over the same periods, and the best one that fits each budget is reported next to
the selectors' choice (the best a selector could have done with these links, known only
afterwards).
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlink.bench.table4_methods import Context, Residency, result
from mlink.links import LinkSet, TrainConfig, TupleSet, node_model
from mlink.scheduler.accuracy import LinkAccuracy
from mlink.scheduler.selection import evaluate, keep_or_switch
from mlink.scheduler.selector import select_models

SELECTORS = {"paper": "MLink (paper greedy)", "objective": "MLink (objective)"}


def _extend(window: TupleSet, held: TupleSet | None, cap: int) -> TupleSet:
    if held is None or len(held) == 0:
        return window
    w = TupleSet(
        specs=dict(window.specs),
        values={k: list(v) for k, v in window.values.items()},
        streams=list(window.streams),
        timestamps=list(window.timestamps),
    )
    w.extend(held)
    if len(w) > cap:
        w = w.subset(range(len(w) - cap, len(w)))
    return w


def link_bytes(links: LinkSet) -> int:
    return int(sum(p.numel() * p.element_size() for ens in links.ensembles.values() for p in ens.parameters()))


def _link_ms(
    links: LinkSet, tuples: TupleSet, active: frozenset[str], positions: Iterable[int], repeats: int = 1
) -> float:
    """Median time (ms) of predicting every inactive node for one frame, as serving does."""
    if len(active) == 0:
        return 0.0
    times = []
    for p in positions:
        outs = {k: tuples.values[k][p] for k in tuples.specs if node_model(k) in active}
        for _ in range(repeats):
            t0 = time.perf_counter()
            links.predict(active, outs)
            times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times)) if times else 0.0


def _train_links(ctx: Context) -> tuple[LinkSet, TupleSet, TupleSet, float]:
    """Step 1: links and ensembles on 80% of the training share; the other 20% held out.
    Returns the links, what they trained on, the held-out tuples and the training seconds."""
    train = ctx.oracle.tuples.subset(ctx.protocol.train)
    seed = int(ctx.opt("seed", 0))
    links_train, heldout = train.split(0.2, seed)
    config = TrainConfig(epochs=int(ctx.opt("epochs", 100)), seed=seed, threads=1)
    t0 = time.perf_counter()
    links = LinkSet.train(links_train, val_share=0.2, config=config, progress=ctx.progress)
    return links, links_train, heldout, time.perf_counter() - t0


@dataclass
class _Run:
    """The periods of :func:`run_mlink`: per (selector, budget) what was served, and the caches.

    ``trajs`` holds the links of each trajectory: ``"tuned"`` is fine-tuned every period,
    ``"frozen"`` (for budgets some model does not fit alone) stays as first trained;
    ``traj_of`` names each budget's trajectory.
    """

    ctx: Context
    budgets: list[float]
    switch_margin: float
    trajs: dict[str, LinkSet]
    windows: dict[str, TupleSet]
    traj_of: dict[float, str]
    cap: int
    link_ms_cache: dict[tuple[str, frozenset[str]], float] = field(default_factory=dict)
    pred_cache: dict[tuple[str, int, frozenset[str]], dict[str, list[np.ndarray]]] = field(default_factory=dict)
    fine_tune_s: list[float] = field(default_factory=list)
    select_s: list[float] = field(default_factory=list)
    fixed: dict[tuple[str, frozenset[str]], dict[str, list]] = field(default_factory=dict)
    state: dict[tuple[str, float], dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.state = {
            (sel, b): {
                "preds": {k: [] for k in self.ctx.oracle.nodes},
                "ms": [],
                "executions": 0,
                "memory": 0.0,
                "periods": [],
                "active": None,
                "res": Residency(self.ctx.costs, b),
                "expected": [],  # (objective, frames served) per period
            }
            for sel in SELECTORS
            for b in self.budgets
        }

    def period(self, pi: int, chunk: list[int], prof: list[int], hindsight: bool) -> None:
        """One period: profile, fine-tune, re-measure, then select and serve at every budget."""
        ctx = self.ctx
        tuples, models = ctx.oracle.tuples, ctx.models
        seed = int(ctx.opt("seed", 0))
        served_pos = [p for p in chunk if p not in set(prof)]
        # 1-2. profile, fine-tune on half, re-measure on the window with the other half.
        new = tuples.subset(prof)
        tune, held = new.split(0.5, seed + pi + 1) if len(new) >= 2 else (new, None)
        t0 = time.perf_counter()
        self.trajs["tuned"].fine_tune(tune, epochs=ctx.options.get("fine_tune_epochs"))
        self.fine_tune_s.append(time.perf_counter() - t0)
        self.windows["tuned"] = _extend(self.windows["tuned"], held, self.cap)
        served_map = {m: tuple(ctx.oracle.served[m]) for m in models}
        accs = {name: LinkAccuracy(self.trajs[name], self.windows[name], served_map) for name in self.trajs}
        sub = tuples.subset(served_pos)
        for b in self.budgets:
            acc = accs[self.traj_of[b]]
            for sel in SELECTORS:
                self._select_and_serve(sel, b, acc, pi, sub, served_pos, prof)
        if hindsight:
            self._hindsight(pi, sub)
        for key in [k for k in self.pred_cache if k[1] == pi]:
            del self.pred_cache[key]

    def _select(self, sel: str, b: float, acc: LinkAccuracy) -> tuple[Any, Any]:
        """3. The selector's candidate and, after hysteresis against the current set, the choice."""
        ctx, models = self.ctx, self.ctx.models
        st = self.state[(sel, b)]
        t0 = time.perf_counter()
        cand = select_models(sel, ctx.costs, acc, int(b), models=models, cost_margin=0.0)
        if st["active"] is not None:
            current = evaluate(st["active"], ctx.costs, acc, b, models=models, selector=cand.selector)
            chosen = keep_or_switch(current, cand, self.switch_margin, True)
        else:
            chosen = cand
        self.select_s.append(time.perf_counter() - t0)
        return cand, chosen

    def _select_and_serve(
        self, sel: str, b: float, acc: LinkAccuracy, pi: int, sub: TupleSet, served_pos: list[int], prof: list[int]
    ) -> None:
        """3-4. Select under budget ``b``, then serve the period's frames and charge them."""
        ctx = self.ctx
        name = self.traj_of[b]
        profiled_models = [m for m in ctx.models if ctx.costs[m] <= b + 1e-9]
        st = self.state[(sel, b)]
        res: Residency = st["res"]
        if prof:  # profiling: the resident models first, then each other one loaded in turn
            resident = set(res.held)
            for m in [m for m in profiled_models if m not in resident]:
                res.load(m, protect=resident)
        cand, chosen = self._select(sel, b, acc)
        active = frozenset(chosen.active)
        mem = sum(ctx.costs[m] for m in active)
        if mem > b + 1e-6:
            raise AssertionError(f"MLink {sel}: active set {sorted(active)} costs {mem} B over the budget {b} B")
        res.hold(active)
        st["active"] = active
        st["expected"].append((float(chosen.objective), len(served_pos)))
        key = (name, pi, active)
        if key not in self.pred_cache:
            self.pred_cache[key] = self.trajs[name].predict_tuples(active, sub)
        lkey = (name, active)
        if lkey not in self.link_ms_cache:
            self.link_ms_cache[lkey] = _link_ms(self.trajs[name], ctx.oracle.tuples, active, served_pos[:10])
        preds = self.pred_cache[key]
        for k in ctx.oracle.nodes:
            st["preds"][k].extend(sub.values[k] if node_model(k) in active else preds[k])
        run = sum(ctx.latency[m] for m in active) + self.link_ms_cache[lkey]
        st["ms"].extend([run] * len(served_pos))
        st["ms"].extend([sum(ctx.latency[m] for m in profiled_models)] * len(prof))
        st["executions"] += len(active) * len(served_pos) + len(profiled_models) * len(prof)
        st["memory"] = max(st["memory"], mem, max((ctx.costs[m] for m in profiled_models), default=0.0))
        st["periods"].append(
            {
                "period": pi,
                "active": sorted(active),
                "expected_objective": round(chosen.objective, 4),
                "candidate": sorted(cand.active),
                "links": name,
                "profiled": len(prof),
                "served": len(served_pos),
            }
        )

    def _hindsight(self, pi: int, sub: TupleSet) -> None:
        """Every fixed set served through the same links, for the best set in hindsight."""
        models, nodes = self.ctx.models, self.ctx.oracle.nodes
        subsets = [frozenset(c) for r in range(len(models) + 1) for c in itertools.combinations(models, r)]
        for name in self.trajs:
            for A in subsets:
                key = (name, pi, A)
                if key not in self.pred_cache:
                    self.pred_cache[key] = self.trajs[name].predict_tuples(A, sub)
                acc_h = self.fixed.setdefault((name, A), {k: [] for k in nodes})
                for k in nodes:
                    acc_h[k].extend(sub.values[k] if node_model(k) in A else self.pred_cache[key][k])

    def results(self, meta: dict[str, Any]) -> dict[tuple[str, float], dict[str, Any]]:
        """{(selector, budget): result}, each with ``meta`` under ``"mlink"``."""
        from mlink.bench.table4_data import score

        ctx = self.ctx
        fixed_acc = {
            (name, A): score(ctx.oracle, ctx.protocol.scored, preds)["accuracy"]
            for (name, A), preds in self.fixed.items()
        }
        out: dict[tuple[str, float], dict[str, Any]] = {}
        for (sel, b), st in self.state.items():
            actives = [tuple(p["active"]) for p in st["periods"]]
            counts: dict[str, int] = {}
            for a in actives:
                counts["+".join(a) or "(none)"] = counts.get("+".join(a) or "(none)", 0) + 1
            notes = []
            if self.traj_of[b] == "frozen":
                notes.append("a model does not fit alone: links not fine-tuned (no complete profiling tuples)")
            best = None
            if fixed_acc:
                feasible = [
                    (acc, A)
                    for (name, A), acc in fixed_acc.items()
                    if name == self.traj_of[b] and sum(ctx.costs[m] for m in A) <= b + 1e-9
                ]
                acc_b, A_b = max(feasible, key=lambda t: (t[0], -len(t[1])))
                best = {"active": sorted(A_b), "accuracy": acc_b}
            out[(sel, b)] = result(
                ctx,
                SELECTORS[sel],
                b,
                st["preds"],
                float(np.mean(st["ms"])),
                st["executions"],
                st["memory"],
                memory_mode="at once (serving); profiling runs the models one after another",
                runs=True,
                notes=notes,
                selector=sel,
                active_sets=counts,
                periods=st["periods"],
                expected_objective=float(np.mean([p["expected_objective"] for p in st["periods"]])),
                residency=st["res"],
                expected_accuracy=_weighted(st["expected"]),
                expected_from="the selector's Eq. 1 objective per period, weighted by the frames it serves",
                hindsight_best=best,
                link_ms={
                    "+".join(sorted(a)) or "(none)": round(v, 3)
                    for (n, a), v in self.link_ms_cache.items()
                    if n == self.traj_of[b]
                },
            )
            out[(sel, b)]["mlink"] = meta
        return out


def _weighted(pairs: list[tuple[float, int]]) -> float | None:
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


TrainedLinks = tuple[LinkSet, TupleSet, TupleSet, float]  # what :func:`_train_links` returns


def run_mlink(
    ctx: Context, budgets: list[float], switch_margin: float = 0.01, trained: TrainedLinks | None = None
) -> dict[tuple[str, float], dict[str, Any]]:
    """Every selector at every budget, over the same periods; {(selector, budget): result}.
    ``trained``: step 1's links when the caller trained them already (they are fine-tuned in
    place); default: trained here."""
    from tqdm import tqdm

    proto = ctx.protocol
    links, links_train, heldout, train_s = trained or _train_links(ctx)
    max_cost = max(ctx.costs.values())
    traj_of = {b: ("tuned" if b + 1e-9 >= max_cost else "frozen") for b in budgets}
    trajs: dict[str, LinkSet] = {"tuned": links}
    if "frozen" in traj_of.values():
        trajs["frozen"] = copy.deepcopy(links)
    windows = {name: heldout for name in trajs}
    run = _Run(ctx, budgets, switch_margin, trajs, windows, traj_of, cap=max(len(heldout), 50))
    hindsight = bool(ctx.opt("hindsight", True))
    bar = tqdm(total=len(proto.periods), desc="MLink periods", unit="period", disable=not ctx.progress)
    try:
        for pi, (chunk, prof) in enumerate(zip(proto.periods, proto.profiled)):
            run.period(pi, chunk, prof, hindsight)
            bar.update(1)
    finally:
        bar.close()

    meta = {
        "train_s": train_s,
        "links_trained_on": len(links_train),
        "held_out": len(heldout),
        "fine_tune_s_per_period": float(np.mean(run.fine_tune_s)) if run.fine_tune_s else 0.0,
        "select_ms_per_period": 1000.0 * float(np.mean(run.select_s)) if run.select_s else 0.0,
        "link_host_bytes": link_bytes(links),
        "epochs": int(ctx.opt("epochs", 100)),
    }
    return run.results(meta)
