"""Throughput benchmark: how many frames a daemon serves, where the time goes, where it saturates.

    python -m mlink.bench.throughput --cameras 1,2,4 --fps 5 [--device cuda] [--unthrottled]

Starts a real :class:`~mlink.server.daemon.Daemon` in this process (the site's models, the
embedded Redis, ``N`` cameras cycling over the sample videos, each sampled at ``--fps``), waits
until it serves (the seconds to ready are reported: a first start profiles and trains links),
then for each camera count in ``--cameras`` (applied as a stream-only reload, so the plan and
the links stay) lets it settle for ``--warmup`` seconds and measures ``--seconds``:

- served frames/s (every camera) against the offered rate (cameras x fps), frames dropped from
  full camera queues, and each camera's decode time (where its ingest reports one);
- per-stage time per frame from :mod:`mlink.server.stages` (queue wait, plan, each model, links,
  rotation, cache, the whole step);
- CPU utilisation of this process and its children (capture processes, Redis), in cores, and
  the GPU's utilisation through NVML on a CUDA device.

``--unthrottled`` decodes file cameras as fast as they go (``ingest.realtime: false``), which is
what live cameras cost: every frame is decoded whether it is sampled or not. The saturation
point is the largest camera count whose served rate keeps up with the offered one (at least
``KEEP_UP`` of it, and drops under 1% of the frames sampled); the highest served rate seen is
reported beside it. Figures go to stdout as a table and, with ``--json``, to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from mlink.scheduler.nvml import Nvml

KEEP_UP = 0.95  # served / offered at or above this keeps up
VIDEOS = ("asset://vtest", "asset://one_by_one", "asset://market_street", "asset://car_detection")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


@dataclass
class StepFigures:
    """One camera count's measured window."""

    cameras: int
    offered_fps: float
    served_fps: float
    sampled_fps: float  # frames the cameras put in their queues per second
    drops: int
    drop_share: float  # drops / frames sampled
    stage_ms: dict[str, float]  # per frame (per item) of each stage
    decode_ms: dict[str, float]  # per camera, where ingest reports it
    cpu_cores: float  # this process and its children, mean over the window
    gpu_util: float | None  # percent, mean over the window (CUDA only)
    periods: int = 0  # re-profiling periods that ran inside the window
    keeps_up: bool = False


@dataclass
class Report:
    device: str
    fps: float
    unthrottled: bool
    ready_s: float
    steps: list[StepFigures] = field(default_factory=list)
    saturation_cameras: int | None = None  # the largest count that kept up
    max_served_fps: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def keeps_up(served: float, offered: float, drop_share: float) -> bool:
    return offered > 0 and served >= KEEP_UP * offered and drop_share < 0.01


def saturation(steps: list[StepFigures]) -> int | None:
    """The largest camera count that kept up, counting only up to the first that did not."""
    best = None
    for s in sorted(steps, key=lambda s: s.cameras):
        if not s.keeps_up:
            break
        best = s.cameras
    return best


def site_config(base: dict[str, Any], cameras: int, fps: float, unthrottled: bool, device: str) -> dict[str, Any]:
    """The benchmark's site: ``base``'s models and budget, ``cameras`` sample-video cameras."""
    cfg = {k: v for k, v in base.items() if k not in ("streams", "api", "cache")}
    cfg["site"] = f"{base.get('site', 'bench')}-throughput"
    cfg["device"] = device
    cfg["streams"] = [
        {"id": f"cam{i:02d}", "url": VIDEOS[i % len(VIDEOS)], "fps": fps, "loop": True} for i in range(cameras)
    ]
    ingest = dict(cfg.get("ingest") or {})
    ingest["realtime"] = not unthrottled
    cfg["ingest"] = ingest
    return cfg


class _Sampler:
    """CPU (this process and children, in cores) and GPU utilisation, sampled every ``every`` s."""

    def __init__(self, device: str, every: float = 0.5) -> None:
        self.every = every
        self.proc = psutil.Process()
        self.cpu: list[float] = []
        self.gpu: list[float] = []
        self._stop = threading.Event()
        self._nv: Nvml | None = None
        if device.startswith("cuda"):
            try:
                self._nv = Nvml(device)  # cuda:N as CUDA numbers it (CUDA_VISIBLE_DEVICES)
            except Exception as exc:  # a bench without NVML still reports CPU figures
                print(f"GPU utilisation not measured: {exc}", file=sys.stderr)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu_seconds(self) -> float:
        total = 0.0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        last_t, last_c = time.monotonic(), self._cpu_seconds()
        while not self._stop.wait(self.every):
            now, c = time.monotonic(), self._cpu_seconds()
            if now > last_t and c >= last_c:  # a child that ended takes its seconds with it
                self.cpu.append((c - last_c) / (now - last_t))
            last_t, last_c = now, c
            if self._nv is not None:
                self.gpu.append(float(self._nv.nv.nvmlDeviceGetUtilizationRates(self._nv.handle).gpu))

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        if self._nv is not None:
            self._nv.close()


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def measure_step(daemon: Any, cameras: int, fps: float, warmup: float, seconds: float, device: str) -> StepFigures:
    """Counters before and after a ``seconds`` window on a daemon that serves ``cameras`` cameras."""
    from mlink.server.stages import per_item_ms

    time.sleep(warmup)
    served0 = sum(daemon.frames_total.values())
    cams0 = {k: v.to_dict() for k, v in daemon.ingest.status().items()}
    stages0 = daemon.stages.snapshot()
    period0 = daemon.planner.period if daemon.planner is not None else 0
    t0 = time.monotonic()
    with _Sampler(device) as sampler:
        time.sleep(seconds)
    dt = time.monotonic() - t0
    served1 = sum(daemon.frames_total.values())
    cams1 = {k: v.to_dict() for k, v in daemon.ingest.status().items()}
    stages = per_item_ms(stages0, daemon.stages.snapshot())
    sampled = sum(c["frames_in"] - cams0.get(k, {}).get("frames_in", 0) for k, c in cams1.items())
    drops = sum(c["drops"] - cams0.get(k, {}).get("drops", 0) for k, c in cams1.items())
    decode = {k: float(c["decode_ms"]) for k, c in cams1.items() if c.get("decode_ms") is not None}
    served = (served1 - served0) / dt
    offered = cameras * fps
    step = StepFigures(
        cameras=cameras,
        offered_fps=offered,
        served_fps=served,
        sampled_fps=sampled / dt,
        drops=drops,
        drop_share=drops / sampled if sampled else 0.0,
        stage_ms=stages,
        decode_ms=decode,
        cpu_cores=_mean(sampler.cpu),
        gpu_util=_mean(sampler.gpu) if sampler.gpu else None,
        periods=(daemon.planner.period if daemon.planner is not None else 0) - period0,
    )
    step.keeps_up = keeps_up(step.served_fps, offered, step.drop_share)
    return step


def run(args: argparse.Namespace) -> Report:
    from mlink.configs.load import parse_config
    from mlink.models.catalog import zoo_catalog
    from mlink.server.daemon import Daemon

    counts = sorted({int(c) for c in str(args.cameras).split(",") if c.strip()})
    base = yaml.safe_load(Path(args.config).read_text())
    if args.budget:
        base["budget"] = args.budget
    base.setdefault("links", {})["profile_frames"] = args.profile_frames

    def config(n: int) -> Any:
        text = yaml.safe_dump(site_config(base, n, args.fps, args.unthrottled, args.device))
        return parse_config(text, "throughput benchmark", catalog=zoo_catalog())

    daemon = Daemon(config(counts[0]), progress=not args.quiet)
    t0 = time.monotonic()
    daemon.start()
    try:
        if not daemon.wait_ready(args.ready_timeout):
            raise SystemExit(f"the daemon did not become ready: {daemon.state} {daemon.error or ''}")
        report = Report(args.device, args.fps, args.unthrottled, ready_s=time.monotonic() - t0)
        print(f"ready after {report.ready_s:.1f} s", file=sys.stderr)
        for n in counts:
            if n != counts[0]:
                res = daemon.reload(config(n))
                if not res.ok:
                    raise SystemExit(f"reload to {n} cameras failed: {res.message}")
            step = measure_step(daemon, n, args.fps, args.warmup, args.seconds, args.device)
            report.steps.append(step)
            print(_row(step), file=sys.stderr)
        report.saturation_cameras = saturation(report.steps)
        report.max_served_fps = max(s.served_fps for s in report.steps)
        return report
    finally:
        daemon.stop()


def _row(s: StepFigures) -> str:
    gpu = f", GPU {s.gpu_util:.0f}%" if s.gpu_util is not None else ""
    return (
        f"{s.cameras} cameras: served {s.served_fps:.2f}/{s.offered_fps:.1f} frames/s, "
        f"drops {s.drops} ({100 * s.drop_share:.1f}%), CPU {s.cpu_cores:.2f} cores{gpu}, periods {s.periods}"
    )


def markdown(report: Report) -> str:
    stages = sorted({k for s in report.steps for k in s.stage_ms})
    head = [
        "cameras",
        "offered/s",
        "served/s",
        "drops",
        "periods",
        "CPU cores",
        "GPU %",
        "decode ms",
        *[f"{k} ms" for k in stages],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for s in report.steps:
        decode = f"{_mean(list(s.decode_ms.values())):.1f}" if s.decode_ms else "-"
        gpu = f"{s.gpu_util:.0f}" if s.gpu_util is not None else "-"
        cells = [
            str(s.cameras),
            f"{s.offered_fps:.1f}",
            f"{s.served_fps:.2f}",
            f"{s.drops} ({100 * s.drop_share:.1f}%)",
            str(s.periods),
            f"{s.cpu_cores:.2f}",
            gpu,
            decode,
            *[f"{s.stage_ms[k]:.1f}" if k in s.stage_ms else "-" for k in stages],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    sat = report.saturation_cameras
    lines.append("")
    lines.append(
        f"device {report.device}, {report.fps:g} fps per camera"
        f"{', unthrottled decode' if report.unthrottled else ''}; ready after {report.ready_s:.1f} s; "
        f"saturation: {f'{sat} cameras' if sat else 'below the first step'}; "
        f"highest served rate {report.max_served_fps:.2f} frames/s"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlink.bench.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--cameras", default="1,2,4", help="camera counts to step through, comma-separated")
    p.add_argument("--fps", type=float, default=5.0, help="sampled frames per second per camera")
    p.add_argument("--device", default="cpu")
    p.add_argument("--unthrottled", action="store_true", help="decode files as fast as they go (as live cameras)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="site whose models and budget are used")
    p.add_argument("--budget", default=None, help="override the site's budget")
    p.add_argument("--profile-frames", type=int, default=100, help="frames a first start profiles")
    p.add_argument("--seconds", type=float, default=20.0, help="measured window per step")
    p.add_argument("--warmup", type=float, default=5.0, help="settling time before each window")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--quiet", action="store_true", help="no profiling progress")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print(markdown(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2))


if __name__ == "__main__":
    main()
