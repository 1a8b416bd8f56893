"""Links that read a box set as a set: box set -> box set (``BoxSet``), box set -> count (``BoxCount``).

The paper's sequence links read boxes with a GRU and write them with an attention decoder, one
element after another. Detections are sets, though: the order of boxes carries nothing, and
on the real tuples the sequence links reached box F1 0.29-0.56 and exact counts 0.49-0.60.
These two links are order-free by construction (DeepSets: one MLP per box, symmetric pooling),
and :mod:`mlink.links.candidates` trains them *beside* the paper's links and keeps whichever
scores better on held-out frames, so neither replaces the other.

``BoxSet`` (the "cheap first step" of the method doc's "Box sets"): per source box, an MLP reads
the box, its score and a pooled context of the whole set, and predicts a move of the box
towards a target box (centre offsets in box widths, log size ratios), the target's score, and
a keep/drop logit. ``free`` extra slots (learned anchors and queries, read with the same
context) can emit boxes that have no source box at all, such as parked cars a person detector
never reports. Training pairs predictions with target boxes by a minimum-cost assignment
(:mod:`mlink.links.matching`, cost ``L1 + (1 - IoU)``); matched predictions learn the box (L1 +
GIoU) and score and keep = 1, all others keep = 0. A source box matched to a target it does not
overlap (IoU under ``GATE_IOU`` for its source box and its prediction) counts as unmatched: the
assignment pairs everything it can, and pulling a car's box across the frame onto a stray
person teaches nothing. Prediction: the kept boxes, overlapping duplicates (IoU above ``nms``)
suppressed, by descending score. An empty source set leaves only the free slots, so with
``free=0`` it predicts the empty set.

``BoxCount``: the count is mostly "how many boxes of some kind": features are the numbers of
boxes above several score thresholds and per size bin, plus sum- and mean-pooled per-box MLP
embeddings (a learned soft count), into the same MLP head, target scaling and MSE loss as
``Seq2Vec``; it mixes in ensembles like any vector link.

Both predict in numpy (a handful of matrix products per batch, see :mod:`mlink.links.infer`).

Measured (5-fold cross-validation over the 527 real building tuples of test_links_real.py,
held-out box F1 / exact counts): yolox -> hog boxes 0.39 (Seq2Seq) -> 0.71 (BoxSet), hog ->
yolox boxes 0.24 -> 0.74 (the free slots find the parked cars hog never reports); the counts
stay within noise (BoxCount won 1 fold of 5 per pair: 0.50 and 0.41 either way), which the
counts of the BoxSet's own kept boxes (0.51) suggest is what box sets can tell about them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlink.links.arch import Encoded, Link, hidden_width, mlp
from mlink.links.encode import Batch, present
from mlink.links.infer import NpMLP, sigmoid
from mlink.links.matching import assignment, match_cost, paired_giou_loss, pairwise_iou
from mlink.models.spec import BOX_DIM, box_iou

BOX_FEATS = 10  # x1, y1, x2, y2, score, cx, cy, w, h, sqrt(area)
SCORE_THRESHOLDS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8)
SIZE_EDGES = (0.0, 0.05, 0.1, 0.2, 0.4)  # sqrt(area) bins (the last open-ended)
COUNT_SCALE = 8.0  # counts enter the network divided by this (a busy frame has a few dozen boxes)
FREE_SLOTS = 8
GATE_IOU = 0.1
NMS_IOU = 0.9  # only near-copies: at 0.7 hog -> yolox boxes lost 4 points F1 (parked cars overlap)
L1_WEIGHT, GIOU_WEIGHT, SCORE_WEIGHT = 5.0, 2.0, 1.0  # DETR's box weights; the score is secondary
MIN_SIZE = 1e-3


def box_features(x: Any) -> Any:
    """Per-box features (..., BOX_FEATS) of boxes (..., 5), for torch tensors and numpy arrays alike."""
    x1, y1, x2, y2, s = (x[..., k] for k in range(5))
    w, h = (x2 - x1).clip(0), (y2 - y1).clip(0)
    cols = [x1, y1, x2, y2, s, (x1 + x2) / 2, (y1 + y2) / 2, w, h, (w * h) ** 0.5]
    return torch.stack(cols, -1) if isinstance(x, torch.Tensor) else np.stack(cols, -1).astype(np.float32)


def _corners(cx: Any, cy: Any, w: Any, h: Any) -> Any:
    cols = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    return torch.stack(cols, -1) if isinstance(cx, torch.Tensor) else np.stack(cols, -1)


def _moved(f: Any, o: Any) -> Any:
    """Source boxes (features ``f``) moved by the head's outputs ``o``: corners (..., 4)."""
    w, h = f[..., 7].clip(MIN_SIZE), f[..., 8].clip(MIN_SIZE)
    exp = torch.exp if isinstance(o, torch.Tensor) else np.exp
    return _corners(
        f[..., 5] + o[..., 0] * w,
        f[..., 6] + o[..., 1] * h,
        w * exp(o[..., 2].clip(-4, 4)),
        h * exp(o[..., 3].clip(-4, 4)),
    )


def _hand_counts(f: Any, mask: Any) -> Any:
    """Boxes above each score threshold and per size bin, divided by ``COUNT_SCALE``: (N, 11)."""
    s, size = f[..., 4], f[..., 9]
    edges = [*SIZE_EDGES[1:], float("inf")]
    cols = [(s > t) * mask for t in SCORE_THRESHOLDS]
    cols += [((size >= lo) & (size < hi)) * mask for lo, hi in zip(SIZE_EDGES, edges)]
    if isinstance(f, torch.Tensor):
        return torch.stack([c.sum(1) for c in cols], -1) / COUNT_SCALE
    return (np.stack([c.sum(1) for c in cols], -1) / COUNT_SCALE).astype(np.float32)


def _valid(lengths: Any, width: int) -> Any:
    if isinstance(lengths, torch.Tensor):
        return (torch.arange(width)[None, :] < lengths[:, None]).float()
    return (np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)


class BoxCount(Link):
    """Box set -> count, order-free (see the module docstring)."""

    arch = "BoxCount"

    def __init__(self, source: Any, target: Any, **hp: Any) -> None:
        super().__init__(source, target, **hp)
        hidden = self.hparams["hidden"]
        self.phi = mlp(BOX_FEATS, hidden, hidden, self.hparams["dropout"])
        width = hidden_width(target.dim, self.hparams["min_hidden"], self.hparams["max_hidden"])
        n_hand = len(SCORE_THRESHOLDS) + len(SIZE_EDGES)
        self.mlp = mlp(2 * hidden + n_hand + 1, width, target.dim, self.hparams["dropout"])

    @property
    def uses_seq_lr(self) -> bool:
        return False  # no GRU: at the paper's lr it learnt counts-above-a-threshold best (1.00 vs 0.98)

    def preact(self, src: Batch) -> torch.Tensor:
        x, lengths = src.x, src.seq_lengths
        mask = _valid(lengths, x.shape[1])
        f = box_features(x)
        phi = torch.relu(self.phi(f)) * mask[..., None]
        n = lengths.to(x.dtype)
        total = phi.sum(1)
        feat = [total / COUNT_SCALE, total / n.clamp_min(1)[:, None], _hand_counts(f, mask), torch.log1p(n)[:, None]]
        return self.mlp(torch.cat(feat, 1))

    def _compile_np(self) -> SimpleNamespace:
        return SimpleNamespace(phi=NpMLP(self.phi), mlp=NpMLP(self.mlp))

    def np_encoder(self) -> None:
        return None  # no GRU to share with other links reading the same boxes

    def preact_np(self, src: Batch, encoded: Encoded | None = None) -> np.ndarray:
        c = self._compiled()
        x, lengths = src.x.numpy(), src.seq_lengths.numpy()
        mask = _valid(lengths, x.shape[1])
        f = box_features(x)
        phi = np.maximum(c.phi(f), 0.0) * mask[..., None]
        n = lengths.astype(np.float32)
        total = phi.sum(1)
        feat = [total / COUNT_SCALE, total / np.maximum(n, 1)[:, None], _hand_counts(f, mask), np.log1p(n)[:, None]]
        return c.mlp(np.concatenate(feat, 1).astype(np.float32))


class BoxSet(Link):
    """Box set -> box set, order-free (see the module docstring)."""

    arch = "BoxSet"
    mixable = False
    # Its training is a lottery of the seed (hog -> yolox boxes, five folds x four seeds: F1
    # 0.40-0.77 on the same frames); the lowest validation loss of three seeds averaged 0.65.
    restarts = 3

    def __init__(self, source: Any, target: Any, *, free: int = FREE_SLOTS, nms: float = NMS_IOU, **hp: Any) -> None:
        # No dropout by default: it jitters the keep/drop decisions and the free slots; on five
        # folds of 320 building tuples hog -> yolox boxes reached F1 0.64 without, 0.54 with 0.1.
        hp["dropout"] = 0.0 if hp.get("dropout") is None else hp["dropout"]
        super().__init__(source, target, **hp)
        self.hparams.update(free=int(free), nms=float(nms))
        hidden, drop = self.hparams["hidden"], self.hparams["dropout"]
        self.phi = mlp(BOX_FEATS, hidden, hidden, drop)
        self.rho = mlp(2 * hidden + 1, hidden, hidden, drop)
        self.box_head = mlp(2 * hidden, hidden, 6, drop)  # dx, dy, dw, dh, score, keep
        self.free_head = mlp(2 * hidden, hidden, 6, drop)  # anchor moves (logits), score, keep
        k = int(free)
        self.free_query = nn.Parameter(torch.randn(k, hidden) * 0.1)
        grid = torch.linspace(0.1, 0.9, max(k, 1))[:k]
        anchors = torch.stack([grid, grid.flip(0), torch.full_like(grid, 0.1), torch.full_like(grid, 0.2)], -1)
        self.free_anchor = nn.Parameter(torch.logit(anchors))
        with torch.no_grad():  # start as the identity: every source box kept where it is
            for head, keep in ((self.box_head, 0.0), (self.free_head, -2.0)):
                last = head[3]
                assert isinstance(last, nn.Linear)
                last.weight.zero_()
                last.bias.zero_()
                last.bias[5] = keep

    def early_stops(self) -> bool:
        return True  # its loss is the set loss of real predictions, not a teacher-forced one

    def np_encoder(self) -> None:
        return None

    def forward_sets(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> corners (N, P, 4), score logits (N, P), keep logits (N, P), valid (N, P) with
        P = L source slots + ``free`` slots."""
        n, width, _ = x.shape
        mask = _valid(lengths, width)
        f = box_features(x)
        phi = torch.relu(self.phi(f)) * mask[..., None]
        count = lengths.to(x.dtype)
        ctx_in = torch.cat(
            [phi.sum(1) / count.clamp_min(1)[:, None], phi.max(1).values, torch.log1p(count)[:, None]], 1
        )
        ctx = torch.relu(self.rho(ctx_in))
        o = self.box_head(torch.cat([phi, ctx[:, None].expand(-1, width, -1)], -1))
        boxes, out, valid = _moved(f, o), o, mask
        k = self.hparams["free"]
        if k:
            q = torch.cat([self.free_query[None].expand(n, -1, -1), ctx[:, None].expand(-1, k, -1)], -1)
            of = self.free_head(q)
            a = torch.sigmoid(self.free_anchor[None] + of[..., :4])
            boxes = torch.cat([boxes, _corners(a[..., 0], a[..., 1], a[..., 2], a[..., 3])], 1)
            out, valid = torch.cat([o, of], 1), torch.cat([mask, mask.new_ones((n, k))], 1)
        return boxes, out[..., 4], out[..., 5], valid

    def loss(self, src: Batch, tgt: Batch) -> torch.Tensor:
        """The matching loss (module docstring), per target box, plus the keep/drop BCE."""
        boxes, score, keep, valid = self.forward_sets(src.x, src.seq_lengths)
        y, ylen = tgt.x, tgt.seq_lengths
        frame, pred, targ = _match(boxes.detach(), src.x, y, valid, ylen, src.x.shape[1])
        keep_target = torch.zeros_like(keep)
        keep_target[frame, pred] = 1.0
        on = valid > 0
        bce = F.binary_cross_entropy_with_logits(keep[on], keep_target[on]) if bool(on.any()) else keep.sum() * 0
        if len(frame) == 0:
            return bce + boxes.sum() * 0
        pb, tb = boxes[frame, pred], y[frame, targ]
        reg = L1_WEIGHT * (pb - tb[:, :4]).abs().sum(-1) + GIOU_WEIGHT * paired_giou_loss(pb, tb)
        reg = reg + SCORE_WEIGHT * (torch.sigmoid(score[frame, pred]) - tb[:, 4]).abs()
        return bce + reg.sum() / ylen.sum().clamp_min(1)

    def _compile_np(self) -> SimpleNamespace:
        return SimpleNamespace(
            phi=NpMLP(self.phi),
            rho=NpMLP(self.rho),
            box_head=NpMLP(self.box_head),
            free_head=NpMLP(self.free_head),
            query=self.free_query.detach().numpy().astype(np.float32).copy(),
            anchor=self.free_anchor.detach().numpy().astype(np.float32).copy(),
        )

    def sets_np(self, x: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
        """:meth:`forward_sets` in numpy (eval mode)."""
        c = self._compiled()
        n, width, _ = x.shape
        mask = _valid(lengths, width)
        f = box_features(x)
        phi = np.maximum(c.phi(f), 0.0) * mask[..., None]
        count = lengths.astype(np.float32)
        ctx_in = np.concatenate([phi.sum(1) / np.maximum(count, 1)[:, None], phi.max(1), np.log1p(count)[:, None]], 1)
        ctx = np.maximum(c.rho(ctx_in.astype(np.float32)), 0.0)
        o = c.box_head(np.concatenate([phi, np.broadcast_to(ctx[:, None], (n, width, ctx.shape[1]))], -1))
        boxes, out, valid = _moved(f, o), o, mask
        k = self.hparams["free"]
        if k:
            q = np.concatenate(
                [np.broadcast_to(c.query[None], (n, k, c.query.shape[1])), np.repeat(ctx[:, None], k, 1)], -1
            )
            of = c.free_head(q)
            a = sigmoid(c.anchor[None] + of[..., :4])
            boxes = np.concatenate([boxes, _corners(a[..., 0], a[..., 1], a[..., 2], a[..., 3])], 1)
            out, valid = np.concatenate([o, of], 1), np.concatenate([mask, np.ones((n, k), np.float32)], 1)
        return boxes, out[..., 4], out[..., 5], valid

    def predict(self, src: Batch) -> list[np.ndarray]:
        boxes, score, keep, valid = self.sets_np(src.x.numpy(), src.seq_lengths.numpy())
        nms, cap = self.hparams["nms"], self.cap
        return [
            present(self.target, _kept(boxes[i], score[i], keep[i], valid[i] > 0, nms, cap)) for i in range(len(boxes))
        ]


def _match(
    boxes: torch.Tensor, src: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, ylen: torch.Tensor, n_src: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Matched (frame, prediction, target) index triples of a batch: a minimum-cost assignment
    per frame, less source-box predictions that overlap their target under ``GATE_IOU``."""
    cost = match_cost(boxes, y).numpy()
    iou = torch.maximum(pairwise_iou(boxes[:, :n_src], y), pairwise_iou(src, y)).numpy()
    ok = valid.numpy() > 0
    frames, preds, targs = [], [], []
    for i in range(len(boxes)):
        p_idx = np.flatnonzero(ok[i])
        t_n = int(ylen[i])
        if not len(p_idx) or not t_n:
            continue
        rows, cols = assignment(cost[i][p_idx][:, :t_n])
        p = p_idx[rows]
        keep = (p >= n_src) | (iou[i, np.minimum(p, n_src - 1), cols] >= GATE_IOU)
        frames += [i] * int(keep.sum())
        preds += p[keep].tolist()
        targs += cols[keep].tolist()
    as_t = (torch.tensor(v, dtype=torch.long) for v in (frames, preds, targs))
    return next(as_t), next(as_t), next(as_t)


def _kept(
    boxes: np.ndarray, score: np.ndarray, keep: np.ndarray, valid: np.ndarray, nms: float, cap: int
) -> np.ndarray:
    """One frame's prediction: kept boxes in [0, 1], duplicates suppressed, by descending score."""
    idx = np.flatnonzero(valid & (keep > 0))
    idx = idx[np.argsort(-keep[idx], kind="stable")]
    b = np.clip(boxes[idx], 0.0, 1.0)
    chosen: list[int] = []
    if len(idx):
        ious = box_iou(b, b)
        for j in range(len(idx)):
            if all(ious[j, k] <= nms for k in chosen):
                chosen.append(j)
            if len(chosen) == cap:
                break
    return np.concatenate([b[chosen], sigmoid(score[idx[chosen]])[:, None]], 1).astype(np.float32).reshape(-1, BOX_DIM)
