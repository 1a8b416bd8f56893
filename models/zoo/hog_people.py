"""OpenCV's HOG + linear SVM people detector (Dalal & Triggs 2005), built into OpenCV 4.

No weight file: the SVM is ``cv2.HOGDescriptor_getDefaultPeopleDetector()`` (trained on INRIA
pedestrians, 64x128 window). opencv 5 removed it, hence the ``opencv-python-headless<5`` pin.

``detectMultiScale`` (defaults winStride (8, 8), padding (8, 8), scale 1.05, OpenCV's own grouping
of overlapping windows) gives windows and SVM margins. Two things follow here:

- boxes: a 64x128 window frames an upright person of about 96 px with a margin, so each window is
  shrunk as OpenCV's ``peopledetect`` sample does (10 % off each side, 7 % off the top, 80 % of the
  height kept) to hug the person; then windows that mostly lie inside a stronger one (intersection
  over the smaller box >= ``overlap_threshold``, 0.65) are dropped, which OpenCV's grouping leaves
  (a tall window around one or two walkers);
- scores: the SVM margin m (distance past ``hit_threshold``, unbounded, typically 0..4) becomes
  ``1 - exp(-m)`` in [0, 1): monotone in the margin, 0 at the decision boundary, about 0.6 at
  m = 1 and 0.86 at m = 2. It orders boxes; it is not a calibrated probability.

The detector itself only finds people at least ~100 px tall (its pyramid only shrinks the image),
so frames are first enlarged by ``upscale`` (default 1.25: people of ~80 px, the walkers of a
768x576 campus camera like vtest, are found; at 1.0 about a third of them are missed) and then,
if wider than ``max_width`` (default 1280; None for no limit), shrunk to it, which bounds the cost
of HD frames. Cost grows with pixels: on 2 CPU cores about 75 ms at 768x576 and 120 ms at the
default 1.25x. Boxes are mapped back to the original frame.

Params (:class:`HogParams`): ``win_stride`` ((8, 8)), ``padding`` ((8, 8)), ``scale`` (1.05),
``hit_threshold`` (0.0), ``group_threshold`` (2), ``overlap_threshold`` (0.65), ``upscale``
(1.25), ``max_width`` (1280).
"""

from __future__ import annotations

from typing import Annotated, Any

import cv2
import numpy as np
from pydantic import Field

from mlink.models.base import AdapterParams, BlackBoxModel, ModelError, ModelOutput
from mlink.models.detections import PERSON_COUNT, box_sequence, boxes_spec
from mlink.models.registry import register

WINDOW = (64, 128)  # the default people detector's window (w, h)


def suppress_nested(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS on intersection over the *smaller* box, by descending score."""
    order = np.argsort(-scores, kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        overlap = w * h / np.maximum(np.minimum(areas[i], areas[rest]), 1e-9)
        order = rest[overlap < threshold]
    return np.asarray(keep, dtype=np.int64)


PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class HogParams(AdapterParams):
    win_stride: tuple[PositiveInt, PositiveInt] = Field(
        default=(8, 8), description="detection window step (x, y), pixels"
    )
    padding: tuple[NonNegativeInt, NonNegativeInt] = Field(
        default=(8, 8), description="padding around each window (x, y), pixels"
    )
    scale: float = Field(default=1.05, ge=1.001, le=4.0, description="pyramid step between scales")
    hit_threshold: float = Field(default=0.0, ge=-10.0, le=10.0, description="SVM margin a window needs")
    group_threshold: int = Field(
        default=2, ge=0, le=100, description="OpenCV's grouping of overlapping windows (0: none)"
    )
    overlap_threshold: float = Field(
        default=0.65,
        ge=0.0,
        le=1.0,
        description="intersection over the smaller box above which a weaker box is dropped",
    )
    upscale: float = Field(
        default=1.25, ge=0.1, le=4.0, description="frames are enlarged by this first (finds smaller people)"
    )
    max_width: int | None = Field(
        default=1280, ge=WINDOW[0], description="frames wider than this after upscale are shrunk to it; None: no limit"
    )


@register
class HogPeople(BlackBoxModel):
    name = "hog_people"
    task = "person_detection"
    backend = "opencv"
    outputs = (PERSON_COUNT, boxes_spec("person boxes: x1, y1, x2, y2 normalised to the frame, 1 - exp(-SVM margin)"))
    primary = "person_count"
    assets = ()
    description = "OpenCV HOG + linear SVM pedestrian detector (built in, no weights file); upright people >= ~80 px"

    Params = HogParams
    params: HogParams

    def __init__(self, store: Any = None, **params: Any) -> None:
        super().__init__(store, **params)
        self._hog: cv2.HOGDescriptor | None = None

    def _load(self, device: str) -> None:
        if device.startswith("cuda"):
            # OpenCV's CUDA HOG needs a CUDA build of OpenCV, which the pip wheels are not: the
            # answers are the same on the CPU, and no GPU memory is used.
            self.fall_back("OpenCV's HOG runs on the CPU here (the pip wheels have no CUDA)")
        elif device != "cpu":
            raise ModelError(f"model {self.name}: unknown device {device!r} (use cpu, cuda or cuda:N)")
        hog = cv2.HOGDescriptor()  # the default: 64x128 window, 9 bins, the layout the SVM expects
        hog.setSVMDetector(np.asarray(cv2.HOGDescriptor.getDefaultPeopleDetector(), np.float32))
        self._hog = hog

    def _unload(self) -> None:
        self._hog = None

    def factor(self, width: int) -> float:
        """How much a frame of ``width`` px is resized before detection."""
        f = self.params.upscale
        max_width = self.params.max_width
        if max_width is not None and width * f > max_width:
            f = max_width / width
        return f

    def detect(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Person boxes (N, 4) in the frame's pixels and scores (N,) in [0, 1), strongest first."""
        assert self._hog is not None
        h, w = frame.shape[:2]
        f = self.factor(w)
        image = frame
        if f != 1.0:
            size = (max(1, round(w * f)), max(1, round(h * f)))
            image = cv2.resize(frame, size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
        if image.shape[1] < WINDOW[0] or image.shape[0] < WINDOW[1]:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        p = self.params
        rects, weights = self._hog.detectMultiScale(
            image,
            hitThreshold=p.hit_threshold,
            winStride=p.win_stride,
            padding=p.padding,
            scale=p.scale,
            groupThreshold=p.group_threshold,
        )
        xywh = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
        if len(xywh) == 0:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        margins = np.asarray(weights, dtype=np.float32).reshape(-1) - p.hit_threshold
        scores = (1.0 - np.exp(-np.clip(margins, 0.0, None))).astype(np.float32)
        x, y, bw, bh = xywh.T
        boxes = np.stack([x + 0.1 * bw, y + 0.07 * bh, x + 0.9 * bw, y + 0.87 * bh], axis=1) / f
        keep = suppress_nested(boxes, scores, p.overlap_threshold)
        return boxes[keep].astype(np.float32), scores[keep]

    def _infer(self, frames: list[np.ndarray]) -> list[ModelOutput]:
        results = []
        for frame in frames:
            boxes, scores = self.detect(frame)
            h, w = frame.shape[:2]
            results.append(
                {"person_count": np.array([len(scores)], dtype=np.float32), "boxes": box_sequence(boxes, scores, w, h)}
            )
        return results
