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

Diagnostic (``hindsight``, on by default): every fixed active set is also served through the
same links over the same periods, and the best one that fits each budget is reported next to
the selectors' choice (the best a selector could have done with these links, known only
afterwards).
"""

from __future__ import annotations

import copy
import itertools
import time
from typing import Any, Iterable

import numpy as np

from mlink.bench.table4_methods import Context, result
from mlink.links import LinkSet, TrainConfig, TupleSet, node_model
from mlink.scheduler.accuracy import LinkAccuracy
from mlink.scheduler.selector import select_models
from mlink.scheduler.selection import evaluate, keep_or_switch

SELECTORS = {"paper": "MLink (paper greedy)", "objective": "MLink (objective)"}


def _extend(window: TupleSet, held: TupleSet | None, cap: int) -> TupleSet:
    if held is None or len(held) == 0:
        return window
    w = TupleSet(specs=dict(window.specs), values={k: list(v) for k, v in window.values.items()}, streams=list(window.streams), timestamps=list(window.timestamps))
    w.extend(held)
    if len(w) > cap:
        w = w.subset(range(len(w) - cap, len(w)))
    return w


def link_bytes(links: LinkSet) -> int:
    return int(sum(p.numel() * p.element_size() for ens in links.ensembles.values() for p in ens.parameters()))


def _link_ms(links: LinkSet, tuples: TupleSet, active: frozenset[str], positions: Iterable[int], repeats: int = 1) -> float:
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


def run_mlink(ctx: Context, budgets: list[float], switch_margin: float = 0.01) -> dict[tuple[str, float], dict[str, Any]]:
    """Every selector at every budget, over the same periods; {(selector, budget): result}."""
    from tqdm import tqdm

    oracle, proto = ctx.oracle, ctx.protocol
    tuples = oracle.tuples
    models = ctx.models
    served_map = {m: tuple(oracle.served[m]) for m in models}
    seed = int(ctx.opt("seed", 0))
    epochs = int(ctx.opt("epochs", 100))
    ft_epochs = ctx.options.get("fine_tune_epochs")

    train = tuples.subset(proto.train)
    links_train, heldout = train.split(0.2, seed)
    config = TrainConfig(epochs=epochs, seed=seed, threads=1)
    t0 = time.perf_counter()
    links = LinkSet.train(links_train, val_share=0.2, config=config, progress=ctx.progress)
    train_s = time.perf_counter() - t0

    max_cost = max(ctx.costs.values())
    traj_of = {b: ("tuned" if b + 1e-9 >= max_cost else "frozen") for b in budgets}
    trajs: dict[str, LinkSet] = {"tuned": links}
    if "frozen" in traj_of.values():
        trajs["frozen"] = copy.deepcopy(links)
    windows = {name: heldout for name in trajs}
    cap = max(len(heldout), 50)

    link_ms_cache: dict[tuple[str, frozenset[str]], float] = {}
    pred_cache: dict[tuple[str, int, frozenset[str]], dict[str, list[np.ndarray]]] = {}
    state: dict[tuple[str, float], dict[str, Any]] = {
        (sel, b): {"preds": {k: [] for k in oracle.nodes}, "ms": [], "executions": 0, "memory": 0.0, "periods": [], "active": None}
        for sel in SELECTORS
        for b in budgets
    }
    fine_tune_s: list[float] = []
    select_s: list[float] = []
    hindsight = bool(ctx.opt("hindsight", True))
    subsets = [frozenset(c) for r in range(len(models) + 1) for c in itertools.combinations(models, r)]
    fixed: dict[tuple[str, frozenset[str]], dict[str, list]] = {}
    bar = tqdm(total=len(proto.periods), desc="MLink periods", unit="period", disable=not ctx.progress)
    try:
        for pi, (chunk, prof) in enumerate(zip(proto.periods, proto.profiled)):
            served_pos = [p for p in chunk if p not in set(prof)]
            # 1-2. profile, fine-tune on half, re-measure on the window with the other half.
            new = tuples.subset(prof)
            tune, held = new.split(0.5, seed + pi + 1) if len(new) >= 2 else (new, None)
            t0 = time.perf_counter()
            trajs["tuned"].fine_tune(tune, epochs=ft_epochs)
            fine_tune_s.append(time.perf_counter() - t0)
            windows["tuned"] = _extend(windows["tuned"], held, cap)
            accs = {name: LinkAccuracy(trajs[name], windows[name], served_map) for name in trajs}
            sub = tuples.subset(served_pos)
            for b in budgets:
                name = traj_of[b]
                acc = accs[name]
                profiled_models = [m for m in models if ctx.costs[m] <= b + 1e-9]
                for sel in SELECTORS:
                    st = state[(sel, b)]
                    t0 = time.perf_counter()
                    cand = select_models(sel, ctx.costs, acc, int(b), models=models, cost_margin=0.0)
                    if st["active"] is not None:
                        current = evaluate(st["active"], ctx.costs, acc, b, models=models, selector=cand.selector)
                        chosen = keep_or_switch(current, cand, switch_margin, True)
                    else:
                        chosen = cand
                    select_s.append(time.perf_counter() - t0)
                    active = frozenset(chosen.active)
                    mem = sum(ctx.costs[m] for m in active)
                    if mem > b + 1e-6:
                        raise AssertionError(f"MLink {sel}: active set {sorted(active)} costs {mem} B over the budget {b} B")
                    st["active"] = active
                    key = (name, pi, active)
                    if key not in pred_cache:
                        pred_cache[key] = trajs[name].predict_tuples(active, sub)
                    lkey = (name, active)
                    if lkey not in link_ms_cache:
                        link_ms_cache[lkey] = _link_ms(trajs[name], tuples, active, served_pos[:10])
                    preds = pred_cache[key]
                    for k in oracle.nodes:
                        st["preds"][k].extend(sub.values[k] if node_model(k) in active else preds[k])
                    run = sum(ctx.latency[m] for m in active) + link_ms_cache[lkey]
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
            if hindsight:
                # Every fixed set served through the same links, for the best set in hindsight.
                for name in trajs:
                    for A in subsets:
                        key = (name, pi, A)
                        if key not in pred_cache:
                            pred_cache[key] = trajs[name].predict_tuples(A, sub)
                        acc_h = fixed.setdefault((name, A), {k: [] for k in oracle.nodes})
                        for k in oracle.nodes:
                            acc_h[k].extend(sub.values[k] if node_model(k) in A else pred_cache[key][k])
            for key in [k for k in pred_cache if k[1] == pi]:
                del pred_cache[key]
            bar.update(1)
    finally:
        bar.close()

    from mlink.bench.table4_data import score

    fixed_acc = {(name, A): score(oracle, proto.scored, preds)["accuracy"] for (name, A), preds in fixed.items()}

    out: dict[tuple[str, float], dict[str, Any]] = {}
    for (sel, b), st in state.items():
        actives = [tuple(p["active"]) for p in st["periods"]]
        counts: dict[str, int] = {}
        for a in actives:
            counts["+".join(a) or "(none)"] = counts.get("+".join(a) or "(none)", 0) + 1
        notes = []
        if traj_of[b] == "frozen":
            notes.append("a model does not fit alone: links not fine-tuned (no complete profiling tuples)")
        best = None
        if fixed_acc:
            feasible = [(acc, A) for (name, A), acc in fixed_acc.items() if name == traj_of[b] and sum(ctx.costs[m] for m in A) <= b + 1e-9]
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
            memory_mode="at once (serving); time-shared profiling, one model at a time",
            runs=True,
            notes=notes,
            selector=sel,
            active_sets=counts,
            periods=st["periods"],
            expected_objective=float(np.mean([p["expected_objective"] for p in st["periods"]])),
            hindsight_best=best,
            link_ms={"+".join(sorted(a)) or "(none)": round(v, 3) for (n, a), v in link_ms_cache.items() if n == traj_of[b]},
        )
    meta = {
        "train_s": train_s,
        "links_trained_on": len(links_train),
        "held_out": len(heldout),
        "fine_tune_s_per_period": float(np.mean(fine_tune_s)) if fine_tune_s else 0.0,
        "select_ms_per_period": 1000.0 * float(np.mean(select_s)) if select_s else 0.0,
        "link_host_bytes": link_bytes(links),
        "epochs": epochs,
    }
    for r in out.values():
        r["mlink"] = meta
    return out
