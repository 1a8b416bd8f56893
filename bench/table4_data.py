"""Table 4 harness, data: the oracle tuples in time order, the protocol's splits, and per-frame
features computed in one decode pass (Reducto's low-level maps and MTL's backbone features).

The oracle is the site's stored profile (every model on every sampled frame, once): the
accuracy reference, as in the paper (agreement with each model's own output). A profile lists
its frames stream by stream; the harness puts them in *time order* across streams: each
stream's frames at their relative position in the stream (rank / frames of that stream), so
the cameras run side by side and "the first 10%" is the first 10% of every camera. The
protocol (paper): links and every learned baseline train on the first ``train_share`` of the
frames; the rest is the evaluation stream, cut into ``periods`` consecutive periods whose first
``profile_share`` (at least ``min_profile`` frames) MLink profiles through all models. Every
method's accuracy is measured on the same frames: the evaluation stream minus those profiled
frames (which MLink fine-tunes on), so no method is scored on a frame it trained on.

Per-frame features (cached in the output folder as an ``.npz`` keyed by the profile's version
and the frames kept): the frames are decoded again from the site's videos (the same sampling
as :func:`mlink.server.profiling.plan_stream_frames`, checked frame by frame against the
profile's streams and timestamps) and, frame by frame, reduced to what the baselines need, so
no image is kept in memory:

- Reducto's maps at ``MAP_W`` x ``MAP_H`` (aspect ignored: only differences between frames of
  one camera matter): grey, grey blurred (area feature, blur radius 11), the Canny edge map of
  the blurred grey (thresholds 101/255) and a Harris corner map (block 5, aperture 3, k 0.05,
  dilated, corners where the response exceeds 1% of the frame's maximum), the last two packed
  as bits;
- MobileNetV2's pooled backbone features (1280 floats) of the whole frame squashed to 224 x 224
  (no centre crop: counts need the whole view), from the zoo's ``mobilenet_v2`` weights asset.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlink.links.tuples import TupleSet, node_key
from mlink.server.change import MAP_H, MAP_W, reducto_maps  # Reducto's maps: one implementation

BACKBONE_DIM = 1280
BACKBONE_SIDE = 224
FEATURES_FORMAT = "mlink-table4-features/1"


# -- the oracle in time order and the protocol's splits -----------------------------------------


def time_order(tuples: TupleSet) -> list[int]:
    """Indices of ``tuples`` in time order across streams (relative position in each stream)."""
    streams: dict[str, list[int]] = {}
    for i, s in enumerate(tuples.streams):
        streams.setdefault(s, []).append(i)
    rank = {s: k for k, s in enumerate(streams)}
    keyed: list[tuple[float, int, int]] = []
    for s, members in streams.items():
        ordered = sorted(members, key=lambda i: tuples.timestamps[i])
        n = len(ordered)
        keyed.extend(((r + 0.5) / n, rank[s], i) for r, i in enumerate(ordered))
    return [i for _, _, i in sorted(keyed)]


def pick_evenly(n_total: int, n: int) -> list[int]:
    """``n`` positions spread evenly over ``range(n_total)`` (all when ``n >= n_total``)."""
    if n >= n_total:
        return list(range(n_total))
    return sorted({round(float(x)) for x in np.linspace(0, n_total - 1, n)})


@dataclass
class Protocol:
    """Positions (indices into the time-ordered oracle) of each share of the protocol."""

    n: int
    train: list[int]
    eval: list[int]
    periods: list[list[int]]  # consecutive chunks of ``eval``
    profiled: list[list[int]]  # per period: its first frames, run through all models by MLink
    scored: list[int]  # eval minus every profiled frame: where every method is scored
    train_share: float
    profile_share: float

    def to_json(self) -> dict[str, Any]:
        return {
            "frames": self.n,
            "train_frames": len(self.train),
            "eval_frames": len(self.eval),
            "periods": len(self.periods),
            "period_frames": [len(p) for p in self.periods],
            "profiled_per_period": [len(p) for p in self.profiled],
            "scored_frames": len(self.scored),
            "train_share": self.train_share,
            "profile_share": self.profile_share,
        }


def make_protocol(
    n: int, train_share: float = 0.1, periods: int = 10, profile_share: float = 0.01, min_profile: int = 2
) -> Protocol:
    if not 0.0 < train_share < 1.0:
        raise ValueError(f"train_share must be in (0, 1), got {train_share}")
    n_train = max(4, round(n * train_share))
    if n - n_train < 2 * max(1, periods):
        raise ValueError(f"{n} frames are too few for {n_train} training frames and {periods} periods")
    train = list(range(n_train))
    ev = list(range(n_train, n))
    chunks = [list(map(int, c)) for c in np.array_split(np.array(ev), max(1, periods))]
    profiled = []
    for c in chunks:
        k = max(min_profile, math.ceil(profile_share * len(c) - 1e-9))
        profiled.append(c[: min(k, len(c) - 1)])
    prof = {p for ps in profiled for p in ps}
    scored = [p for p in ev if p not in prof]
    return Protocol(n, train, ev, chunks, profiled, scored, train_share, profile_share)


@dataclass
class Oracle:
    """The site's outputs on its frames, in time order, with what the harness needs around them."""

    tuples: TupleSet  # time-ordered
    served: dict[str, list[str]]  # model -> served outputs (config order)
    source: str  # where the profile came from
    version: str  # content version of the *stored* profile
    stored_index: list[int]  # position -> index in the stored profile

    @property
    def models(self) -> list[str]:
        return list(self.served)

    @property
    def nodes(self) -> list[str]:
        return [node_key(m, o) for m, outs in self.served.items() for o in outs]

    def nodes_of(self, model: str) -> list[str]:
        return [node_key(model, o) for o in self.served[model]]

    def exact(self, node: str, positions: Sequence[int]) -> list[np.ndarray]:
        vals = self.tuples.values[node]
        return [vals[p] for p in positions]


def load_oracle(cfg: Any, store: Any, home: Path, frames: int | None, progress: bool = True) -> tuple[Oracle, TupleSet]:
    """The site's latest stored profile (profiled and stored first when missing, over other
    outputs than the config's, or shorter than ``frames``); ``frames`` fewer than stored keeps
    that many spread evenly in time. Returns (oracle, the stored profile as stored)."""
    from mlink.scheduler.site import site_served
    from mlink.server.profiling import site_profile

    served = {m: list(outs) for m, outs in site_served(cfg).items()}
    nodes = [node_key(m, o) for m, outs in served.items() for o in outs]
    stored, path, _ = site_profile(cfg, store, min_frames=frames or 0, home=home, progress=progress)
    stored = stored.select(nodes)
    order = time_order(stored)
    if frames is not None and frames < len(order):
        order = [order[p] for p in pick_evenly(len(order), frames)]
    tuples = stored.subset(order)
    return Oracle(tuples, served, str(path), stored.version(), order), stored


# -- per-frame features ----------------------------------------------------------------------


class Backbone:
    """MobileNetV2's convolutional features + global average pooling, frozen, from the asset."""

    def __init__(self, store: Any, device: str = "cpu") -> None:
        import torch
        import torchvision

        from mlink.models.zoo._torch import load_state_dict_file

        state = load_state_dict_file(store.path("mobilenet_v2"))
        features = torchvision.models.mobilenet_v2(weights=None).features
        features.load_state_dict(
            {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}, strict=True
        )
        del state
        self.device = torch.device(device)
        self.features = features.eval().requires_grad_(False).to(self.device)

    def __call__(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        import torch
        import torchvision.transforms.functional as TF

        from mlink.models.zoo._torch import IMAGENET_MEAN, IMAGENET_STD, frame_tensor

        out = []
        with torch.inference_mode():
            for f in frames:
                t = frame_tensor(f, self.device)
                t = TF.resize(
                    t, [BACKBONE_SIDE, BACKBONE_SIDE], interpolation=TF.InterpolationMode.BILINEAR, antialias=True
                )
                x = t[None].float().div_(255.0)
                m = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
                s = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
                y = self.features((x - m) / s).mean(dim=(2, 3))
                out.append(y[0].float().cpu().numpy())
        return np.stack(out).astype(np.float32)


@dataclass
class FrameFeatures:
    grey: np.ndarray  # (N, H, W) uint8
    blur: np.ndarray  # (N, H, W) uint8
    edges: np.ndarray  # (N, H*W/8) packed bits
    corners: np.ndarray  # (N, H*W/8) packed bits
    backbone: np.ndarray  # (N, 1280) float32
    map_ms: float  # mean time to compute one frame's Reducto maps (from the full frame)
    backbone_ms: float  # mean time of one frame's backbone features in the decode pass
    source: str = ""
    extra: dict = field(default_factory=dict)

    def edge(self, p: int) -> np.ndarray:
        return np.unpackbits(self.edges[p])[: MAP_W * MAP_H].astype(bool)

    def corner(self, p: int) -> np.ndarray:
        return np.unpackbits(self.corners[p])[: MAP_W * MAP_H].astype(bool)


def _key(oracle: Oracle) -> str:
    h = hashlib.sha256()
    h.update(oracle.version.encode())
    h.update(json.dumps(oracle.stored_index).encode())
    h.update(f"{MAP_W}x{MAP_H}|{BACKBONE_SIDE}|{FEATURES_FORMAT}".encode())
    return h.hexdigest()[:16]


def _decoded(cfg: Any, store: Any, stored: TupleSet) -> Iterator[tuple[int, np.ndarray]]:
    """(stored index, image) for every frame of the stored profile, decoded again and checked."""
    from mlink.server.profiling import plan_stream_frames, site_frames

    plan = plan_stream_frames(cfg, len(stored), store)
    i = 0
    for f in site_frames(plan):
        if i >= len(stored):
            break
        if f.stream != stored.streams[i] or abs(f.timestamp - stored.timestamps[i]) > 1e-3:
            raise RuntimeError(
                f"decoding the site's videos again gave frame {i} as ({f.stream}, {f.timestamp}); the profile has "
                f"({stored.streams[i]}, {stored.timestamps[i]}): the profile was made from other videos or sampling; "
                "profile again (mlink profile) or pass --frames to make a new one"
            )
        yield i, f.image
        i += 1
    if i != len(stored):
        raise RuntimeError(f"decoding the site's videos again gave {i} frames, the profile has {len(stored)}")


def frame_features(
    cfg: Any, store: Any, oracle: Oracle, stored: TupleSet, out_dir: Path, progress: bool = True
) -> FrameFeatures:
    """Per-frame features of the oracle's frames (time order), from the cache or one decode pass."""
    from tqdm import tqdm

    path = out_dir / f"features-{_key(oracle)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") == FEATURES_FORMAT and meta.get("n") == len(oracle.tuples):
                    return FrameFeatures(
                        z["grey"],
                        z["blur"],
                        z["edges"],
                        z["corners"],
                        z["backbone"],
                        meta["map_ms"],
                        meta["backbone_ms"],
                        f"cache {path}",
                    )
        except Exception:  # a broken cache is recomputed
            pass
    n = len(oracle.tuples)
    where = {s: p for p, s in enumerate(oracle.stored_index)}
    grey = np.zeros((n, MAP_H, MAP_W), np.uint8)
    blur = np.zeros((n, MAP_H, MAP_W), np.uint8)
    nbytes = (MAP_W * MAP_H + 7) // 8
    edges = np.zeros((n, nbytes), np.uint8)
    corners = np.zeros((n, nbytes), np.uint8)
    feats = np.zeros((n, BACKBONE_DIM), np.float32)
    backbone = Backbone(store, "cpu")
    map_s = bb_s = 0.0
    bar = tqdm(total=len(stored), desc="decode + features", unit="frame", disable=not progress)
    try:
        for si, image in _decoded(cfg, store, stored):
            bar.update(1)
            p = where.get(si)
            if p is None:
                continue
            t0 = time.perf_counter()
            grey[p], blur[p], edges[p], corners[p] = reducto_maps(image)
            t1 = time.perf_counter()
            feats[p] = backbone([image])[0]
            t2 = time.perf_counter()
            map_s += t1 - t0
            bb_s += t2 - t1
    finally:
        bar.close()
    meta = {
        "format": FEATURES_FORMAT,
        "n": n,
        "map_ms": 1000 * map_s / n,
        "backbone_ms": 1000 * bb_s / n,
        "profile": oracle.version,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp, grey=grey, blur=blur, edges=edges, corners=corners, backbone=feats, meta=np.array(json.dumps(meta))
    )
    tmp.replace(path)
    return FrameFeatures(grey, blur, edges, corners, feats, meta["map_ms"], meta["backbone_ms"], "decode pass")


# -- scoring -------------------------------------------------------------------------------------


def score(oracle: Oracle, positions: Sequence[int], preds: Mapping[str, Sequence[np.ndarray | None]]) -> dict[str, Any]:
    """Accuracy against the oracle on ``positions``: per node (its own metric), per model (mean
    over its nodes), overall (mean over models). ``preds[node][k]`` is the output served for
    ``positions[k]``, or None (no output: 0). A node missing from ``preds`` has no output."""
    per_node: dict[str, float] = {}
    for node in oracle.nodes:
        spec = oracle.tuples.specs[node]
        exact = oracle.exact(node, positions)
        got = preds.get(node)
        if got is None:
            per_node[node] = 0.0
            continue
        if len(got) != len(positions):
            raise ValueError(f"{node}: {len(got)} outputs for {len(positions)} frames")
        per_node[node] = (
            float(np.mean([0.0 if g is None else spec.accuracy(g, e) for g, e in zip(got, exact)]))
            if positions
            else 0.0
        )
    per_model = {m: float(np.mean([per_node[k] for k in oracle.nodes_of(m)])) for m in oracle.models}
    return {"accuracy": float(np.mean(list(per_model.values()))), "by_model": per_model, "by_node": per_node}
