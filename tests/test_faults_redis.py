"""Faults of the embedded Redis, with real processes (a real redis-server, killed with SIGKILL from
outside as an operator's ``kill -9`` would): the supervisor reaps and restarts it on the same
folder, the cache flushes its outage buffer, and nothing written is lost; a restart of the daemon
(a new EmbeddedRedis on the same folder) finds the history; two cannot share a folder; close
leaves no temporary folder; a server that cannot come back makes ``health()`` fail with the reason.

Each test is bounded by ``wait_for`` timeouts (seconds) and writes a few hundred results at most.
The recovery time is printed (``pytest -s``), not asserted: timing is the benchmarks' business.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from waiting import wait_for  # tests/waiting.py

from mlink.configs.schema import CacheConfig
from mlink.server.cache import ResultCache, open_cache
from mlink.server.redis_embedded import EmbeddedRedis, EmbeddedRedisError


def _state(pid: int) -> str | None:
    """The kernel's state letter of ``pid`` (``Z``: a zombie), None once it is gone (reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _seqs(cache: ResultCache, cam: str) -> list[int]:
    return [r.result["seq"] for r in cache.history(cam)]


def test_kill_9_while_writing_restarts_on_the_same_folder_and_loses_nothing(tmp_path: Path) -> None:
    cache, server = open_cache(CacheConfig(history=100_000, buffer=10_000), prefix="mlink:faults", home=tmp_path)
    assert server is not None
    stop = threading.Event()
    put: list[int] = []

    def producer() -> None:
        i = 0
        while not stop.is_set() and i < 5000:
            cache.put(("a", "b")[i % 2], {"seq": i}, ts=1000.0 + i * 0.001)
            put.append(i)
            i += 1
            time.sleep(0.002)

    t = threading.Thread(target=producer)
    t.start()
    try:
        wait_for(lambda: len(put) > 100, what="results written before the kill")
        old = server.pid
        assert old is not None
        killed_at = time.monotonic()
        os.kill(old, signal.SIGKILL)  # from outside: the EmbeddedRedis is not told
        probe = server.client(socket_timeout=0.5, socket_connect_timeout=0.5)

        def answers() -> bool:
            try:
                return server.pid not in (None, old) and bool(probe.ping())
            except Exception:
                return False

        wait_for(answers, timeout=15.0, what="the supervisor to restart redis-server")
        recovery = time.monotonic() - killed_at
        probe.close()
        wait_for(lambda: _state(old) is None, timeout=5.0, what="the killed child to be reaped (no zombie)")
        n_at_recovery = len(put)
        wait_for(lambda: cache.stats().reconnects >= 1, timeout=10.0, what="the cache to reconnect")
        wait_for(lambda: len(put) > n_at_recovery + 100, timeout=10.0, what="results written after the restart")
    finally:
        stop.set()
        t.join()
    try:
        assert cache.flush(10.0)
        st = cache.stats()
        n = len(put)
        lost = n - len(_seqs(cache, "a")) - len(_seqs(cache, "b"))
        print(
            f"\nredis kill -9 -> answering PING again: {recovery:.2f}s (supervisor's own figure "
            f"{server.last_recovery_s:.2f}s); results written {n}, buffered during the outage {st.flushed}, lost {lost}"
        )
        assert (st.dropped, st.buffered, lost) == (0, 0, 0)
        assert _seqs(cache, "a") == list(range(0, n, 2)) and _seqs(cache, "b") == list(range(1, n, 2))
        assert server.restarts == 1 and server.directory == tmp_path / "redis" / "faults"
        ok, why = server.health()
        assert ok, why
    finally:
        cache.close()
        server.close()
    assert not server.socket_path.exists()


def test_a_restart_on_the_same_folder_finds_the_history_and_two_cannot_share_it(tmp_path: Path) -> None:
    cfg = CacheConfig(history=1000, buffer=100)
    cache, server = open_cache(cfg, prefix="mlink:site1", home=tmp_path)
    assert server is not None
    for i in range(50):
        cache.put("cam", {"seq": i}, ts=float(i))
    second = EmbeddedRedis(server.directory, appendonly=True)
    with pytest.raises(EmbeddedRedisError, match=rf"in use by another mlink daemon \(pid {os.getpid()}\)"):
        second.start()
    second.close()
    assert server.running  # the refused one touched nothing
    cache.close()
    server.close()

    cache, server = open_cache(cfg, prefix="mlink:site1", home=tmp_path)  # the daemon started again
    try:
        assert [r.result["seq"] for r in cache.history("cam")] == list(range(50))
        assert cache.latest("cam").result == {"seq": 49}
    finally:
        cache.close()
        server.close()
    other, s2 = open_cache(cfg, prefix="mlink:site2", home=tmp_path)  # another site: its own folder
    try:
        assert other.history("cam") == []
    finally:
        other.close()
        s2.close()


def test_close_leaves_no_temporary_folder_even_with_a_socket_path_too_long_for_its_folder(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with EmbeddedRedis(deep, appendonly=True) as s:
        assert s.socket_path.parent != deep  # the socket had to go to a short private folder
        assert s.client().ping()
        short = s.socket_path.parent
    assert not short.exists() and (deep / "redis.conf").exists()  # the data folder is kept
    with EmbeddedRedis() as s:
        temp = s.directory
    assert not temp.exists()


def test_health_fails_with_the_reason_when_redis_cannot_come_back(tmp_path: Path) -> None:
    s = EmbeddedRedis(tmp_path / "r", appendonly=True, max_restarts=2, restart_backoff=(0.01, 0.05)).start()
    try:
        assert s.health()[0]
        s.client().set("k", "v")
        (tmp_path / "r" / "appendonly.aof").write_bytes(b"not an append-only file\n")  # Redis refuses it
        pid = s.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not s.health()[0], timeout=30.0, what="the supervisor to give up")
        ok, why = s.health()
        assert not ok
        assert "3 restarts failed" in why and "exited with code" in why, why
        assert str(tmp_path) not in why  # no internal path in what /healthz shows
        assert _state(pid) is None and not s.running
    finally:
        s.close()
    assert not s.health()[0]
