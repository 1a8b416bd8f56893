"""Reproduce Table 4 of the MLink paper on one of our sites: every method under the same budgets.

``mlink bench table4 --site building|city`` (``bench/cli.py``) runs :func:`run_table4`:

1. **Oracle**: the site's latest stored profile (every model on every sampled frame, once),
   profiled and stored first when there is none or it is too short
   (:mod:`mlink.bench.table4_data`); per-frame features for the baselines from one decode pass,
   cached in the output folder.
2. **Costs and budgets**: each model's (and MTL's) memory cost and per-frame latency, measured
   in child processes and cached; the "one model fits" and "two fit" budgets and a sweep
   (:mod:`mlink.bench.table4_costs`).
3. **Methods** on the same frames under each budget: Standalone, MTL, DRLS, Reducto, MLink with
   the paper's greedy and with the objective-driven selector (``table4_methods``,
   ``table4_mtl``, ``table4_drls``, ``table4_mlink``). Everything learnt trains on the first
   ``train_share`` of the frames in time order; every accuracy is measured against the oracle
   on the evaluation frames no method trained on. Every method's model loads are charged at
   the measured load time (``load_ms_per_frame``, part of ``ms_per_frame``), its memory is
   checked against the budget at every instant, and where it predicts its own accuracy
   (``expected_accuracy``) that stands beside the measured one (``table4_methods``).
4. **Output**: ``table4.json`` (every figure at every budget), ``table4.md`` (the paper's table:
   accuracy and per-frame time at both budgets, executions saved) and ``table4.png`` (accuracy
   against budget, every method) in the output folder (default ``$MLINK_HOME/bench/SITE``),
   rendered by :mod:`mlink.bench.table4_report` for whatever methods the report holds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlink.bench.table4_report import MiB, markdown, plot, write_outputs

COST_FIELDS = ("memory_bytes", "latency_ms", "latency_ms_p90", "load_s", "meter", "memory_peaks")
TRIVIAL_WHAT = (
    "constant outputs fitted on the training share (majority class, rounded mean count, empty box list), no model run"
)
METHOD_ORDER = ["Standalone", "MTL", "DRLS", "Reducto", "MLink (paper greedy)", "MLink (objective)", "MLink (hybrid)"]

DEFAULTS: dict[str, Any] = {
    "train_share": 0.1,
    "periods": 10,
    "profile_share": 0.01,
    "min_profile": 2,
    "sweep": 8,
    "epochs": 100,  # link training (the paper's 100, early-stopped)
    "fine_tune_epochs": None,  # the links' default (5)
    "mtl_epochs": 300,
    "dqn_steps": 4000,
    "drls_time_penalty": 0.1,
    "reducto_target": 0.9,
    # MLink (hybrid)'s GPU time per frame: None = Reducto's measured per-frame time at the same
    # budget (an equal-time comparison); a share = that share of every model on every frame
    "hybrid_share": None,
    "buffer_frames": 20,  # time-shared methods' buffer: consecutive positions of the evaluation stream
    "latency_frames": 20,
    "cost_repeats": 2,
    "threads": 1,
    "seed": 0,
    "hindsight": True,  # MLink diagnostic: the best fixed set per budget, known afterwards
}


def _mtl_result(ctx: Any, budget: float, mtl: Any, row: Mapping[str, Any], head_ms: float) -> dict[str, Any]:
    from mlink.bench.table4_methods import Residency, result

    cost = float(row["memory_bytes"])
    fits = cost <= budget + 1e-9
    scored = ctx.protocol.scored
    preds = mtl.predict(ctx.features.backbone[scored]) if fits else {}
    notes = ["box outputs: the trivial (empty) list; counts by regression heads, classes by soft-label heads"]
    res = Residency({"mtl": cost}, budget)
    if fits:
        res.hold(["mtl"])  # loaded once, held throughout
    if not fits:
        notes.insert(
            0, f"does not fit: backbone + heads cost {cost / MiB:.1f} MiB > budget {budget / MiB:.1f} MiB; no output"
        )
    return result(
        ctx,
        "MTL",
        budget,
        preds,
        float(row["latency_ms"]) if fits else 0.0,
        0,
        cost if fits else 0.0,
        memory_mode="at once",
        runs=fits,
        notes=notes,
        residency=res,
        backbone_executions=len(ctx.protocol.eval) if fits else 0,
        head_ms=head_ms,
        mtl_fit=mtl.fit,
    )


def _options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """DEFAULTS overridden by the options given (None means "the default")."""
    return {**DEFAULTS, **{k: v for k, v in (options or {}).items() if v is not None}}


def _oracle_and_costs(
    cfg: Any,
    store: Any,
    home: Path,
    out_dir: Path,
    config_path: Path,
    frames: int | None,
    opts: Mapping[str, Any],
    remeasure: bool,
    progress: bool,
    timings: dict[str, float],
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Steps 1 and 2: the oracle, the protocol, the per-frame features and the cost table."""
    from mlink.bench.table4_costs import measure_costs
    from mlink.bench.table4_data import frame_features, load_oracle, make_protocol
    from mlink.bench.table4_mtl import head_specs

    t0 = time.perf_counter()
    oracle, stored = load_oracle(cfg, store, Path(home), frames, progress=progress)
    proto = make_protocol(
        len(oracle.tuples), opts["train_share"], opts["periods"], opts["profile_share"], opts["min_profile"]
    )
    features = frame_features(cfg, store, oracle, stored, out_dir, progress=progress)
    timings["oracle_and_features_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    shapes = head_specs(oracle.tuples.specs)
    table = measure_costs(
        cfg,
        Path(config_path),
        store,
        shapes,
        out_dir,
        frames=int(opts["latency_frames"]),
        repeats=int(opts["cost_repeats"]),
        threads=int(opts["threads"]),
        remeasure=remeasure,
        progress=progress,
    )
    timings["costs_s"] = time.perf_counter() - t0
    return oracle, proto, features, table


def _run_methods(
    ctx: Any,
    cfg: Any,
    mtl_row: Mapping[str, Any],
    all_budgets: list[float],
    opts: Mapping[str, Any],
    timings: dict[str, float],
) -> tuple[dict[str, dict[float, dict[str, Any]]], Any]:
    """Step 3: every method at every budget, each timed. Returns the results and Reducto's tuning."""
    from mlink.bench.table4_drls import drls
    from mlink.bench.table4_hybrid import run_hybrid
    from mlink.bench.table4_methods import reducto, standalone, tune_reducto
    from mlink.bench.table4_mlink import SELECTORS, _train_links, run_mlink
    from mlink.bench.table4_mtl import MTL

    oracle, proto, features = ctx.oracle, ctx.protocol, ctx.features
    results: dict[str, dict[float, dict[str, Any]]] = {m: {} for m in METHOD_ORDER}

    t0 = time.perf_counter()
    for b in all_budgets:
        results["Standalone"][b] = standalone(ctx, b)
    timings["standalone_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train = proto.train
    mtl = MTL.train(
        oracle.tuples.specs,
        features.backbone[train],
        {k: oracle.exact(k, train) for k in oracle.nodes},
        epochs=int(opts["mtl_epochs"]),
        seed=int(opts["seed"]),
    )
    head_ms = mtl.head_ms(features.backbone)
    for b in all_budgets:
        results["MTL"][b] = _mtl_result(ctx, b, mtl, mtl_row, head_ms)
    timings["mtl_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cache: dict = {}
    for b in all_budgets:
        results["DRLS"][b] = drls(ctx, b, cache)
    timings["drls_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tuned = tune_reducto(ctx, float(opts["reducto_target"]))
    for b in all_budgets:
        results["Reducto"][b] = reducto(ctx, b, tuned)
    timings["reducto_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    trained = _train_links(ctx)  # MLink's step 1, once for both MLink rows and the hybrid
    timings["links_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    share = opts.get("hybrid_share")
    same_time = None if share is not None else {b: float(results["Reducto"][b]["ms_per_frame"]) for b in all_budgets}
    for b, r in run_hybrid(ctx, all_budgets, same_time, trained=trained).items():  # copies the links
        results["MLink (hybrid)"][b] = r
    timings["hybrid_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ml = run_mlink(ctx, all_budgets, switch_margin=cfg.scheduler.switch_margin, trained=trained)  # tunes in place
    for (sel, b), r in ml.items():
        results[SELECTORS[sel]][b] = r
    timings["mlink_s"] = time.perf_counter() - t0

    for method, per in results.items():
        for b, r in per.items():
            assert r["memory_bytes"] <= b + 1e-6, f"{method} over budget at {b}"
            assert 0.0 <= r["accuracy"] <= 1.0
    return results, tuned


def _trivial_score(oracle: Any, proto: Any) -> dict[str, Any]:
    """Accuracy of constant outputs fitted on the training share, no model run."""
    from mlink.bench.table4_data import score
    from mlink.links.ensemble import trivial_output

    trivial = {k: trivial_output(oracle.tuples.specs[k], oracle.exact(k, proto.train)) for k in oracle.nodes}
    return score(oracle, proto.scored, {k: [v] * len(proto.scored) for k, v in trivial.items()})


def run_table4(
    cfg: Any,
    *,
    store: Any,
    home: Path,
    out_dir: Path,
    config_path: Path,
    frames: int | None = None,
    options: Mapping[str, Any] | None = None,
    remeasure: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole harness; write table4.json/.md/.png into ``out_dir``; return the report."""
    import cv2
    import torch

    from mlink.bench.table4_costs import budgets as make_budgets
    from mlink.bench.table4_methods import Context

    opts = _options(options)
    torch.set_num_threads(max(1, min(2, int(opts["threads"]))))
    cv2.setNumThreads(max(1, min(2, int(opts["threads"]))))
    t_start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    oracle, proto, features, table = _oracle_and_costs(
        cfg, store, home, out_dir, config_path, frames, opts, remeasure, progress, timings
    )
    rows = table["rows"]
    costs = {m: float(rows[m]["memory_bytes"]) for m in oracle.models}
    latency = {m: float(rows[m]["latency_ms"]) for m in oracle.models}
    bud = make_budgets(costs, int(opts["sweep"]))
    named = {"one": bud["one"], "two": bud["two"]}
    all_budgets = sorted({*named.values(), *bud["sweep"]})

    load_s = {m: float(rows[m]["load_s"]) for m in [*oracle.models, "mtl"]}
    ctx = Context(oracle, proto, costs, latency, features, options=opts, progress=progress, load_s=load_s)
    results, tuned = _run_methods(ctx, cfg, rows["mtl"], all_budgets, opts, timings)
    trivial_score = _trivial_score(oracle, proto)

    report = {
        "site": cfg.site,
        "device": cfg.device,
        "profile": oracle.source,
        "protocol": proto.to_json(),
        "options": opts,
        "costs": {m: {k: rows[m][k] for k in COST_FIELDS} for m in [*oracle.models, "mtl"]},
        "cost_source": table.get("source"),
        "features": {"source": features.source, "reducto_map_ms": features.map_ms, "backbone_ms": features.backbone_ms},
        "budgets": {
            "one": named["one"],
            "two": named["two"],
            "sweep": bud["sweep"],
            "all": all_budgets,
            "rule": bud["rule"],
        },
        "fits": {
            name: {
                "fits_alone": sorted(m for m in costs if costs[m] <= b),
                "max_models_at_once": _max_at_once(costs, b),
            }
            for name, b in named.items()
        },
        "methods": _methods_json(results, named, all_budgets),
        "reducto_tuning": tuned,
        "trivial": {"accuracy": trivial_score["accuracy"], "by_node": trivial_score["by_node"], "what": TRIVIAL_WHAT},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "seconds": round(time.time() - t_start, 1),
    }
    write_outputs(report, out_dir)
    return report


def _methods_json(
    results: Mapping[str, Mapping[float, dict[str, Any]]], named: Mapping[str, float], all_budgets: list[float]
) -> dict[str, dict[str, Any]]:
    """Each method's results at the named budgets and along the sweep (the report's "methods")."""
    order = [m for m in METHOD_ORDER if m in results] + [m for m in results if m not in METHOD_ORDER]
    return {
        m: {
            "one": results[m][named["one"]],
            "two": results[m][named["two"]],
            "curve": [results[m][b] for b in all_budgets],
        }
        for m in order
        if results[m]
    }


def _max_at_once(costs: Mapping[str, float], budget: float) -> int:
    from mlink.bench.table4_costs import fitting_sets

    return max(len(s) for s in fitting_sets(costs, budget))


__all__ = ["DEFAULTS", "METHOD_ORDER", "MiB", "markdown", "plot", "run_table4", "write_outputs"]
