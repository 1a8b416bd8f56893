"""The torch zoo adapters on real frames: mobilenet_v2, efficientnet_lite0, torchvision detectors.

The classifiers load their real weights offline (mirror / installed package). The torchvision
detectors' official weights are not on every machine: here they run with
``allow_random_weights=True`` (shapes and memory only), and their strict-load path is checked
with a checkpoint of the official format (FrozenBatchNorm2d keys, as torchvision saves them)
written to a temporary mirror.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models.detection as tvd

from mlink.models.assets import AssetStore, sha256_of
from mlink.models.base import ModelError
from mlink.models.catalog import create_model, model_info, zoo
from mlink.models.detections import COCO_CLASSES, MAX_BOXES
from mlink.models.spec import Task
from mlink.models.zoo._torch import IMAGENET_CATEGORIES
from mlink.models.zoo.torchvision_detectors import COCO_LABEL_MAP, TV_COCO_CATEGORIES
from mlink.server.frames import read_frames

CLASSIFIERS = ("mobilenet_v2", "efficientnet_lite0")
DETECTORS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large", "keypointrcnn_resnet50_fpn")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # On a small shared CPU, torch's spinning worker threads make a contended run several
    # times slower (108 s with 2 threads vs 21 s with 1, measured); one thread is robust.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def top5(p: np.ndarray) -> set[int]:
    return {int(i) for i in np.argsort(-p)[:5]}


# -- classifiers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifiers(store):
    models = {}
    for name in CLASSIFIERS:
        m = create_model(name, store=store)
        m.load()
        models[name] = m
    yield models
    for m in models.values():
        m.unload()


CLIP = 16  # frames per video for the statistical checks below
STEP = 2  # neighbours are STEP frames apart in a clip: vtest 0.5 s, market-street 1 s


@pytest.fixture(scope="module")
def clips(store) -> dict[str, list[np.ndarray]]:
    """CLIP frames per video at twice the rate of ``vtest_frames`` / ``market_frames``, over the
    same stretch (every other frame is theirs): vtest 0.25 s apart, market-street 0.5 s apart."""
    return {
        video: [f.image for f in read_frames(str(store.path(asset)), sample_fps=fps, max_frames=CLIP)]
        for video, asset, fps in (("vtest", "vtest", 4.0), ("market", "market_street", 2.0))
    }


@pytest.fixture(scope="module")
def class_probs(classifiers, clips):
    """(model, video) -> (CLIP, 1000) probabilities on that video's clip."""
    return {
        (name, video): np.stack([o["probs"] for o in m.infer(frames)])
        for name, m in classifiers.items()
        for video, frames in clips.items()
    }


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_info(name):
    info = model_info(name)
    assert name in zoo()
    assert (info.backend, info.task, info.primary, info.assets) == ("torch", "classification", "probs", (name,))
    (spec,) = info.outputs
    assert (spec.name, spec.kind, spec.dim, spec.task) == ("probs", "vector", 1000, Task.CLASS)
    assert spec.labels == IMAGENET_CATEGORIES
    assert spec.labels[0] == "tench" and spec.labels[954] == "banana" and spec.labels[829] == "streetcar"
    assert info.pretrained_note == ""


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("video", ["vtest", "market"])
def test_classifier_probs_are_distributions(class_probs, name, video):
    p = class_probs[name, video]
    assert p.shape == (CLIP, 1000) and p.dtype == np.float32
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-4)
    # Real weights on real frames: far from uniform (1e-3), and not all frames alike.
    assert p.max(axis=1).min() > 0.05
    assert not np.allclose(p[0], p[-1])


# The thresholds below are set against chance, with room for a few near-ties to flip on another
# CPU or library build. For unrelated outputs (top-5 sets drawn at random from 1000 classes): a
# frame's top-1 is in another frame's top-5 with p = 0.005 (both ways: 2.5e-5), two top-1s agree
# with p = 0.001, two top-5 sets share at least one class with p = 0.025 and at least two with
# p = 2e-4, and they share 0.025 classes on average. Reaching the thresholds by chance is below
# 1e-16 (binomial tails); the models clear them with 2 to 4 pairs or frames to spare (seen on the
# clips here: held 13-14 of 14, mean overlap 3.2-4.3, market top-1 agreeing on 10-14 of 14, the
# two models sharing a class on 16 of 16 frames and two on 12-15).


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_stable_over_neighbouring_frames(class_probs, name):
    for video in ("vtest", "market"):
        p = class_probs[name, video]
        top1 = p.argmax(axis=1)
        t5 = [top5(row) for row in p]
        pairs = range(len(p) - STEP)  # 14 neighbour pairs
        # On vtest the top-1 flips between near-tied labels (pole / swing / flagpole), so the
        # robust form of stability: each frame's top-1 is in its neighbour's top-5, both ways,
        # on at least 3/4 of the pairs.
        held = sum(top1[k] in t5[k + STEP] and top1[k + STEP] in t5[k] for k in pairs)
        assert held >= 0.75 * len(pairs), (name, video, held)
        # Neighbours share half their top-5 on average (chance: 0.025 classes).
        assert np.mean([len(t5[k] & t5[k + STEP]) for k in pairs]) >= 2.5
    # The street clip reads as one scene: the exact top-1 agrees on most (over half) neighbour pairs.
    top1 = class_probs[name, "market"].argmax(axis=1)
    pairs = range(len(top1) - STEP)
    assert sum(top1[k] == top1[k + STEP] for k in pairs) > 0.5 * len(pairs)
    # And the two videos read differently: neighbours agree far more than cross-video pairs.
    v, m = class_probs[name, "vtest"], class_probs[name, "market"]
    cross = np.mean([len(top5(a) & top5(b)) for a in v for b in m])
    assert cross < 1.0


def test_classifiers_agree_on_top5(class_probs):
    for video in ("vtest", "market"):
        a, b = class_probs["mobilenet_v2", video], class_probs["efficientnet_lite0", video]
        overlaps = [len(top5(x) & top5(y)) for x, y in zip(a, b)]
        # Random top-5 sets share a class on 2.5% of frames and two classes on 0.02%: here on at
        # least 3/4 and half of the frames.
        assert sum(o >= 1 for o in overlaps) >= 0.75 * len(overlaps), (video, overlaps)
        assert sum(o >= 2 for o in overlaps) >= 0.5 * len(overlaps), (video, overlaps)


def test_classifier_batch_equals_single(classifiers, class_probs, clips):
    m = classifiers["mobilenet_v2"]
    single = m.infer([clips["market"][3]])[0]["probs"]
    np.testing.assert_allclose(single, class_probs["mobilenet_v2", "market"][3], atol=1e-5)
    # Mixed frame sizes in one batch (768x576 and 640x360) are fine.
    mixed = m.infer([clips["vtest"][0], clips["market"][0]])
    np.testing.assert_allclose(mixed[0]["probs"], class_probs["mobilenet_v2", "vtest"][0], atol=1e-5)


def test_classifier_derived_labels(classifiers, market_frames):
    m = classifiers["efficientnet_lite0"]
    out = m.infer(market_frames[:1])[0]
    d = m.derived(out)["probs"]
    assert d["label"] == IMAGENET_CATEGORIES[int(np.argmax(out["probs"]))]
    assert len(d["top5"]) == 5 and d["top5"][0]["label"] == d["label"]


def test_classifier_load_unload_load(store, market_frames):
    m = create_model("mobilenet_v2", store=store, batch_size=2)
    m.load()
    first = m.infer(market_frames[:3])
    m.unload()
    assert not m.loaded and m._module is None
    with pytest.raises(ModelError, match="before load"):
        m.infer(market_frames[:1])
    m.load()
    again = m.infer(market_frames[:3])
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["probs"], b["probs"])
    m.unload()


def test_classifier_without_weights_names_the_asset(tmp_path):
    empty = tmp_path / "mirror"
    empty.mkdir()
    offline = AssetStore(home=tmp_path / "home", mirror=empty, offline=True)
    m = create_model("mobilenet_v2", store=offline)
    with pytest.raises(ModelError, match=r"mobilenet_v2-b0353104\.pth") as err:
        m.load()
    assert "'mobilenet_v2'" in str(err.value)
    assert not m.loaded


# -- detectors -----------------------------------------------------------------------------


def test_coco_label_map():
    assert len(TV_COCO_CATEGORIES) == 91
    mapped = COCO_LABEL_MAP[COCO_LABEL_MAP >= 0]
    assert sorted(mapped.tolist()) == list(range(80))  # every class exactly once
    assert COCO_LABEL_MAP[0] == -1  # background
    assert COCO_LABEL_MAP[12] == -1 and TV_COCO_CATEGORIES[12] == "N/A"
    assert COCO_CLASSES[COCO_LABEL_MAP[1]] == "person"
    assert COCO_CLASSES[COCO_LABEL_MAP[3]] == "car"
    assert COCO_CLASSES[COCO_LABEL_MAP[13]] == "stop sign"  # first id after a gap
    assert COCO_CLASSES[COCO_LABEL_MAP[90]] == "toothbrush"


def test_detector_info():
    for name in DETECTORS:
        info = model_info(name)
        assert (info.backend, info.primary, info.assets) == ("torch", "person_count", (name,))
        assert info.pretrained_note == ""  # official weights unless an instance says otherwise
    assert [s.name for s in model_info(DETECTORS[0]).outputs] == [
        "person_count",
        "vehicle_count",
        "object_count",
        "boxes",
    ]
    assert [s.name for s in model_info("keypointrcnn_resnet50_fpn").outputs] == ["person_count", "boxes"]


@pytest.fixture
def empty_store(tmp_path) -> AssetStore:
    mirror = tmp_path / "empty-mirror"
    mirror.mkdir()
    return AssetStore(home=tmp_path / "home", mirror=mirror, offline=True)


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_without_weights_refuses(empty_store, name):
    m = create_model(name, store=empty_store)
    with pytest.raises(ModelError) as err:
        m.load()
    msg = str(err.value)
    assert f"{name!r}" in msg and empty_store.asset(name).file in msg and "allow_random_weights" in msg
    assert not m.loaded and m.weights_note == ""


def _check_detection_output(name: str, out: dict[str, np.ndarray]) -> None:
    spec = {s.name: s for s in model_info(name).outputs}
    assert set(out) == set(spec)
    for k, v in out.items():
        assert v.dtype == np.float32
        spec[k].check(v)
    boxes = out["boxes"]
    assert boxes.ndim == 2 and boxes.shape[1] == 5 and len(boxes) <= MAX_BOXES
    assert np.all((boxes[:, :4] >= 0) & (boxes[:, :4] <= 1))
    assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])
    assert np.all(np.diff(boxes[:, 4]) <= 0)  # best first
    if "object_count" in out:
        assert out["object_count"][0] == len(boxes)
        assert out["person_count"][0] + out["vehicle_count"][0] <= out["object_count"][0]
    else:
        assert out["person_count"][0] == len(boxes)


# Keypoint R-CNN resizes to 800 px by default and runs its keypoint head on every kept box;
# 256 px and 8 boxes keep this CPU test at about a second.
RANDOM_PARAMS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": {},
    "ssdlite320_mobilenet_v3_large": {},
    "keypointrcnn_resnet50_fpn": {"min_size": 256, "max_size": 448, "max_detections": 8},
}


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_random_weights_real_frame(empty_store, vtest_frames, name):
    frame = vtest_frames[0][::2, ::2].copy()  # 384x288
    rng_before = torch.get_rng_state()
    m = create_model(name, store=empty_store, allow_random_weights=True, score_threshold=0.0, **RANDOM_PARAMS[name])
    m.load()
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeding did not touch the global RNG
    note = m.info().pretrained_note
    assert "random weights" in note and name in note and m.weights_note == note
    assert model_info(name).pretrained_note == ""  # the class entry is unaffected
    (out,) = m.infer([frame])
    _check_detection_output(name, out)
    assert len(out["boxes"]) <= RANDOM_PARAMS[name].get("max_detections", MAX_BOXES)
    m.unload()
    assert not m.loaded and m._module is None
    # Seeded: a reload gives the same network, hence the same output.
    m.load()
    (again,) = m.infer([frame])
    for k in out:
        np.testing.assert_allclose(again[k], out[k], atol=1e-5)
    m.unload()


def test_detector_threshold_filters(empty_store, vtest_frames):
    frame = vtest_frames[1]
    outs = {}
    for thr in (0.0, 0.5):
        m = create_model(
            "ssdlite320_mobilenet_v3_large", store=empty_store, allow_random_weights=True, score_threshold=thr
        )
        m.load()
        (outs[thr],) = m.infer([frame])
        m.unload()
    low, high = outs[0.0]["boxes"], outs[0.5]["boxes"]
    assert len(low) == MAX_BOXES  # random SSD heads still score every anchor a little
    assert np.all(high[:, 4] >= 0.5) and len(high) <= len(low)


def test_detector_unknown_param(store):
    with pytest.raises(ModelError, match="unknown params"):
        create_model("ssdlite320_mobilenet_v3_large", store=store, score_thresh=0.3)
    with pytest.raises(ModelError, match="fixed input size"):
        create_model("ssdlite320_mobilenet_v3_large", store=store, min_size=256)
    with pytest.raises(ModelError, match="max_detections"):
        create_model("ssdlite320_mobilenet_v3_large", store=store, max_detections=MAX_BOXES + 1)


def _official_format_store(tmp_path: Path, name: str, weights_enum, bias_person: bool, monkeypatch):
    """A store whose ``name`` asset is a checkpoint in the official format, and the model
    torchvision itself builds from that checkpoint through ``weights=...COCO_V1``."""
    builder = getattr(tvd, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        donor = builder(weights=None, weights_backbone=None, num_classes=len(weights_enum.meta["categories"]))
    # torchvision's official detection checkpoints come from FrozenBatchNorm2d models: no
    # num_batches_tracked entries.
    state = {k: v for k, v in donor.state_dict().items() if not k.endswith("num_batches_tracked")}
    if bias_person:  # make the random box head call everything a person, confidently
        state["roi_heads.box_predictor.cls_score.bias"][1] += 12.0
    monkeypatch.setattr(type(weights_enum), "get_state_dict", lambda self, *a, **k: state)
    reference = builder(weights=weights_enum).eval()  # strict load inside torchvision
    monkeypatch.undo()

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    base = AssetStore(home=tmp_path / "unused", mirror=mirror, offline=True)
    asset = base.asset(name)
    path = mirror / asset.file
    torch.save(state, path)
    manifest = dict(base.manifest)
    manifest[name] = dataclasses.replace(asset, sha256=sha256_of(path), size=None, sha256_prefix=None)
    store = AssetStore(home=tmp_path / "home", mirror=mirror, offline=True, manifest=manifest)
    return store, reference


@pytest.mark.parametrize(
    "name, weights_enum, bias_person, threshold",
    [
        ("fasterrcnn_mobilenet_v3_large_320_fpn", tvd.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1, True, 0.5),
        ("ssdlite320_mobilenet_v3_large", tvd.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1, False, 0.0),
    ],
)
def test_detector_official_format_weights_load_strictly(
    tmp_path, monkeypatch, vtest_frames, name, weights_enum, bias_person, threshold
):
    store, reference = _official_format_store(tmp_path, name, weights_enum, bias_person, monkeypatch)
    m = create_model(name, store=store, score_threshold=threshold)  # no allow_random_weights
    m.load()
    assert m.weights_note == "" and m.info().pretrained_note == ""
    frame = vtest_frames[2]
    (out,) = m.infer([frame])
    _check_detection_output(name, out)
    assert len(out["boxes"]) > 0
    if bias_person:  # label 1 of torchvision's 91 ids became COCO_CLASSES "person"
        assert out["person_count"][0] == out["object_count"][0] == len(out["boxes"])
        assert out["vehicle_count"][0] == 0
    # The same output as the model torchvision builds from the same file.
    m._module = reference
    (ref,) = m.infer([frame])
    for k in out:
        np.testing.assert_allclose(out[k], ref[k], atol=1e-4)
    m.unload()


# -- devices -------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_requested_without_cuda(store):
    m = create_model("mobilenet_v2", store=store)
    with pytest.raises(ModelError, match="CUDA is not available"):
        m.load("cuda")
    assert not m.loaded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_unload_frees(store, class_probs, market_frames, empty_store, vtest_frames):
    # cuBLAS keeps one workspace per stream once used: create it before taking the baseline.
    x = torch.ones(64, 64, device="cuda")
    (x @ x).sum().item()
    del x
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    m = create_model("mobilenet_v2", store=store)
    m.load("cuda")
    assert torch.cuda.memory_allocated() > base + 10 * 2**20  # 14 MB of weights went to the GPU
    p = np.stack([o["probs"] for o in m.infer(market_frames)])
    cpu = class_probs["mobilenet_v2", "market"]
    # TF32 convolutions and float resizing on the GPU: close, not bit-equal.
    assert np.abs(p - cpu).max() < 0.05
    assert np.sum(p.argmax(axis=1) == cpu.argmax(axis=1)) >= 7
    reserved = torch.cuda.memory_reserved()
    m.unload()
    assert torch.cuda.memory_allocated() <= base + 2**20
    assert torch.cuda.memory_reserved() < reserved  # empty_cache handed blocks back
    d = create_model("fasterrcnn_mobilenet_v3_large_320_fpn", store=empty_store, allow_random_weights=True)
    d.load("cuda:0")
    assert next(d._module.parameters()).is_cuda
    (out,) = d.infer(vtest_frames[:1])
    _check_detection_output(d.name, out)
    d.unload()
    assert torch.cuda.memory_allocated() <= base + 2**20
