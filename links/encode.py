"""How output arrays become link inputs and training targets.

Inputs (what a link reads from a source node):
- counts: ``log1p(max(count, 0))``, so 0, 3 and 30 persons stay on one comparable scale;
- class probabilities: as they are (e.g. 1000 ImageNet probabilities);
- sequences (boxes): the elements as they are (normalised corners and score), capped at the
  first ``cap`` elements, which are the highest-scoring since models order them by score.

Box sequences are then put in a *canonical order*, left to right by box centre (then top to
bottom), for link inputs and training targets alike. Two detectors rank the same boxes by
their own, unrelated scores; with targets in score order an element-wise loss would ask a
decoder for an order it cannot know and teach it the average box. In spatial order the
sequences are predictable and source and target elements align monotonically. The accuracy
metric (box F1) ignores order, and decoded outputs are put back into descending predicted
score, the spec's convention (:func:`present`).

Targets (what a link is trained to produce) are the target node's outputs; their scaling
(standardised counts, normalised probabilities, capped sequences) lives in the link heads.

A :class:`Batch` keeps a node's values for many frames as tensors; sequences are zero-padded
to the longest one in the batch, with their lengths alongside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mlink.models.spec import OutputSpec, Task

SEQ_CAP = 32  # default cap on sequence length, for link inputs and link outputs alike


@dataclass
class Batch:
    """One node's values over ``N`` frames: ``x`` is (N, d) or (N, L, d); ``lengths`` (N,) for sequences."""

    x: torch.Tensor
    lengths: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def is_sequence(self) -> bool:
        return self.lengths is not None

    @property
    def seq_lengths(self) -> torch.Tensor:
        """``lengths`` of a sequence batch (ValueError for a vector batch, which has none)."""
        if self.lengths is None:
            raise ValueError("a batch of vectors has no lengths")
        return self.lengths

    def index(self, idx: torch.Tensor | np.ndarray | Sequence[int]) -> Batch:
        idx_t = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        if self.lengths is None:
            return Batch(self.x[idx_t])
        lengths = self.lengths[idx_t]
        longest = int(lengths.max()) if len(lengths) else 0
        return Batch(self.x[idx_t, : max(longest, 1)], lengths)


def canonical(spec: OutputSpec, value: np.ndarray, cap: int) -> np.ndarray:
    """The first ``cap`` elements (the highest-scoring), boxes in left-to-right order."""
    arr = np.asarray(value, dtype=np.float32).reshape(-1, spec.dim)[:cap]
    if spec.task is Task.BOXES and len(arr) > 1:
        order = np.lexsort((arr[:, 1] + arr[:, 3], arr[:, 0] + arr[:, 2]))
        arr = arr[order]
    return arr


def present(spec: OutputSpec, value: np.ndarray) -> np.ndarray:
    """A decoded sequence in the spec's convention: boxes by descending (predicted) score."""
    if spec.task is Task.BOXES and len(value) > 1:
        return np.ascontiguousarray(value[np.argsort(-value[:, 4], kind="stable")])
    return value


def _pad(spec: OutputSpec, values: Sequence[np.ndarray], cap: int) -> Batch:
    rows = [canonical(spec, v, cap) for v in values]
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    longest = max(int(lengths.max()) if len(lengths) else 0, 1)
    x = np.zeros((len(values), longest, spec.dim), dtype=np.float32)
    for i, r in enumerate(rows):
        x[i, : len(r)] = r
    return Batch(torch.from_numpy(x), torch.from_numpy(lengths))


def input_vector(spec: OutputSpec, value: np.ndarray) -> np.ndarray:
    """The link input for one vector output, (d,) float32."""
    arr = np.asarray(value, dtype=np.float32).reshape(spec.dim)
    if spec.task is Task.COUNT:
        return np.log1p(np.maximum(arr, 0.0)).astype(np.float32)
    return arr


def encode_source(spec: OutputSpec, values: Sequence[np.ndarray], cap: int = SEQ_CAP) -> Batch:
    """Link inputs for a source node over many frames."""
    if spec.kind == "vector":
        if not len(values):
            return Batch(torch.zeros((0, spec.dim)))
        x = np.stack([input_vector(spec, v) for v in values]).astype(np.float32)
        return Batch(torch.from_numpy(x))
    return _pad(spec, values, cap)


def encode_one(spec: OutputSpec, value: np.ndarray, cap: int = SEQ_CAP) -> Batch:
    """Link input for one frame (a batch of one), with as little overhead as possible."""
    if spec.kind == "vector":
        return Batch(torch.from_numpy(input_vector(spec, value)[None, :]))
    arr = canonical(spec, value, cap)
    n = len(arr)
    x = np.zeros((1, max(n, 1), spec.dim), dtype=np.float32)
    x[0, :n] = arr
    return Batch(torch.from_numpy(x), torch.tensor([n], dtype=torch.long))


def encode_target(spec: OutputSpec, values: Sequence[np.ndarray], cap: int = SEQ_CAP) -> Batch:
    """Raw training targets for a target node: counts as they are (scaled by the head), probabilities
    renormalised to sum to 1, sequences capped and padded."""
    if spec.kind == "sequence":
        return _pad(spec, values, cap)
    if not len(values):
        return Batch(torch.zeros((0, spec.dim)))
    y = np.stack([np.asarray(v, dtype=np.float32).reshape(spec.dim) for v in values]).astype(np.float32)
    if spec.task is Task.CLASS:
        y = np.clip(y, 0.0, None)
        y = y / np.maximum(y.sum(axis=1, keepdims=True), 1e-12)
    return Batch(torch.from_numpy(y.astype(np.float32)))
