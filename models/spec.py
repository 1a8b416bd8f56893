"""Output specifications: what a black-box model returns, and how its accuracy is judged.

Everything outside ``models/`` sees a model only through these specs and the arrays they
describe. Links consume the arrays, the scheduler consumes the accuracies, the server turns
them into JSON. The accuracy metric lives here, with the output, because a link's quality is
always measured against the target model's own output (MLink, Eq. 1), never against labels.

Array conventions (``np.float32`` everywhere):
- ``vector`` outputs are shape ``(dim,)``;
- ``sequence`` outputs are shape ``(length, dim)`` with ``0 <= length``; elements are ordered
  deterministically by the model (for boxes: by descending score) so links see a stable order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import numpy as np


class Task(str, Enum):
    """The kind of output, which fixes its metric, and for links its activation and loss."""

    COUNT = "count"  # vector (1,): a non-negative count; correct when |pred - exact| < 0.5
    CLASS = "class"  # vector (C,): class probabilities; correct on top-1 agreement
    BOXES = "boxes"  # sequence (L, 5): normalised x1, y1, x2, y2, score; F1 of IoU>=0.5 matches


Kind = Literal["vector", "sequence"]

# Box elements: corners normalised to [0, 1] by frame width/height, then the detector's score.
BOX_DIM = 5
BOX_IOU_MATCH = 0.5


@dataclass(frozen=True)
class OutputSpec:
    """One named output of a model: its shape family, width, task and (for classes) labels."""

    name: str
    kind: Kind
    dim: int
    task: Task
    description: str = ""
    max_len: int | None = None  # sequences: the most elements the model will ever emit
    labels: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"output {self.name}: dim must be >= 1, got {self.dim}")
        expected = {Task.COUNT: "vector", Task.CLASS: "vector", Task.BOXES: "sequence"}[self.task]
        if self.kind != expected:
            raise ValueError(f"output {self.name}: task {self.task.value} needs kind {expected}")
        if self.task is Task.COUNT and self.dim != 1:
            raise ValueError(f"output {self.name}: a count has dim 1")
        if self.task is Task.BOXES and self.dim != BOX_DIM:
            raise ValueError(f"output {self.name}: boxes have dim {BOX_DIM}")
        if self.labels and len(self.labels) != self.dim:
            raise ValueError(f"output {self.name}: {len(self.labels)} labels for dim {self.dim}")

    # -- validation -------------------------------------------------------------------------
    def check(self, value: np.ndarray) -> np.ndarray:
        """Return ``value`` as float32 if it matches this spec, else raise ValueError."""
        arr = np.asarray(value, dtype=np.float32)
        if self.kind == "vector" and arr.shape != (self.dim,):
            raise ValueError(f"output {self.name}: expected shape ({self.dim},), got {arr.shape}")
        if self.kind == "sequence":
            if arr.ndim != 2 or arr.shape[1] != self.dim:
                raise ValueError(f"output {self.name}: expected shape (L, {self.dim}), got {arr.shape}")
            if self.max_len is not None and arr.shape[0] > self.max_len:
                raise ValueError(f"output {self.name}: {arr.shape[0]} elements > max_len {self.max_len}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"output {self.name}: non-finite values")
        return arr

    def empty(self) -> np.ndarray:
        """The trivial sequence output (no elements); only meaningful for sequences."""
        return np.zeros((0, self.dim), dtype=np.float32)

    # -- accuracy ---------------------------------------------------------------------------
    def accuracy(self, pred: np.ndarray, exact: np.ndarray) -> float:
        """Accuracy of ``pred`` against the model's own output ``exact``, in [0, 1]."""
        if self.task is Task.COUNT:
            return float(abs(float(pred[0]) - float(exact[0])) < 0.5)
        if self.task is Task.CLASS:
            return float(int(np.argmax(pred)) == int(np.argmax(exact)))
        return box_f1(np.asarray(pred).reshape(-1, BOX_DIM), np.asarray(exact).reshape(-1, BOX_DIM))

    def mean_accuracy(self, preds: list[np.ndarray], exacts: list[np.ndarray]) -> float:
        if len(preds) != len(exacts) or not preds:
            raise ValueError("mean_accuracy needs equally many (>0) predictions and references")
        return float(np.mean([self.accuracy(p, e) for p, e in zip(preds, exacts)]))

    # -- presentation -----------------------------------------------------------------------
    def to_json(self, value: np.ndarray) -> Any:
        """A JSON-friendly rendering for APIs and the CLI (derived values, not raw arrays)."""
        arr = np.asarray(value, dtype=np.float32)
        if self.task is Task.COUNT:
            return {"count": round(max(float(arr[0]), 0.0)), "value": round(float(arr[0]), 3)}
        if self.task is Task.CLASS:
            top = np.argsort(-arr)[:5]
            return {
                "label": self._label(int(top[0])),
                "index": int(top[0]),
                "score": round(float(arr[top[0]]), 4),
                "top5": [{"label": self._label(int(i)), "score": round(float(arr[i]), 4)} for i in top],
            }
        return [
            {"box": [round(float(v), 4) for v in row[:4]], "score": round(float(row[4]), 4)}
            for row in arr.reshape(-1, BOX_DIM)
        ]

    def _label(self, index: int) -> str:
        return self.labels[index] if self.labels else str(index)

    def describe(self) -> str:
        shape = f"({self.dim},)" if self.kind == "vector" else f"(L<={self.max_len}, {self.dim})"
        return f"{self.name}: {self.kind} {shape} {self.task.value}"


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (N, >=4) and ``b`` (M, >=4) in x1, y1, x2, y2 form."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float32)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0).astype(np.float32)


def box_f1(pred: np.ndarray, exact: np.ndarray, iou: float = BOX_IOU_MATCH) -> float:
    """F1 of a greedy one-to-one matching at IoU >= ``iou``; two empty sets agree fully."""
    if len(pred) == 0 and len(exact) == 0:
        return 1.0
    if len(pred) == 0 or len(exact) == 0:
        return 0.0
    ious = box_iou(pred, exact)
    matched = 0
    used_p: set[int] = set()
    used_e: set[int] = set()
    for flat in np.argsort(-ious, axis=None):
        p, e = divmod(int(flat), ious.shape[1])
        if ious[p, e] < iou:
            break
        if p in used_p or e in used_e:
            continue
        used_p.add(p)
        used_e.add(e)
        matched += 1
    return 2.0 * matched / (len(pred) + len(exact))
