"""Daemon benchmark: API latency under load, and the pipeline's overhead beside model time.

1. GET ``/api/v1/cameras/{id}/results/latest`` at fixed request rates (default 200 and 1000/s)
   from a second process on loopback, open loop (:mod:`mlink.bench.api_load`): p50/p99/max, and
   the pipeline's served frames/s without the load and under each rate; with the reads answered
   in the daemon's process (``api.read_workers: 0``, before issue 13) and by a reader process.
2. Per-camera pipeline overhead: for the same frames, the time spent decoding, scheduling
   (the planner's per-batch work, outside re-profiling periods), predicting with links (the
   serving step's time minus the executed models' own time on the same frame) and writing
   results to Redis, as a share of the time the executed models take.
3. Cache writes per second for each durability policy (``cache.fsync``: always, everysec), one
   round trip per result and one per batch.

    python -m mlink.bench.daemon [--rates 200,1000] [--workers 0,1] [--seconds 10] [--frames 60]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

SITE = {
    "site": "bench",
    "budget": "0.8x",
    "models": [
        {"name": "hog_people"},
        {"name": "mobilenet_v2"},
        {"name": "yolox_nano", "outputs": ["object_count", "boxes"]},
    ],
    "streams": [{"id": "walkway", "url": "asset://vtest", "fps": 5, "loop": True}],
    "links": {"profile_frames": 60},
    "scheduler": {"batch_size": 1},
}


def cache_writes(policy: str, n: int, batch: int) -> dict[str, Any]:
    """Results stored per second by the cache on an embedded Redis with AOF ``appendfsync policy``:
    one round trip per result (``put``), and one per ``batch`` results (``put_many``)."""
    from mlink.server.cache import ResultCache
    from mlink.server.redis_embedded import EmbeddedRedis

    result = {
        "plan_id": 1,
        "outputs": {f"m{i}:out": {"provenance": "predicted", "value": [0.5] * 40} for i in range(4)},
    }
    out: dict[str, Any] = {"policy": policy, "results": n}
    with EmbeddedRedis(appendonly=True, appendfsync=policy) as server:
        cache = ResultCache(server.url, history=n)
        t0 = time.perf_counter()
        for i in range(n):
            cache.put("cam", result, float(i))
        out["put_per_s"] = round(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            cache.put_many([("cam", result, float(n + j), False) for j in range(i, min(n, i + batch))])
        out[f"put_many_{batch}_per_s"] = round(n / (time.perf_counter() - t0))
        cache.close()
    return out


def pipeline_overhead(frames: int) -> dict:
    """Decode, schedule, links and cache times against model time, on the same frames."""
    import torch

    torch.set_num_threads(2)
    from mlink.configs.load import parse_config
    from mlink.models.assets import default_store
    from mlink.models.catalog import zoo_catalog
    from mlink.scheduler.planner import Planner
    from mlink.scheduler.profiler import ProfileFrame
    from mlink.scheduler.site import build_pool
    from mlink.server.cache import ResultCache
    from mlink.server.frames import read_frames
    from mlink.server.profiling import plan_stream_frames, site_frames
    from mlink.server.redis_embedded import EmbeddedRedis

    cfg = parse_config(yaml.safe_dump(SITE), catalog=zoo_catalog())
    store = default_store()
    pool = build_pool(cfg, store=store)
    planner = Planner(cfg, pool)
    planner.initial(site_frames(plan_stream_frames(cfg, cfg.links.profile_frames, store)))
    plan = planner.plan
    assert plan is not None
    t = {"decode": 0.0, "schedule": 0.0, "serve": 0.0, "models": 0.0, "cache": 0.0}
    with EmbeddedRedis() as redis_server:
        cache = ResultCache(redis_server.url)
        t0 = time.perf_counter()
        images = []
        for f in read_frames(str(store.path("vtest")), sample_fps=5.0, max_frames=frames):
            images.append(f)
        t["decode"] = time.perf_counter() - t0
        for f in images:
            frame = ProfileFrame("walkway", f.timestamp, f.image)
            t0 = time.perf_counter()
            planner.on_frames([frame], now=plan.created_at)  # inside the period: no re-profiling
            t1 = time.perf_counter()
            results = planner.serve([frame])  # the serving step: executed models + link predictions
            t2 = time.perf_counter()
            cache.put("walkway", results[0].to_json())
            t3 = time.perf_counter()
            for m in sorted(plan.active):  # the executed models alone, on the same frame
                with pool.pin(m) as model:
                    model.infer([f.image])
            t4 = time.perf_counter()
            t["schedule"] += t1 - t0
            t["serve"] += t2 - t1
            t["cache"] += t3 - t2
            t["models"] += t4 - t3
        cache.close()
    pool.close()
    t["links_and_glue"] = max(t["serve"] - t["models"], 0.0)  # serve minus the models' own time
    overhead = t["decode"] + t["schedule"] + t["links_and_glue"] + t["cache"]
    n = len(images)
    return {
        "frames": n,
        "active": sorted(plan.active),
        "per_frame_ms": {k: round(v / n * 1000, 3) for k, v in t.items()},
        "overhead_share_of_model_time": round(overhead / t["models"], 4) if t["models"] else None,
    }


def main(argv: list[str] | None = None) -> int:
    from mlink.bench.api_load import api_under_load

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rates", default="200,1000", help="GET requests per second, comma-separated")
    ap.add_argument("--workers", default="0,1", help="api.read_workers values to compare, comma-separated")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each window")
    ap.add_argument("--frames", type=int, default=60, help="frames for the overhead measurement (0: skip)")
    ap.add_argument("--writes", type=int, default=2000, help="results written per fsync policy (0: skip)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r]
    home = Path(tempfile.mkdtemp(prefix="mlink-bench-"))  # shared: the second start reuses the links
    api = [api_under_load(SITE, home, int(w), rates, args.seconds) for w in args.workers.split(",") if w]
    fsync = [cache_writes(p, args.writes, 4) for p in ("always", "everysec")] if args.writes else []
    pipe = pipeline_overhead(args.frames) if args.frames else None
    if args.json:
        print(json.dumps({"api": api, "fsync": fsync, "pipeline": pipe}))
        return 0
    for run in api:
        where = f"{run['read_workers']} reader process(es)" if run["read_workers"] else "the daemon's process"
        print(f"\nreads answered by {where}: pipeline {run['quiet_fps']:.2f} frames/s without load", end="")
        print(f" ({run['quiet_fps_after']:.2f} after)")
        for rate in rates:
            r = run[f"{rate:g}"]
            print(
                f"  GET latest at {rate:>5.0f}/s: p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  max {r['max_ms']:.1f} ms"
                f"  ({r['ok']}/{r['requests']} ok, {r['achieved_rate']:.0f}/s sent)  pipeline {r['fps']:.2f} frames/s"
            )
    for f in fsync:
        print(
            f"\ncache.fsync {f['policy']:<8}: {f['put_per_s']:>6} results/s one by one, {f['put_many_4_per_s']:>6} in batches of 4"
        )
    if pipe:
        print(f"\npipeline per frame ({pipe['frames']} frames of vtest, active {pipe['active']}):")
        for k, v in pipe["per_frame_ms"].items():
            print(f"  {k:<9} {v:8.2f} ms")
        share = pipe["overhead_share_of_model_time"]
        print(f"  overhead (decode + scheduling + links + cache write) / model time: {share:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
