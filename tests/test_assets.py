"""The asset store on the real mirror: verified fetches, corrupt files refused, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mlink.models.assets import MANIFEST, AssetError, AssetStore, sha256_of


def test_every_mirrored_asset_fetches_and_verifies(store: AssetStore) -> None:
    if store.mirror is None:
        pytest.skip("no asset mirror on this machine")
    mirrored = [n for n, a in MANIFEST.items() if (store.mirror / a.file).exists()]
    assert {"yolox_nano", "mobilenet_v2", "centerface", "vtest", "market_street", "megamind"} <= set(mirrored)
    for name in mirrored:
        path = store.path(name)
        assert path.parent == store.cache_dir
        assert MANIFEST[name].matches(sha256_of(path))
        assert store.status(name).state == "ok"


def test_pip_shipped_asset_comes_from_the_installed_package(tmp_path: Path) -> None:
    s = AssetStore(home=tmp_path, mirror=None, offline=True)
    path = s.path("efficientnet_lite0")
    assert path.stat().st_size == MANIFEST["efficientnet_lite0"].size


def test_missing_offline_names_file_urls_and_mirror_variable(tmp_path: Path) -> None:
    empty = tmp_path / "mirror"
    empty.mkdir()
    s = AssetStore(home=tmp_path / "home", mirror=empty, offline=True)
    with pytest.raises(AssetError) as err:
        s.path("yolox_nano")
    msg = str(err.value)
    assert "yolox_nano.onnx" in msg
    assert "MLINK_ASSET_MIRROR" in msg and str(empty) in msg
    assert MANIFEST["yolox_nano"].urls[0] in msg
    assert "MLINK_OFFLINE" in msg


def test_corrupt_cache_entry_is_replaced_from_the_mirror(store: AssetStore, tmp_path: Path) -> None:
    if store.mirror is None:
        pytest.skip("no asset mirror on this machine")
    s = AssetStore(home=tmp_path, mirror=store.mirror, offline=True)
    good = s.path("megamind")
    data = bytearray(good.read_bytes())
    data[1000] ^= 0xFF  # same size, different content
    good.write_bytes(bytes(data))
    assert s.status("megamind").state == "corrupt"
    fresh = AssetStore(home=tmp_path, mirror=store.mirror, offline=True)  # no in-process memo
    path = fresh.path("megamind")
    assert sha256_of(path) == MANIFEST["megamind"].sha256


def test_corrupt_mirror_copy_is_refused_never_loaded(store: AssetStore, tmp_path: Path) -> None:
    if store.mirror is None:
        pytest.skip("no asset mirror on this machine")
    bad_mirror = tmp_path / "mirror"
    bad_mirror.mkdir()
    src = store.mirror / MANIFEST["megamind"].file
    dst = bad_mirror / src.name
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(500)
        f.write(b"\x00garbage\x00")
    s = AssetStore(home=tmp_path / "home", mirror=bad_mirror, offline=True)
    with pytest.raises(AssetError, match="corrupt: sha256"):
        s.path("megamind")
    assert not s.cached_path("megamind").exists()


def test_unknown_asset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="unknown asset 'nope'"):
        AssetStore(home=tmp_path, mirror=None, offline=True).path("nope")


def test_manifest_matches_torchvision_published_urls() -> None:
    """The torchvision entries must name the same files torchvision itself downloads."""
    from torchvision.models import MobileNet_V2_Weights
    from torchvision.models.detection import (
        FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
        KeypointRCNN_ResNet50_FPN_Weights,
        SSDLite320_MobileNet_V3_Large_Weights,
    )

    assert MobileNet_V2_Weights.IMAGENET1K_V1.url in MANIFEST["mobilenet_v2"].urls
    assert (
        FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1.url
        in MANIFEST["fasterrcnn_mobilenet_v3_large_320_fpn"].urls
    )
    assert SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.url in MANIFEST["ssdlite320_mobilenet_v3_large"].urls
    assert KeypointRCNN_ResNet50_FPN_Weights.COCO_V1.url in MANIFEST["keypointrcnn_resnet50_fpn"].urls
