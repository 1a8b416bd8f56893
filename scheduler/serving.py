"""The serving step: run the plan's loaded models, predict every other served output.

:func:`serve` takes a batch of frames and the current :class:`~mlink.scheduler.planner.Plan`,
runs each active model (pinned in the pool for the duration of its inference, so an unload
waits for it) in batches, and fills in every other served node with its ensemble of links over
the models that actually ran (:meth:`LinkSet.predict`). Every output says where it came from:

- ``provenance == "executed"``: the model ran on this frame; expected accuracy 1.0;
- ``provenance == "predicted"``: ``sources`` lists the models whose links the prediction used
  (empty: the ensemble's trivial output, nothing active helps); ``expected_accuracy`` is the
  plan's p(h_{A,node}) when the models that ran are the plan's, else (an active model was
  missing) the accuracy for the models that did run, from ``accuracy`` when given;
- ``provenance == "unavailable"``: no links exist for this node (its model could never be
  profiled) and its model did not run; ``value`` is None.

An active model that is unexpectedly missing (unloaded, failed, or its inference raised) does
not fail the step: its outputs are predicted from the remaining active models, and
``FrameResult.missing`` says which model and why. Nothing here does I/O (no Redis, no HTTP);
the daemon stores and publishes :meth:`FrameResult.to_json`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from mlink.links import LinkSet, node_model
from mlink.models.catalog import model_info
from mlink.models.spec import OutputSpec
from mlink.scheduler.pool import ModelNotLoaded, ModelPool

if TYPE_CHECKING:
    from mlink.scheduler.planner import Plan

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
        return d


@dataclass
class FrameResult:
    """Every served output of one frame, with the plan that produced them."""

    stream: str
    timestamp: float
    plan_id: int
    outputs: dict[str, NodeOutput]
    executed: tuple[str, ...] = ()  # models that ran on this frame
    missing: dict[str, str] = field(default_factory=dict)  # active models that did not run, and why
    seconds: float = 0.0  # the step's wall time for the batch this frame was in, per frame

    def to_json(self) -> dict[str, Any]:
        return {
            "camera": self.stream,
            "timestamp": self.timestamp,
            "plan_id": self.plan_id,
            "executed": list(self.executed),
            "missing": dict(self.missing),
            "outputs": {k: v.to_json() for k, v in self.outputs.items()},
        }


def _spec(node: str) -> OutputSpec:
    model, output = node.split(":", 1)
    return model_info(model).output(output)


def _frame_parts(frame: Any, index: int) -> tuple[str, float, np.ndarray]:
    if isinstance(frame, np.ndarray):
        return "", float(index), frame
    return str(getattr(frame, "stream", "")), float(getattr(frame, "timestamp", index)), frame.image


def serve(
    frames: Sequence[Any],
    plan: "Plan",
    pool: ModelPool,
    links: LinkSet | None,
    *,
    batch_size: int = 4,
    accuracy: NodeAccuracy | None = None,
) -> list[FrameResult]:
    """Serve ``frames`` (objects with ``.image``/``.stream``/``.timestamp``, or bare BGR arrays).

    ``accuracy(active, node)`` gives p(h_{A,node}) for a set of models the plan did not foresee
    (an active model went missing); without it such predictions carry ``expected_accuracy``
    None. Never raises for a missing model or a failing inference.
    """
    parts = [_frame_parts(f, i) for i, f in enumerate(frames)]
    nodes = [f"{m}:{o}" for m, outs in plan.served.items() for o in outs]
    specs = {k: _spec(k) for k in nodes}
    active = [m for m in plan.served if m in plan.active]
    results: list[FrameResult] = []
    bs = max(1, int(batch_size))
    for start in range(0, len(parts), bs):
        t0 = time.perf_counter()
        chunk = parts[start : start + bs]
        images = [img for _, _, img in chunk]
        ran: dict[str, list[dict[str, np.ndarray]]] = {}
        missing: dict[str, str] = {}
        for m in active:
            try:
                with pool.pin(m) as model:
                    ran[m] = model.infer(images)
            except ModelNotLoaded as exc:
                missing[m] = str(exc)
            except Exception as exc:  # a failing model must not fail the step
                log.warning("serving: %s failed on a batch: %s", m, exc)
                missing[m] = f"{type(exc).__name__}: {exc}"
        executed = frozenset(ran)
        foreseen = executed == plan.active
        per_frame = (time.perf_counter() - t0) / max(len(chunk), 1)
        expected: dict[str, float | None] = {}
        for k in nodes:
            if node_model(k) in executed:
                continue
            if foreseen and k in plan.expected_nodes:
                expected[k] = float(plan.expected_nodes[k])
            elif accuracy is not None:
                try:
                    expected[k] = float(accuracy(executed, k))
                except Exception:
                    expected[k] = None
            else:
                expected[k] = None
        note = f"active model(s) missing: {', '.join(sorted(missing))}" if missing else ""
        # Every frame of the chunk had the same models run: predict the others for the whole
        # chunk in one pass (per-frame cost falls with the batch; see LinkSet.predict_batch).
        t1 = time.perf_counter()
        source_outputs = [
            {f"{m}:{o}": ran[m][i][o] for m in executed for o in plan.served[m]} for i in range(len(chunk))
        ]
        wanted = [k for k in nodes if node_model(k) not in executed and links is not None and k in links.ensembles]
        predicted: list[Mapping[str, np.ndarray]] = [{} for _ in chunk]
        if wanted:
            try:
                predicted = links.predict_batch(executed, source_outputs, targets=wanted)  # type: ignore[union-attr]
            except Exception as exc:  # links are someone else's code: never fail the step
                log.exception("serving: link prediction failed")
                note = (note + "; " if note else "") + f"prediction failed: {type(exc).__name__}: {exc}"
        predict_per_frame = (time.perf_counter() - t1) / max(len(chunk), 1)
        for i, (stream, ts, _) in enumerate(chunk):
            t1 = time.perf_counter()
            fnote = note
            outputs: dict[str, NodeOutput] = {
                k: NodeOutput(k, v, specs[k].to_json(v), "executed", (), 1.0) for k, v in source_outputs[i].items()
            }
            for k in nodes:
                if k in outputs:
                    continue
                if k in predicted[i]:
                    v = predicted[i][k]
                    srcs = _sources(links, executed, k)
                    outputs[k] = NodeOutput(k, v, specs[k].to_json(v), "predicted", tuple(srcs), expected.get(k), fnote)
                else:
                    outputs[k] = NodeOutput(k, None, None, "unavailable", (), 0.0, fnote or "no links predict this output")
            results.append(
                FrameResult(
                    stream=stream,
                    timestamp=ts,
                    plan_id=plan.id,
                    outputs={k: outputs[k] for k in nodes},
                    executed=tuple(sorted(executed)),
                    missing=dict(missing),
                    seconds=per_frame + predict_per_frame + (time.perf_counter() - t1),
                )
            )
    return results


def _sources(links: LinkSet | None, executed: frozenset[str], node: str) -> list[str]:
    if links is None:
        return []
    from mlink.scheduler.planner import used_sources

    return used_sources(links, executed, node)
