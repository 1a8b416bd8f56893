"""Scheduler benchmark: selection time for many models, and re-profiling overhead per period.

1. **Selection time, 50 models** (synthetic): costs drawn from 0.5-5 GB, single-link accuracies
   q_ij from a seeded mix of strong, weak and useless links, ensemble accuracy
   p(h_{A,j}) = max(trivial_j, 1 - prod_{i in A} (1 - q_ij)) (mutual assistance: every active
   source adds a little), budget 10% of all costs. Both selectors (the paper's greedy and the
   Eq. 1 selector, which beyond 12 models is its marginal-gain greedy), median of repeats, and
   the exact search at 12 models for reference; the objective each reaches is printed too.
2. **Re-profiling overhead**: one real period of the planner on the CPU for a site
   (``--site building``): ``profile_share`` of a period's frames at the site's sampling rate
   (the streams' fps added up; 1% of an hour at 7 fps is 252 frames) is buffered from the
   site's own videos and :meth:`Planner.run_period` runs on it with the real models: profiling
   through every model one after another via the pool (with the loads and unloads that needs),
   link fine-tuning, re-measuring, re-selection and applying the plan. Its wall time as a share
   of the period is the overhead. Links come from the site's link store when they match its
   latest profile, else they are trained on that profile (``--epochs``, default 10: the period's
   fine-tuning cost does not depend on it).

    python -m mlink.bench.scheduler [--models 50] [--site building] [--period 3600] [--share 0.01] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

GB = 1_000_000_000


# -- 1. selection time ------------------------------------------------------------------------


def synthetic_problem(n: int, seed: int = 0, budget_share: float = 0.1):
    rng = np.random.default_rng(seed)
    names = [f"m{i:02d}" for i in range(n)]
    costs = {m: float(rng.uniform(0.5, 5.0) * GB) for m in names}
    kind = rng.choice(3, size=(n, n), p=[0.04, 0.3, 0.66])  # strong, weak, useless links
    q = np.where(kind == 0, rng.uniform(0.5, 0.9, (n, n)), np.where(kind == 1, rng.uniform(0.02, 0.2, (n, n)), 0.0))
    np.fill_diagonal(q, 0.0)
    trivial = {m: float(rng.uniform(0.0, 0.4)) for m in names}
    index = {m: i for i, m in enumerate(names)}
    link_acc = {(a, b): float(q[index[a], index[b]]) for a in names for b in names if a != b}

    def acc(active: frozenset[str], target: str) -> float:
        j = index[target]
        miss = 1.0
        for a in active:
            miss *= 1.0 - q[index[a], j]
        return max(trivial[target], 1.0 - miss)

    budget = budget_share * sum(costs.values())
    return names, costs, link_acc, acc, budget


def time_selection(n: int, repeats: int = 5, seed: int = 0) -> dict[str, Any]:
    from mlink.scheduler.selection import objective_select, paper_greedy

    _names, costs, link_acc, acc, budget = synthetic_problem(n, seed)
    out: dict[str, Any] = {"models": n, "budget_share": 0.1}
    for label, run in (
        ("paper", lambda: paper_greedy(costs, link_acc, budget, ensemble_acc=acc)),
        ("objective", lambda: objective_select(costs, acc, budget)),
    ):
        times, sel = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            sel = run()  # a fresh selection each time: no cache survives between runs
            times.append(time.perf_counter() - t0)
        assert sel is not None
        out[label] = {
            "seconds_median": statistics.median(times),
            "seconds_max": max(times),
            "objective": sel.objective,
            "active": len(sel.active),
            "selector": sel.selector,
            "evaluations": sel.evaluations,
        }
    return out


# -- 2. re-profiling overhead -----------------------------------------------------------------


def _links_for(cfg, store, epochs: int, quiet: bool):
    from mlink.links import LinkSet, LinkStoreError, TrainConfig
    from mlink.links.matrix import heldout_split
    from mlink.scheduler.profiler import link_store_dir
    from mlink.server.profiling import profile_site, stored_profile

    tuples, _, _ = stored_profile(cfg, store.home)
    if tuples is None:
        if not quiet:
            print(f"no stored profile of {cfg.site}: profiling 60 frames", file=sys.stderr)
        tuples = profile_site(cfg, 60, store, progress=not quiet)
    train, test = heldout_split(tuples)
    try:
        links = LinkSet.load(link_store_dir(cfg, store.home), expect_specs=train.specs)
        if links.data_version == train.version():
            return links, test, "stored"
    except LinkStoreError:
        pass
    if not quiet:
        print(f"training links on {len(train)} tuples ({epochs} epochs)", file=sys.stderr)
    t0 = time.perf_counter()
    links = LinkSet.train(train, config=TrainConfig(epochs=epochs), progress=not quiet)
    return links, test, f"trained now ({epochs} epochs, {time.perf_counter() - t0:.0f} s)"


def reprofile_overhead(
    site: str, period_s: float, share: float, budget: str | None, epochs: int, quiet: bool
) -> dict[str, Any]:
    import torch

    from mlink.configs.load import load_config, site_config_path
    from mlink.models.assets import default_store
    from mlink.models.catalog import zoo_catalog
    from mlink.scheduler.options import PlannerOptions
    from mlink.scheduler.planner import Planner
    from mlink.scheduler.site import build_pool
    from mlink.server.profiling import plan_stream_frames, site_frames

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = load_config(site_config_path(site), catalog=zoo_catalog())
    cfg = cfg.model_copy(
        update={
            "device": "cpu",
            "scheduler": cfg.scheduler.model_copy(update={"period_s": period_s, "profile_share": share}),
        }
    )
    store = default_store()
    links, test, how = _links_for(cfg, store, epochs, quiet)
    rate = sum(s.fps for s in cfg.streams)
    n = max(2, math.ceil(share * period_s * rate - 1e-9))
    frames = list(site_frames(plan_stream_frames(cfg, n, store)))
    pool = build_pool(cfg, store=store, budget=budget)
    planner = Planner(
        cfg, pool, links, heldout=test, options=PlannerOptions.from_site(cfg, budget=budget), clock=lambda: 0.0
    )
    planner.initial(now=0.0)
    # Buffer the period's share, as the daemon does at the boundary, then run the period.
    tick = planner.on_frames(frames, now=period_s, run=False)
    assert tick.collecting and planner.period_due(period_s)
    t0 = time.perf_counter()
    report = planner.run_period(now=period_s)
    wall = time.perf_counter() - t0
    pool.close()
    return {
        "site": site,
        "period_s": period_s,
        "profile_share": share,
        "frame_rate": rate,
        "frames": report.frames,
        "links": how,
        "budget_bytes": planner.budget,
        "costs": pool.costs(),
        "profile_s": report.profile_s,
        "fine_tune_s": report.fine_tune_s,
        "measure_s": report.measure_s,
        "select_s": report.select_s,
        "apply_s": report.apply_s,
        "total_s": wall,
        "overhead_share": wall / period_s,
        "profile_share_of_period": report.profile_s / period_s,
        "loads": report.loads,
        "unloads": report.unloads,
        "evicted": report.evicted,
        "active_before": sorted(planner.reports[0].candidate["active"]) if planner.reports[0].candidate else None,
        "active_after": sorted(planner.plan.active) if planner.plan else None,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=50, help="synthetic model count for selection time")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--site", action="append", help="site(s) for the re-profiling overhead (default: building)")
    ap.add_argument("--period", type=float, default=3600.0, help="period length, seconds (paper: 1 hour)")
    ap.add_argument("--share", type=float, default=0.01, help="share of a period's frames profiled (paper: 1%%)")
    ap.add_argument(
        "--budget",
        default="0.8x",
        help="planner budget (default 0.8x: every model fits alone, so each can be re-profiled, but not all together)",
    )
    ap.add_argument("--epochs", type=int, default=10, help="epochs if links must be trained first")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    out: dict[str, Any] = {"selection": [time_selection(args.models, args.repeats), time_selection(12, args.repeats)]}
    if not args.skip_overhead:
        out["overhead"] = [
            reprofile_overhead(s, args.period, args.share, args.budget, args.epochs, args.json)
            for s in (args.site or ["building"])
        ]
    if args.json:
        print(json.dumps(out, default=str))
        return 0
    print("selection time (synthetic costs and accuracies, budget 10% of all costs):")
    for row in out["selection"]:
        for label in ("paper", "objective"):
            r = row[label]
            print(
                f"  {row['models']:>3} models  {label:<10} {r['seconds_median'] * 1000:>9.2f} ms median ({r['seconds_max'] * 1000:.2f} max)"
                f"  objective {r['objective']:.4f} with {r['active']} active  [{r['selector']}, {r['evaluations']} set evaluations]"
            )
    for r in out.get("overhead", []):
        print(
            f"re-profiling overhead, site {r['site']} on the CPU ({r['torch_threads']} torch threads): {r['frames']} frames "
            f"({r['profile_share']:.1%} of {r['period_s']:.0f} s at {r['frame_rate']:g} fps) through all models"
        )
        print(
            f"  profile {r['profile_s']:.1f} s, fine-tune {r['fine_tune_s']:.1f} s, measure {r['measure_s']:.2f} s, "
            f"select {r['select_s'] * 1000:.1f} ms, apply {r['apply_s']:.1f} s; total {r['total_s']:.1f} s "
            f"= {r['overhead_share']:.2%} of the period (profiling alone {r['profile_share_of_period']:.2%})"
        )
        print(f"  loads {r['loads']}, unloads {r['unloads']}, evicted {r['evicted']}; links {r['links']}")
        print(f"  active before {r['active_before']}, after {r['active_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
