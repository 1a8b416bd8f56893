"""Reader processes (issue 13 item 4): the read routes answered outside the daemon's process, from
Redis and the published snapshot, with the daemon's answers; the rest forwarded to it; a reader
that dies restarted and reported; every reader reaped on close.

A real daemon object (not started: no models, so this module stays quick) with its real cache
on the embedded Redis, its real app on the pool's private unix socket, real reader processes
on a real TCP port. Each answer through a reader is compared with the daemon's own app's.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator

import httpx
import pytest
from daemons import behind_readers  # tests/daemons.py
from waiting import wait_for  # tests/waiting.py

from mlink.models.assets import AssetStore
from mlink.server.daemon import Daemon
from mlink.server.readers import ReaderPool

SITE = {
    "site": "readers",
    "models": [{"name": "mobilenet_v2"}],
    "streams": [{"id": "gate", "url": "asset://vtest"}],
    "api": {"token": "t0ken", "read_workers": 1},
}


@pytest.fixture(scope="module")
def pool(store: AssetStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, ReaderPool]]:
    pids: list[int] = []
    with behind_readers(SITE, tmp_path_factory.mktemp("home"), store) as (daemon, readers):
        yield daemon, readers
        pids = readers.pids()
    for pid in pids:  # reaped: no such process, not even a zombie
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope="module")
def clients(pool) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    _, readers = pool
    public = httpx.Client(base_url=f"http://127.0.0.1:{readers.port}", timeout=30)
    direct = httpx.Client(transport=httpx.HTTPTransport(uds=readers.upstream), base_url="http://daemon", timeout=30)
    with public, direct:
        wait_for(lambda: public.get("/api/v1/models").headers.get("x-mlink-served-by") == "reader", 30, "a live reader")
        yield public, direct


AGE = re.compile(rb'"age_s":[0-9.e+-]+')


def same(public: httpx.Client, direct: httpx.Client, path: str, **params) -> httpx.Response:
    """The reader answered ``path`` itself, with the daemon's status, JSON and snapshot header."""
    a, b = public.get(path, params=params), direct.get(path, params=params)
    assert a.headers.get("x-mlink-served-by") == "reader", path
    ja, jb = a.json(), b.json()
    if isinstance(ja, dict) and "age_s" in ja:  # read on each answer: the two clocks differ a little
        assert abs(ja.pop("age_s") - jb.pop("age_s")) < 5, path
    assert (a.status_code, ja) == (b.status_code, jb), path
    assert a.headers.get("x-mlink-snapshot") == b.headers.get("x-mlink-snapshot"), path
    return a


def test_reads_are_the_daemons_answers(pool, clients) -> None:
    daemon, _ = pool
    public, direct = clients
    assert same(public, direct, "/api/v1/cameras/gate/results/latest").status_code == 404  # no result yet
    assert same(public, direct, "/api/v1/cameras/nope/results/latest").json()["cameras"] == ["gate"]
    done = daemon.cache.put_many([("gate", {"n": i, "x": 0.1 * i, "é": "ü"}, 1000.0 + i, False) for i in range(5)])
    assert done.written and done.stored == 5 and not done.rejected
    wait_for(lambda: public.get("/api/v1/cameras/gate/results/latest").json().get("result", {}).get("n") == 4, 10)
    a = same(public, direct, "/api/v1/cameras/gate/results/latest")
    b = direct.get("/api/v1/cameras/gate/results/latest")
    assert AGE.sub(b"", a.content) == AGE.sub(b"", b.content)  # byte for byte, but for the age
    assert a.json()["stale"] is True and a.json()["age_s"] > 1e9  # from 1970, of a camera never seen
    assert same(public, direct, "/api/v1/cameras/gate/results", since=1001, limit=2).json()["count"] == 2
    assert same(public, direct, "/api/v1/cameras/gate/results", limit=0).status_code == 422
    assert same(public, direct, "/api/v1/cameras/gate/results", since="nan").status_code == 422
    assert same(public, direct, "/api/v1/cameras/nope/results").status_code == 404
    assert same(public, direct, "/api/v1/schedule").status_code == 503  # no plan: the daemon did not plan
    assert same(public, direct, "/api/v1/links").status_code == 503
    assert same(public, direct, "/api/v1/models").json()[0]["name"] == "mobilenet_v2"
    assert same(public, direct, "/api/v1/cameras").json() == [{"id": "gate", "state": "unknown"}]


def test_a_new_snapshot_reaches_the_reader(pool, clients) -> None:
    daemon, _ = pool
    public, direct = clients
    cfg = daemon.cfg.model_copy(
        update={"streams": [*daemon.cfg.streams, daemon.cfg.streams[0].model_copy(update={"id": "yard"})]}
    )
    snap = daemon._publish_config(cfg)
    wait_for(
        lambda: public.get("/api/v1/models").headers["x-mlink-snapshot"] == str(snap.version), 10, "the new version"
    )
    assert same(public, direct, "/api/v1/cameras/yard/results/latest").json() == {
        "error": "no result for camera 'yard' yet"
    }


def test_other_routes_are_forwarded_with_their_auth(pool, clients) -> None:
    public, _ = clients
    health = public.get("/healthz")
    assert "x-mlink-served-by" not in health.headers
    assert health.json()["readers"] == {"workers": 1, "alive": 1, "restarts": 0, "last_exit": None}
    assert public.post("/api/v1/config/reload", content="site: x").status_code == 401
    r = public.post("/api/v1/config/reload", content="site: [", headers={"Authorization": "Bearer t0ken"})
    assert r.status_code == 400 and r.json()["errors"]
    big = public.post("/api/v1/config/reload", content=b"#" * (10 * 2**20), headers={"Authorization": "Bearer t0ken"})
    assert big.status_code == 413 and "256 KiB" in big.json()["error"]
    assert big.headers.get("x-mlink-served-by") == "reader"  # refused by the reader, not held and forwarded
    assert public.get("/metrics").text.startswith("# HELP")
    assert public.get("/nowhere").status_code == 404
    assert public.delete("/api/v1/models").status_code == 405


def test_while_redis_is_down_the_daemon_answers(pool, clients) -> None:
    daemon, _ = pool
    public, direct = clients
    daemon._redis.kill()
    wait_for(lambda: "x-mlink-served-by" not in public.get("/api/v1/models").headers, 10, "the reader to forward")
    assert not daemon.cache.put("gate", {"n": 99}, 2000.0)  # buffered by the daemon
    assert public.get("/api/v1/cameras/gate/results/latest").json()["result"] == {"n": 99}  # from its buffer
    daemon._redis.start()
    wait_for(lambda: daemon.cache.flush(1.0), 20, "the buffer to flush")
    wait_for(lambda: public.get("/api/v1/models").headers.get("x-mlink-served-by") == "reader", 20, "a live reader")
    assert same(public, direct, "/api/v1/cameras/gate/results/latest").json()["result"] == {"n": 99}


def test_a_dead_reader_is_reported_and_restarted(pool, clients) -> None:
    _, readers = pool
    public, direct = clients
    (pid,) = readers.pids()
    os.kill(pid, signal.SIGKILL)
    health = wait_for(lambda: (h := direct.get("/healthz").json())["readers"]["restarts"] == 1 and h, 10, "a restart")
    assert str(pid) in health["readers"]["last_exit"] and "-9" in health["readers"]["last_exit"]
    wait_for(lambda: public.get("/api/v1/models").headers.get("x-mlink-served-by") == "reader", 30, "the new reader")
    assert readers.pids() != [pid]


def test_a_token_in_a_forwarded_query_reaches_no_log(store: AssetStore, tmp_path, capfd) -> None:
    """A reader logging at INFO forwards ``/healthz?token=...``: the token is in no log line (the
    HTTP client the readers forward with logs each URL it sends at INFO, query string included)."""
    secret = "q7-forwarded-s3cret"
    site = {**SITE, "site": "readerlogs"}
    with (
        behind_readers(site, tmp_path, store, log_level="info") as (_, readers),
        httpx.Client(base_url=f"http://127.0.0.1:{readers.port}", timeout=30) as public,
    ):
        wait_for(lambda: public.get("/api/v1/models").headers.get("x-mlink-served-by") == "reader", 30, "a reader")
        for path in ("/healthz", "/metrics", "/nowhere", "/api/v1/models"):  # forwarded, forwarded, 404, answered
            public.get(path, params={"token": secret})
    out, err = capfd.readouterr()  # the reader process's stderr included
    assert "mlink.reader" in out + err or "INFO" in out + err  # it does log at INFO
    assert secret not in out + err
