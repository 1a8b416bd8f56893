"""Turning raw detections into the outputs a site serves: counts and a box sequence.

Every detector in the zoo (YOLOX, torchvision detectors, HOG, CenterFace) ends in the same
place: boxes in pixels, scores, class ids. Converting them here, once, keeps the meaning of
"person count" or "vehicle count" identical whichever detector produced it, so links between
detectors compare like with like.
"""

from __future__ import annotations

import numpy as np

from mlink.models.spec import BOX_DIM, OutputSpec, Task

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
PERSON = COCO_CLASSES.index("person")
# The definition of a vehicle: car, bus, truck, motorcycle, bicycle.
VEHICLES = frozenset(COCO_CLASSES.index(n) for n in ("car", "bus", "truck", "motorcycle", "bicycle"))

MAX_BOXES = 100  # the most boxes any zoo detector emits per frame (largest score first)

PERSON_COUNT = OutputSpec("person_count", "vector", 1, Task.COUNT, "persons detected")
VEHICLE_COUNT = OutputSpec("vehicle_count", "vector", 1, Task.COUNT, "cars, buses, trucks, motorcycles, bicycles")
OBJECT_COUNT = OutputSpec("object_count", "vector", 1, Task.COUNT, "all objects detected")
FACE_COUNT = OutputSpec("face_count", "vector", 1, Task.COUNT, "faces detected")


def boxes_spec(description: str) -> OutputSpec:
    return OutputSpec("boxes", "sequence", BOX_DIM, Task.BOXES, description, max_len=MAX_BOXES)


COCO_OUTPUTS: tuple[OutputSpec, ...] = (
    PERSON_COUNT,
    VEHICLE_COUNT,
    OBJECT_COUNT,
    boxes_spec("all detections: x1, y1, x2, y2 normalised to the frame, score"),
)


def box_sequence(boxes_xyxy: np.ndarray, scores: np.ndarray, width: int, height: int) -> np.ndarray:
    """(L, 5) float32: boxes clipped and normalised to [0, 1], by descending score, at most MAX_BOXES."""
    boxes_xyxy = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    order = np.argsort(-scores, kind="stable")[:MAX_BOXES]
    scale = np.array([width, height, width, height], dtype=np.float32)
    norm = np.clip(boxes_xyxy[order] / scale, 0.0, 1.0)
    return np.concatenate([norm, scores[order, None]], axis=1).astype(np.float32)


def coco_outputs(
    boxes_xyxy: np.ndarray, scores: np.ndarray, classes: np.ndarray, width: int, height: int
) -> dict[str, np.ndarray]:
    """The four :data:`COCO_OUTPUTS` from one frame's final (post-NMS, thresholded) detections."""
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    n_person = int(np.sum(classes == PERSON))
    n_vehicle = int(np.sum(np.isin(classes, list(VEHICLES))))
    return {
        "person_count": np.array([n_person], dtype=np.float32),
        "vehicle_count": np.array([n_vehicle], dtype=np.float32),
        "object_count": np.array([len(classes)], dtype=np.float32),
        "boxes": box_sequence(boxes_xyxy, scores, width, height),
    }
