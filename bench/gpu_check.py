"""GPU check for a CUDA machine: measured model costs, a few planner periods, the peak vs the budget.

    python -m mlink.bench.gpu_check [--device cuda] [--budget auto|0.6x|BYTES] [--periods 3] [--frames 32]
        [--models a,b] [--no-hybrid] [--hybrid-buffers 4] [--hybrid-frames 8] [--no-onnx] [--json]

1. Loads each torch model of the zoo on the GPU through a :class:`ModelPool` (load + warm-up
   at the serving batch), one at a time, and prints the pool's NVML figures per model (peak
   cost, what stayed resident, what the unload freed), with the device-level delta across the
   load as a cross-check, and whether each fits the budget alone. Detectors whose official
   weights are not in the asset store run with seeded random weights (their memory and speed
   are the real ones); a classifier without its weights is left out, with the reason printed.
2. Builds a site of those models on the GPU, lets :class:`Planner` profile ``--frames`` frames,
   train links (few epochs: this checks memory, not accuracy) and choose a plan under the
   budget, then runs ``--periods`` short periods (re-profiling every model through the pool,
   fine-tuning, re-selecting, applying) while serving frames, with a sampler thread reading
   this process's GPU memory through NVML all along.
3. Prints the measured peak (above the pool's baseline, which holds the CUDA context) against
   the budget, and the per-period load/unload counts.
4. Hybrid rotation (:mod:`mlink.bench.gpu_check_hybrid`; ``--no-hybrid`` skips it): under a
   budget where at most one model fits beside a resident one, a :class:`Rotation` serves
   ``--hybrid-buffers`` buffers of ``--hybrid-frames`` real frames, loading rotating models one
   at a time through the pool while NVML is sampled; prints the rotation loads/unloads, frames
   executed by rotating models and revised, the measured peak against that budget and the
   pool's charged peak.
5. ONNX models (:mod:`mlink.bench.gpu_check_onnx`; ``--no-onnx`` skips it, ``--onnx-models a,b``
   narrows it): each ONNX model of the zoo loaded twice through a pool on the GPU; where it
   executes (its session must run on CUDAExecutionProvider, no CPU fallback), its NVML-measured
   cost at both loads (must be above zero), what the unload freed, milliseconds per frame.

Exit status 1 when a measured peak exceeded its budget, a period loaded or unloaded a model
twice, or an ONNX model ran off the GPU or measured 0 B. ``--models a,b`` restricts the check
to those torch models.

On a machine without a usable CUDA device it prints ``skipped: no CUDA device (...)`` with the
reason and exits 0. Sized to finish within a few minutes on an H100 (a CPU dry run of the same
steps, ``--dry-run-cpu``, takes under two minutes on two cores with ``--frames 8``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from mlink.bench import gpu_check_hybrid, gpu_check_onnx

MiB = 1 << 20


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:8.1f} MiB"


def cuda_status(device: str) -> str | None:
    """None when ``device`` is usable, else why not (for the skip message)."""
    try:
        import torch
    except Exception as exc:  # pragma: no cover - torch is a dependency
        return f"torch cannot be imported: {exc}"
    if not torch.cuda.is_available():
        built = getattr(torch.version, "cuda", None)
        why = "torch was built without CUDA" if not built else f"torch {torch.__version__} (CUDA {built}) sees no GPU"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            why += f", CUDA_VISIBLE_DEVICES={visible!r}"
        return why
    index = torch.device(device).index or 0
    if index >= torch.cuda.device_count():
        return f"{device} requested, torch sees {torch.cuda.device_count()} GPU(s)"
    return None


def torch_models(store: Any) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """{model: params} of the zoo's torch models that can load here, and {model: why not}."""
    from mlink.models.catalog import model_info, zoo

    chosen: dict[str, dict[str, Any]] = {}
    left_out: dict[str, str] = {}
    for name in zoo():
        info = model_info(name)
        if info.backend != "torch":
            continue
        have = all(store.present(a) for a in info.assets)
        if have:
            chosen[name] = {}
        elif info.task == "detection":
            chosen[name] = {"allow_random_weights": True}
        else:
            left_out[name] = f"weights {', '.join(info.assets)} not in the asset store"
    return chosen, left_out


def sample_frames(store: Any, n: int, fps: float) -> list[Any]:
    """Frames of vtest.avi when the asset is there, topped up with deterministic synthetic ones."""
    import numpy as np

    from mlink.scheduler.priming import synthetic_frame
    from mlink.scheduler.profiler import ProfileFrame

    out: list[Any] = []
    try:
        from mlink.server.frames import read_frames

        path = str(store.path("vtest"))
        out = [ProfileFrame("walkway", f.timestamp, f.image) for f in read_frames(path, sample_fps=fps, max_frames=n)]
    except Exception:  # no asset store or no video here: synthetic frames only
        out = []
    t = out[-1].timestamp + 1.0 / fps if out else 0.0
    for i in range(n - len(out)):
        img = np.roll(synthetic_frame(640, 480, seed=i), 8 * i, axis=1)  # moving texture: outputs vary
        out.append(ProfileFrame("synthetic", t + i / fps, img))
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--budget",
        default="auto",
        help="planner budget: bytes, a device share, a share of the models' cost (0.6x), or auto (default): "
        "1.5x the largest model's cost (at most 0.8x all, at least 1.15x the largest), so each model can be re-profiled but not all stay loaded",
    )
    ap.add_argument("--periods", type=int, default=3)
    ap.add_argument("--frames", type=int, default=32, help="initial profiling frames")
    ap.add_argument("--period-frames", type=int, default=12, help="frames served per period")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--models", default="", help="comma-separated torch models to check (default: every one)")
    gpu_check_hybrid.add_arguments(ap)
    gpu_check_onnx.add_arguments(ap)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dry-run-cpu", action="store_true", help=argparse.SUPPRESS)  # the same steps on the CPU meter
    return ap.parse_args(argv)


def _site_config(args: argparse.Namespace, params: dict[str, dict[str, Any]]) -> Any:
    """The gpu-check site: every model of ``params`` on ``args.device`` (the budget is set later, in bytes)."""
    from mlink.configs.load import parse_config
    from mlink.models.catalog import zoo_catalog

    site_yaml = "\n".join(
        [f"site: gpu-check\ndevice: {args.device}\nbudget: {args.budget}\nmodels:"]
        + [f"  - name: {n}\n    params: {json.dumps(params[n])}" for n in sorted(params)]
        + [
            f"links:\n  profile_frames: {max(20, args.frames)}",
            f"scheduler:\n  period_s: 1.0\n  profile_share: 0.34\n  switch_margin: 0.0\n  batch_size: {args.batch}",
        ]
    )
    return parse_config(
        site_yaml.replace("budget: auto", "budget: 0.8x"), "<gpu-check>", catalog=zoo_catalog()
    )  # the planner gets bytes below


def _probe_costs(
    args: argparse.Namespace, cfg: Any, store: Any, meter: Any, params: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Step 1: each model loaded alone through a pool and unloaded again; one row of figures per model."""
    from mlink.scheduler.pool import ModelPool
    from mlink.scheduler.site import model_factory

    names = sorted(params)
    probe = ModelPool(
        meter.total(),
        args.device,
        meter=meter,
        factory=model_factory(cfg, store),
        warmup_batch=args.batch,
        models=names,
    )
    rows = []
    for n in names:
        dev0 = meter.device_used()
        ok = probe.load(n)
        dev1 = meter.device_used()
        rec = probe.load_records[-1] if ok and probe.load_records else None
        unload = probe.unload(n, reason="measure") if ok else None
        rows.append(
            {
                "model": n,
                "ok": ok,
                "why": probe.unavailable_reason(n),
                "cost": probe.cost(n),
                "resident": rec.resident if rec else None,
                "freed": unload.freed if unload else None,
                "sticky": bool(unload.sticky) if unload else None,
                "device_delta": (dev1 - dev0) if (dev0 is not None and dev1 is not None) else None,
                "source": rec.source if rec else None,
                "load_s": rec.seconds if rec else None,
                "random_weights": bool(params[n].get("allow_random_weights")),
            }
        )
    probe.close()
    return rows


def _budget(spec: str, costs: dict[str, int], total: int) -> int:
    """The planner's budget in bytes for ``--budget``."""
    from mlink.configs.budget import resolve_site_budget

    if spec == "auto":
        # Every model must fit alone with the planner's 10% margin (a serving peak measured on
        # the H100 was 0.7% above its warm-up peak), else the check tests the margin, not the plan.
        largest = max(costs.values())
        return int(max(min(1.5 * largest, 0.8 * sum(costs.values())), 1.15 * largest))
    budget = resolve_site_budget(spec, total, costs)
    assert budget is not None  # never None when the costs are given
    return budget


def _run_planner(
    args: argparse.Namespace,
    cfg: Any,
    store: Any,
    meter: Any,
    budget: int,
    costs: dict[str, int],
    frames: list[Any],
    fps: float,
) -> tuple[Any, Any, Any, int]:
    """Step 2: the planner over a few short periods, GPU memory sampled all along.
    Returns the planner, its pool, the measurement and the number of frames served."""
    from mlink.links import TrainConfig
    from mlink.scheduler.memory import MemoryMeter
    from mlink.scheduler.options import PlannerOptions
    from mlink.scheduler.planner import Planner
    from mlink.scheduler.site import build_pool

    pool = build_pool(cfg, store=store, budget=budget, costs=costs, meter=meter)  # warm-up: --batch
    options = PlannerOptions.from_site(
        cfg,
        budget=budget,
        train_config=TrainConfig(epochs=5, patience=2, combiner_steps=50, fine_tune_epochs=2),
        frame_rate=fps,
    )
    planner = Planner(cfg, pool, options=options, clock=lambda: 0.0)
    watcher = MemoryMeter(args.device)
    served_frames = 0

    def run() -> None:
        nonlocal served_frames
        planner.initial(frames[: args.frames], now=frames[args.frames - 1].timestamp)
        rest = frames[args.frames :] if args.periods > 0 else []
        step = max(1, args.batch)
        for i in range(0, len(rest), step):
            chunk = rest[i : i + step]
            tick = planner.on_frames(chunk, now=chunk[-1].timestamp)
            planner.serve(chunk)
            served_frames += len(chunk)
            if planner.period >= args.periods and tick.period is not None:
                break

    _, m = watcher.measure_call(run, release_before=True)
    return planner, pool, m, served_frames


def _twice(planner: Any, names: list[str]) -> dict[int, dict[str, tuple[int, int]]]:
    """Models loaded or unloaded more than once in a period, by period (after the first plan)."""
    twice = {
        r.period: {
            k: (r.loads.get(k, 0), r.unloads.get(k, 0))
            for k in names
            if r.loads.get(k, 0) > 1 or r.unloads.get(k, 0) > 1
        }
        for r in planner.reports
        if r.period >= 1
    }
    return {p: v for p, v in twice.items() if v}


def _print_report(
    args: argparse.Namespace,
    out: dict[str, Any],
    costs: dict[str, int],
    twice: dict[int, Any],
    planner: Any,
    pool: Any,
    m: Any,
) -> None:
    budget = out["budget_bytes"]
    peak_above_baseline = out["measured"]["peak_above_baseline"]
    over = peak_above_baseline is not None and peak_above_baseline > budget
    print(f"GPU check on {out['gpu']} ({args.device}), memory from {out['nvml_source']}")
    for n, w in out["left_out"].items():
        print(f"  left out {n}: {w}")
    print(
        f"{'model':<40} {'peak cost':>13} {'resident':>13} {'unload freed':>13} {'device delta':>13} {'load s':>7}  fits {_mib(budget).strip()}?"
    )
    for r in out["models"]:
        if not r["ok"]:
            print(f"{r['model']:<40} FAILED: {r['why']}")
            continue
        note = " (random weights)" if r["random_weights"] else ""
        note += " STICKY" if r["sticky"] else ""
        print(
            f"{r['model']:<40} {_mib(r['cost']):>13} {_mib(r['resident']):>13} {_mib(r['freed']):>13} {_mib(r['device_delta']):>13}"
            f" {r['load_s']:>7.2f}  {'yes' if r['fits_alone'] else 'NO'}{note}"
        )
    print(f"budget {args.budget} = {_mib(budget).strip()} (sum of costs {_mib(sum(costs.values())).strip()})")
    for r in planner.reports:
        print(
            f"  period {r.period}: profiled {len(r.profiled)} models on {r.frames} frames, skipped {list(r.skipped) or 'none'}, "
            f"plan {r.plan_id} active {r.candidate and r.candidate.get('active')}, loads {sum(r.loads.values())}, "
            f"unloads {sum(r.unloads.values())}, peak charged {_mib(r.peak_charged).strip()}, {r.total_s:.1f} s"
        )
    peak_txt = (
        _mib(peak_above_baseline).strip() if peak_above_baseline is not None else f"n/a (source changed to {m.source})"
    )
    print(
        f"measured peak above the pool's baseline: {peak_txt} vs budget {_mib(budget).strip()}"
        f" -> {'OK' if not over else 'OVER BUDGET'}  ({m.samples} samples of {m.source}; planner's peak charged {_mib(planner.peak_charged).strip()})"
    )
    if twice:
        print(f"loaded/unloaded twice in a period: {twice}")
    if pool.refusals:
        print(f"refused loads (measured over budget): {dict(pool.refusals)}")
    if out.get("hybrid") is not None:
        gpu_check_hybrid.print_hybrid(out["hybrid"], _mib)
    if out.get("onnx") is not None:
        gpu_check_onnx.print_onnx(out["onnx"], _mib)
    print(f"{'PASS' if out['ok'] else 'FAIL'} in {out['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.dry_run_cpu:
        args.device = "cpu"
    else:
        why = cuda_status(args.device)
        if why is not None:
            print(f"skipped: no CUDA device ({why})")
            return 0

    import torch

    from mlink.models.assets import default_store
    from mlink.scheduler.memory import MemoryMeter

    meter = MemoryMeter(args.device)
    if not meter.gpu and not args.dry_run_cpu:
        print(
            f"error: CUDA works but NVML does not ({meter.nvml_error}); GPU memory cannot be measured", file=sys.stderr
        )
        return 2
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    store = default_store()
    params, left_out = torch_models(store)
    wanted = {n.strip() for n in args.models.split(",") if n.strip()}
    if wanted:
        left_out.update({n: "not in --models" for n in params if n not in wanted})
        params = {n: p for n, p in params.items() if n in wanted}
    if len(params) < 2:
        print(f"error: fewer than two torch models can load here ({left_out})", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "no GPU (dry run on the CPU)"
    out: dict[str, Any] = {"device": args.device, "gpu": gpu, "left_out": left_out}
    return _check(args, store, meter, params, out)


def _check(
    args: argparse.Namespace, store: Any, meter: Any, params: dict[str, dict[str, Any]], out: dict[str, Any]
) -> int:
    """Steps 1-5 (module docstring) and the report; the exit status."""
    names = sorted(params)
    cfg = _site_config(args, params)
    fps = 4.0
    planner_frames = args.frames + args.periods * args.period_frames + args.period_frames
    frames = sample_frames(store, planner_frames + gpu_check_hybrid.hybrid_frames_needed(args), fps)
    t_all = time.perf_counter()

    # 1. per-model NVML costs, each model alone.
    rows = _probe_costs(args, cfg, store, meter, params)
    costs = {r["model"]: r["cost"] for r in rows if r["ok"] and r["cost"]}
    budget = _budget(args.budget, costs, meter.total())
    for r in rows:
        r["fits_alone"] = r["cost"] is not None and r["cost"] <= budget
    out["models"] = rows
    out["budget_bytes"] = budget
    out["nvml_source"] = meter.source

    # 2. the planner over a few short periods, sampled all along.
    planner, pool, m, served_frames = _run_planner(args, cfg, store, meter, budget, costs, frames, fps)
    peak_above_baseline = m.peak - pool.baseline if m.source == pool.meter.source else None
    out["planner"] = {
        "periods": planner.period,
        "served_frames": served_frames,
        "plans": [r.to_json() for r in planner.reports],
        "final_plan": planner.plan.to_json() if planner.plan else None,
        "peak_charged": planner.peak_charged,
        "refusals": dict(pool.refusals),
        "sticky": [r.name for r in pool.sticky],
    }
    out["measured"] = {
        "source": m.source,
        "baseline": pool.baseline,
        "peak": m.peak,
        "peak_above_baseline": peak_above_baseline,
        "parts": list(m.parts),
        "samples": m.samples,
        "device_used_now": meter.device_used(),
    }
    twice = _twice(planner, names)
    over = peak_above_baseline is not None and peak_above_baseline > budget

    # 4. hybrid rotation under a budget where at most one model fits beside the resident set.
    hybrid = None
    if not args.no_hybrid:
        hybrid = gpu_check_hybrid.run_hybrid(
            args, cfg, store, meter, costs, planner, frames[planner_frames:], frames[: args.frames], fps
        )
    out["hybrid"] = hybrid
    pool.close()

    # 5. the ONNX models on the GPU (CUDA provider, NVML-measured costs), in a pool of their own.
    onnx = None if args.no_onnx else gpu_check_onnx.run_onnx(args, store, meter, frames[: args.batch])
    out["onnx"] = onnx
    out["ok"] = not over and not twice and (hybrid is None or hybrid["ok"]) and (onnx is None or onnx["ok"])
    out["seconds"] = time.perf_counter() - t_all

    if args.json:
        print(json.dumps(out, default=str))
        return 0 if out["ok"] else 1
    _print_report(args, out, costs, twice, planner, pool, m)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
