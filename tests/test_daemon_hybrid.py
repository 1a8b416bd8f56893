"""Hybrid plans in the daemon, on real video with real models and the real embedded Redis.

Three models whose memory cannot all be held (a budget of 0.62x their measured cost): the
modes keep one resident and rotate another one into what it leaves, over buffers of a few
seconds. The results served at once are revised when a rotating model ran, and the pool never
holds more than the budget at any instant. The API publishes what rotation measured of the
links' accuracy, and the plan history.
"""

from __future__ import annotations

import time

import httpx
import pytest
from browser import Chromium, find_chromium  # tests/browser.py
from daemons import Running, app_behind_readers, running_daemon  # tests/daemons.py
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_for  # tests/waiting.py

from mlink.models.assets import AssetStore
from mlink.scheduler.rotation import Rotation
from mlink.server.daemon import Daemon


def _site() -> dict:
    return {
        "site": "hybrid",
        "budget": "0.62x",
        "models": [
            {"name": "hog_people", "params": {"upscale": 1.0}},
            {"name": "mobilenet_v2"},
            {"name": "yolox_nano", "outputs": ["object_count", "boxes"]},
        ],
        "streams": [{"id": "walkway", "url": "asset://vtest", "fps": 4, "loop": True}],
        "links": {"profile_frames": 20},
        "scheduler": {
            "period_s": 3600,
            "batch_size": 2,
            "hybrid": {"enabled": True, "max_delay_s": 6.0, "gpu_share": 0.5},
        },
        "cache": {"history": 5000, "buffer": 5000},
    }


@pytest.fixture(scope="module")
def run(store: AssetStore, tmp_path_factory: pytest.TempPathFactory):
    with running_daemon(_site(), tmp_path_factory.mktemp("hybrid-home"), store, http=True, ready_s=300) as r:
        yield r


@pytest.fixture(scope="module")
def daemon(run: Running) -> Daemon:
    return run.daemon


def _revisions(d: Daemon) -> list[dict]:
    assert d.cache is not None
    return [r.result for r in d.cache.history("walkway")]


def test_rotating_models_execute_revise_and_stay_within_the_budget(daemon: Daemon) -> None:
    rot = daemon.rotation
    assert rot is not None and rot.modes is not None
    wait_for(lambda: any(r.get("revision", 0) > 0 for r in _revisions(daemon)), 60, "a revised result", every=0.5)
    results = _revisions(daemon)
    revised = [r for r in results if r["revision"] > 0]
    rotated = {m for w in rot.windows for m, runs in w["runs"].items() if runs}
    assert rotated, rot.windows
    model = sorted(rotated)[0]
    nodes = [k for k in results[0]["outputs"] if k.startswith(model + ":")]
    # the rotating model ran on some frames (a revision says executed) ...
    assert any(r["outputs"][k]["provenance"] == "executed" for r in revised for k in nodes)
    # ... and served others from a real output of the camera, with a temporal source
    temporal = [
        o for r in results for k, o in r["outputs"].items() if o["provenance"] == "predicted" and "temporal" in o
    ]
    assert temporal, "no output served from a real output of another frame"
    assert all(o["sources"][0].startswith("temporal:") and "from_frame" in o["temporal"] for o in temporal)
    # both revisions of a revised frame are in the history, the first one as served at once
    by_frame: dict[float, list[int]] = {}
    for r in results:
        by_frame.setdefault(r["wall_time"], []).append(r["revision"])
    frame = revised[0]["wall_time"]
    assert sorted(by_frame[frame])[:2] == [0, 1]
    # latest is the newest revision of the newest frame
    latest = daemon.cache.latest("walkway").result  # type: ignore[union-attr]
    newest = max(by_frame)
    assert latest["wall_time"] == newest and latest["revision"] == max(by_frame[newest])
    # memory never above the budget: every rotation load fitted beside what was held
    budget = daemon.pool.budget  # type: ignore[union-attr]
    assert rot.loads and rot.peak_charged <= budget
    for load in rot.loads:
        assert load["charged_after"] <= budget
    # the schedule shows the modes
    time.sleep(1.2)
    assert daemon.snapshot.plan_json is not None and daemon.snapshot.plan_json["hybrid"]["modes"]


def _audits(rot: Rotation) -> int:
    """Rotation's audit count, read off the pipeline thread (one C-level copy of the sums)."""
    return int(sum(s[2] for s in list(rot.audit.sums.values())))


def test_the_api_publishes_the_measured_accuracy_and_the_plan_history(run: Running) -> None:
    """``measured`` in /api/v1/links: rotation's audits per output (a rotating model's outputs
    checked against its real runs), refreshed while rotation runs; ``history`` in /schedule."""
    client, rot = run.client, run.daemon.rotation
    assert client is not None and rot is not None

    def audited() -> dict:
        m = client.get("/api/v1/links").json()["measured"]
        return m if any(r["n"] > 0 for r in m["nodes"].values()) else {}

    first = wait_for(audited, 90, "an audited output in /api/v1/links", every=0.5)
    assert first["source"] == "rotation" and 0 < first["correction"] <= 1
    rotated = {m for w in rot.windows for m, runs in w["runs"].items() if runs}
    plan = client.get("/api/v1/schedule").json()["plan"]
    assert set(plan["expected_nodes"]) <= set(first["nodes"])  # every output listed, audited or not
    for node, row in first["nodes"].items():
        if row["n"] == 0:  # never checked: no figure
            assert row["expected"] is None and row["measured"] is None and row["drift"] is None, node
            continue
        assert row["model"] in rotated, (node, rotated)  # checked where a rotating model really ran
        assert 0.0 <= row["expected"] <= 1.0 and 0.0 <= row["measured"] <= 1.0, row
        assert abs(row["drift"] - (row["measured"] - row["expected"])) < 1e-5
        points = first["series"][node]
        assert sum(p[1] for p in points) == row["n"] and all(0 <= p[3] <= 1 for p in points)
    # refreshed while rotation runs, not only with a new plan: the refresh publishes (about once
    # a second) carry rotation's current count (it grows in bursts, when a buffer closes)
    wait_for(
        lambda: (
            (snap := run.daemon.snapshot).reason == "refresh"
            and snap.measured is not None
            and snap.measured["audits"] == _audits(rot) >= first["audits"]
        ),
        20,
        "a refresh publish with the current audits",
        every=0.2,
    )
    # ... and in /metrics: a count per output, a measured figure only where there was a check
    scrape = {
        (sample.name, sample.labels.get("output")): sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
    }
    for node, row in first["nodes"].items():
        checks = scrape[("mlink_output_accuracy_checks_total", node)]  # this scrape came later: maybe more
        assert checks >= row["n"], node
        measured = scrape.get(("mlink_output_measured_accuracy", node))
        assert (measured is not None) == (checks > 0) and (measured is None or 0.0 <= measured <= 1.0), node
    schedule = client.get("/api/v1/schedule").json()
    history = schedule["history"]
    assert history and history[-1]["plan_id"] == schedule["plan"]["plan_id"]
    assert [h["plan_id"] for h in history] == sorted({h["plan_id"] for h in history})
    # the initial plan is re-chosen with the hybrid modes before it serves: what served says so
    assert {h["reason"] for h in history} <= {"initial", "hybrid", "period", "failure", "refused"}
    assert history[0]["reason"] in ("initial", "hybrid"), history
    assert all(isinstance(h["active"], list) and 0 <= h["objective"] <= 1 for h in history)


def test_reader_processes_serve_the_measured_accuracy_and_the_history(run: Running) -> None:
    """Both travel to the reader processes with the rest of the snapshot (through Redis)."""
    with (
        app_behind_readers(run.daemon) as readers,
        httpx.Client(base_url=f"http://127.0.0.1:{readers.port}", timeout=30) as public,
    ):
        wait_for(lambda: public.get("/api/v1/links").headers.get("x-mlink-served-by") == "reader", 30, "a reader")
        links = public.get("/api/v1/links")
        assert links.headers["x-mlink-served-by"] == "reader"
        measured = links.json()["measured"]
        assert measured["source"] == "rotation" and measured["audits"] > 0
        assert any(r["n"] > 0 for r in measured["nodes"].values())
        history = public.get("/api/v1/schedule").json()["history"]
        assert [h["plan_id"] for h in history] == [h["plan_id"] for h in run.daemon.snapshot.history]


def test_the_dashboard_shows_which_models_rotate(run: Running) -> None:
    """The dashboard's models table takes each model's state from the hybrid plan's modes: the
    rotating models say "rotating", the resident ones "loaded" (headless Chromium, as in
    tests/test_dashboard_browser.py)."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium found (/usr/bin/chromium: Debian's `chromium`, installed by .ci/debian-packages)")
    assert run.client is not None
    modes = run.client.get("/api/v1/schedule").json()["plan"]["hybrid"]["modes"]
    assert modes["rotating"], modes  # this site rotates a model: else the test would prove nothing
    with Chromium(chromium) as page:
        page.goto(f"{run.client.base_url}/")
        states = wait_for(
            lambda: page.js(
                "Object.fromEntries([...document.querySelectorAll('#models tbody tr')]"
                ".map(r => [r.dataset.model, r.dataset.state]))"
            ),
            30,
            "the models table",
            every=0.5,
        )
    assert {m for m, s in states.items() if s == "rotating"} == set(modes["rotating"]), (states, modes)
    assert {m for m, s in states.items() if s == "loaded"} == set(modes["resident"]), (states, modes)
