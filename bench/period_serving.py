"""What a re-profiling period costs serving: frames served and dropped while it runs, inline vs worker.

Runs the daemon on a site config (default: ``configs/default.yaml``) with a short
``scheduler.period_s``, once with ``scheduler.period_worker: false`` (the period runs inside the
pipeline's step: nothing is served meanwhile) and once with ``true`` (the period runs in a worker
thread beside serving), and prints, per period, how long it was in flight and how many frames
were served and dropped by the camera queues meanwhile (``PeriodWorker.runs``).

    python -m mlink.bench.period_serving [--config configs/default.yaml] [--period-s 20]
        [--profile-share 0.1] [--profile-frames 40] [--periods 2]

``--profile-frames`` only shortens the first start (the links' first profile); the period's own
profile is ``profile_share * period_s * fps`` frames.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from mlink.configs.load import load_config
from mlink.models.assets import AssetStore, default_store
from mlink.models.catalog import zoo_catalog
from mlink.server.daemon import Daemon


def run_mode(args: argparse.Namespace, worker: bool, home: Path) -> list[dict[str, Any]]:
    cfg = load_config(Path(args.config), catalog=zoo_catalog())
    sched = cfg.scheduler.model_copy(
        update={"period_s": args.period_s, "profile_share": args.profile_share, "period_worker": worker}
    )
    cfg = cfg.model_copy(
        update={
            "scheduler": sched,
            "links": cfg.links.model_copy(update={"profile_frames": args.profile_frames}),
            "cache": cfg.cache.model_copy(update={"redis_url": None}),
        }
    )
    base = default_store()
    daemon = Daemon(cfg, None, AssetStore(home=home, mirror=base.mirror, offline=base.offline), progress=False)
    daemon.start()
    try:
        if not daemon.wait_ready(1800):
            raise SystemExit(f"daemon not ready: {daemon.state} {daemon.error}")
        deadline = time.monotonic() + args.periods * args.period_s * 3 + 600
        while time.monotonic() < deadline:
            periods = daemon.periods
            if periods is not None and len(periods.runs) >= args.periods:
                return list(periods.runs)
            time.sleep(0.5)
        raise SystemExit("the periods did not run in time")
    finally:
        daemon.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--period-s", type=float, default=20.0)
    p.add_argument("--profile-share", type=float, default=0.1)
    p.add_argument("--profile-frames", type=int, default=40)
    p.add_argument("--periods", type=int, default=2)
    args = p.parse_args(argv)
    out = {}
    with tempfile.TemporaryDirectory(prefix="mlink-period-bench-") as tmp:
        for worker in (False, True):
            mode = "worker" if worker else "inline"
            runs = run_mode(args, worker, Path(tmp) / mode)
            out[mode] = runs
            for r in runs:
                print(
                    f"{mode:6s} period {r['period']}: {r['seconds']:.2f} s in flight, "
                    f"{r['during'].get('served', 0)} frames served, {r['during'].get('dropped', 0)} dropped"
                )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
