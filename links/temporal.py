"""Temporal links: what a target's last real output on the same camera is worth on this frame.

A camera's next frame looks like its last one. When a model really ran on a frame of a camera
(rotation, profiling, an audit), its output there is a candidate answer for the camera's other
frames; how good a candidate depends on how much the picture changed in between and how long
ago it was. :class:`ReuseModel` learns that, per node, from pairs of *real* outputs of the same
camera: for a frame ``p`` and a reference ``r`` where the model ran, the target is the node's own
accuracy metric of ``output(r)`` against ``output(p)`` (exact counts, top-1 class, box F1), and
the inputs are a :class:`Change`: Reducto's four low-level difference features between the two
frames (share of pixels, blurred areas, edges and corners changed), the time between them and
whether the reference lies ahead (a buffered frame served from a later real output).

The model is a logistic regression with soft targets (Newton steps, L2-regularised) on
log-scaled features, so its output is an *expected accuracy*, calibrated on pairs the way they
will be used, and monotone in each feature. That keeps it honest on data it never saw: a larger
change can only lower (or only raise) the figure, never wiggle with a clip's quirks.

Serving (:func:`choose`) compares, per node and frame, the best reuse candidate's expected
accuracy with the cross-model ensemble's (the link accuracy of the models that ran on the
frame) and serves the larger; with no recent real output it falls back to the ensemble. Every
real execution teaches: two real outputs of one camera are one more training pair
(:meth:`ReuseModel.learn`), refitted in milliseconds.

Only numbers come in (outputs, differences, times): this module never sees a frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mlink.links.tuples import TupleSet, node_model
from mlink.models.spec import OutputSpec

CHANGE_FEATURES = ("pixel", "area", "edge", "corner")
MAX_PAIRS = 20000  # pairs kept per node (the most recent); older ones are dropped
L2 = 1e-2
NEWTON_STEPS = 25


@dataclass(frozen=True)
class Change:
    """How a frame differs from a reference frame of the same camera."""

    diffs: tuple[float, ...]  # CHANGE_FEATURES, each a share of the frame in [0, 1]
    age_s: float  # seconds between the two frames (absolute)
    ahead: bool = False  # the reference comes after the frame

    context: float | None = None  # how much the other models' real outputs changed (None: unknown)

    def vector(self) -> np.ndarray:
        return change_vector(self.diffs, self.age_s, self.ahead, self.context)


def change_vector(diffs: Sequence[float], age_s: float, ahead: bool, context: float | None = None) -> np.ndarray:
    """The regression's inputs: a bias, log-scaled differences and age, the direction, and the
    context: the mean over the other models real on both frames of (1 - their accuracy of one
    frame's output against the other's), with a flag when no other model was real on both."""
    d = [math.log1p(100.0 * max(0.0, float(x))) for x in diffs]
    ctx = [0.0, 1.0] if context is None else [float(context), 0.0]
    return np.array([1.0, *d, math.log1p(max(0.0, float(age_s))), 1.0 if ahead else 0.0, *ctx], dtype=np.float64)


N_INPUTS = 5 + len(CHANGE_FEATURES)


def output_change(tuples: TupleSet, model_nodes: Sequence[str], r: int, p: int) -> float:
    """1 - the mean accuracy of frame ``r``'s outputs against frame ``p``'s over ``model_nodes``."""
    accs = [tuples.specs[k].accuracy(tuples.values[k][r], tuples.values[k][p]) for k in model_nodes]
    return 1.0 - float(np.mean(accs)) if accs else 0.0


def _fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = L2, steps: int = NEWTON_STEPS) -> np.ndarray:
    """Weights of a logistic regression with soft targets in [0, 1] (Newton's method). The bias
    is not penalised; a node whose pairs are all equal gets a near-constant model."""
    n, d = X.shape
    w = np.zeros(d)
    mean = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
    w[0] = math.log(mean / (1 - mean))
    pen = np.full(d, l2 * n)
    pen[0] = 0.0
    for _ in range(steps):
        z = np.clip(X @ w, -30, 30)
        p = 1.0 / (1.0 + np.exp(-z))
        grad = X.T @ (p - y) + pen * w
        s = p * (1 - p) + 1e-6
        hess = (X * s[:, None]).T @ X + np.diag(pen + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-7:
            break
    return w


@dataclass
class ReuseModel:
    """Per node, the expected accuracy of serving a reference frame's real output (module doc)."""

    weights: dict[str, np.ndarray] = field(default_factory=dict)
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def fit(cls, pairs: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> ReuseModel:
        model = cls()
        for node, (X, y) in pairs.items():
            model.learn(node, X, y)
        return model

    def learn(self, node: str, X: np.ndarray, y: np.ndarray) -> None:
        """Add pairs (inputs ``X`` as :func:`change_vector` makes them, accuracies ``y``) and refit."""
        X = np.asarray(X, dtype=np.float64).reshape(-1, N_INPUTS)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if len(y) == 0:
            return
        if node in self.pairs:
            X = np.concatenate([self.pairs[node][0], X])
            y = np.concatenate([self.pairs[node][1], y])
        X, y = X[-MAX_PAIRS:], y[-MAX_PAIRS:]
        self.pairs[node] = (X, y)
        self.weights[node] = _fit_logistic(X, y)

    def knows(self, node: str) -> bool:
        return node in self.weights

    def expected(self, node: str, X: np.ndarray) -> np.ndarray:
        """Expected accuracy of reuse for each row of ``X`` (0 for a node never learnt)."""
        X = np.asarray(X, dtype=np.float64).reshape(-1, N_INPUTS)
        w = self.weights.get(node)
        if w is None:
            return np.zeros(len(X))
        return 1.0 / (1.0 + np.exp(-np.clip(X @ w, -30, 30)))

    def n_pairs(self, node: str) -> int:
        return len(self.pairs[node][1]) if node in self.pairs else 0


DiffFn = Callable[[int, int], Sequence[float]]


def camera_pairs(
    tuples: TupleSet,
    positions: Sequence[int],
    diff: DiffFn,
    max_gap: int,
    nodes: Sequence[str] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Training pairs from tuples where every node is real: for each camera's frames in time
    order, every frame against each frame at most ``max_gap`` frames away (both directions),
    once with every other model as the context and once without any. ``diff(a, b)`` gives the :data:`CHANGE_FEATURES`
    between two positions."""
    nodes = list(nodes if nodes is not None else tuples.nodes)
    runs: dict[str, list[int]] = {}
    for p in positions:
        runs.setdefault(tuples.streams[p], []).append(p)
    by_model: dict[str, list[str]] = {}
    for k in nodes:
        by_model.setdefault(node_model(k), []).append(k)
    models = sorted({node_model(k) for k in tuples.nodes})
    ref_frame: list[tuple[int, int, tuple[float, ...], float, bool]] = []
    for members in runs.values():
        seq = sorted(members, key=lambda i: tuples.timestamps[i])
        for a in range(len(seq)):
            for b in range(max(0, a - max_gap), min(len(seq), a + max_gap + 1)):
                if a != b:
                    p, r = seq[a], seq[b]
                    age = abs(tuples.timestamps[p] - tuples.timestamps[r])
                    ref_frame.append((r, p, tuple(diff(r, p)), age, b > a))
    change = {
        (m, r, p): output_change(tuples, [k for k in tuples.nodes if node_model(k) == m], r, p)
        for m in models
        for r, p, *_ in ref_frame
    }
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for model, keys in by_model.items():
        others = [m for m in models if m != model]
        rows = [
            change_vector(d, age, ahead, float(np.mean([change[(m, r, p)] for m in others])) if others else None)
            for r, p, d, age, ahead in ref_frame
        ]
        # each pair again without the context: serving often knows no other model's output there
        rows += [change_vector(d, age, ahead, None) for r, p, d, age, ahead in ref_frame]
        X = np.stack(rows) if rows else np.zeros((0, N_INPUTS))
        for k in keys:
            spec: OutputSpec = tuples.specs[k]
            vals = tuples.values[k]
            y = np.array([spec.accuracy(vals[r], vals[p]) for r, p, *_ in ref_frame], dtype=np.float64)
            out[k] = (X, np.concatenate([y, y]))
    return out


def choose(reuse: np.ndarray, link: float) -> tuple[int, float]:
    """The source to serve: the index of the best reuse candidate (expected accuracies
    ``reuse``), or -1 for the cross-model ensemble (expected accuracy ``link``) when it is at
    least as good or there is no candidate. Returns (choice, its expected accuracy)."""
    if len(reuse) == 0:
        return -1, float(link)
    i = int(np.argmax(reuse))
    if float(reuse[i]) > float(link):
        return i, float(reuse[i])
    return -1, float(link)
