"""Measuring a model in a benchmark: memory across load + warm-up, load time, per-frame latency.

One implementation for the zoo benchmark and the Table 4 cost table, so their figures mean the
same thing: the memory meter's delta and peak delta across loading and warming up (what the
scheduler's pool charges), the load time alone, and latencies over real frames, one per call.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any


def p90(sorted_values: Sequence[float]) -> float:
    return sorted_values[int(0.9 * (len(sorted_values) - 1))]


def latency_ms(fn: Any, images: Sequence[Any]) -> list[float]:
    """Milliseconds of ``fn(image)`` for each image, sorted."""
    lat = []
    for img in images:
        t0 = time.perf_counter()
        fn(img)
        lat.append((time.perf_counter() - t0) * 1000)
    return sorted(lat)


def measure_loads(
    meter: Any, make: Any, warm: Any, unload: Any, repeats: int
) -> tuple[list[int], list[int], list[float], Any]:
    """``repeats`` times: ``make()`` (timed) then ``warm(obj)``, measured by ``meter``.

    Returns the peak deltas, end deltas, load seconds, and the object of the last round, still
    loaded (the earlier ones are unloaded and their memory released before the next round).
    """
    peaks, deltas, secs = [], [], []
    obj = None
    holder: dict[str, Any] = {}  # what the last load_and_warm made

    def load_and_warm() -> float:
        t0 = time.perf_counter()
        holder["obj"] = make()
        s = time.perf_counter() - t0
        warm(holder["obj"])
        return s

    for r in range(max(1, repeats)):
        s, m = meter.measure_call(load_and_warm)
        peaks.append(max(int(m.peak_delta), 0))
        deltas.append(int(m.delta))
        secs.append(float(s))
        obj = holder["obj"]
        if r < repeats - 1:
            unload(obj)
            obj = None
            holder.clear()
            meter.release()
    return peaks, deltas, secs, obj


# -- a model's cost idle and under ingest load -------------------------------------------------


class IngestLoad:
    """``threads`` threads decoding ``video`` with OpenCV and keeping their last ``keep`` frames.

    What ingest does to this process's memory: every decoded frame is a fresh buffer (1.3 MB
    for vtest's 768x576), and the newest few stay referenced, so process memory churns by tens
    of MB while a model is being measured. Used as a context manager; loops the video.
    """

    def __init__(self, video: str, threads: int = 8, keep: int = 4) -> None:
        self.video = video
        self.keep = keep
        self.frames = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._decode, name=f"ingest-{i}", daemon=True) for i in range(threads)]

    def _decode(self) -> None:
        import cv2

        kept: deque[Any] = deque(maxlen=self.keep)
        while not self._stop.is_set():
            cap = cv2.VideoCapture(self.video)
            try:
                while not self._stop.is_set():
                    ok, frame = cap.read()
                    if not ok:
                        break
                    kept.append(frame)
                    self.frames += 1
            finally:
                cap.release()

    def __enter__(self) -> IngestLoad:
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + 10.0
        while self.frames < 4 * len(self._threads) and time.monotonic() < deadline:
            time.sleep(0.05)  # decoding under way before anything is measured
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def cost_in_process(meter: Any, factory: Any, name: str, device: str, frames: Sequence[Any]) -> int:
    """A model's cost as one in-process measurement of load + warm-up sees it (then unloaded)."""
    from mlink.scheduler.cost_settling import warm

    model = factory(name)
    m = meter.measure_call(functools.partial(warm, model, device, list(frames)))[1]
    model.unload()
    del model  # gone before the release, as the pool's unload does
    meter.release()
    return max(int(m.peak_delta), 0)


def cost_by_pool(cfg: Any, store: Any, name: str) -> tuple[int, str]:
    """A model's cost as a fresh pool records it for the planner (isolated figures not cached):
    (bytes, how: isolated / stable / UNSTABLE, and the in-process figure when it differs)."""
    from mlink.scheduler.isolated import clear_cache
    from mlink.scheduler.site import build_pool

    clear_cache()  # measured again, not remembered from the idle round
    pool = build_pool(cfg, store=store, budget=1.0)  # the whole device: every model loads
    try:
        pool.load(name)
        record = pool.load_records[-1]
        pool.unload(name, reason="bench")
    finally:
        pool.close()
    how = "isolated" if record.isolated else ("stable" if record.stable else "UNSTABLE")
    if record.in_process != record.cost:
        how += f"; in process {record.in_process / MB:.1f} MB"
    return record.cost, how


def isolation_main(argv: Sequence[str] | None = None) -> int:
    """Each model of a site measured idle and under ingest load, in process and by the pool."""
    ap = argparse.ArgumentParser(prog="python -m mlink.bench.measure", description=isolation_main.__doc__)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--device", default=None, help="default: the config's")
    ap.add_argument("--threads", type=int, default=8, help="decoding threads (ingest load)")
    ap.add_argument("--keep", type=int, default=4, help="frames each decoding thread keeps")
    ap.add_argument(
        "--modes", default="in-process,pool", help="in-process (one measurement), pool (what a fresh pool plans on)"
    )
    args = ap.parse_args(argv)

    from mlink.configs.load import load_config
    from mlink.models.assets import default_store
    from mlink.models.catalog import model_info, zoo_catalog
    from mlink.scheduler.pool import ModelPool
    from mlink.scheduler.priming import synthetic_frame
    from mlink.scheduler.site import build_pool

    cfg = load_config(args.config, catalog=zoo_catalog())
    device = args.device or cfg.device
    cfg = cfg.model_copy(update={"device": device})
    store = default_store()
    video = str(store.path("vtest"))
    names = [m.name for m in cfg.models]
    for name in names:
        for asset in model_info(name).assets:
            store.path(asset)  # fetched before anything is measured
    pool: ModelPool = build_pool(cfg, store=store, budget=1.0)  # the whole device: every model loads
    frames = [synthetic_frame()] * pool.warmup_batch
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = []
    for mode in modes:
        for name in names:
            figures = []
            for loaded in (False, True):
                ctx = IngestLoad(video, args.threads, args.keep) if loaded else contextlib.nullcontext()
                with ctx:
                    if mode == "in-process":
                        cost, how = cost_in_process(pool.meter, pool.factory, name, device, frames), "in-process"
                    else:
                        cost, how = cost_by_pool(cfg, store, name)
                figures.append((cost, how))
            (idle, how_idle), (busy, how_busy) = figures
            ratio = busy / idle if idle else float("nan")
            rows.append((mode, name, idle, busy, ratio, how_idle, how_busy))
            print(
                f"{mode:10s} {name:14s} idle {idle / MB:8.1f} MB ({how_idle})  under {args.threads} decoders "
                f"{busy / MB:8.1f} MB ({how_busy})  ratio {ratio:.3f}",
                flush=True,
            )
    pool.close()
    worst = max(abs(r[4] - 1) for r in rows if r[0] == "pool") if "pool" in modes else None
    if worst is not None:
        print(f"pool: largest |loaded/idle - 1| = {worst:.3f} (target <= 0.05)")
    return 0


MB = 1e6

if __name__ == "__main__":
    raise SystemExit(isolation_main())
