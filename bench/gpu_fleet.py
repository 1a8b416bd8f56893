"""GPU-host check for issue 13: a camera fleet on one GPU, and the saturation point.

    python -m mlink.bench.gpu_fleet [--out DIR] [--seconds 60] [--cameras 16] [--steps 8,16,24,32]

Two runs of :mod:`mlink.bench.throughput` on ``cuda``, each from a fresh ``$MLINK_HOME`` (so the
first start profiles ``links.profile_frames: 100`` frames and trains the links, as a new site's
would):

1. **Fleet** (``bench/site_gpu_fleet.yaml``: keypointrcnn, fasterrcnn, mobilenet_v2,
   yolox_nano under 0.6x): ``--cameras`` cameras decoded unthrottled (every frame decoded, as
   live cameras cost) and served at 5 fps. Reports the seconds to ready (target: 90), served
   against offered frames/s and drops over a ``--seconds`` window that holds a re-profiling
   period (target: no drop), per-stage time, CPU cores and GPU utilisation.
2. **Saturation** (``bench/site_gpu_resident.yaml``: yolox_nano, mobilenet_v2, fasterrcnn, all
   resident): cameras paced at their native 25 fps, every frame sampled, stepped through
   ``--steps``; the largest count that keeps up and the highest served rate (target: 500
   frames/s).

Writes ``fleet.json``, ``saturation.json`` and ``summary.md`` under ``--out`` (default ``$OUT``,
else ``./gpu-fleet``). Without a usable CUDA device it prints ``skipped: ...`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from mlink.bench import throughput
from mlink.bench.gpu_check import cuda_status

SITES = Path(__file__).resolve().parent


def one(name: str, argv: list[str], out: Path) -> throughput.Report:
    """A throughput run in a fresh MLINK_HOME (a first start), its figures written to ``out``."""
    with tempfile.TemporaryDirectory(prefix=f"mlink-{name}-") as home:
        os.environ["MLINK_HOME"] = home
        print(f"== {name}: python -m mlink.bench.throughput {' '.join(argv)}", file=sys.stderr)
        report = throughput.run(throughput.parse_args(argv))
    (out / f"{name}.json").write_text(json.dumps(report.to_json(), indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlink.bench.gpu_fleet", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-fleet"))
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--cameras", type=int, default=16)
    p.add_argument("--steps", default="8,16,24,32")
    args = p.parse_args(argv)
    why = cuda_status("cuda")
    if why is not None:
        print(f"skipped: no CUDA device ({why})")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    fleet = one(
        "fleet",
        [
            "--config",
            str(SITES / "site_gpu_fleet.yaml"),
            "--device",
            "cuda",
            "--cameras",
            str(args.cameras),
            "--fps",
            "5",
            "--unthrottled",
            "--seconds",
            str(args.seconds),
            "--warmup",
            "10",
            "--quiet",
        ],
        args.out,
    )
    sat = one(
        "saturation",
        [
            "--config",
            str(SITES / "site_gpu_resident.yaml"),
            "--device",
            "cuda",
            "--cameras",
            args.steps,
            "--fps",
            "25",
            "--seconds",
            "20",
            "--warmup",
            "5",
            "--quiet",
        ],
        args.out,
    )
    summary = "\n\n".join(
        [
            "## Fleet (16 cameras unthrottled, served at 5 fps; targets: ready <= 90 s, no drop)",
            throughput.markdown(fleet),
            "## Saturation (GPU-resident site; target: >= 500 served frames/s)",
            throughput.markdown(sat),
        ]
    )
    (args.out / "summary.md").write_text(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
