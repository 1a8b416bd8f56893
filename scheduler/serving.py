"""The serving step: run the plan's loaded models, predict every other served output.

:func:`serve` takes a batch of frames and the current :class:`~mlink.scheduler.plans.Plan`,
runs each active model (pinned in the pool for the duration of its inference, so an unload
waits for it) in batches, and fills in every other served node with its ensemble of links over
the models that actually ran (:meth:`LinkSet.predict`). Every output says where it came from:

- ``provenance == "executed"``: the model ran on this frame; expected accuracy 1.0;
- ``provenance == "predicted"``: ``sources`` lists the models whose links the prediction used
  (empty: the ensemble's trivial output, nothing active helps); ``sources`` and
  ``expected_accuracy`` are the plan's (``Plan.sources``, p(h_{A,node})) when the models that ran
  are the plan's, else (an active model was missing) those for the models that did run, looked
  up once per batch (the accuracy from ``accuracy`` when given);
- ``provenance == "predicted"`` with ``temporal`` (hybrid plans, :mod:`~mlink.scheduler.rotation`):
  the model's real output on another frame of the camera, reused; ``sources`` is
  ``["temporal:<age>s"]`` (age: this frame's time minus the reference's; negative when the
  reference came later) and ``temporal`` says which frame;
- ``provenance == "unavailable"``: no links exist for this node (its model could never be
  profiled) and its model did not run; ``value`` is None.

An active model that is unexpectedly missing (unloaded, failed, or its inference raised) does
not fail the step: its outputs are predicted from the remaining active models, and
``FrameResult.missing`` says which model and why. Nothing here does I/O (no Redis, no HTTP);
the daemon stores and publishes :meth:`FrameResult.to_json`.

Each :class:`FrameResult` carries the :class:`~mlink.scheduler.frame.FrameRecord` it was made
from, unchanged, so the stored result names the frame (camera, index, video time, wall time) as
ingest produced it; other frames (bare arrays, profiling frames) get a record here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mlink.links import LinkSet, node_key, node_model
from mlink.models.catalog import model_info
from mlink.models.spec import OutputSpec
from mlink.scheduler.accuracy import used_sources
from mlink.scheduler.frame import FrameRecord
from mlink.scheduler.pool import ModelPool
from mlink.scheduler.pool_records import ModelNotLoaded

if TYPE_CHECKING:
    from mlink.scheduler.plans import Plan

log = logging.getLogger(__name__)

NodeAccuracy = Callable[[frozenset[str], str], float]


@dataclass
class NodeOutput:
    """One served output of one frame."""

    node: str  # "model:output"
    value: np.ndarray | None
    json: Any  # OutputSpec.to_json(value); None when unavailable
    provenance: str  # executed | predicted | unavailable
    sources: tuple[str, ...] = ()  # models whose links a prediction used
    expected_accuracy: float | None = None
    note: str = ""
    temporal: dict[str, Any] | None = None  # served from a real output of another frame (hybrid plans)

    @property
    def model(self) -> str:
        return node_model(self.node)

    @property
    def output(self) -> str:
        return self.node.split(":", 1)[1]

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "provenance": self.provenance,
            "value": self.json,
            "expected_accuracy": None if self.expected_accuracy is None else round(float(self.expected_accuracy), 6),
        }
        if self.provenance == "predicted":
            d["sources"] = list(self.sources)
        if self.note:
            d["note"] = self.note
        if self.temporal is not None:
            d["temporal"] = dict(self.temporal)
        return d


@dataclass
class FrameResult:
    """Every served output of one frame, with the plan that produced them and the frame's record."""

    frame: FrameRecord  # the record served, as it came in
    plan_id: int
    outputs: dict[str, NodeOutput]
    executed: tuple[str, ...] = ()  # models that ran on this frame
    missing: dict[str, str] = field(default_factory=dict)  # active models that did not run, and why
    seconds: float = 0.0  # the step's wall time for the batch this frame was in, per frame
    # Where that time went, per frame: each executed model's share of its batch call, and the
    # links' prediction. Not stored with the result; the daemon sums them per stage.
    model_seconds: dict[str, float] = field(default_factory=dict)
    link_seconds: float = 0.0
    revision: int = 0  # 0 as first served; each revision of the stored result adds one (hybrid plans)

    @property
    def stream(self) -> str:
        return self.frame.camera

    @property
    def timestamp(self) -> float:
        """The frame's video time (seconds into its source)."""
        return self.frame.video_time

    def to_json(self) -> dict[str, Any]:
        """The stored result: ``timestamp`` is the video time, ``wall_time`` the capture time
        (the clock the cache scores results by and ``since``/``until`` select on)."""
        f = self.frame
        return {
            "camera": f.camera,
            "timestamp": f.video_time,
            "plan_id": self.plan_id,
            "executed": list(self.executed),
            "missing": dict(self.missing),
            "outputs": {k: v.to_json() for k, v in self.outputs.items()},
            "frame_index": f.index,
            "wall_time": f.wall_time,
            "revision": self.revision,
        }


def _spec(node: str) -> OutputSpec:
    model, output = node.split(":", 1)
    return model_info(model).output(output)


def _record(frame: Any, position: int, now: float) -> FrameRecord:
    """``frame`` itself when it is a record; else one made for it (index: its position in the
    call; wall time: ``now``, when it is served; a bare array has camera "" and video time
    its position)."""
    if isinstance(frame, FrameRecord):
        return frame
    if isinstance(frame, np.ndarray):
        return FrameRecord("", position, float(position), now, frame)
    return FrameRecord(
        str(getattr(frame, "stream", "")), position, float(getattr(frame, "timestamp", position)), now, frame.image
    )


def serve(
    frames: Sequence[Any],
    plan: Plan,
    pool: ModelPool,
    links: LinkSet | None,
    *,
    batch_size: int = 4,
    accuracy: NodeAccuracy | None = None,
) -> list[FrameResult]:
    """Serve ``frames``: :class:`FrameRecord` objects (carried into the results unchanged),
    other objects with ``.image``/``.stream``/``.timestamp``, or bare BGR arrays.

    ``accuracy(active, node)`` gives p(h_{A,node}) for a set of models the plan did not foresee
    (an active model went missing); without it such predictions carry ``expected_accuracy``
    None. Never raises for a missing model or a failing inference.
    """
    now = time.time()
    parts = [_record(f, i, now) for i, f in enumerate(frames)]
    step = _Step(plan, pool, links, accuracy)
    bs = max(1, int(batch_size))
    results: list[FrameResult] = []
    for start in range(0, len(parts), bs):
        results.extend(step.chunk(parts[start : start + bs]))
    return results


class _Step:
    """One :func:`serve` call: the plan's nodes and specs, served chunk by chunk."""

    def __init__(self, plan: Plan, pool: ModelPool, links: LinkSet | None, accuracy: NodeAccuracy | None) -> None:
        self.plan = plan
        self.pool = pool
        self.links = links
        self.accuracy = accuracy
        self.nodes = [node_key(m, o) for m, outs in plan.served.items() for o in outs]
        self.specs = {k: _spec(k) for k in self.nodes}
        self.active = [m for m in plan.served if m in plan.active]

    def _run(
        self, images: list[np.ndarray]
    ) -> tuple[dict[str, list[dict[str, np.ndarray]]], dict[str, str], dict[str, float]]:
        """Each active model on ``images``: (outputs per model that ran, why the others did not,
        each model's seconds for the whole batch)."""
        ran: dict[str, list[dict[str, np.ndarray]]] = {}
        missing: dict[str, str] = {}
        seconds: dict[str, float] = {}
        for m in self.active:
            try:
                with self.pool.pin(m) as model:
                    t0 = time.perf_counter()
                    ran[m] = model.infer(images)
                    seconds[m] = time.perf_counter() - t0
            except ModelNotLoaded as exc:
                missing[m] = str(exc)
            except Exception as exc:  # a failing model must not fail the step
                log.warning("serving: %s failed on a batch: %s", m, exc)
                missing[m] = f"{type(exc).__name__}: {exc}"
        return ran, missing, seconds

    def _expected(self, executed: frozenset[str], foreseen: bool) -> dict[str, float | None]:
        """p(h_{A,node}) of every node not executed: the plan's, else for what did run."""
        expected: dict[str, float | None] = {}
        for k in self.nodes:
            if node_model(k) in executed:
                continue
            if foreseen and k in self.plan.expected_nodes:
                expected[k] = float(self.plan.expected_nodes[k])
            elif self.accuracy is not None:
                try:
                    expected[k] = float(self.accuracy(executed, k))
                except Exception:
                    expected[k] = None
            else:
                expected[k] = None
        return expected

    def _predict(
        self, executed: frozenset[str], source_outputs: list[dict[str, np.ndarray]]
    ) -> tuple[list[str], list[Mapping[str, np.ndarray]], str]:
        """(the nodes predicted, per frame their values, a note when prediction failed)."""
        links = self.links
        wanted = [k for k in self.nodes if node_model(k) not in executed and links is not None and k in links.ensembles]
        predicted: list[Mapping[str, np.ndarray]] = [{} for _ in source_outputs]
        if wanted:
            try:
                assert links is not None  # wanted is empty without links
                predicted = list[Mapping[str, np.ndarray]](
                    links.predict_batch(executed, source_outputs, targets=wanted)
                )
            except Exception as exc:  # links are someone else's code: never fail the step
                log.exception("serving: link prediction failed")
                return wanted, predicted, f"prediction failed: {type(exc).__name__}: {exc}"
        return wanted, predicted, ""

    def chunk(self, chunk: list[FrameRecord]) -> list[FrameResult]:
        """Serve frames that go through the models together."""
        plan, nodes, specs = self.plan, self.nodes, self.specs
        t0 = time.perf_counter()
        ran, missing, model_seconds = self._run([f.image for f in chunk])
        model_per_frame = {m: t / max(len(chunk), 1) for m, t in model_seconds.items()}
        executed = frozenset(ran)
        foreseen = executed == plan.active
        per_frame = (time.perf_counter() - t0) / max(len(chunk), 1)
        expected = self._expected(executed, foreseen)
        note = f"active model(s) missing: {', '.join(sorted(missing))}" if missing else ""
        # Every frame of the chunk had the same models run: predict the others for the whole
        # chunk in one pass (per-frame cost falls with the batch; see LinkSet.predict_batch).
        t1 = time.perf_counter()
        source_outputs = [
            {node_key(m, o): ran[m][i][o] for m in executed for o in plan.served[m]} for i in range(len(chunk))
        ]
        wanted, predicted, failed = self._predict(executed, source_outputs)
        note = "; ".join(n for n in (note, failed) if n)
        sources = plan.sources if foreseen else _sources(self.links, executed, wanted)
        predict_per_frame = (time.perf_counter() - t1) / max(len(chunk), 1)
        results = []
        for i, frame in enumerate(chunk):
            t1 = time.perf_counter()
            outputs: dict[str, NodeOutput] = {
                k: NodeOutput(k, v, specs[k].to_json(v), "executed", (), 1.0) for k, v in source_outputs[i].items()
            }
            for k in nodes:
                if k in outputs:
                    continue
                if k in predicted[i]:
                    v = predicted[i][k]
                    outputs[k] = NodeOutput(
                        k, v, specs[k].to_json(v), "predicted", tuple(sources.get(k, ())), expected.get(k), note
                    )
                else:
                    outputs[k] = NodeOutput(
                        k, None, None, "unavailable", (), 0.0, note or "no links predict this output"
                    )
            results.append(
                FrameResult(
                    frame=frame,
                    plan_id=plan.id,
                    outputs={k: outputs[k] for k in nodes},
                    executed=tuple(sorted(executed)),
                    missing=dict(missing),
                    seconds=per_frame + predict_per_frame + (time.perf_counter() - t1),
                    model_seconds=model_per_frame,
                    link_seconds=predict_per_frame,
                )
            )
        return results


def _sources(links: LinkSet | None, executed: frozenset[str], nodes: list[str]) -> dict[str, tuple[str, ...]]:
    """Per node, the models whose links predict it from ``executed`` (when the plan's do not apply)."""
    if links is None:
        return {}
    return {k: tuple(used_sources(links, executed, k)) for k in nodes}
