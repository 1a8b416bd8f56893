"""Snapshots (issue 15 item 2): a camera's latest frame with its outputs drawn, over HTTP.

The drawing is checked on a real frame: executed boxes solid, predicted ones dashed, a colour
per model. The route is checked against a real daemon on real video (two detectors, one of
them predicted under the budget) served as ``mlink serve`` serves it with ``api.read_workers``:
a real reader process on the public port forwards the route to the daemon's app over its unix
socket, and the JPEG must come through intact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import cv2
import httpx
import numpy as np
import pytest
import yaml
from daemons import app_behind_readers, running_daemon  # tests/daemons.py
from fastapi.testclient import TestClient
from waiting import wait_for  # tests/waiting.py

from mlink.configs.load import parse_config
from mlink.models.assets import AssetStore
from mlink.models.catalog import zoo_catalog
from mlink.scheduler.frame import FrameRecord
from mlink.scheduler.serving import FrameResult
from mlink.server.api import create_app
from mlink.server.daemon import Daemon
from mlink.server.latest_frames import LatestFrames, latest_frames
from mlink.server.overlay import PALETTE, draw, legend_lines, model_colours
from mlink.server.result_listeners import ResultListeners

EXECUTED = [0.55, 0.55, 0.9, 0.95]  # away from the legend in the top-left corner
PREDICTED = [0.1, 0.6, 0.45, 0.95]


def _result(**extra: object) -> dict:
    return {
        "camera": "walkway",
        "frame_index": 7,
        "plan_id": 2,
        "executed": ["hog_people"],
        "missing": {},
        "revision": 0,
        "outputs": {
            "hog_people:boxes": {
                "provenance": "executed",
                "value": [{"box": EXECUTED, "score": 0.9}],
                "expected_accuracy": 1.0,
            },
            "hog_people:person_count": {
                "provenance": "executed",
                "value": {"count": 1, "value": 1.2},
                "expected_accuracy": 1.0,
            },
            "yolox_nano:boxes": {
                "provenance": "predicted",
                "sources": ["hog_people"],
                "value": [{"box": PREDICTED, "score": 0.4}],
                "expected_accuracy": 0.61,
            },
        },
        **extra,
    }


def _top_edge(image: np.ndarray, box: list[float]) -> tuple[np.ndarray, slice]:
    """The pixels along a box's top edge (corners left out), and the columns they span."""
    h, w = image.shape[:2]
    y = round(box[1] * (h - 1))
    cols = slice(round(box[0] * (w - 1)) + 4, round(box[2] * (w - 1)) - 4)
    return image[y, cols].astype(int), cols


def _near(pixels: np.ndarray, colour: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    return np.all(np.abs(pixels - np.array(colour)) <= tol, axis=-1)


def test_executed_boxes_are_solid_predicted_dashed_one_colour_per_model(vtest_frames: list[np.ndarray]) -> None:
    frame = vtest_frames[0]
    before = frame.copy()
    drawn = draw(frame, _result())
    assert np.array_equal(frame, before), "draw leaves its input alone"
    colours = model_colours(["hog_people", "yolox_nano"])
    assert colours["hog_people"] != colours["yolox_nano"]

    solid, _ = _top_edge(drawn, EXECUTED)
    assert _near(solid, colours["hog_people"]).mean() > 0.95  # one unbroken line of the model's colour

    dashed, cols = _top_edge(drawn, PREDICTED)
    on = _near(dashed, colours["yolox_nano"])
    assert 0.35 < on.mean() < 0.85, on.mean()  # dashes and gaps
    assert int(np.sum(np.diff(on.astype(int)) == 1)) >= 4, "several separate dashes"
    y = round(PREDICTED[1] * (frame.shape[0] - 1))
    gaps = ~on & np.all(drawn[y, cols] == frame[y, cols], axis=-1)
    assert gaps.sum() >= 10, "the video shows through the gaps"
    assert not _near(dashed, colours["hog_people"]).any(), "each model in its own colour"


def test_the_legend_says_provenance_value_and_accuracy(vtest_frames: list[np.ndarray]) -> None:
    lines = dict(legend_lines(_result(revision=1)))
    assert "walkway  frame 7  plan 2  revised x1" in lines
    assert lines["yolox_nano:boxes: 1 box  predicted from hog_people  acc 0.61"] == "yolox_nano"
    assert lines["hog_people:person_count: count 1  executed  acc 1.00"] == "hog_people"
    reused = _result()
    reused["outputs"]["yolox_nano:boxes"].update(sources=["temporal:0.5s"], temporal={"frame_index": 5})
    assert "yolox_nano:boxes: 1 box  reused 0.5s  acc 0.61" in dict(legend_lines(reused))
    frame = vtest_frames[0]
    drawn = draw(frame, _result())
    assert not np.array_equal(drawn[:20, :200], frame[:20, :200]), "the legend is drawn top left"
    assert np.array_equal(draw(frame, None), frame)


def test_colours_are_stable_and_distinct() -> None:
    names = [f"model_{i}" for i in range(len(PALETTE))]
    colours = model_colours(names)
    assert len(set(colours.values())) == len(PALETTE)
    assert model_colours(reversed(names)) == colours


def _record(camera: str, index: int, image: np.ndarray) -> FrameResult:
    return FrameResult(FrameRecord(camera, index, index / 4, 1000.0 + index, image), plan_id=1, outputs={})


def test_one_frame_per_camera_encoded_once_dropped_on_removal(vtest_frames: list[np.ndarray]) -> None:
    frames = LatestFrames(["a", "b"], max_width=384)
    for i, image in enumerate(vtest_frames * 4):  # 32 frames of two cameras, plus one of an unknown camera
        results = [_record("a", i, image), _record("b", i, image), _record("gone", i, image)]
        frames.on_results(results, [r.to_json() for r in results])
    assert sorted(frames.cameras()) == ["a", "b"]
    held = frames.held("a")
    assert held is not None and held.index == 31
    frames.on_results([_record("a", 3, vtest_frames[0])], [{"revision": 1}])  # an older frame's revision
    assert frames.held("a") is held
    first = frames.jpeg("a")
    assert first is not None and frames.jpeg("a") is first and frames.encodes == 1  # cached
    image = cv2.imdecode(np.frombuffer(first, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[1] == 384 and image.shape[0] == round(384 * 576 / 768)  # scaled to max_width
    frames.retain(["b"])
    assert frames.cameras() == ["b"] and frames.jpeg("a") is None


def test_a_failing_result_listener_is_skipped(vtest_frames: list[np.ndarray], caplog: pytest.LogCaptureFixture) -> None:
    listeners, heard = ResultListeners(), []

    def broken(results: object, stored: object) -> None:
        raise RuntimeError("listener bug")

    listeners.add(broken)
    listeners.add(lambda results, stored: heard.append(len(results)))
    batch = [_record("a", 0, vtest_frames[0])]
    listeners(batch, [r.to_json() for r in batch])
    assert heard == [1] and "listener bug" in caplog.text
    listeners.remove(broken)
    listeners(batch, [r.to_json() for r in batch])
    assert heard == [1, 1] and len(caplog.records) == 1


# -- a real daemon behind a real reader process --------------------------------------------

SITE = {
    "site": "snapshots",
    "budget": "0.6x",
    "models": [
        {"name": "hog_people", "params": {"upscale": 1.0}, "outputs": ["person_count", "boxes"]},
        {"name": "yolox_nano", "outputs": ["boxes"]},
    ],
    "streams": [{"id": "walkway", "url": "asset://vtest", "fps": 4, "loop": True}],
    "links": {"profile_frames": 20},
    "scheduler": {"period_s": 3600, "batch_size": 2},
}


@pytest.fixture(scope="module")
def served(store: AssetStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, httpx.Client]]:
    with running_daemon(SITE, tmp_path_factory.mktemp("snapshots-home"), store) as run:
        daemon = run.daemon
        assert daemon.cfg.api.read_workers >= 1, "the default serves through reader processes"
        with (
            app_behind_readers(daemon) as readers,
            httpx.Client(base_url=f"http://127.0.0.1:{readers.port}", timeout=30) as client,
        ):
            yield daemon, client


def _jpeg(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert int(r.headers["content-length"]) == len(r.content)
    image = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "the bytes are a whole JPEG"
    return image


def _same_frame(daemon: Daemon, client: httpx.Client) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """The held frame's result, and that frame drawn and raw (None while the frame changed
    between the requests, or its result has no box to compare)."""
    held = latest_frames(daemon).held("walkway")
    if held is None or not any(isinstance(o["value"], list) and o["value"] for o in held.result["outputs"].values()):
        return None
    url = "/api/v1/cameras/walkway/snapshot.jpg"
    a, b = client.get(url), client.get(url, params={"raw": 1})
    if not a.headers.get("x-mlink-frame-index") == b.headers.get("x-mlink-frame-index") == str(held.index):
        return None
    return held.result, _jpeg(a), _jpeg(b)


def test_snapshot_through_the_reader_has_the_outputs_drawn(served: tuple[Daemon, httpx.Client]) -> None:
    daemon, client = served
    url = "/api/v1/cameras/walkway/snapshot.jpg"
    r = wait_for(lambda: (got := client.get(url)).status_code == 200 and got, 60, "a snapshot", every=0.2)
    assert "x-mlink-served-by" not in r.headers  # the daemon's answer, forwarded
    result, drawn, raw = wait_for(lambda: _same_frame(daemon, client), 60, "a frame with boxes", every=0.2)
    assert drawn.shape == raw.shape == (576, 768, 3)  # vtest.avi's frames, whole (under the 960 px cap)
    boxes = {o["provenance"] for o in result["outputs"].values() if isinstance(o["value"], list)}
    assert boxes == {"executed", "predicted"}, "the budget holds one detector: the other's boxes are predicted"
    if os.environ.get("MLINK_TEST_ARTEFACTS"):  # to look at what an operator sees
        cv2.imwrite(os.path.join(os.environ["MLINK_TEST_ARTEFACTS"], "snapshot.jpg"), drawn)
    changed = np.abs(drawn.astype(int) - raw.astype(int)).max(axis=-1) > 30  # JPEG noise stays under
    assert changed[:30, :200].mean() > 0.05, "the legend is drawn"
    h, w = raw.shape[:2]
    for node, out in result["outputs"].items():
        for b in out["value"] if isinstance(out["value"], list) else ():
            x1, y1, x2, _ = (round(v * (d - 1)) for v, d in zip(b["box"], (w, h, w, h)))
            if y1 < 40 or x2 - x1 < 20:  # under the legend, or too narrow to tell
                continue
            edge = changed[max(y1 - 1, 0) : y1 + 2, x1 + 3 : x2 - 3].any(axis=0)
            assert edge.mean() > 0.3, (node, b)  # its top edge is drawn (dashed: at least the dashes)


def test_one_entry_per_camera_and_a_removed_camera_is_dropped(served: tuple[Daemon, httpx.Client]) -> None:
    daemon, client = served
    frames = latest_frames(daemon)
    start = daemon.frames_total["walkway"]
    wait_for(lambda: daemon.frames_total["walkway"] >= start + 12, 60, "a dozen more frames")
    assert frames.cameras() == ["walkway"]
    site = {**SITE, "streams": [*SITE["streams"], {"id": "room", "url": "asset://one_by_one", "fps": 2, "loop": True}]}
    assert daemon.reload(parse_config(yaml.safe_dump(site), catalog=zoo_catalog())).ok
    wait_for(lambda: client.get("/api/v1/cameras/room/snapshot.jpg").status_code == 200, 60, "a room snapshot")
    assert sorted(frames.cameras()) == ["room", "walkway"]
    assert daemon.reload(parse_config(yaml.safe_dump(SITE), catalog=zoo_catalog())).ok
    assert frames.cameras() == ["walkway"]
    r = client.get("/api/v1/cameras/room/snapshot.jpg")
    assert r.status_code == 404 and r.json()["error"] == "no camera 'room'"


def test_unknown_camera_and_bad_query(served: tuple[Daemon, httpx.Client]) -> None:
    _, client = served
    r = client.get("/api/v1/cameras/nope/snapshot.jpg")
    assert r.status_code == 404 and r.json()["error"] == "no camera 'nope'" and r.json()["cameras"] == ["walkway"]
    r = client.get("/api/v1/cameras/walkway/snapshot.jpg", params={"raw": "maybe"})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "query.raw"
    codes = client.get("/openapi.json").json()["paths"]["/api/v1/cameras/{camera_id}/snapshot.jpg"]["get"]["responses"]
    assert {"200", "404", "422"} <= set(codes) and "image/jpeg" in codes["200"]["content"]


def test_no_frame_yet_is_a_404_that_says_so(store: AssetStore) -> None:
    daemon = Daemon(parse_config(yaml.safe_dump(SITE), catalog=zoo_catalog()), None, store, progress=False)
    with TestClient(create_app(daemon)) as client:  # not started: nothing served
        r = client.get("/api/v1/cameras/walkway/snapshot.jpg")
    assert r.status_code == 404 and r.json() == {"error": "no frame of camera 'walkway' served yet"}
