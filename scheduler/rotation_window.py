"""The figures a hybrid buffer is planned on, and the temporal outputs served from real ones.

Pure helpers of :mod:`mlink.scheduler.rotation` (no pool, no threads): a camera's real outputs
(:class:`Real`), the reuse/prior tensors :func:`mlink.scheduler.hybrid.plan_window` takes
(:func:`window_tensors`), a mode option's expected accuracy and time over a buffer already seen
(:func:`simulate`), and the temporal :class:`~mlink.scheduler.serving.NodeOutput` that serves a
real output of another frame (:func:`temporal_output`). Frames come in as opaque per-frame
``maps`` and a ``diff(maps_a, maps_b)`` giving the :data:`mlink.links.temporal.CHANGE_FEATURES`
between them (the server computes both: :mod:`mlink.server.change`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlink.links import node_model
from mlink.links.temporal import ReuseModel, change_vector
from mlink.models.catalog import model_info
from mlink.scheduler.hybrid import Modes, plan_window, window_figures
from mlink.scheduler.serving import FrameResult, NodeOutput

DiffFn = Callable[[Any, Any], Sequence[float]]


@dataclass(frozen=True)
class Real:
    """A model's real outputs on one frame of a camera."""

    camera: str
    index: int  # the frame's index in its source
    wall_time: float
    maps: Any
    outputs: Mapping[str, np.ndarray]  # node -> value


@dataclass
class Held:
    """A buffered frame: its result as last stored, its maps, and its revision."""

    result: FrameResult
    maps: Any
    revision: int = 0
    ran: set[str] = field(default_factory=set)  # models that really ran on it

    @property
    def camera(self) -> str:
        return self.result.frame.camera

    @property
    def wall_time(self) -> float:
        return self.result.frame.wall_time


def real_of(held: Held, model: str, nodes: Sequence[str]) -> Real | None:
    """The frame's real outputs of ``model`` (None when any of its nodes was not executed)."""
    outs = held.result.outputs
    if not nodes or any(k not in outs or outs[k].provenance != "executed" for k in nodes):
        return None
    values = {k: outs[k].value for k in nodes}
    if any(v is None for v in values.values()):
        return None
    f = held.result.frame
    return Real(f.camera, f.index, f.wall_time, held.maps, values)  # type: ignore[arg-type]


class Changes:
    """Change vectors between frames, the differences computed once per pair of maps."""

    def __init__(self, diff: DiffFn) -> None:
        self.diff = diff
        self._cache: dict[tuple[int, int], Sequence[float]] = {}

    def vector(self, ref: Any, ref_time: float, maps: Any, time: float) -> np.ndarray:
        key = (id(ref), id(maps))
        d = self._cache.get(key)
        if d is None:
            d = self._cache[key] = tuple(self.diff(ref, maps))
        return change_vector(d, abs(time - ref_time), ref_time > time)

    def clear(self) -> None:
        self._cache.clear()


def window_tensors(
    reuse: ReuseModel,
    changes: Changes,
    nodes: Sequence[str],
    window: Sequence[Held],
    prior: Mapping[str, Real],
    in_window: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(reuse (nodes, n, n), prior (nodes, n)) as :func:`~mlink.scheduler.hybrid.plan_window`
    takes them: frame i served from a real output on frame j of the same camera, or from the
    camera's last real output before the buffer (``prior``: camera -> :class:`Real`)."""
    rows: list[np.ndarray] = []
    where: list[tuple[int, int]] = []
    for i, h in enumerate(window):
        ref = prior.get(h.camera)
        if ref is not None:
            rows.append(changes.vector(ref.maps, ref.wall_time, h.maps, h.wall_time))
            where.append((i, -1))
        for j, o in enumerate(window if in_window else ()):
            if j != i and o.camera == h.camera:
                rows.append(changes.vector(o.maps, o.wall_time, h.maps, h.wall_time))
                where.append((i, j))
    return window_figures(reuse, nodes, rows, where, len(window))


@dataclass
class Figures:
    """What :func:`simulate` and the rotation read: per model its nodes, costs and tensors."""

    nodes: Mapping[str, Sequence[str]]  # model -> its served nodes
    link: Callable[[frozenset[str], str], float]  # (resident set, node) -> expected accuracy
    latency_ms: Mapping[str, float]
    load_ms: Mapping[str, float]
    time_budget_ms: float  # per frame: gpu_share x every model's latency added up


def window_budget(fig: Figures, modes: Modes, n: int) -> float:
    """Rotation time a buffer of ``n`` frames may spend beside the resident models."""
    resident = sum(fig.latency_ms[m] for m in modes.resident)
    return max(0.0, fig.time_budget_ms - resident) * n


def simulate(
    fig: Figures, modes: Modes, tensors: Mapping[str, tuple[np.ndarray, np.ndarray]], n: int
) -> tuple[float, float]:
    """(expected accuracy, ms per frame) of ``modes`` over a buffer of ``n`` frames already seen,
    from expected figures only (what :func:`~mlink.scheduler.hybrid.choose_modes` compares).
    Without a buffer (``n`` 0) a rotating model counts as predicted."""
    resident_ms = sum(fig.latency_ms[m] for m in modes.resident)
    if resident_ms > fig.time_budget_ms + 1e-9:
        return 0.0, resident_ms
    res = frozenset(modes.resident)
    link = {m: np.array([fig.link(res, k) for k in fig.nodes[m]]) for m in fig.nodes if m not in res}
    rot = sorted(m for m in modes.rotating if n and m in tensors)
    wp = plan_window(
        {m: tensors[m][0] for m in rot},
        {m: np.zeros_like(tensors[m][1]) for m in rot},
        {m: link[m] for m in rot},
        {m: fig.latency_ms[m] for m in rot},
        {m: fig.load_ms[m] for m in rot},
        window_budget(fig, modes, n),
    )
    per_model = []
    for m in fig.nodes:
        if m in res:
            per_model.append(1.0)
        elif m in rot:
            per_model.append(float(np.mean(wp.expected[m])))
        else:
            per_model.append(float(np.mean(link[m])) if len(link[m]) else 0.0)
    return float(np.mean(per_model)), resident_ms + (wp.spent_ms / n if n else 0.0)


def temporal_output(node: str, ref: Real, held_time: float, expected: float) -> NodeOutput:
    """``node`` served from ``ref``'s real output: predicted, with a temporal source."""
    value = ref.outputs[node]
    age = held_time - ref.wall_time
    spec = model_info(node_model(node)).output(node.split(":", 1)[1])
    return NodeOutput(
        node,
        value,
        spec.to_json(value),
        "predicted",
        (f"temporal:{age:+.2f}s",),
        expected,
        temporal={"age_s": round(age, 4), "from_frame": ref.index, "from_wall_time": ref.wall_time},
    )


def executed_output(node: str, value: np.ndarray) -> NodeOutput:
    spec = model_info(node_model(node)).output(node.split(":", 1)[1])
    return NodeOutput(node, value, spec.to_json(value), "executed", (), 1.0)
