"""Zoo benchmark: per model, load seconds, per-frame latency, and measured memory cost.

Each model is measured in a fresh child process, so one model's allocator leftovers never
count towards the next one's memory. Memory cost is the process-memory delta across load +
warm-up inference (peak, as the scheduler's meter measures it: NVML on a GPU, USS on a CPU).
Latency is the median (and p90) over real frames of vtest.avi, one frame per call.

    python -m mlink.bench.zoo [--frames 50] [--device cpu] [--models a,b] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from tqdm import tqdm

from mlink.bench.measure import latency_ms, measure_loads, p90


def measure_one(name: str, frames: int, device: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from mlink.models.assets import default_store
    from mlink.models.catalog import create_model, model_info
    from mlink.scheduler.memory import MemoryMeter
    from mlink.server.frames import read_frames

    store = default_store()
    images = [f.image for f in read_frames(str(store.path("vtest")), sample_fps=5.0, max_frames=frames)]
    info = model_info(name)
    # torchvision detectors without their official weights here: random weights, measured for
    # load time, latency and memory only, and the row says so.
    random_ok = info.backend == "torch" and info.task == "detection" and not any(store.present(a) for a in info.assets)
    params = {"allow_random_weights": True} if random_ok else {}
    model = create_model(name, store=store, **params)
    meter = MemoryMeter(device)
    meter.prepare([info.backend])  # the CUDA context / backend set-up is the process's, not the model's

    def load() -> Any:
        model.load(device)
        return model

    peaks, deltas, secs, _ = measure_loads(meter, load, lambda m: m.infer(images[:1]), lambda m: m.unload(), 1)
    lat = latency_ms(lambda img: model.infer([img]), images)
    note = model.info().pretrained_note
    return {
        "model": name,
        "backend": info.backend,
        "device": device,
        "meter": meter.source,
        "load_s": round(secs[0], 3),
        "latency_ms_median": round(statistics.median(lat), 2),
        "latency_ms_p90": round(p90(lat), 2),
        "frames": len(lat),
        "memory_delta_bytes": deltas[0],
        "memory_peak_delta_bytes": peaks[0],
        "note": note,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--models", default="", help="comma-separated subset (default: the whole zoo)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.one:
        print(json.dumps(measure_one(args.one, args.frames, args.device, args.threads)))
        return 0

    from mlink.models.catalog import zoo

    names = [n for n in args.models.split(",") if n] or list(zoo())
    rows = []
    for name in tqdm(names, desc="zoo bench", unit="model", file=sys.stderr):
        cmd = [
            sys.executable,
            "-m",
            "mlink.bench.zoo",
            "--one",
            name,
            "--frames",
            str(args.frames),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # a failure is a row
        if proc.returncode != 0:
            rows.append({"model": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"\nzoo benchmark: {args.frames} frames of vtest.avi, device {args.device}, {args.threads} threads")
    print(
        f"{'model':<40} {'backend':<12} {'load s':>7} {'median ms':>10} {'p90 ms':>8} {'mem MiB':>8} {'peak MiB':>9}  note"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<40} ERROR: {r['error']}")
            continue
        print(
            f"{r['model']:<40} {r['backend']:<12} {r['load_s']:>7.2f} {r['latency_ms_median']:>10.1f} {r['latency_ms_p90']:>8.1f}"
            f" {r['memory_delta_bytes'] / 2**20:>8.1f} {r['memory_peak_delta_bytes'] / 2**20:>9.1f}  {r['note']}"
        )
    print(f"memory: process delta across load + warm-up, measured with {rows[0].get('meter', '?') if rows else '?'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
