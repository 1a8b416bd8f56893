"""The ONNX/OpenCV detectors of the zoo (yolox_nano, hog_people, centerface) on real frames.

Each model is loaded once per module; every check runs the real weights on frames of the sample
videos (vtest: campus walkways, 4-7 people a frame; market_street: a busy 1906 street; Megamind:
animated faces). Nothing is mocked.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from mlink.models.assets import AssetError, AssetStore
from mlink.models.base import BlackBoxModel, ModelError
from mlink.models.catalog import create_model, model_info, zoo
from mlink.models.detections import COCO_OUTPUTS, MAX_BOXES
from mlink.models.placement import Placement, forget_placements, latest_placement
from mlink.models.spec import box_f1, box_iou
from mlink.models.zoo.centerface import CenterFace, dynamicize
from mlink.models.zoo.centerface import decode as centerface_decode
from mlink.models.zoo.yolox_nano import INPUT_SIZE, PAD_VALUE, letterbox
from mlink.models.zoo.yolox_nano import decode as yolox_decode

DETECTORS = ("yolox_nano", "hog_people", "centerface")


# -- fixtures: each model loaded once, its outputs on the sample frames computed once -----------
@pytest.fixture(scope="module")
def yolox(store: AssetStore) -> BlackBoxModel:
    model = create_model("yolox_nano", store=store)
    model.load("cpu")
    yield model
    model.unload()


@pytest.fixture(scope="module")
def hog(store: AssetStore) -> BlackBoxModel:
    model = create_model("hog_people", store=store)
    model.load("cpu")
    yield model
    model.unload()


@pytest.fixture(scope="module")
def centerface(store: AssetStore) -> BlackBoxModel:
    model = create_model("centerface", store=store)
    model.load("cpu")
    yield model
    model.unload()


@pytest.fixture(scope="module")
def yolox_vtest(yolox, vtest_frames):
    return yolox.infer(vtest_frames)


@pytest.fixture(scope="module")
def hog_vtest(hog, vtest_frames):
    return hog.infer(vtest_frames)


@pytest.fixture(scope="module")
def centerface_megamind(centerface, megamind_frames):
    return centerface.infer(megamind_frames)


def counts(outputs, key: str) -> list[int]:
    return [int(out[key][0]) for out in outputs]


def assert_well_formed_boxes(boxes: np.ndarray, min_score: float = 0.0) -> None:
    """Normalised, non-degenerate boxes with scores in [min_score, 1], by descending score."""
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 5
    assert len(boxes) <= MAX_BOXES
    if len(boxes) == 0:
        return
    assert np.all((boxes[:, :4] >= 0) & (boxes[:, :4] <= 1))
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    assert np.all((boxes[:, 4] >= min_score) & (boxes[:, 4] <= 1))
    assert np.all(np.diff(boxes[:, 4]) <= 0), "boxes must be ordered by descending score"


# -- registry ------------------------------------------------------------------------------
def test_registry_declares_the_three_detectors():
    names = zoo()
    for name in DETECTORS:
        assert name in names
    yolox = model_info("yolox_nano")
    assert (yolox.backend, yolox.task, yolox.assets, yolox.primary) == (
        "onnxruntime",
        "detection",
        ("yolox_nano",),
        "person_count",
    )
    assert yolox.outputs == COCO_OUTPUTS
    hog = model_info("hog_people")
    assert (hog.backend, hog.task, hog.assets, hog.primary) == ("opencv", "person_detection", (), "person_count")
    assert [s.name for s in hog.outputs] == ["person_count", "boxes"]
    face = model_info("centerface")
    assert (face.backend, face.task, face.assets, face.primary) == (
        "onnxruntime",
        "face_detection",
        ("centerface",),
        "face_count",
    )
    assert [s.name for s in face.outputs] == ["face_count", "boxes"]
    for name in DETECTORS:
        assert model_info(name).pretrained_note == ""  # all three run real pretrained detectors


# -- yolox_nano ----------------------------------------------------------------------------
def test_letterbox_is_yolox_preproc():
    frame = np.full((100, 200, 3), 7, dtype=np.uint8)
    blob, ratio = letterbox(frame)
    assert blob.shape == (1, 3, INPUT_SIZE, INPUT_SIZE) and blob.dtype == np.float32
    assert ratio == pytest.approx(INPUT_SIZE / 200)
    assert np.all(blob[0, :, :208, :] == 7)  # the image, top-left, raw 0..255 values
    assert np.all(blob[0, :, 208:, :] == PAD_VALUE)  # padding below it


def test_yolox_counts_people_and_cars_on_vtest(yolox_vtest):
    persons = counts(yolox_vtest, "person_count")
    vehicles = counts(yolox_vtest, "vehicle_count")
    objects = counts(yolox_vtest, "object_count")
    assert all(3 <= n <= 12 for n in persons), persons
    # Parked cars and a van at the top right of every frame.
    assert all(1 <= n <= 6 for n in vehicles), vehicles
    for out, p, v, o in zip(yolox_vtest, persons, vehicles, objects):
        assert o >= p + v
        assert len(out["boxes"]) == o  # one box per counted object (well under MAX_BOXES here)
        assert_well_formed_boxes(out["boxes"], min_score=0.3)


def test_yolox_sees_a_crowd_on_market_street(yolox, market_frames):
    persons = counts(yolox.infer(market_frames), "person_count")
    assert np.median(persons) >= 4, persons


def test_yolox_boxes_map_back_to_the_frame(yolox, vtest_frames, yolox_vtest):
    # The same scene at half the size must give the same normalised boxes: the letterbox ratio
    # is undone correctly whatever the frame size.
    half = [cv2.resize(f, (f.shape[1] // 2, f.shape[0] // 2), interpolation=cv2.INTER_AREA) for f in vtest_frames]
    f1 = [box_f1(a["boxes"], b["boxes"]) for a, b in zip(yolox_vtest, yolox.infer(half))]
    assert np.mean(f1) >= 0.8, f1


def test_yolox_thresholds_change_the_output(store, vtest_frames, yolox_vtest):
    strict = create_model("yolox_nano", store=store, score_threshold=0.7, threads=1)
    strict.load()
    assert strict._session.get_session_options().intra_op_num_threads == 1
    outs = strict.infer(vtest_frames[:3])
    for a, b in zip(outs, yolox_vtest[:3]):
        assert int(a["object_count"][0]) < int(b["object_count"][0])
        assert_well_formed_boxes(a["boxes"], min_score=0.7)


def test_yolox_decode_rejects_a_foreign_output():
    with pytest.raises(ModelError, match="unexpected output shape"):
        yolox_decode(np.zeros((100, 85), np.float32), 1.0, 0.3, 0.45)


def test_yolox_on_cuda_reports_where_it_runs(store, caplog):
    """On a CPU host (no CUDA provider) the model loads on the CPU and says so, in its fields, the
    remembered placement and one warning; on a CUDA host with onnxruntime-gpu it runs on CUDA."""
    import onnxruntime as ort

    forget_placements()
    with caplog.at_level(logging.WARNING):
        model = create_model("yolox_nano", store=store)
        model.load("cuda")
        again = create_model("yolox_nano", store=store)
        again.load("cuda")
    providers = model._session.get_providers()
    if "CUDAExecutionProvider" in ort.get_available_providers() and providers[0] == "CUDAExecutionProvider":
        assert (model.executes_on, model.fallback) == ("cuda", None)
    else:
        assert providers == ["CPUExecutionProvider"]
        assert model.executes_on == "cpu" and "mlink[gpu]" in (model.fallback or "")
        assert model.placement == Placement("cuda", "cpu", model.fallback)
        assert latest_placement("yolox_nano", "cuda") == model.placement
        warnings = [r.getMessage() for r in caplog.records if "runs on cpu" in r.getMessage()]
        assert len(warnings) == 1 and "yolox_nano" in warnings[0]  # once, not at every load
        out = model.infer([np.zeros((64, 64, 3), np.uint8)])[0]  # it serves all the same
        assert out["person_count"].shape == (1,)
    assert latest_placement("yolox_nano", "cpu") is None or latest_placement("yolox_nano", "cpu").fallback is None
    model.unload()
    again.unload()
    assert latest_placement("yolox_nano", "cuda") is not None  # remembered across unloads


# -- hog_people ----------------------------------------------------------------------------
def test_hog_counts_people_on_vtest(hog_vtest):
    persons = counts(hog_vtest, "person_count")
    assert all(1 <= n <= 12 for n in persons), persons
    assert 2.5 <= np.mean(persons) <= 12, persons
    for out in hog_vtest:
        assert len(out["boxes"]) == int(out["person_count"][0])
        assert_well_formed_boxes(out["boxes"])
        assert np.all(out["boxes"][:, 4] < 1)


def test_hog_boxes_are_people_yolox_also_sees(hog_vtest, yolox, vtest_frames):
    # An independent detector as the reference: HOG's boxes should sit on YOLOX's persons.
    matched = total = 0
    for frame, out in zip(vtest_frames, hog_vtest):
        h, w = frame.shape[:2]
        blob, ratio = letterbox(frame)
        raw = yolox._session.run(None, {yolox._input: blob})[0][0]
        boxes, _, classes = yolox_decode(raw, ratio, 0.3, 0.45)
        persons = boxes[classes == 0] / np.array([w, h, w, h], dtype=np.float32)
        iou = box_iou(out["boxes"], persons)
        total += len(out["boxes"])
        matched += int(np.sum(iou.max(axis=1) >= 0.3)) if iou.size else 0
    assert total > 0 and matched / total >= 0.8, (matched, total)


def test_hog_resize_params(store):
    model = create_model("hog_people", store=store, upscale=1.0, max_width=640)
    assert model.factor(768) == pytest.approx(640 / 768)
    assert model.factor(320) == 1.0
    assert create_model("hog_people", store=store).factor(768) == pytest.approx(1.25)
    model.load()
    out = model.infer([np.zeros((40, 30, 3), np.uint8)])[0]  # smaller than the 64x128 window
    assert out["person_count"][0] == 0 and out["boxes"].shape == (0, 5)


def test_hog_on_cuda_runs_on_the_cpu(store, vtest_frames, hog_vtest, caplog):
    forget_placements()
    model = create_model("hog_people", store=store)
    with caplog.at_level(logging.WARNING):
        model.load("cuda:0")
    assert any("runs on the CPU" in r.getMessage() for r in caplog.records)
    assert model.executes_on == "cpu" and "HOG runs on the CPU" in (model.fallback or "")
    assert latest_placement("hog_people", "cuda:0") == Placement("cuda:0", "cpu", model.fallback)
    out = model.infer(vtest_frames[:1])[0]
    np.testing.assert_array_equal(out["boxes"], hog_vtest[0]["boxes"])


# -- centerface ----------------------------------------------------------------------------
def test_centerface_finds_faces_on_megamind(centerface_megamind, megamind_frames):
    faces = counts(centerface_megamind, "face_count")
    assert sum(n >= 1 for n in faces) >= len(faces) - 1, faces
    assert max(faces) <= 5, faces
    for frame, out in zip(megamind_frames, centerface_megamind):
        boxes = out["boxes"]
        assert len(boxes) == int(out["face_count"][0])
        assert_well_formed_boxes(boxes, min_score=0.5)
        h, w = frame.shape[:2]
        px = boxes[:, :4] * np.array([w, h, w, h], dtype=np.float32)
        bw, bh = px[:, 2] - px[:, 0], px[:, 3] - px[:, 1]
        assert np.all(bw >= 10) and np.all(bw <= w / 2)  # a face, not the frame
        assert np.all((bh / bw >= 0.8) & (bh / bw <= 2.5))  # face-shaped: a bit taller than wide


def test_centerface_is_stable_at_a_smaller_input(store, megamind_frames, centerface_megamind):
    small = CenterFace(store=store, input_size=480)
    assert small.network_size(720, 528) == (480, 352)
    assert CenterFace(store=store).network_size(720, 528) == (736, 544)
    small.load()
    f1 = [box_f1(a["boxes"], b["boxes"]) for a, b in zip(small.infer(megamind_frames), centerface_megamind)]
    assert np.mean(f1) >= 0.6, f1


def test_centerface_decode_keeps_boxes_inside_the_input():
    h = w = 16  # a 64x64 input at stride 4
    heatmap = np.zeros((1, h, w), np.float32)
    heatmap[0, 0, 0] = 0.9  # a face centred at the top-left corner ...
    heatmap[0, 15, 15] = 0.8  # ... and one at the bottom-right, both reaching past the input
    heatmap[0, 8, 8] = 0.4  # below the threshold
    scale = np.full((2, h, w), np.log(5.0), np.float32)  # 20 px boxes
    offset = np.zeros((2, h, w), np.float32)
    boxes, scores = centerface_decode(heatmap, scale, offset, (64, 64), 0.5, 0.3)
    assert scores.tolist() == pytest.approx([0.9, 0.8])
    assert np.all(boxes >= 0) and np.all(boxes <= 64)
    np.testing.assert_allclose(boxes, [[0, 0, 20, 20], [52, 52, 64, 64]])
    # Two overlapping peaks of one face collapse to the stronger one.
    heatmap[0, 0, 1] = 0.95
    boxes, scores = centerface_decode(heatmap, scale, offset, (64, 64), 0.5, 0.3)
    assert scores.tolist() == pytest.approx([0.95, 0.8])


def test_dynamicize_names_a_missing_tensor(store):
    with pytest.raises(ValueError, match="nope"):
        dynamicize(store.path("centerface").read_bytes(), {"nope": ("B", 3, "H", "W")})


# -- common contract -----------------------------------------------------------------------
@pytest.mark.parametrize("name", DETECTORS)
def test_outputs_match_specs(name, request, vtest_frames):
    model = request.getfixturevalue({"yolox_nano": "yolox", "hog_people": "hog", "centerface": "centerface"}[name])
    out = model.infer(vtest_frames[:1])[0]
    specs = {s.name: s for s in model.outputs}
    assert set(out) == set(specs)
    for key, value in out.items():
        assert value.dtype == np.float32
        specs[key].check(value)
    derived = model.derived(out)
    assert derived[model.primary]["count"] == int(out[model.primary][0])


@pytest.mark.parametrize("name", DETECTORS)
def test_infer_before_load_raises(name, store, vtest_frames):
    with pytest.raises(ModelError, match="before load"):
        create_model(name, store=store).infer(vtest_frames[:1])


@pytest.mark.parametrize("name", DETECTORS)
def test_load_unload_load_again(name, store, vtest_frames):
    model = create_model(name, store=store)
    model.load()
    first = model.infer(vtest_frames[:1])[0]
    model.unload()
    assert not model.loaded
    with pytest.raises(ModelError):
        model.infer(vtest_frames[:1])
    model.load()
    again = model.infer(vtest_frames[:1])[0]
    for key in first:
        np.testing.assert_allclose(again[key], first[key], atol=1e-5)


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros((64, 64, 3), np.float32),  # wrong dtype
        np.zeros((64, 64), np.uint8),  # grayscale
        np.zeros((64, 64, 4), np.uint8),  # BGRA
        [[0, 0, 0]],  # not an array
    ],
    ids=["float32", "gray", "bgra", "list"],
)
@pytest.mark.parametrize("name", DETECTORS)
def test_bad_frame_raises(name, frame, request):
    model = request.getfixturevalue({"yolox_nano": "yolox", "hog_people": "hog", "centerface": "centerface"}[name])
    with pytest.raises(ModelError, match="uint8 BGR"):
        model.infer([frame])


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("yolox_nano", {"score_threshold": 1.5}, "score_threshold"),
        ("yolox_nano", {"threads": -1}, "threads"),
        ("centerface", {"gpu_mem_limit": -1}, "gpu_mem_limit"),
        ("hog_people", {"win_stride": (8,)}, "win_stride"),
        ("hog_people", {"max_width": 10}, "max_width"),
        ("centerface", {"input_size": 8}, "input_size"),
        ("centerface", {"nms_threshold": "high"}, "nms_threshold"),
    ],
)
def test_bad_params_are_refused(name, params, match, store):
    with pytest.raises(ModelError, match=match):
        create_model(name, store=store, **params)


@pytest.mark.parametrize("name", DETECTORS)
def test_unknown_device_is_refused(name, store):
    with pytest.raises(ModelError, match="unknown device"):
        create_model(name, store=store).load("tpu")


def test_corrupt_weights_are_refused(tmp_path: Path, store: AssetStore):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    good = store.path("yolox_nano")
    bad = mirror / good.name
    shutil.copyfile(good, bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # same size, different bytes
    bad.write_bytes(bytes(data))
    corrupt_store = AssetStore(home=tmp_path / "home", mirror=mirror, offline=True)
    model = create_model("yolox_nano", store=corrupt_store)
    with pytest.raises(ModelError) as excinfo:
        model.load()
    assert isinstance(excinfo.value.__cause__, AssetError)
    assert "yolox_nano.onnx" in str(excinfo.value) and "corrupt" in str(excinfo.value)
    assert not model.loaded
    assert not corrupt_store.cached_path("yolox_nano").exists()  # never handed out nor kept
