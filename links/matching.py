"""Matching predicted boxes to target boxes: the assignment behind the box-set links' loss.

Detections are sets: two detectors list the same objects in unrelated orders, so a loss that
compares element ``k`` with element ``k`` asks for an order nobody can know. A set loss first
pairs predictions with targets by a minimum-cost one-to-one assignment (DETR's matcher), then
scores the pairs. The cost here is the brief's ``L1 + (1 - IoU)`` on the corners: L1 separates
boxes that do not overlap at all, IoU is what the F1 metric thresholds.

scipy is not a dependency of this project, so the assignment is the classic O(n^2 m)
Hungarian method with potentials (Kuhn-Munkres, as in Jonker-Volgenant's shortest augmenting
paths), in plain Python: box sets are capped at ``SEQ_CAP`` (32) elements plus a few free
slots, and a 10 x 8 problem, typical of the real tuples, takes a few hundred microseconds.
"""

from __future__ import annotations

import numpy as np
import torch


def assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment of an (n, m) cost matrix: ``min(n, m)`` pairs
    ``(rows, cols)``, rows ascending. Costs must be finite."""
    c = np.asarray(cost, dtype=np.float64)
    n, m = c.shape
    if n == 0 or m == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    transposed = n > m
    if transposed:
        c = c.T
        n, m = m, n
    match = _hungarian(c.tolist(), n, m)  # match[j] = row assigned to column j (1-based), 0 = none
    rows = [match[j] - 1 for j in range(1, m + 1) if match[j]]
    cols = [j - 1 for j in range(1, m + 1) if match[j]]
    r, k = (np.array(cols), np.array(rows)) if transposed else (np.array(rows), np.array(cols))
    order = np.argsort(r, kind="stable")
    return r[order].astype(np.int64), k[order].astype(np.int64)


def _hungarian(a: list[list[float]], n: int, m: int) -> list[int]:
    """Shortest augmenting paths with row/column potentials, for n <= m; 1-based match per column."""
    inf = float("inf")
    u = [0.0] * (n + 1)
    v = [0.0] * (m + 1)
    match = [0] * (m + 1)
    way = [0] * (m + 1)
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        minv = [inf] * (m + 1)
        used = [False] * (m + 1)
        while True:
            used[j0] = True
            i0 = match[j0]
            row, ui0 = a[i0 - 1], u[i0]
            delta, j1 = inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = row[j - 1] - ui0 - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    return match


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``a`` (..., P, >=4) with every box of ``b`` (..., T, >=4): (..., P, T)."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:4], b[..., None, :, 2:4])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[..., 2:4] - a[..., :2]).clamp_min(0).prod(-1)
    area_b = (b[..., 2:4] - b[..., :2]).clamp_min(0).prod(-1)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return inter / union.clamp_min(1e-9)


def match_cost(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L1 + (1 - IoU)`` of corners, for every prediction (..., P, 4+) and target (..., T, 4+)."""
    l1 = (pred[..., :, None, :4] - target[..., None, :, :4]).abs().sum(-1)
    return l1 + 1.0 - pairwise_iou(pred, target)


def paired_giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - GIoU`` of matched pairs (K, 4+) and (K, 4+): a gradient even for disjoint boxes."""
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:4], target[:, 2:4])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_p = (pred[:, 2:4] - pred[:, :2]).clamp_min(0).prod(-1)
    area_t = (target[:, 2:4] - target[:, :2]).clamp_min(0).prod(-1)
    union = (area_p + area_t - inter).clamp_min(1e-9)
    hull = (torch.maximum(pred[:, 2:4], target[:, 2:4]) - torch.minimum(pred[:, :2], target[:, :2])).prod(-1)
    giou = inter / union - (hull - union) / hull.clamp_min(1e-9)
    return 1.0 - giou
