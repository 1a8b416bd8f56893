"""How much decoding cameras costs the serving process's interpreter: threads vs processes.

A pure-Python, CPU-bound counter loop (what the pipeline thread's Python work is like) runs in
the serving process for ``--seconds`` while ``--cameras`` cameras decode vtest unpaced
(``realtime: false``, sampled at ``--fps``) and a consumer thread takes their frames, as the
daemon does; once with no cameras (the baseline), once with reader threads here
(``ingest.processes: 0``) and once with capture processes (``auto``). It prints the loop's
iterations per second and the frames taken per second for each.

    python -m mlink.bench.ingest_contention [--cameras 4] [--fps 5] [--seconds 10]
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any, Literal

from mlink.configs.schema import IngestConfig, StreamEntry
from mlink.server.ingest import Ingest


def busy_loop(seconds: float) -> float:
    """Iterations per second of a pure-Python counter loop (holds the interpreter lock)."""
    n = 0
    end = time.perf_counter() + seconds
    while True:
        for _ in range(10_000):
            n += 1
        if time.perf_counter() >= end:
            return n / seconds


def run(processes: int | Literal["auto"] | None, cameras: int, fps: float, seconds: float) -> dict[str, Any]:
    if processes is None:
        return {"mode": "no cameras", "loop_per_s": busy_loop(seconds)}
    settings = IngestConfig(realtime=False, processes=processes, queue=4)
    streams = [StreamEntry(id=f"cam{i}", url="asset://vtest", fps=fps, loop=True) for i in range(cameras)]
    stop = threading.Event()
    taken = [0]

    def consume(ing: Ingest) -> None:
        for f in ing.frames(stop):
            ing.mark_processed(f.camera)
            taken[0] += 1

    with Ingest(settings) as ing:
        ing.apply(streams)
        first = ing.next_frame(timeout=60)
        assert first is not None, ing.status()
        time.sleep(1.0)  # every camera open and decoding
        consumer = threading.Thread(target=consume, args=(ing,), daemon=True)
        consumer.start()
        started = time.perf_counter()
        sampled0 = sum(s.frames_in for s in ing.status().values())
        loop = busy_loop(seconds)
        elapsed = time.perf_counter() - started
        sampled = sum(s.frames_in for s in ing.status().values()) - sampled0
        stop.set()
        consumer.join(5)
        st = ing.status()
    return {
        "mode": "threads" if processes == 0 else "processes",
        "loop_per_s": loop,
        "frames_per_s": taken[0] / elapsed,
        "sampled_per_s": sampled / elapsed,  # decoded and sampled (taken or dropped)
        "decode_ms": sum(s.decode_ms for s in st.values()) / len(st),
        "queue_wait_ms": sum(s.queue_wait_ms for s in st.values()) / len(st),
        "drops": sum(s.drops for s in st.values()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--fps", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args(argv)
    rows = [run(p, args.cameras, args.fps, args.seconds) for p in (None, 0, "auto")]
    base = rows[0]["loop_per_s"]
    print(f"{args.cameras} cameras, vtest unpaced, sampled at {args.fps:g} fps, {args.seconds:g} s each")
    for r in rows:
        extra = (
            f"  sampled {r['sampled_per_s']:.0f}/s, taken {r['frames_per_s']:.0f}/s"
            f"  loop lost per 100 sampled frames {(base - r['loop_per_s']) / r['sampled_per_s'] * 100 / base:.1%}"
            f"  decode {r['decode_ms']:.2f} ms/grab"
            f"  queue wait {r['queue_wait_ms']:.1f} ms  drops {r['drops']}"
            if "frames_per_s" in r
            else ""
        )
        print(f"{r['mode']:>11}: busy loop {r['loop_per_s'] / 1e6:.2f} M it/s ({r['loop_per_s'] / base:.0%}){extra}")


if __name__ == "__main__":
    main()
