"""Push (issue 15 item 3): every cached result also goes to a bounded Redis stream per camera (and
one for all cameras), and the API serves those streams as server-sent events.

A real daemon on real video (one cheap model, a few seconds of frames) with its real embedded
Redis and a real HTTP server: the SSE streams (read over HTTP with httpx) and the Redis stream
(read directly) must each hold every result of the run, in order, with no gap, counted against
the history; ``Last-Event-ID`` resumes exactly after the given id. A daemon that is not started
(no models: quick) with a reader process in front: the reader answers the event routes itself,
and results buffered during a Redis outage reach the stream, in order, when it comes back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from daemons import behind_readers, running_daemon  # tests/daemons.py
from waiting import wait_for  # tests/waiting.py

from mlink.models.assets import AssetStore
from mlink.server import api_events
from mlink.server.cache import ResultCache
from mlink.server.daemon import Daemon
from mlink.server.readers import ReaderPool

SITE = {
    "site": "push",
    "budget": "1.0x",
    "models": [{"name": "hog_people", "params": {"upscale": 1.0}}],
    "streams": [{"id": "walkway", "url": "asset://vtest", "fps": 4, "loop": True}],
    "links": {"profile_frames": 20},
    "scheduler": {"period_s": 3600, "batch_size": 2},
}
RUN = 12  # results of the short run the streams are checked on


def sse(response: httpx.Response, n: int) -> list[dict[str, Any]]:
    """The first ``n`` events of an open ``text/event-stream`` response (comments skipped)."""
    events: list[dict[str, Any]] = []
    event: dict[str, Any] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in event:
                events.append(event)
                if len(events) == n:
                    return events
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            event[name] = json.loads(value) if name == "data" else value
    raise AssertionError(f"the stream ended after {len(events)} events")


def read_events(client: httpx.Client, path: str, n: int, last_id: str | None = None) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": last_id} if last_id is not None else {}
    with client.stream("GET", path, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse(r, n)


def sid(text: str) -> tuple[int, int]:
    ms, seq = text.split("-")
    return int(ms), int(seq)


def record(e: dict[str, Any]) -> tuple[float, Any]:
    return e["data"]["ts"], e["data"]["result"]


# -- a real daemon on real video ---------------------------------------------------------------


@pytest.fixture(scope="module")
def running(store: AssetStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, httpx.Client]]:
    with running_daemon(SITE, tmp_path_factory.mktemp("push-home"), store, http=True) as run:
        assert run.client is not None
        yield run.daemon, run.client


def test_sse_and_redis_stream_deliver_every_result_in_order(running) -> None:
    daemon, client = running
    events = read_events(client, "/api/v1/cameras/walkway/events", RUN, last_id="0")  # from the first result
    assert all(e["event"] == "result" and e["data"]["camera"] == "walkway" for e in events)
    # the Redis stream and the history, read in one MULTI/EXEC: one moment of both
    r = redis.Redis.from_url(daemon.cache.url, decode_responses=True)
    keys = daemon.cache.keys
    pipe = r.pipeline(transaction=True)
    pipe.zrange(keys.history("walkway"), 0, -1)
    pipe.xrange(keys.stream("walkway"))
    members, entries = pipe.execute()
    history = [json.loads(m) for m in members]
    stream = [json.loads(f["data"]) for _, f in entries]
    assert len(stream) == len(history) >= RUN  # every result, counted against the history
    assert [(s["id"], s["ts"], s["result"]) for s in stream] == [(h["id"], h["ts"], h["result"]) for h in history]
    assert [e["id"] for e in events] == [sid for sid, _ in entries[:RUN]]  # SSE ids: the stream's, no gap
    assert [record(e) for e in events] == [(h["ts"], h["result"]) for h in history[:RUN]]
    api = client.get("/api/v1/cameras/walkway/results", params={"limit": 10000}).json()["results"]
    assert [(x["ts"], x["result"]) for x in api[:RUN]] == [record(e) for e in events]
    r.close()


def test_last_event_id_resumes_exactly_after_it(running) -> None:
    _, client = running
    first = read_events(client, "/api/v1/cameras/walkway/events", 8, last_id="0")
    resumed = read_events(client, "/api/v1/cameras/walkway/events", 4, last_id=first[3]["id"])
    assert [e["id"] for e in resumed] == [e["id"] for e in first[4:8]]
    assert [record(e) for e in resumed] == [record(e) for e in first[4:8]]
    everyone = read_events(client, "/api/v1/events", 6, last_id="0")  # one camera here: the same results
    assert [record(e) for e in everyone] == [record(e) for e in first[:6]]
    live = read_events(client, "/api/v1/cameras/walkway/events", 1)  # no Last-Event-ID: from now on
    assert sid(live[0]["id"]) > sid(first[-1]["id"])


def test_bad_requests_get_their_status(running) -> None:
    _, client = running
    assert client.get("/api/v1/cameras/nope/events").status_code == 404
    bad = client.get("/api/v1/cameras/walkway/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 422 and "Last-Event-ID" in bad.json()["error"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"200", "404", "422", "503"} <= set(paths["/api/v1/cameras/{camera_id}/events"]["get"]["responses"])
    assert {"200", "422", "503"} <= set(paths["/api/v1/events"]["get"]["responses"])


def test_streams_are_bounded_in_number_and_leave_nothing_behind(running, monkeypatch) -> None:
    daemon, client = running
    r = redis.Redis.from_url(daemon.cache.url, decode_responses=True)

    def held() -> int:  # Redis connections of open event streams
        return sum(c.get("name") == api_events.CLIENT_NAME for c in r.client_list())

    monkeypatch.setattr(api_events, "MAX_CLIENTS", 2)
    with client.stream("GET", "/api/v1/events") as one, client.stream("GET", "/api/v1/cameras/walkway/events") as two:
        assert one.status_code == two.status_code == 200
        assert (held(), api_events._slots.open) == (2, 2)
        third = client.get("/api/v1/events")
        assert third.status_code == 503 and "too many" in third.json()["error"]
    # both clients went away mid-stream: their streams end, their slots and connections are freed
    wait_for(lambda: held() == 0 and api_events._slots.open == 0, 10, "the streams' connections closed")
    r.close()


# -- a reader process, and a Redis outage --------------------------------------------------------


@pytest.fixture(scope="module")
def pool(store: AssetStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, ReaderPool]]:
    site = {**SITE, "site": "pushreaders", "api": {"read_workers": 1}}
    with behind_readers(site, tmp_path_factory.mktemp("home"), store) as (daemon, readers):
        daemon.cache.backoff_max = 0.1
        yield daemon, readers


def test_a_reader_answers_the_events_itself_and_an_outage_keeps_the_order(pool) -> None:
    daemon, readers = pool
    public = httpx.Client(base_url=f"http://127.0.0.1:{readers.port}", timeout=30)
    direct = httpx.Client(transport=httpx.HTTPTransport(uds=readers.upstream), base_url="http://daemon", timeout=30)
    with public, direct:
        wait_for(lambda: public.get("/api/v1/models").headers.get("x-mlink-served-by") == "reader", 30, "a live reader")
        assert daemon.cache.put_many([("walkway", {"n": i}, 100.0 + i, False) for i in range(3)]).written
        with public.stream("GET", "/api/v1/cameras/walkway/events", headers={"Last-Event-ID": "0"}) as r:
            assert r.headers.get("x-mlink-served-by") == "reader"  # not forwarded to the daemon
            assert [e["data"]["result"]["n"] for e in sse(r, 3)] == [0, 1, 2]
        assert public.get("/api/v1/cameras/nope/events").status_code == 404

        daemon._redis.kill()
        assert not daemon.cache.ping()
        # buffered: a newer frame, a revision of an older one, a newer frame
        items = [("walkway", {"n": 3}, 103.0, False), ("walkway", {"n": 1, "revision": 1}, 101.0, True)]
        assert not daemon.cache.put_many([*items, ("walkway", {"n": 4}, 104.0, False)]).written
        down = direct.get("/api/v1/cameras/walkway/events")
        assert down.status_code == 503 and "unreachable" in down.json()["error"]
        assert "redis" not in down.text.lower()  # nothing of the store's address
        daemon._redis.start()
        assert daemon.cache.flush(10.0)
        with direct.stream("GET", "/api/v1/events", headers={"Last-Event-ID": "0"}) as r:
            got = sse(r, 6)
        assert [(e["data"]["result"]["n"], e.get("event")) for e in got] == [(i, "result") for i in (0, 1, 2, 3, 1, 4)]
        assert got[4]["data"]["result"]["revision"] == 1
        raw = redis.Redis.from_url(daemon.cache.url, decode_responses=True)
        entries = raw.xrange(daemon.cache.keys.stream("walkway"))
        assert [e[1].get("revision") for e in entries] == [None, None, None, None, "1", None]
        # one camera: the same results in the same order (each stream numbers its own entries)
        assert [json.loads(f["data"])["id"] for _, f in entries] == [e["data"]["id"] for e in got]
        ids = [sid for sid, _ in entries]
        raw.xtrim(
            daemon.cache.keys.stream("walkway"), maxlen=2, approximate=False
        )  # as if retention passed a slow client
        with public.stream("GET", "/api/v1/cameras/walkway/events", headers={"Last-Event-ID": ids[0]}) as r:
            gap, *rest = sse(r, 3)
        assert gap["event"] == "gap" and gap["data"] == {"after": ids[0], "oldest": ids[4]}
        assert [e["id"] for e in rest] == ids[4:]
        raw.close()


def test_the_streams_are_bounded(pool) -> None:
    daemon, _ = pool
    cache = ResultCache(daemon.cache.url, prefix="mlink:bounded", stream=10)
    try:
        for start in range(0, 600, 200):
            cache.put_many([(("a", "b")[i % 2], {"i": i}, float(i), False) for i in range(start, start + 200)])
        raw = redis.Redis.from_url(daemon.cache.url)
        a, everyone = raw.xlen(cache.keys.stream("a")), raw.xlen(cache.keys.events)
        raw.close()
        # MAXLEN ~: Redis trims whole nodes (100 entries by default), so at least N stay, a few more may
        assert 10 <= a <= 10 + 100 and 20 <= everyone <= 20 + 100, (a, everyone)
        assert len(cache.history("a", limit=10000)) == 300  # the history keeps its own bound
    finally:
        cache.close()
