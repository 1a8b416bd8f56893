"""YOLOX-Nano (Megvii, Apache-2.0) on ONNX Runtime: 80 COCO classes at 416x416.

The ONNX file is the stock YOLOX export (``tools/export_onnx.py`` without ``--decode_in_inference``):
input ``images`` [1, 3, 416, 416] float32, BGR, 0..255, letterboxed to the top-left corner with
pad value 114 (YOLOX's ``preproc``), no mean/std; output [1, 3549, 85] with, per anchor point of
the 52x52, 26x26 and 13x13 grids (strides 8, 16, 32): x, y offsets and log w, log h in grid
units, objectness, and 80 class scores (all after sigmoid). This adapter decodes the grid,
keeps each anchor's best class when objectness * class score passes ``score_threshold``, runs
per-class NMS and maps boxes back to the original frame's pixels.

Params (:class:`YoloxParams`): ``score_threshold`` (0.3), ``nms_threshold`` (IoU, 0.45),
``threads`` (ONNX Runtime intra-op threads; default 0: ORT decides), ``gpu_mem_limit`` (bytes
the CUDA arena may hold; 0: no limit). On a CUDA device the session runs on ONNX Runtime's CUDA
provider when the ``gpu`` extra (onnxruntime-gpu) is installed, else on the CPU, reported as a
fallback (:mod:`mlink.models.zoo._onnx`).
"""

from __future__ import annotations

from functools import cache

import cv2
import numpy as np
from pydantic import Field

from mlink.models.base import ModelError, ModelOutput
from mlink.models.detections import COCO_OUTPUTS, coco_outputs
from mlink.models.registry import register
from mlink.models.zoo._onnx import OnnxModel, OnnxParams, onnx_session, warm_up

INPUT_SIZE = 416  # square network input, pixels
STRIDES = (8, 16, 32)
PAD_VALUE = 114


def letterbox(frame: np.ndarray, size: int = INPUT_SIZE) -> tuple[np.ndarray, float]:
    """YOLOX's ``preproc``: resize keeping the ratio, place top-left on a 114 canvas; NCHW float32."""
    h, w = frame.shape[:2]
    r = min(size / h, size / w)
    nh, nw = max(1, int(h * r)), max(1, int(w * r))
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    canvas[:nh, :nw] = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_LINEAR)
    blob = np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32)
    return blob, r


@cache
def _grids(size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(A, 2) grid cell x, y and (A, 1) stride of every anchor point, in YOLOX's output order."""
    cells, strides = [], []
    for s in STRIDES:
        n = size // s
        xv, yv = np.meshgrid(np.arange(n), np.arange(n))
        cells.append(np.stack((xv, yv), axis=2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    return np.concatenate(cells).astype(np.float32), np.concatenate(strides).astype(np.float32)


def decode(
    raw: np.ndarray, ratio: float, score_threshold: float, nms_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw (A, 85) network output -> final boxes (N, 4) in original pixels, scores (N,), classes (N,)."""
    grid, stride = _grids()
    if raw.shape != (len(grid), 85):
        raise ModelError(f"model yolox_nano: unexpected output shape {raw.shape}, expected ({len(grid)}, 85)")
    cls = raw[:, 5:].argmax(axis=1)
    scores = raw[:, 4] * raw[np.arange(len(raw)), 5 + cls]
    keep = scores >= score_threshold
    if not np.any(keep):
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    raw, cls, scores, grid, stride = raw[keep], cls[keep], scores[keep], grid[keep], stride[keep]
    xy = (raw[:, :2] + grid) * stride
    wh = np.exp(np.minimum(raw[:, 2:4], 20.0)) * stride  # clamp: a wild logit must not overflow
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1) / ratio
    idx = cv2.dnn.NMSBoxesBatched(
        np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).astype(np.float64).tolist(),
        scores.astype(float).tolist(),
        cls.astype(int).tolist(),
        score_threshold,
        nms_threshold,
    )
    keep = np.asarray(idx, dtype=np.int64).reshape(-1)
    return boxes[keep].astype(np.float32), scores[keep].astype(np.float32), cls[keep].astype(np.int64)


class YoloxParams(OnnxParams):
    score_threshold: float = Field(default=0.3, ge=0, le=1, description="objectness * class score a detection needs")
    nms_threshold: float = Field(
        default=0.45, ge=0, le=1, description="IoU above which NMS drops the weaker box of a class"
    )


@register
class YoloxNano(OnnxModel):
    name = "yolox_nano"
    task = "detection"
    backend = "onnxruntime"
    outputs = COCO_OUTPUTS
    primary = "person_count"
    assets = ("yolox_nano",)
    description = "YOLOX-Nano COCO detector (0.91M params, 416x416): person/vehicle/object counts and boxes"
    Params = YoloxParams
    params: YoloxParams

    def _load(self, device: str) -> None:
        path = self.store.path("yolox_nano")
        session = onnx_session(str(path), device, self.params, self)
        inputs = session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape) != [1, 3, INPUT_SIZE, INPUT_SIZE]:
            raise ModelError(
                f"model {self.name}: {path} has inputs {[(i.name, i.shape) for i in inputs]}, not one [1, 3, 416, 416]"
            )
        self._input = inputs[0].name
        warm_up(session, {self._input: np.zeros((1, 3, INPUT_SIZE, INPUT_SIZE), np.float32)})
        self._session = session

    def _infer(self, frames: list[np.ndarray]) -> list[ModelOutput]:
        results = []
        for frame in frames:  # the export has a fixed batch of 1
            blob, ratio = letterbox(frame)
            raw = self._session.run(None, {self._input: blob})[0][0]
            boxes, scores, classes = decode(raw, ratio, self.params.score_threshold, self.params.nms_threshold)
            h, w = frame.shape[:2]
            results.append(coco_outputs(boxes, scores, classes, w, h))
        return results
