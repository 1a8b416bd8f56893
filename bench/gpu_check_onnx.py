"""The GPU check's ONNX step: the zoo's ONNX Runtime models on the GPU, measured like the torch ones.

    python -m mlink.bench.gpu_check_onnx [--device cuda] [--onnx-models yolox_nano,centerface] [--batch 4] [--json]

Run by :mod:`mlink.bench.gpu_check` after its other steps (``--no-onnx`` skips it), or alone as
above. For each ONNX model of the zoo whose weights are in the asset store (``--onnx-models``
narrows them):

1. loaded twice through a :class:`ModelPool` on the device (load plus a warm-up at ``--batch``,
   measured by the pool's meter: this process's GPU memory through NVML on CUDA), unloaded after
   each, so the first load's one-time costs (ONNX Runtime's CUDA libraries, its first kernels)
   show against the second;
2. where it executes: the model's ``executes_on`` and ``fallback`` (what /api/v1/models shows)
   and the ONNX Runtime session's providers;
3. ``--batch`` frames of vtest through it a few times: milliseconds per frame.

``ok`` when every model executes on the device asked for (its session's first provider
CUDAExecutionProvider on CUDA, no fallback) and both measured costs are above zero (a model
on the CPU of a CUDA site costs 0 B of GPU memory, which is what the budget must not believe).
On a machine without CUDA it prints ``skipped: ...`` and exits 0; ``--dry-run-cpu`` runs the
same steps on the CPU meter, on yolox_nano alone unless ``--onnx-models`` names others (the
models must then execute on the CPU, with no fallback).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

MiB = 1 << 20
REPEATS = 5  # timed passes over the frames, after one untimed
DRY_RUN_MODEL = "yolox_nano"  # the one model of a CPU dry run without --onnx-models


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX step")
    ap.add_argument("--onnx-models", default="", help="comma-separated ONNX models to check (default: every one)")


def onnx_models(store: Any, wanted: str = "") -> tuple[list[str], dict[str, str]]:
    """The zoo's ONNX Runtime models whose weights are here, and {model: why left out}."""
    from mlink.models.catalog import model_info, zoo

    names = {n.strip() for n in wanted.split(",") if n.strip()}
    chosen, left_out = [], {}
    for name in zoo():
        info = model_info(name)
        if info.backend != "onnxruntime":
            continue
        if names and name not in names:
            left_out[name] = "not in --onnx-models"
        elif all(store.present(a) for a in info.assets):
            chosen.append(name)
        else:
            left_out[name] = f"weights {', '.join(info.assets)} not in the asset store"
    return chosen, left_out


def _check_model(name: str, pool: Any, frames: list[Any], device: str) -> dict[str, Any]:
    """Two measured loads of ``name`` (unloaded after each), its placement, its time per frame."""
    from mlink.models.zoo._onnx import CUDA_EP

    loads: list[dict[str, Any]] = []
    row: dict[str, Any] = {"model": name, "why": None}
    for _ in range(2):
        if not pool.load(name):
            row["why"] = pool.unavailable_reason(name)
            break
        rec = pool.load_records[-1]
        with pool.pin(name) as model:
            row.update(executes_on=model.executes_on, fallback=model.fallback, providers=list(model.providers))
            if not loads:  # time it once; on the CPU (a dry run) one pass of one frame is enough
                batch, repeats = (frames, REPEATS) if device.startswith("cuda") else (frames[:1], 1)
                model.infer(batch)
                t0 = time.perf_counter()
                for _ in range(repeats):
                    model.infer(batch)
                row["ms_per_frame"] = 1000 * (time.perf_counter() - t0) / (repeats * len(batch))
        unload = pool.unload(name, reason="measure")
        loads.append(
            {"cost": rec.cost, "resident": rec.resident, "freed": unload.freed if unload else None, "s": rec.seconds}
        )
    row["loads"] = loads
    want = device if device.startswith("cuda") else "cpu"
    placed = row.get("executes_on") == want and row.get("fallback") is None
    on_cuda = not want.startswith("cuda") or (row.get("providers") or [None])[0] == CUDA_EP
    row["ok"] = len(loads) == 2 and placed and on_cuda and all(x["cost"] > 0 for x in loads)
    return row


def run_onnx(args: argparse.Namespace, store: Any, meter: Any, frames: list[Any]) -> dict[str, Any]:
    """The ONNX step (module docstring) on ``args.device``; ``frames``: images to time it on."""
    from mlink.models.catalog import create_model
    from mlink.scheduler.pool import ModelPool

    t0 = time.perf_counter()
    # A dry run on the CPU checks the code path, not the models: one small one unless told.
    wanted = args.onnx_models or ("" if args.device.startswith("cuda") else DRY_RUN_MODEL)
    names, left_out = onnx_models(store, wanted)
    out: dict[str, Any] = {"device": args.device, "source": meter.source, "left_out": left_out, "models": []}
    if not names:
        out.update(ok=False, why="no ONNX model's weights are in the asset store", seconds=0.0)
        return out
    images = [getattr(f, "image", f) for f in frames[: max(1, args.batch)]]
    pool = ModelPool(
        meter.total(),
        args.device,
        meter=meter,
        factory=lambda n: create_model(n, store=store),
        warmup_batch=args.batch,
        models=names,
    )
    try:
        out["models"] = [_check_model(n, pool, images, args.device) for n in names]
    finally:
        pool.close()
    out["ok"] = all(r["ok"] for r in out["models"])
    out["seconds"] = time.perf_counter() - t0
    return out


def print_onnx(o: dict[str, Any], mib: Any) -> None:
    """The ONNX step's lines of the check's report (``mib``: the check's byte formatter)."""
    print(f"ONNX models on {o['device']} (memory from {o['source']}):")
    for n, why in o["left_out"].items():
        print(f"  left out {n}: {why}")
    if o.get("why"):
        print(f"  {o['why']}")
    for r in o["models"]:
        if r["why"]:
            print(f"  {r['model']:<12} FAILED: {r['why']}")
            continue
        costs = " / ".join(mib(x["cost"]).strip() for x in r["loads"])
        freed = " / ".join(mib(x["freed"]).strip() for x in r["loads"])
        print(
            f"  {r['model']:<12} executes on {r['executes_on']} ({', '.join(r['providers'])}); cost 1st / 2nd load "
            f"{costs}; unload freed {freed}; {r.get('ms_per_frame', float('nan')):.1f} ms/frame  "
            f"{'ok' if r['ok'] else 'NOT OK'}"
        )
        if r["fallback"]:
            print(f"    fallback: {r['fallback']}")
    print(f"  ONNX step {'PASS' if o['ok'] else 'FAIL'} in {o['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dry-run-cpu", action="store_true", help="the same steps on the CPU meter")
    add_arguments(ap)
    args = ap.parse_args(argv)
    import torch

    if args.dry_run_cpu:
        args.device = "cpu"
    elif not torch.cuda.is_available():
        print(f"skipped: no CUDA device (torch {torch.__version__} sees no GPU)")
        return 0

    from mlink.models.assets import default_store
    from mlink.scheduler.memory import MemoryMeter
    from mlink.scheduler.priming import synthetic_frame

    meter = MemoryMeter(args.device)
    frames = [synthetic_frame(640, 480, seed=i) for i in range(max(1, args.batch))]
    out = run_onnx(args, default_store(), meter, frames)
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print_onnx(out, lambda n: "-" if n is None else f"{n / MiB:8.1f} MiB")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
