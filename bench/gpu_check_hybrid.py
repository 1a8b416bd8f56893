"""The GPU check's hybrid step: a :class:`Rotation` over real frames, NVML sampled all along.

Run by :mod:`mlink.bench.gpu_check` after the planner periods (``--no-hybrid`` skips it):

1. The planner's pool is closed and a fresh one is made under the *hybrid budget*
   (:func:`hybrid_budget`: one model at a time; at most one beside the cheapest when that one
   is tiny), so models that run must rotate through the pool. Its baseline is taken then,
   after the earlier steps' memory went back. Models dearer than the budget are predicted.
2. A planner over that pool starts from the links and held-out tuples step 2 trained (no new
   profile, as the daemon does with links from disk); a :class:`Rotation` over it
   (``max_delay_s`` so a buffer is ``--hybrid-frames`` frames, ``gpu_share`` 1.0 so loads fit
   its time budget) starts its temporal links from the profiled frames, chooses the modes and
   makes the pool hold the resident set.
3. ``--hybrid-buffers`` buffers of real frames (``sample_frames``) are served as the daemon
   serves them (serve, rotation.serve, close each buffer when due) inside one measured call:
   the sampler reads this process's GPU memory through NVML (process memory on the CPU).

The report: the modes, rotation loads and unloads, frames executed by rotating models, frames
revised, the measured peak above the pool's baseline against the budget, and the pool's
charged peak. ``ok`` is False when the measured peak exceeded the budget.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

MARGIN = 1.05  # over a model's measured cost: a load's re-measured cost may be a little higher
UNDER = 0.97  # of the two cheapest models together: they cannot both be held


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-hybrid", action="store_true", help="skip the hybrid rotation step")
    ap.add_argument("--hybrid-buffers", type=int, default=4, help="buffers the rotation serves")
    ap.add_argument("--hybrid-frames", type=int, default=8, help="frames per hybrid buffer")


def hybrid_frames_needed(args: argparse.Namespace) -> int:
    return 0 if args.no_hybrid else max(1, args.hybrid_buffers) * max(2, args.hybrid_frames)


def hybrid_budget(costs: dict[str, int]) -> int:
    """Bytes for one model at a time: just under the two cheapest together (97%), but at least
    the second cheapest alone (+5%); when the cheapest is tiny that lets it stay resident with
    one other model beside it, never two."""
    c = sorted(costs.values())
    if len(c) < 2:
        raise ValueError("the hybrid step needs two models with measured costs")
    return int(max(UNDER * (c[0] + c[1]), MARGIN * c[1]))


def _records(frames: list[Any], fps: float) -> list[Any]:
    """The frames as camera records on the check's own clock (``fps`` apart from now)."""
    from mlink.scheduler.frame import FrameRecord

    t0 = time.time()
    return [FrameRecord(f.stream, i, f.timestamp, t0 + i / fps, f.image, seq=i) for i, f in enumerate(frames)]


def _build(args: argparse.Namespace, cfg: Any, store: Any, meter: Any, costs: dict[str, int], trained: Any) -> Any:
    """A pool under the hybrid budget and a planner over it that starts from ``trained``'s links."""
    from mlink.links import TrainConfig
    from mlink.scheduler.options import PlannerOptions
    from mlink.scheduler.planner import Planner
    from mlink.scheduler.site import build_pool

    budget = hybrid_budget(costs)
    pool = build_pool(cfg, store=store, budget=budget, costs=costs, meter=meter)  # warm-up: --batch
    options = PlannerOptions.from_site(
        cfg, budget=budget, train_config=TrainConfig(epochs=5, patience=2, combiner_steps=50, fine_tune_epochs=2)
    )
    return Planner(cfg, pool, trained.links, trained.heldout, options=options, clock=lambda: 0.0)


def _serve(args: argparse.Namespace, planner: Any, rotation: Any, records: list[Any]) -> dict[str, Any]:
    """The daemon's serving steps over ``records``; counts of what was served and revised."""
    served = 0
    revised: list[Any] = []
    rotated: set[int] = set()  # frames a model not resident at the time executed on

    def close() -> None:
        resident = planner.plan.active if planner.plan is not None else frozenset()
        out = rotation.close()
        revised.extend(out)
        rotated.update(id(r.frame) for r in out if set(r.executed) - resident)

    step = max(1, args.batch)
    for i in range(0, len(records), step):
        chunk = records[i : i + step]
        served += len(rotation.serve(planner.serve(chunk)))
        if rotation.due(now=chunk[-1].wall_time):
            close()
    close()  # the last buffer, however full
    return {
        "served_frames": served,
        "revisions": len(revised),
        "frames_revised": len({id(r.frame) for r in revised}),
        "frames_rotated": len(rotated),
        "executions_rotated": sum(len(v) for w in rotation.windows for v in w["runs"].values()),
    }


def run_hybrid(
    args: argparse.Namespace,
    cfg: Any,
    store: Any,
    meter: Any,
    costs: dict[str, int],
    trained: Any,
    frames: list[Any],
    profiled: list[Any],
    fps: float,
) -> dict[str, Any]:
    """The hybrid step (module docstring); ``trained``: step 2's planner (its pool is closed
    here), ``frames``: the frames to serve, ``profiled``: those its links were profiled on."""
    from mlink.configs.schema import HybridConfig
    from mlink.scheduler.memory import MemoryMeter
    from mlink.scheduler.rotation import Rotation
    from mlink.server.change import Maps, diffs

    t_start = time.perf_counter()
    trained.pool.close()
    planner = _build(args, cfg, store, meter, costs, trained)
    pool = planner.pool
    planner.initial(now=0.0)
    hf = max(2, args.hybrid_frames)
    hcfg = HybridConfig(enabled=True, max_delay_s=2.0 * (hf - 1) / fps, gpu_share=1.0)
    rotation = Rotation(hcfg, planner, Maps.of, diffs)
    taught = rotation.bootstrap(trained.heldout, {(f.stream, f.timestamp): Maps.of(f.image) for f in profiled})
    watcher = MemoryMeter(args.device)

    def run() -> dict[str, Any]:
        rotation.on_plan()
        return _serve(args, planner, rotation, _records(frames, fps))

    counts, m = watcher.measure_call(run, release_before=True)
    above = m.peak - pool.baseline if m.source == pool.meter.source else None
    rotation_unloads = [r for r in pool.unload_records if r.reason == "rotation"]
    out = {
        "budget_bytes": pool.budget,
        "costs": {k: costs[k] for k in sorted(costs)},
        "modes": rotation.modes.to_json() if rotation.modes is not None else None,
        "taught_pairs": taught,
        "buffers": len(rotation.windows),
        "buffer_frames": hf,
        "rotation_loads": len(rotation.loads),
        "rotation_unloads": len(rotation_unloads),
        "loads_by_model": {k: sum(1 for x in rotation.loads if x["model"] == k) for k in sorted(costs)},
        **counts,
        "peak_charged": max(rotation.peak_charged, max((x["charged_after"] for x in rotation.loads), default=0)),
        "refusals": dict(pool.refusals),
        "measured": {"source": m.source, "baseline": pool.baseline, "peak": m.peak, "samples": m.samples},
        "peak_above_baseline": above,
    }
    out["ok"] = above is None or above <= pool.budget
    out["seconds"] = time.perf_counter() - t_start
    pool.close()
    return out


def print_hybrid(h: dict[str, Any], mib: Any) -> None:
    """The hybrid step's lines of the check's report (``mib``: the check's byte formatter)."""
    modes = h["modes"] or {}
    print(
        f"hybrid: budget {mib(h['budget_bytes']).strip()}, resident {modes.get('resident')}, "
        f"rotating {modes.get('rotating')}, predicted {modes.get('predicted')}"
    )
    print(
        f"  {h['buffers']} buffers of {h['buffer_frames']} frames, {h['served_frames']} frames served: "
        f"rotation loads {h['rotation_loads']} ({h['loads_by_model']}), unloads {h['rotation_unloads']}, "
        f"frames executed by rotating models {h['frames_rotated']}, frames revised {h['frames_revised']}"
        f" ({h['revisions']} revisions), {h['seconds']:.1f} s"
    )
    above = h["peak_above_baseline"]
    peak_txt = mib(above).strip() if above is not None else "n/a (meter source changed)"
    print(
        f"  measured peak above the pool's baseline: {peak_txt} vs budget {mib(h['budget_bytes']).strip()}"
        f" -> {'OK' if h['ok'] else 'OVER BUDGET'}  ({h['measured']['samples']} samples of {h['measured']['source']};"
        f" pool's charged peak {mib(h['peak_charged']).strip()})"
    )
    if not h["rotation_loads"]:
        print(
            "  no rotating model ran (the modes chose none, or no buffer's time covered a load): resident serving only"
        )
    if h["refusals"]:
        print(f"  refused loads (measured over budget): {h['refusals']}")
