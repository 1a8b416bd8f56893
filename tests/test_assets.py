"""The asset store on the real mirror: verified fetches, corrupt files refused, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from asset_race import fetchers

from mlink.models import assets
from mlink.models.assets import MANIFEST, AssetError, AssetStore, sha256_of
from mlink.models.atomic_files import STALE_AFTER_S, TEMP_SUFFIX


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


# -- many fetchers at once (issue 13 item 7) ----------------------------------------------------
RACE_ASSET = "megamind"  # the smallest mirrored file (1.2 MB): the race, not the copy, is tested
THREADS = 16
PROCESSES = 2
PROCESS_THREADS = 4


def _leftovers(store: AssetStore, name: str) -> list[str]:
    """Anything in the cache folder but the finished file and the lock folder."""
    return sorted(p.name for p in store.cache_dir.iterdir() if p.name not in (MANIFEST[name].file, ".locks"))


@pytest.mark.timeout(120)
def test_many_threads_and_processes_fetch_one_asset_at_once(store: AssetStore, tmp_path: Path) -> None:
    """16 threads here and 2 processes of 4 threads, released together on an empty store, all
    get the verified file: no AssetError, no half-written file handed out, no temporary left."""
    if store.mirror is None:
        pytest.skip("no asset mirror on this machine")
    home = tmp_path / "home"
    script = Path(__file__).with_name("asset_race.py")
    args = [str(home), str(store.mirror), RACE_ASSET, str(PROCESS_THREADS)]
    procs = [
        subprocess.Popen([sys.executable, str(script), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(PROCESSES)
    ]
    try:
        workers, release, results = fetchers(home, store.mirror, RACE_ASSET, THREADS)
        for p in procs:  # every process has its threads waiting at its own barrier
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        release()
        for w in workers:
            w.join(timeout=60)
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0
            results += [json.loads(line) for line in out.splitlines()]
    finally:
        for p in procs:
            p.kill()
    assert len(results) == THREADS + PROCESSES * PROCESS_THREADS
    bad = [r for r in results if not r.startswith(f"ok {MANIFEST[RACE_ASSET].sha256} ")]
    assert not bad, f"{len(bad)} of {len(results)} fetches failed: {bad[:3]}"
    final = AssetStore(home=home, mirror=store.mirror, offline=True).cached_path(RACE_ASSET)
    # One writer, the others waited for it: everyone was handed the very file now in place.
    assert {r.split()[2] for r in results} == {str(final.stat().st_ino)}
    assert _leftovers(AssetStore(home=home, mirror=store.mirror, offline=True), RACE_ASSET) == []


def test_truncated_file_in_the_store_is_repaired_on_next_fetch(store: AssetStore, tmp_path: Path) -> None:
    """A file cut short in the store (a crash mid-copy by an older writer, a full disk) is fetched
    again, by the same store that verified it before and by a fresh one."""
    if store.mirror is None:
        pytest.skip("no asset mirror on this machine")
    s = AssetStore(home=tmp_path, mirror=store.mirror, offline=True)
    good = s.path(RACE_ASSET)
    half = good.stat().st_size // 2
    for size, fetcher in [(half, s), (0, s), (half, AssetStore(home=tmp_path, mirror=store.mirror, offline=True))]:
        with open(good, "r+b") as f:
            f.truncate(size)
        assert s.status(RACE_ASSET).state == "corrupt"
        # ...and a temporary of a writer that died mid-copy, which the repair clears away.
        crashed = s.cache_dir / f".{good.name}.crashed{TEMP_SUFFIX}"
        crashed.write_bytes(b"half a copy")
        os.utime(crashed, (time.time() - 2 * STALE_AFTER_S,) * 2)
        assert sha256_of(fetcher.path(RACE_ASSET)) == MANIFEST[RACE_ASSET].sha256
        assert _leftovers(s, RACE_ASSET) == []


@pytest.mark.timeout(60)
def test_a_fetch_stuck_in_another_process_is_a_clear_error(
    store: AssetStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting on a lock held elsewhere ends in an AssetError naming the asset and the lock."""
    if store.mirror is None:
        pytest.skip("no asset mirror on this machine")
    fcntl = pytest.importorskip("fcntl")
    monkeypatch.setattr(assets, "LOCK_TIMEOUT_S", 0.3)
    s = AssetStore(home=tmp_path, mirror=store.mirror, offline=True)
    lock_file = s.cache_dir / ".locks" / f"{MANIFEST[RACE_ASSET].file}.lock"
    lock_file.parent.mkdir(parents=True)
    with open(lock_file, "ab") as other:  # an open file of its own: flock sees another holder
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(AssetError, match=r"'megamind'.*another process held .*Megamind\.avi\.lock"):
            s.path(RACE_ASSET)
    assert sha256_of(s.path(RACE_ASSET)) == MANIFEST[RACE_ASSET].sha256  # released: fetched
