"""How much a camera's picture changed between two frames: Reducto's low-level features.

Reducto (SIGCOMM 2020) reuses a model's last output while the frame barely changed. Its four
difference features, each a share of the frame in [0, 1], are what the temporal links
(:mod:`mlink.links.temporal`) read to say how good a reference frame's real output still is:

- ``pixel``: pixels whose grey level moved by more than ``PIXEL_LOW``;
- ``area``: the area of the changed blobs after a blur (radius ``AREA_BLUR``), dilated twice;
- ``edge``: Canny edge-map pixels (thresholds 101/255, on the blurred grey) that differ;
- ``corner``: Harris corner-map pixels (block 5, aperture 3, k 0.05, dilated, corners above 1%
  of the frame's maximum response) that differ.

A frame is reduced once to its :class:`Maps` at ``MAP_W`` x ``MAP_H`` (aspect ignored: only
differences between frames of one camera matter; edge and corner maps packed as bits), so a
buffer keeps a few kilobytes per frame instead of the image. This is the one implementation:
the daemon's rotation and the Table 4 harness (``mlink.bench``) both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

MAP_W, MAP_H = 256, 192
PIXEL_LOW = 21  # Reducto's pixel/area/edge intensity threshold lower bound
AREA_BLUR = 11
DILATE_3X3 = np.ones((3, 3), np.uint8)  # the kernel cv2.dilate uses when given None
CANNY_LOW, CANNY_HIGH = 101, 255
HARRIS_BLOCK, HARRIS_K, HARRIS_APERTURE = 5, 0.05, 3
FEATURES = ("pixel", "area", "edge", "corner")
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def reducto_maps(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(grey, blurred grey, packed edge bits, packed corner bits) of one BGR frame."""
    small = cv2.resize(image, (MAP_W, MAP_H), interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    blur = cv2.GaussianBlur(grey, (AREA_BLUR, AREA_BLUR), 0)
    edges = cv2.Canny(blur, CANNY_LOW, CANNY_HIGH) > 0
    harris = cv2.dilate(cv2.cornerHarris(np.float32(grey), HARRIS_BLOCK, HARRIS_APERTURE, HARRIS_K), DILATE_3X3)
    top = float(harris.max())
    corners = harris > 0.01 * top if top > 0 else np.zeros_like(edges)
    return grey, blur, np.packbits(edges.ravel()), np.packbits(corners.ravel())


def frame_diff(fx: Any, feature: str, a: int, b: int) -> float:
    """Reducto's difference ``feature`` between frames ``a`` and ``b`` of ``fx``: anything with
    ``grey``, ``blur``, ``edges`` and ``corners`` indexable by frame (as :func:`reducto_maps`
    makes them), e.g. stacked arrays. Returns the share of the frame changed."""
    size = fx.grey[a].shape[0] * fx.grey[a].shape[1]
    if feature == "pixel":
        return float(np.count_nonzero(cv2.absdiff(fx.grey[a], fx.grey[b]) > PIXEL_LOW)) / size
    if feature == "area":
        delta = (cv2.absdiff(fx.blur[a], fx.blur[b]) > PIXEL_LOW).astype(np.uint8) * 255
        delta = cv2.dilate(delta, DILATE_3X3, iterations=2)
        contours, _ = cv2.findContours(delta, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        return float(sum(cv2.contourArea(c) for c in contours)) / size
    if feature == "edge":
        return float(_POPCOUNT[np.bitwise_xor(fx.edges[a], fx.edges[b])].sum()) / size
    if feature == "corner":
        return float(_POPCOUNT[np.bitwise_xor(fx.corners[a], fx.corners[b])].sum()) / size
    raise ValueError(f"unknown Reducto feature {feature!r}")


@dataclass(frozen=True)
class Maps:
    """One frame's Reducto maps (:func:`reducto_maps`)."""

    grey: np.ndarray
    blur: np.ndarray
    edges: np.ndarray
    corners: np.ndarray

    @classmethod
    def of(cls, image: np.ndarray) -> Maps:
        return cls(*reducto_maps(image))


class _Pair:
    """Two frames' maps as :func:`frame_diff` indexes them (0 and 1)."""

    def __init__(self, a: Maps, b: Maps) -> None:
        self.grey = (a.grey, b.grey)
        self.blur = (a.blur, b.blur)
        self.edges = (a.edges, b.edges)
        self.corners = (a.corners, b.corners)


def diffs(a: Maps, b: Maps, features: Sequence[str] = FEATURES) -> tuple[float, ...]:
    """The difference features between two frames (default: all four, in :data:`FEATURES` order)."""
    pair = _Pair(a, b)
    return tuple(frame_diff(pair, f, 0, 1) for f in features)
