"""Daemon benchmark: API latency under load, and the pipeline's overhead beside model time.

1. GET ``/api/v1/cameras/{id}/results/latest`` at a fixed request rate from a second process on
   loopback (open loop: requests are sent on schedule whether or not earlier ones returned,
   so a slow server shows up as latency, not as a lower rate); p50/p99 of the latencies.
2. Per-camera pipeline overhead: for the same frames, the time spent decoding, scheduling
   (the planner's per-batch work, outside re-profiling periods), predicting with links (the
   serving step's time minus the executed models' own time on the same frame) and writing
   results to Redis, as a share of the time the executed models take.

    python -m mlink.bench.daemon [--rate 200] [--seconds 10] [--frames 60]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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

LOADGEN = r"""
import json, sys, time, threading, httpx
url, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
lat, errors, lock = [], [0], threading.Lock()
client = httpx.Client(timeout=5, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
def one():
    t0 = time.perf_counter()
    try:
        ok = client.get(url).status_code == 200
    except Exception:
        ok = False
    dt = time.perf_counter() - t0
    with lock:
        (lat.append(dt) if ok else None)
        errors[0] += 0 if ok else 1
start = time.perf_counter(); n = int(rate * seconds); threads = []
for i in range(n):
    delay = start + i / rate - time.perf_counter()
    if delay > 0: time.sleep(delay)
    t = threading.Thread(target=one); t.start(); threads.append(t)
for t in threads: t.join()
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else None
print(json.dumps({"requests": n, "ok": len(lat), "errors": errors[0], "achieved_rate": n / (time.perf_counter() - start), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": lat[-1] * 1000 if lat else None}))
"""


def api_latency(rate: float, seconds: float) -> dict:
    import uvicorn

    from mlink.configs.load import parse_config
    from mlink.models.assets import default_store
    from mlink.models.catalog import zoo_catalog
    from mlink.server.api import create_app
    from mlink.server.daemon import Daemon

    home = Path(tempfile.mkdtemp(prefix="mlink-bench-"))
    store = default_store()
    from mlink.models.assets import AssetStore

    store = AssetStore(home=home, mirror=store.mirror, offline=store.offline)
    daemon = Daemon(parse_config(yaml.safe_dump(SITE), catalog=zoo_catalog()), None, store, progress=True)
    daemon.start()
    server = uvicorn.Server(uvicorn.Config(create_app(daemon), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        if not daemon.wait_ready(900):
            raise RuntimeError(f"daemon not ready: {daemon.state} {daemon.error}")
        while not server.started:
            time.sleep(0.05)
        while daemon.frames_total["walkway"] < 2:
            time.sleep(0.1)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/api/v1/cameras/walkway/results/latest"
        out = subprocess.run(
            [sys.executable, "-c", LOADGEN, url, str(rate), str(seconds)], capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)
    finally:
        server.should_exit = True
        thread.join(10)
        daemon.stop()


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=200.0, help="GET requests per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--frames", type=int, default=60, help="frames for the overhead measurement")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    api = api_latency(args.rate, args.seconds)
    pipe = pipeline_overhead(args.frames)
    if args.json:
        print(json.dumps({"api": api, "pipeline": pipe}))
        return 0
    print(f"\nGET latest result, {args.rate:.0f} req/s for {args.seconds:.0f} s from a second process on loopback:")
    print(
        f"  p50 {api['p50_ms']:.2f} ms   p99 {api['p99_ms']:.2f} ms   max {api['max_ms']:.2f} ms   "
        f"({api['ok']}/{api['requests']} ok, achieved {api['achieved_rate']:.0f} req/s)"
    )
    print(f"\npipeline per frame ({pipe['frames']} frames of vtest, active {pipe['active']}):")
    for k, v in pipe["per_frame_ms"].items():
        print(f"  {k:<9} {v:8.2f} ms")
    print(
        f"  overhead (decode + scheduling + links + cache write) / model time: {pipe['overhead_share_of_model_time']:.1%}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
