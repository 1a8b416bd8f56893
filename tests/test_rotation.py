"""scheduler/rotation.py without threads: a fake pool and planner, counts as outputs, frames as
numbers (their "maps"), so every expected figure and every revision can be followed by hand."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mlink.configs.schema import HybridConfig, SchedulerConfig
from mlink.links.temporal import ReuseModel, change_vector
from mlink.scheduler.frame import FrameRecord
from mlink.scheduler.hybrid import Modes
from mlink.scheduler.rotation import Rotation
from mlink.scheduler.serving import FrameResult, NodeOutput

RES, ROT = "yolox_nano", "hog_people"
RES_NODE, ROT_NODE = f"{RES}:object_count", f"{ROT}:person_count"
MiB = 1 << 20


class FakeModel:
    def infer(self, images):
        return [{"person_count": np.array([float(img[0, 0, 0])], np.float32)} for img in images]


class FakePool:
    """Costs only; load refuses over the budget as the real pool does."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._costs = {RES: 20 * MiB, ROT: 4 * MiB}
        self.held = {RES}
        self.load_seconds = {ROT: [0.01]}  # 10 ms: a load and runs fit the buffer's 40 ms
        self.log: list[tuple[str, str, int]] = []

    def costs(self):
        return dict(self._costs)

    def cost(self, m):
        return self._costs[m]

    def unavailable(self):
        return {}

    def loaded(self):
        return frozenset(self.held)

    def charged(self):
        return sum(self._costs[m] for m in self.held)

    def load(self, m):
        assert self.charged() + self._costs[m] <= self.budget
        self.held.add(m)
        self.log.append(("load", m, self.charged()))
        return True

    def unload(self, m, reason="plan"):
        self.held.discard(m)
        self.log.append(("unload", m, self.charged()))

    @contextmanager
    def pin(self, m):
        assert m in self.held
        yield FakeModel()


def _planner(pool: FakePool) -> Any:  # a Planner as far as Rotation reads it
    return SimpleNamespace(
        served={RES: ("object_count",), ROT: ("person_count",)},
        pool=pool,
        accuracy=SimpleNamespace(node=lambda active, k: 1.0 if k.split(":")[0] in active else 0.3),
        budget=pool.budget,
        taught=[],
        plan=SimpleNamespace(id=1, active=frozenset({RES}), selector="objective"),
        _evaluate=lambda held, selector: held,  # the planner's own, for a resident set the modes chose
        _make_plan=lambda held, reason, now: SimpleNamespace(id=2, active=held, selector="objective"),
    )


def _result(i: int, people: float) -> FrameResult:
    image = np.full((4, 4, 3), people, np.uint8)
    rec = FrameRecord("cam", i, i * 0.25, 1000.0 + i * 0.25, image)
    outs = {
        RES_NODE: NodeOutput(RES_NODE, np.array([1.0]), {"count": 1}, "executed", (), 1.0),
        ROT_NODE: NodeOutput(ROT_NODE, np.array([0.0]), {"count": 0}, "predicted", (RES,), 0.3),
    }
    return FrameResult(rec, 1, outs, executed=(RES,), seconds=0.01)


def _rotation(budget: int = 24 * MiB) -> tuple[Rotation, FakePool]:
    pool = FakePool(budget)
    reuse = ReuseModel()
    # reuse is good for small changes, poor for large ones
    X = np.stack([change_vector([d] * 4, 0.25, False) for d in (0.0, 0.01, 0.3, 0.6)] * 5)
    reuse.learn(ROT_NODE, X, np.array([0.95, 0.9, 0.2, 0.1] * 5))
    cfg = HybridConfig(enabled=True, max_delay_s=2.0, gpu_share=1.0)
    rot = Rotation(cfg, _planner(pool), maps=lambda img: float(img[0, 0, 0]), diff=lambda a, b: [abs(a - b) / 100] * 4)
    rot.reuse = reuse
    rot.modes = Modes(frozenset({RES}), frozenset({ROT}), frozenset())
    rot.latency_ms = {RES: 10.0, ROT: 10.0}
    return rot, pool


def test_a_buffer_runs_the_rotating_model_revises_and_spreads_within_the_budget() -> None:
    rot, pool = _rotation()
    served = rot.serve([_result(i, 3.0) for i in range(4)])
    assert all(r.revision == 0 and r.outputs[ROT_NODE].provenance == "predicted" for r in served)
    assert not any(r.outputs[ROT_NODE].temporal for r in served)  # no real output of hog yet
    assert rot.due(now=1000.0 + 1.0) and not rot.due(now=1000.0 + 0.5)
    revised = rot.close()
    assert revised and all(r.revision == 1 for r in revised)
    executed = [r for r in revised if r.outputs[ROT_NODE].provenance == "executed"]
    spread = [r for r in revised if r.outputs[ROT_NODE].provenance == "predicted"]
    assert executed and executed[0].outputs[ROT_NODE].json["count"] == 3 and ROT in executed[0].executed
    assert len(executed) + len(spread) == 4  # same picture: one real output serves the buffer
    for r in spread:
        out = r.outputs[ROT_NODE]
        assert out.sources[0].startswith("temporal:") and out.temporal is not None
        assert out.expected_accuracy is not None and out.expected_accuracy > 0.3
    assert [op for op, m, _ in pool.log if m == ROT][:2] == ["load", "unload"]  # then modes are chosen again
    assert max(c for _, _, c in pool.log) <= pool.budget and rot.peak_charged <= pool.budget
    assert rot.reuse.n_pairs(ROT_NODE) > 20  # the real output taught (against nothing else yet: >= the seed)
    # ... and the links too, next period: the frames it ran on, with the resident model's outputs
    (part,) = rot.planner.taught
    assert set(part.specs) == {RES_NODE, ROT_NODE} and len(part) == len(executed)
    assert [float(v[0]) for v in part.values[ROT_NODE]] == [3.0] * len(executed)


def test_the_next_frame_is_served_from_the_last_real_output_when_the_picture_held() -> None:
    rot, _ = _rotation()
    rot.serve([_result(i, 3.0) for i in range(4)])
    rot.close()
    same, changed = rot.serve([_result(10, 3.0), _result(11, 90.0)])
    assert same.outputs[ROT_NODE].temporal is not None and same.outputs[ROT_NODE].json["count"] == 3
    assert changed.outputs[ROT_NODE].temporal is None  # a big change: the links are expected better


def test_a_rotating_model_that_does_not_fit_is_not_loaded() -> None:
    rot, pool = _rotation(budget=22 * MiB)  # resident 20 MiB + rotating 4 MiB > 22 MiB
    rot.serve([_result(i, 3.0) for i in range(4)])
    pool.load = lambda m: (_ for _ in ()).throw(AssertionError("must not load"))  # type: ignore[method-assign]
    rot.modes = Modes(frozenset({RES}), frozenset(), frozenset({ROT}))  # what mode_options would give
    assert rot.close() == []


def test_hybrid_config_defaults_and_bounds() -> None:
    h = SchedulerConfig().hybrid
    assert (h.enabled, h.max_delay_s, h.gpu_share) == (False, 2.0, 0.5)
    for bad in ({"gpu_share": 0}, {"gpu_share": 1.5}, {"max_delay_s": 0}, {"max_delay_s": float("inf")}, {"x": 1}):
        with pytest.raises(ValidationError):
            HybridConfig(**bad)


def test_the_next_period_fine_tunes_the_links_on_what_rotation_taught() -> None:
    """``fine_tune_links`` spends ``taught`` (partial tuples) on the links between their nodes,
    empties it, and still fine-tunes on the period's complete profile as before."""
    from mlink.links import LinkSet, TrainConfig
    from mlink.links.synthetic import synthetic_tuples
    from mlink.scheduler.plans import PeriodReport
    from mlink.scheduler.upkeep import fine_tune_links

    tuples = synthetic_tuples(160, seed=5)
    nodes = ["yolox_nano:person_count", "hog_people:person_count"]
    links = LinkSet.train(
        tuples.head(120), config=TrainConfig(epochs=10, patience=3, combiner_steps=40), targets=nodes, sources=nodes
    )
    before = {k: [p.detach().clone() for p in link.parameters()] for k, link in links.links.items()}
    taught = [tuples.subset(range(120, 140)).select(nodes)]
    report = PeriodReport(period=1, started_at=0.0, ran_at=0.0, frames=0)
    parts = {m: tuples.subset(range(140, 160)) for m in tuples.models}
    held = fine_tune_links(links, parts, report, fine_tune=True, epochs=2, seed=0, taught=taught)
    assert taught == [] and report.partial_fine_tunes == 1 and report.fine_tuned and held is not None
    assert len(links.history) == 2  # the rotation's part, then the profile's half
    assert links.history[0]["n"] == 20
    assert all(
        not all(torch.equal(a, b) for a, b in zip(before[k], link.parameters())) for k, link in links.links.items()
    )
