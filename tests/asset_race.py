"""Many fetchers of one asset released at the same moment (imported as ``asset_race``).

Why a module of its own: the race must also run in other processes, so this file doubles as a
script. Run as ``python asset_race.py HOME MIRROR NAME THREADS``, it readies its threads, prints
``ready``, waits for a line on stdin (the go signal, so that every process starts together),
fetches, and prints one JSON line per thread. A thread's result is ``ok <sha256> <inode>`` of
what it was handed, or ``error <exception>``: the digest is taken the moment the path comes back,
which is when a half-written file would show, and the inode tells whether the file was written
once (the lock held) or again by every fetcher.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from mlink.models.assets import AssetStore, sha256_of


def fetchers(
    home: Path, mirror: Path, name: str, threads: int
) -> tuple[list[threading.Thread], Callable[[], None], list[str]]:
    """Threads that fetch ``name`` once released, a release function, and their results.

    Half the threads share one store (components of one daemon), the other half each build their
    own (separate in-process memos), as both happen in the daemon.
    """
    shared = AssetStore(home=home, mirror=mirror, offline=True)
    gate = threading.Barrier(threads + 1)
    results: list[str] = ["not run"] * threads

    def fetch(i: int) -> None:
        store = shared if i % 2 == 0 else AssetStore(home=home, mirror=mirror, offline=True)
        gate.wait(timeout=60)
        try:
            path = store.path(name)
            inode = path.stat().st_ino
            results[i] = f"ok {sha256_of(path)} {inode}"
        except Exception as exc:  # the test reports every failure, not only the first
            results[i] = f"error {type(exc).__name__}: {exc}"

    workers = [threading.Thread(target=fetch, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    return workers, lambda: gate.wait(timeout=60), results


def main(argv: list[str]) -> None:
    home, mirror, name, threads = Path(argv[0]), Path(argv[1]), argv[2], int(argv[3])
    workers, release, results = fetchers(home, mirror, name, threads)
    print("ready", flush=True)
    sys.stdin.readline()
    release()
    for w in workers:
        w.join(timeout=60)
    for r in results:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
