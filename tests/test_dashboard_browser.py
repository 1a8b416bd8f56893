"""The dashboard at ``/`` in a real headless Chromium, against a real daemon on real video.

Two cameras (pedestrians on walkways, a person in a room) and two detectors whose memory cannot
both be held (a budget of 0.6x their measured cost): HOG runs, YOLOX's boxes are predicted from
it by a link. The page must show every camera, draw the predicted boxes differently from the
executed ones (dashed vs solid, one colour per model), fill the schedule and links sections, and
show a bad reload's validation errors in place. A screenshot of what an operator sees is saved
under ``$MLINK_TEST_ARTEFACTS`` (else the test's tmp folder) and its path printed.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from browser import Chromium, find_chromium  # tests/browser.py
from daemons import Running, running_daemon  # tests/daemons.py
from waiting import wait_for  # tests/waiting.py

from mlink.models.assets import AssetStore
from mlink.server.api import create_app
from mlink.server.dashboard import FILES
from mlink.server.overlay import hex_colour, model_colours
from mlink.server.readers import ReaderPool

TOKEN = "dash-token"
CAMERAS = ("walkway", "room")


def _site(streams: list[dict] | None = None) -> dict:
    return {
        "site": "dashboard",
        "budget": "0.6x",
        "models": [
            {"name": "hog_people", "params": {"upscale": 1.0}, "outputs": ["person_count", "boxes"]},
            {"name": "yolox_nano", "outputs": ["object_count", "boxes"]},
        ],
        "streams": streams
        or [
            {"id": "walkway", "url": "asset://vtest", "fps": 2, "loop": True},
            {"id": "room", "url": "asset://one_by_one", "fps": 2, "loop": True},
        ],
        "links": {"profile_frames": 20},
        "scheduler": {"period_s": 3600, "batch_size": 2},
        "api": {"token": TOKEN},
    }


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium found (/usr/bin/chromium: Debian's `chromium`, installed by .ci/debian-packages)")
    return path


@pytest.fixture(scope="module")
def run(chromium: str, store: AssetStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_daemon(_site(), tmp_path_factory.mktemp("dashboard-home"), store, http=True, ready_s=300) as r:
        assert r.client is not None
        yield r


@pytest.fixture(scope="module")
def page(chromium: str, run: Running) -> Iterator[Chromium]:
    assert run.client is not None
    with Chromium(chromium) as browser:
        browser.goto(f"{run.client.base_url}/")
        yield browser


def _boxes(page: Chromium) -> list[dict]:
    return page.js(
        """[...document.querySelectorAll('figure.camera svg.overlay rect.box')].map(r => ({
            camera: r.closest('figure').dataset.camera, provenance: r.dataset.provenance, model: r.dataset.model,
            dash: getComputedStyle(r).strokeDasharray, stroke: r.getAttribute('stroke')}))"""
    )


def test_the_page_and_its_files_are_served_with_no_outside_reference(run: Running) -> None:
    assert run.client is not None
    html = run.client.get("/")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    for path, kind in (("/dashboard/app.js", "javascript"), ("/dashboard/style.css", "css")):
        r = run.client.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"] and r.content
        assert "http://" not in r.text.replace("http://www.w3.org/2000/svg", "") and "https://" not in r.text
    assert "/" not in run.client.get("/openapi.json").json()["paths"]  # a page, not part of the API


def test_reader_processes_pass_the_page_through(run: Running) -> None:
    """With ``api.read_workers`` the public port is the readers': they forward what they do not
    answer (the page and its files) to the daemon's app, bytes and content type as they are."""
    assert run.client is not None
    readers = ReaderPool(run.daemon, 1, "127.0.0.1", 0).start()
    server = uvicorn.Server(
        uvicorn.Config(create_app(run.daemon, readers=readers), uds=readers.upstream, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "the daemon's app behind the readers", every=0.1)
        with httpx.Client(base_url=f"http://127.0.0.1:{readers.port}", timeout=30) as public:
            for path in FILES:
                direct, forwarded = run.client.get(path), public.get(path)
                assert forwarded.status_code == 200 and forwarded.content == direct.content, path
                assert forwarded.headers["content-type"] == direct.headers["content-type"], path
    finally:
        server.should_exit = True
        thread.join(10)
        readers.close()


def test_the_grid_shows_every_camera_with_its_frame_and_outputs(page: Chromium) -> None:
    shown = wait_for(
        lambda: (
            set(page.js("[...document.querySelectorAll('figure.camera')].map(f => f.dataset.camera)")) >= set(CAMERAS)
            and page.js("document.querySelectorAll('figure.camera tr[data-provenance]').length") > 0
        ),
        60,
        "a tile with outputs for every camera",
        every=0.5,
    )
    assert shown
    # each camera's latest frame (snapshot.jpg?raw=1) under the drawn boxes, and its stats
    wait_for(
        lambda: (
            page.js("[...document.querySelectorAll('figure.camera img.raw')].filter(i => i.naturalWidth > 0).length")
            == len(CAMERAS)
        ),
        30,
        "every camera's frame",
        every=0.5,
    )
    stats = page.js("[...document.querySelectorAll('figure.camera .stats')].map(s => s.textContent)")
    assert all("frames/s" in s and "dropped" in s for s in stats), stats
    rows = page.js(
        "[...document.querySelectorAll('figure.camera tr[data-output]')].map(r => [r.dataset.output, r.dataset.provenance, r.cells[3].textContent])"
    )
    provenance = {out: prov for out, prov, _ in rows}
    assert provenance.get("hog_people:person_count") == "executed", rows
    assert provenance.get("yolox_nano:boxes") == "predicted", rows
    assert all(acc.endswith("%") for _, _, acc in rows), rows  # expected accuracy with every output


def test_a_predicted_output_is_drawn_differently_from_an_executed_one(page: Chromium, run: Running) -> None:
    boxes = wait_for(
        lambda: (b := _boxes(page)) and {"executed", "predicted"} <= {x["provenance"] for x in b} and b,
        60,
        "executed and predicted boxes on the grid",
        every=0.5,
    )
    executed = [b for b in boxes if b["provenance"] == "executed"]
    predicted = [b for b in boxes if b["provenance"] == "predicted"]
    assert {b["model"] for b in executed} == {"hog_people"} and {b["model"] for b in predicted} == {"yolox_nano"}
    assert all(b["dash"] == "none" for b in executed), executed  # solid
    assert all(b["dash"] not in ("", "none") for b in predicted), predicted  # dashed
    assert {b["stroke"] for b in executed}.isdisjoint({b["stroke"] for b in predicted})  # a colour per model
    assert run.client is not None  # ... the colour snapshot.jpg draws it in (server/overlay.py, /api/v1/models)
    colours = {m["name"]: m["colour"] for m in run.client.get("/api/v1/models").json()}
    assert colours == {n: hex_colour(c) for n, c in model_colours(colours).items()}
    assert all(b["stroke"] == colours[b["model"]] for b in boxes), (boxes, colours)
    assert page.js("document.getElementById('legend').textContent").count("predicted") == 1


def test_schedule_and_links_sections_fill_in(page: Chromium, run: Running) -> None:
    wait_for(
        lambda: (
            page.js("document.querySelectorAll('#memory-chart polyline').length") == 2
            and page.js("document.querySelectorAll('#heatmap td[data-accuracy]').length") > 0
            and page.js("document.querySelectorAll('#plans tbody tr').length") > 0
        ),
        30,
        "the memory chart, the heatmap and the plan history",
        every=0.5,
    )
    states = dict(
        page.js("[...document.querySelectorAll('#models tbody tr')].map(r => [r.dataset.model, r.dataset.state])")
    )
    assert states == {"hog_people": "loaded", "yolox_nano": "predicted"}, states
    assert "initial" in page.js("document.querySelector('#plans tbody tr').textContent")
    assert run.client is not None  # the plan history is the daemon's (newest first), not the page's own
    history = run.client.get("/api/v1/schedule").json()["history"]
    shown = page.js("[...document.querySelectorAll('#plans tbody tr')].map(r => Number(r.dataset.plan))")
    assert shown == [h["plan_id"] for h in reversed(history)] and history[0]["reason"] == "initial"
    # expected accuracy dashed; no rotation on this site: nothing measured, and the page says so
    legend = wait_for(
        lambda: "not measured" in (t := page.js("document.getElementById('accuracy-legend').textContent")) and t,
        30,
        "the accuracy legend with the measured figures",
        every=0.5,
    )
    assert "yolox_nano:boxes: not measured yet; the plan expects" in legend, legend
    dash = page.js("getComputedStyle(document.querySelector('#accuracy-chart [data-kind=expected]')).strokeDasharray")
    assert dash not in ("", "none") and not page.js(
        "document.querySelectorAll('#accuracy-chart [data-kind=measured]').length"
    )
    assert "next re-selection in" in page.js("document.getElementById('reselect').textContent")


def test_a_bad_reload_shows_its_errors_in_place_and_changes_nothing(page: Chromium, run: Running) -> None:
    # a wrong token is refused in place
    page.js("document.getElementById('reload-token').value = 'wrong'; document.getElementById('reload-file').click()")
    wait_for(
        lambda: page.js("document.getElementById('reload-result').textContent").startswith("401"),
        30,
        "the refused token",
        every=0.2,
    )
    # an invalid config: each error with its path, in the page (left there for the screenshot)
    bad = yaml.safe_dump(
        _site([{"id": "walkway", "url": "asset://vtest", "fps": 2}, {"id": "x y", "url": "asset://vtest", "fps": -1}])
    )
    page.js(
        f"""(() => {{
            document.getElementById('reload-config').value = {json.dumps(bad)};
            document.getElementById('reload-token').value = {json.dumps(TOKEN)};
            document.getElementById('reload-apply').click();
        }})()"""
    )
    paths = wait_for(
        lambda: page.js("[...document.querySelectorAll('#reload-result li.reload-error')].map(li => li.dataset.path)"),
        30,
        "the reload's validation errors in the page",
        every=0.2,
    )
    assert {"streams.1.id", "streams.1.fps"} <= set(paths), paths
    assert page.js("document.getElementById('reload-result').textContent").startswith("400")
    assert page.js("document.getElementById('reload-config').getAttribute('aria-invalid')") == "true"
    assert [s.id for s in run.daemon.cfg.streams] == list(CAMERAS)


def test_screenshot_of_what_an_operator_sees(page: Chromium, tmp_path: Path) -> None:
    """Last: by now every section has filled in. Also fails on any script error the page logged."""
    wait_for(
        lambda: page.js("document.querySelector('#memory-chart polyline').points.length") >= 6,
        30,
        "a few samples on the memory chart",
        every=0.5,
    )
    out = Path(os.environ.get("MLINK_TEST_ARTEFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    shot = page.screenshot(out / "dashboard.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"dashboard screenshot: {shot}")
    if os.environ.get("MLINK_DASHBOARD_PNG"):  # a second copy where asked (e.g. for a closing note)
        shutil.copy(shot, os.environ["MLINK_DASHBOARD_PNG"])
    assert page.console_errors() == []
