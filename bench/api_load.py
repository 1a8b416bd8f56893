"""API load against a serving daemon: GET latest latency at fixed rates, and what the load costs the
pipeline (its frames/s with and without the load), with the reads answered in the daemon's process
(``api.read_workers: 0``) or by reader processes (issue 13 item 4).

The load comes from a second process on loopback, open loop: request i is due at ``start + i/rate``
whether or not earlier ones returned, and its latency counts from when it was due, so a server
that falls behind shows as latency (no coordinated omission), not as a lower rate. The generator
speaks HTTP/1.1 over asyncio streams on keep-alive connections (a new one when all are busy), so
it costs a fraction of what an HTTP library would on the cores the daemon shares.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

LOADGEN = r"""
import asyncio, json, sys, time
host, port, path, rate, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
req = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
lat, errors, idle, opened = [], [0], [], [0]

async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status

async def one(due):
    conn = idle.pop() if idle else None
    try:
        if conn is None:
            conn = await asyncio.open_connection(host, port)
            opened[0] += 1
        conn[1].write(req)
        ok = await read_response(conn[0]) == 200
        idle.append(conn)
    except Exception:
        ok = False
    if ok:
        lat.append(time.perf_counter() - due)
    else:
        errors[0] += 1

async def main():
    n, start, tasks = int(rate * seconds), time.perf_counter() + 0.05, []
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    took = time.perf_counter() - start
    lat.sort()
    q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None
    print(json.dumps({"requests": n, "ok": len(lat), "errors": errors[0], "connections": opened[0],
                      "achieved_rate": round(n / took, 1), "p50_ms": q(0.5), "p99_ms": q(0.99),
                      "max_ms": round(lat[-1] * 1000, 3) if lat else None}))

asyncio.run(main())
"""


def load(host: str, port: int, path: str, rate: float, seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", LOADGEN, host, str(port), path, str(rate), str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def served_fps(daemon: Any, seconds: float) -> float:
    """Frames the pipeline served per second over the next ``seconds``."""
    before, t0 = sum(daemon.frames_total.values()), time.perf_counter()
    time.sleep(seconds)
    return (sum(daemon.frames_total.values()) - before) / (time.perf_counter() - t0)


def _serve(daemon: Any, read_workers: int) -> tuple[Any, Any, threading.Thread, int]:
    """The API in front of a started daemon, as ``mlink serve`` runs it; (server, readers, thread, port)."""
    import uvicorn

    from mlink.server.api import create_app

    if read_workers:
        from mlink.server.readers import ReaderPool

        readers = ReaderPool(daemon, read_workers, "127.0.0.1", 0).start()
        config = uvicorn.Config(create_app(daemon, readers=readers), uds=readers.upstream, log_level="warning")
    else:
        readers = None
        config = uvicorn.Config(create_app(daemon), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = readers.port if readers is not None else server.servers[0].sockets[0].getsockname()[1]
    return server, readers, thread, port


def api_under_load(
    site: dict[str, Any], home: Path, read_workers: int, rates: list[float], seconds: float
) -> dict[str, Any]:
    """Start the daemon of ``site``; pipeline frames/s quiet, then under each rate of GET latest."""
    import yaml

    from mlink.configs.load import parse_config
    from mlink.models.assets import AssetStore, default_store
    from mlink.models.catalog import zoo_catalog
    from mlink.server.daemon import Daemon

    mirror = default_store()
    store = AssetStore(home=home, mirror=mirror.mirror, offline=mirror.offline)
    cfg = parse_config(yaml.safe_dump({**site, "api": {"read_workers": read_workers}}), catalog=zoo_catalog())
    daemon = Daemon(cfg, None, store, progress=True)
    daemon.start()
    server, readers, thread, port = _serve(daemon, read_workers)
    try:
        if not daemon.wait_ready(1800):
            raise RuntimeError(f"daemon not ready: {daemon.state} {daemon.error}")
        camera = cfg.streams[0].id
        while daemon.frames_total[camera] < 2:
            time.sleep(0.1)
        time.sleep(2.0)  # the readers' copy of the first results
        out: dict[str, Any] = {"read_workers": read_workers, "quiet_fps": round(served_fps(daemon, seconds), 3)}
        for rate in rates:
            box: dict[str, Any] = {}
            gen = threading.Thread(
                target=lambda r=rate, b=box: b.update(
                    load("127.0.0.1", port, f"/api/v1/cameras/{camera}/results/latest", r, seconds)
                )
            )
            gen.start()
            fps = served_fps(daemon, seconds)
            gen.join()
            out[f"{rate:g}"] = {**box, "fps": round(fps, 3)}
        out["quiet_fps_after"] = round(served_fps(daemon, seconds), 3)
        return out
    finally:
        server.should_exit = True
        thread.join(10)
        if readers is not None:
            readers.close()
        daemon.stop()
