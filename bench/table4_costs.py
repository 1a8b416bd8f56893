"""Table 4 harness, costs and budgets.

Costs are measured, as ``bench/zoo.py`` measures them: each model in a fresh child process, so
no model's allocator leftovers count towards another's. In the child the meter first pays the
backend's one-time costs (:meth:`MemoryMeter.prepare`), then the model is loaded and warmed up
at the site's serving batch on real frames of the site (as the scheduler's pool does), and the
peak delta of the process's memory across that is its cost (NVML on a GPU, anonymous RSS on
the CPU). This is repeated ``repeats`` times in the same child (unload, release, load again)
and the largest is kept, as the pool charges the largest of its recent loads. The per-frame
latency is the median over ``frames`` real frames of the site's streams, one frame per call.
The MTL baseline (backbone + heads) is measured the same way. The table is cached in the
output folder.

Budgets (the paper's 5 GB / 9 GB are "one model fits" / "two fit" for costs 1.5/3.7/4.6 GB):
``B_k`` is the midpoint between the cheapest ``k + 1`` models' total (no ``k + 1`` models may
fit) and the most expensive ``k``-model set below that total (every ``k``-set that can fit
under such a budget does). So ``B_1`` holds at most one model at a time, and every model that
is cheaper than the two cheapest together; ``B_2`` holds at most two. For the paper's costs the
rule gives 4.9 GB and 9.05 GB. The midpoint leaves the same room on both sides for measurement
noise. The sweep adds ``n`` budgets spread linearly from the cheapest model's cost to the sum
of all costs (everything fits).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlink.bench.measure import latency_ms, measure_loads, p90

COSTS_FORMAT = "mlink-table4-costs/1"


# -- in the child ----------------------------------------------------------------------------


def _setup(threads: int, home: str | None, mirror: str | None, offline: bool) -> Any:
    import cv2
    import torch

    torch.set_num_threads(max(1, threads))
    cv2.setNumThreads(max(1, threads))
    from mlink.models.assets import AssetStore

    kw: dict[str, Any] = {"offline": offline}
    if home:
        kw["home"] = Path(home)
    if mirror:
        kw["mirror"] = Path(mirror)
    return AssetStore(**kw)


def _site_images(cfg: Any, store: Any, n: int) -> list:
    from mlink.server.profiling import plan_stream_frames, site_frames

    plan = plan_stream_frames(cfg, max(1, n), store)
    return [f.image for f in site_frames(plan)]


def _figures(
    device: str, meter: Any, peaks: list[int], deltas: list[int], secs: list[float], lat: list[float], threads: int
) -> dict:
    """The cost-table fields every measured entry (a model, the MTL network) has."""
    return {
        "device": device,
        "meter": meter.source,
        "memory_bytes": max(peaks),
        "memory_peaks": peaks,
        "memory_resident_bytes": max(deltas),
        "load_s": round(statistics.median(secs), 4),
        "latency_ms": round(statistics.median(lat), 3),
        "latency_ms_p90": round(p90(lat), 3),
        "latency_frames": len(lat),
        "threads": threads,
    }


def measure_model(
    config: str, name: str, frames: int, device: str, threads: int, repeats: int, store: Any, warmup_batch: int = 1
) -> dict:
    from mlink.configs.load import load_config
    from mlink.models.catalog import create_model, model_info, zoo_catalog
    from mlink.scheduler.memory import MemoryMeter

    cfg = load_config(config, catalog=zoo_catalog())
    images = _site_images(cfg, store, frames)
    info = model_info(name)
    meter = MemoryMeter(device)
    meter.prepare([info.backend])
    batch = [images[0]] * max(1, warmup_batch)

    def make() -> Any:
        model = create_model(name, store=store, **cfg.model(name).params)
        model.load(device)
        return model

    peaks, deltas, secs, model = measure_loads(meter, make, lambda m: m.infer(batch), lambda m: m.unload(), repeats)
    lat = latency_ms(lambda img: model.infer([img]), images)
    model.unload()
    return {"name": name, "backend": info.backend, **_figures(device, meter, peaks, deltas, secs, lat, threads)}


def measure_mtl(
    config: str,
    shapes: Mapping[str, Any],
    frames: int,
    device: str,
    threads: int,
    repeats: int,
    store: Any,
    warmup_batch: int = 1,
) -> dict:
    import torch

    from mlink.bench.table4_data import Backbone
    from mlink.bench.table4_mtl import Heads
    from mlink.configs.load import load_config
    from mlink.models.catalog import zoo_catalog
    from mlink.scheduler.memory import MemoryMeter

    cfg = load_config(config, catalog=zoo_catalog())
    images = _site_images(cfg, store, frames)
    meter = MemoryMeter(device)
    meter.prepare(["torch"])
    batch = [images[0]] * max(1, warmup_batch)

    def make() -> Any:
        return Backbone(store, device), Heads(shapes).eval().requires_grad_(False).to(device)

    def run(obj: Any, frames_: Sequence[Any]) -> Any:
        backbone, heads = obj
        feats = torch.from_numpy(backbone(frames_)).to(device)
        with torch.inference_mode():
            return heads.outputs(feats)

    peaks, deltas, secs, obj = measure_loads(meter, make, lambda o: run(o, batch), lambda o: None, repeats)
    lat = latency_ms(lambda img: run(obj, [img]), images)
    return {
        "name": "mtl",
        "backend": "torch",
        **_figures(device, meter, peaks, deltas, secs, lat, threads),
        "heads": sorted(shapes),
    }


def _child_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="measure one model's (or MTL's) memory cost and latency (child process)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--model")
    ap.add_argument("--mtl", help="JSON head shapes")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup-batch", type=int, default=1)
    ap.add_argument("--home")
    ap.add_argument("--mirror")
    ap.add_argument("--offline", action="store_true")
    args = ap.parse_args(argv)
    store = _setup(args.threads, args.home, args.mirror, args.offline)
    if args.mtl:
        row = measure_mtl(
            args.config,
            json.loads(args.mtl),
            args.frames,
            args.device,
            args.threads,
            args.repeats,
            store,
            args.warmup_batch,
        )
    else:
        row = measure_model(
            args.config, args.model, args.frames, args.device, args.threads, args.repeats, store, args.warmup_batch
        )
    print(json.dumps(row))
    return 0


# -- in the harness ------------------------------------------------------------------------------


def _child(args: list[str], store: Any) -> dict:
    cmd = [sys.executable, "-m", "mlink.bench.table4_costs", *args]
    if store is not None:
        cmd += ["--home", str(store.home)]
        if store.mirror:
            cmd += ["--mirror", str(store.mirror)]
        if store.offline:
            cmd += ["--offline"]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)  # the return code is read below
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise RuntimeError(f"cost measurement {' '.join(args[:4])} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_costs(
    cfg: Any,
    config_path: Path,
    store: Any,
    shapes: Mapping[str, Any],
    out_dir: Path,
    *,
    frames: int = 20,
    repeats: int = 2,
    threads: int = 1,
    remeasure: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """{"models": {name: row}, "mtl": row, ...}: the cached table, or measured now and cached."""
    from tqdm import tqdm

    names = [m.name for m in cfg.models]
    path = out_dir / f"costs-{cfg.device.replace(':', '_')}.json"
    want = {
        "format": COSTS_FORMAT,
        "device": cfg.device,
        "models": sorted(names),
        "heads": sorted(shapes),
        "threads": threads,
    }
    if path.is_file() and not remeasure:
        try:
            table = json.loads(path.read_text())
            if all(table.get(k) == v for k, v in want.items()) and set(table["rows"]) == set(names) | {"mtl"}:
                table["source"] = f"cache {path}"
                return table
        except (OSError, ValueError, KeyError, TypeError):
            pass
    base = [
        "--config",
        str(config_path),
        "--frames",
        str(frames),
        "--device",
        cfg.device,
        "--threads",
        str(threads),
        "--repeats",
        str(repeats),
    ]
    rows: dict[str, Any] = {}
    jobs = [(n, ["--model", n]) for n in names] + [("mtl", ["--mtl", json.dumps(dict(shapes))])]
    for name, extra in tqdm(jobs, desc="measuring costs", unit="model", disable=not progress, file=sys.stderr):
        rows[name] = _child([*extra, *base], store)
    table = {
        **want,
        "rows": rows,
        "frames": frames,
        "repeats": repeats,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)
    table["source"] = f"measured now, saved to {path}"
    return table


def k_fit_budget(costs: Mapping[str, float], k: int) -> float:
    """The midpoint between the cheapest k+1 models' total and the dearest k-set below it."""
    vals = sorted(float(c) for c in costs.values())
    if k >= len(vals):
        return sum(vals) * 1.05
    lo_next = sum(vals[: k + 1])
    hi = max(s for s in (sum(c) for c in itertools.combinations(vals, k)) if s < lo_next)
    return (hi + lo_next) / 2.0


def budgets(costs: Mapping[str, float], sweep: int = 8) -> dict[str, Any]:
    vals = sorted(float(c) for c in costs.values())
    one = k_fit_budget(costs, 1)
    two = k_fit_budget(costs, 2) if len(vals) >= 2 else one
    import numpy as np

    points = [float(x) for x in np.linspace(vals[0], sum(vals), max(2, sweep))] if sweep > 0 else []
    return {
        "one": one,
        "two": two,
        "sweep": points,
        "rule": (
            "B_k = midpoint between the cheapest k+1 models' total and the dearest k-model set below it "
            "(at most k models fit at once; every k-set that can fit does); sweep: linear from the cheapest cost to the sum"
        ),
    }


def fitting_sets(costs: Mapping[str, float], budget: float) -> list[frozenset[str]]:
    """Every set of models whose costs together fit ``budget`` (the empty set included)."""
    names = sorted(costs)
    return [
        frozenset(c)
        for r in range(len(names) + 1)
        for c in itertools.combinations(names, r)
        if sum(float(costs[m]) for m in c) <= budget + 1e-9
    ]


if __name__ == "__main__":
    raise SystemExit(_child_main())
