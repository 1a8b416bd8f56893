"""torchvision COCO detectors: Faster R-CNN MobileNetV3-Large 320 FPN, SSDlite320 MobileNetV3-Large,
and Keypoint R-CNN ResNet50 FPN (as a person detector).

Weights: the official torchvision COCO_V1 state dicts, from the asset store (never torchvision's
own downloader). Each model is built with ``weights=None, weights_backbone=None`` and the file
is loaded with ``strict=True``; the result computes what ``weights=...COCO_V1`` would (torchvision
then uses FrozenBatchNorm2d where this gets BatchNorm2d in eval mode: the same function with the
same eps).

When the weights file is not available, loading fails with a ModelError naming the asset, unless
the model was created with ``allow_random_weights=True``: then it is built with seeded random
weights and says so (a warning in the log, ``weights_note``, and ``info().pretrained_note`` of the
instance). Such a model has the real architecture, input pipeline, output shapes and memory
footprint, and meaningless detections: use it for sizing and plumbing, never for answers.

Params (all optional; :class:`DetectorParams`, without ``min_size``/``max_size`` for SSD):
- ``score_threshold`` (0.5): detections below it are dropped;
- ``allow_random_weights`` (False), ``seed`` (0): see above;
- ``batch_size`` (8): frames per forward pass;
- ``max_detections`` (100, at most MAX_BOXES): boxes the model keeps per frame after NMS, best
  first (set on the model, so Keypoint R-CNN also runs its keypoint head on fewer boxes);
- ``min_size``, ``max_size`` (R-CNN models only): override the internal resize (torchvision's
  defaults: 320/640 for the 320 Faster R-CNN, 800/1333 for Keypoint R-CNN).

Class ids: torchvision's COCO models predict the 91 original COCO category ids (0 background,
"N/A" gaps); they are mapped by name to the 80 contiguous :data:`COCO_CLASSES` indices used by
every zoo detector, so counts mean the same whichever detector made them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision.models.detection as tvd
from pydantic import Field, model_validator

from mlink.models.assets import AssetError
from mlink.models.base import BlackBoxModel, ModelError, ModelInfo, ModelOutput
from mlink.models.detections import (
    COCO_CLASSES,
    COCO_OUTPUTS,
    MAX_BOXES,
    PERSON,
    PERSON_COUNT,
    boxes_spec,
    coco_outputs,
)
from mlink.models.registry import register
from mlink.models.spec import OutputSpec
from mlink.models.zoo._torch import TorchModule, TorchParams, frame_tensor, load_state_dict_file, torch_device

log = logging.getLogger(__name__)

# torchvision's 91 COCO category names (index = model label), "__background__" and "N/A" included.
TV_COCO_CATEGORIES: tuple[str, ...] = tuple(
    tvd.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1.meta["categories"]
)


def _label_map(categories: tuple[str, ...]) -> np.ndarray:
    """model label -> COCO_CLASSES index, -1 for background and the N/A gaps."""
    index = {name: i for i, name in enumerate(COCO_CLASSES)}
    return np.array([index.get(name, -1) for name in categories], dtype=np.int64)


COCO_LABEL_MAP = _label_map(TV_COCO_CATEGORIES)
# Keypoint R-CNN has two classes: 0 "no person" (background), 1 "person".
PERSON_LABEL_MAP = np.array([-1, PERSON], dtype=np.int64)

RANDOM_WEIGHTS_NOTE = "random weights: official weights asset {asset!r} missing; shapes and memory only"


class _InfoWithWeights:
    """``Cls.info()`` describes the zoo entry; ``instance.info()`` also carries the instance's
    ``weights_note`` (random weights) as its ``pretrained_note``."""

    def __get__(self, obj: TorchvisionDetector | None, cls: type[TorchvisionDetector]) -> Callable[[], ModelInfo]:
        base = BlackBoxModel.__dict__["info"].__func__

        def info() -> ModelInfo:
            described: ModelInfo = base(cls)
            if obj is not None and obj.weights_note:
                described = dataclasses.replace(described, pretrained_note=obj.weights_note)
            return described

        return info


class DetectorParams(TorchParams):
    score_threshold: float = Field(default=0.5, ge=0, le=1, description="detections below it are dropped")
    allow_random_weights: bool = Field(
        default=False, description="seeded random weights when the weights asset is missing (shapes and memory only)"
    )
    seed: int = Field(default=0, description="seed of the random weights")
    max_detections: int = Field(
        default=MAX_BOXES, ge=1, le=MAX_BOXES, description="boxes kept per frame after NMS, best first"
    )
    min_size: int | None = Field(
        default=None, ge=1, description="R-CNN only: shorter side the model resizes to (torchvision's default if unset)"
    )
    max_size: int | None = Field(
        default=None, ge=1, description="R-CNN only: longest side the model resizes to (torchvision's default if unset)"
    )


class FixedSizeDetectorParams(DetectorParams):
    """Params of a detector that resizes every frame to one size itself (SSD)."""

    @model_validator(mode="after")
    def _fixed(self) -> FixedSizeDetectorParams:
        if self.min_size is not None or self.max_size is not None:
            raise ValueError("fixed input size; min_size/max_size do not apply")
        return self


class TorchvisionDetector(TorchModule):
    """A torchvision detection model: subclasses name the builder and the label map."""

    task: ClassVar[str] = "detection"
    builder: ClassVar[Callable[..., torch.nn.Module]]
    num_classes: ClassVar[int] = len(TV_COCO_CATEGORIES)
    label_map: ClassVar[np.ndarray] = COCO_LABEL_MAP
    Params: ClassVar[type[DetectorParams]] = DetectorParams  # R-CNN: min_size/max_size apply
    params: DetectorParams

    info = _InfoWithWeights()

    def __init__(self, store: Any = None, **params: Any) -> None:
        super().__init__(store, **params)
        self.weights_note = ""  # non-empty when the loaded weights are not the official ones

    @property
    def asset(self) -> str:
        return self.assets[0]

    # -- lifecycle ---------------------------------------------------------------------------
    def _build(self) -> torch.nn.Module:
        return type(self).builder(weights=None, weights_backbone=None, num_classes=self.num_classes)

    def _load(self, device: str) -> None:
        dev = torch_device(device, self.name)
        try:
            path = self.store.path(self.asset)
        except AssetError as exc:
            if not self.params.allow_random_weights:
                raise ModelError(
                    f"model {self.name}: weights asset {self.asset!r} is not available "
                    f"(pass allow_random_weights=True for a random-weight stand-in): {exc}"
                ) from None
            path = None
        if path is not None:
            module = self._build()
            module.load_state_dict(load_state_dict_file(path), strict=True)
            self.weights_note = ""
        else:
            # Seeded, and without disturbing the process's global RNG streams.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.params.seed)
                module = self._build()
            self.weights_note = RANDOM_WEIGHTS_NOTE.format(asset=self.asset)
            log.warning("model %s: %s (seed %d)", self.name, self.weights_note, self.params.seed)
        # The model's own cap on detections per image (R-CNN: roi_heads, SSD: the model; SSD's
        # default of 300 is wasted work beyond the MAX_BOXES we keep anyway).
        owner = getattr(module, "roi_heads", module)
        owner.detections_per_img = self.params.max_detections
        transform = getattr(module, "transform", None)
        if transform is not None:  # R-CNN; SSD's params refuse min_size/max_size
            if self.params.min_size is not None:
                transform.min_size = (self.params.min_size,)
            if self.params.max_size is not None:
                transform.max_size = self.params.max_size
        self._place(module, dev)

    # -- inference ---------------------------------------------------------------------------
    def _forward(self, chunk: list[np.ndarray]) -> list[ModelOutput]:
        images = [frame_tensor(f, self._dev).float().div_(255.0) for f in chunk]  # type: ignore[arg-type]
        return [self._outputs(frame, det) for frame, det in zip(chunk, self._module(images))]  # type: ignore[misc]

    def _detections(self, det: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (pixels), scores and COCO_CLASSES indices above the threshold, best first, at most MAX_BOXES."""
        boxes = det["boxes"].float().cpu().numpy().reshape(-1, 4)
        scores = det["scores"].float().cpu().numpy().reshape(-1)
        labels = det["labels"].cpu().numpy().astype(np.int64).reshape(-1)
        valid = (labels >= 0) & (labels < len(self.label_map))
        classes = np.full(labels.shape, -1, dtype=np.int64)
        classes[valid] = self.label_map[labels[valid]]
        keep = (scores >= self.params.score_threshold) & (classes >= 0)
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        order = np.argsort(-scores, kind="stable")[: self.params.max_detections]
        return boxes[order], scores[order], classes[order]

    def _outputs(self, frame: np.ndarray, det: dict[str, torch.Tensor]) -> ModelOutput:
        boxes, scores, classes = self._detections(det)
        height, width = frame.shape[:2]
        return coco_outputs(boxes, scores, classes, width, height)


@register
class FasterRCNNMobileNetV3Large320FPN(TorchvisionDetector):
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    assets = ("fasterrcnn_mobilenet_v3_large_320_fpn",)
    outputs = COCO_OUTPUTS
    primary = "person_count"
    description = "torchvision Faster R-CNN MobileNetV3-Large 320 FPN (COCO_V1): person/vehicle/object counts, boxes"
    builder = staticmethod(tvd.fasterrcnn_mobilenet_v3_large_320_fpn)


@register
class SSDLite320MobileNetV3Large(TorchvisionDetector):
    name = "ssdlite320_mobilenet_v3_large"
    assets = ("ssdlite320_mobilenet_v3_large",)
    outputs = COCO_OUTPUTS
    primary = "person_count"
    description = "torchvision SSDlite320 MobileNetV3-Large (COCO_V1): person/vehicle/object counts, boxes"
    builder = staticmethod(tvd.ssdlite320_mobilenet_v3_large)
    Params = FixedSizeDetectorParams  # SSD resizes every frame to 320x320


PERSON_BOXES: OutputSpec = boxes_spec("persons: x1, y1, x2, y2 normalised to the frame, score")


@register
class KeypointRCNNResNet50FPN(TorchvisionDetector):
    """Keypoint R-CNN used as a person detector (its keypoints are not an output)."""

    name = "keypointrcnn_resnet50_fpn"
    assets = ("keypointrcnn_resnet50_fpn",)
    outputs = (PERSON_COUNT, PERSON_BOXES)
    primary = "person_count"
    description = "torchvision Keypoint R-CNN ResNet50 FPN (COCO_V1) as a person detector: person count, person boxes"
    builder = staticmethod(tvd.keypointrcnn_resnet50_fpn)
    num_classes = 2
    label_map = PERSON_LABEL_MAP

    def _outputs(self, frame: np.ndarray, det: dict[str, torch.Tensor]) -> ModelOutput:
        boxes, scores, classes = self._detections(det)
        height, width = frame.shape[:2]
        out = coco_outputs(boxes, scores, classes, width, height)
        return {"person_count": out["person_count"], "boxes": out["boxes"]}
