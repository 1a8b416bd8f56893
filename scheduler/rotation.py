"""Serving hybrid plans: resident models, rotating models over short buffers, revised results.

With ``scheduler.hybrid.enabled`` the pipeline thread drives a :class:`Rotation` next to the
planner (the decision logic is :mod:`mlink.scheduler.hybrid`, the temporal links
:mod:`mlink.links.temporal`):

1. **Modes** (:meth:`Rotation.on_plan`, after every plan the planner makes): the split of the
   site's models into resident / rotating / predicted with the best expected accuracy whose GPU
   time fits (:func:`~mlink.scheduler.hybrid.mode_options` under the memory budget at every
   instant: the resident set plus one rotating model at a time; then
   :func:`~mlink.scheduler.hybrid.choose_modes`, planned over the last buffer seen). The pool
   is made to hold exactly the resident set (unloads first), and the planner's plan becomes the
   plan for that set (served as always: resident models execute, links predict the rest).
2. **Every frame is served at once** (:meth:`Rotation.serve`): per node not executed, the
   better by expected accuracy of the camera's last real output of that model through the
   :class:`~mlink.links.temporal.ReuseModel` (provenance ``predicted``, a ``temporal`` source)
   and the links' prediction. The results join the buffer (revision 0).
3. **A buffer closes** (:meth:`Rotation.due`: its oldest frame is ``max_delay_s / 2`` old, the
   other half left for the rotation) and :meth:`Rotation.close` plans it with
   :func:`~mlink.scheduler.hybrid.plan_window` within its GPU time (``gpu_share`` of every
   model's latency added up per frame, less the resident models', unspent time carried to the
   next buffer up to one buffer's worth); each picked rotating model is loaded through the pool
   (which measures it and refuses it over the budget), runs on its frames, and is unloaded.
   Those frames' results are revised (``executed``); the buffer's other frames of the camera
   whose expected accuracy rises with the new real output are revised too (``predicted``,
   temporal). Each revision adds one to the result's ``revision``.
4. **Every real execution teaches**: pairs of real outputs of one camera (resident and
   rotating, within the buffer and against the last one before it) go to
   :meth:`ReuseModel.learn`. :meth:`Rotation.bootstrap` starts it from profiled tuples.

Times: a model's latency is measured where it runs alone (a rotation run) and estimated from
the serving step otherwise (the step's time split over the resident models); unknown: 100 ms.
A model's load time is the pool's last measured load. Frames reach this module only as
:class:`~mlink.scheduler.frame.FrameRecord` images and the ``maps``/``diff`` callables the
server passes in (:mod:`mlink.server.change`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mlink.configs.schema import HybridConfig
from mlink.links import node_model
from mlink.links.temporal import ReuseModel, camera_pairs
from mlink.links.tuples import TupleSet
from mlink.models.catalog import model_info
from mlink.scheduler.hybrid import LinkAudit, Modes, choose_modes, mode_options, plan_window
from mlink.scheduler.planner import Planner
from mlink.scheduler.pool_records import BudgetExceeded
from mlink.scheduler.rotation_window import (
    Changes,
    DiffFn,
    Figures,
    Held,
    Real,
    executed_output,
    real_of,
    simulate,
    temporal_output,
    window_budget,
    window_tensors,
)
from mlink.scheduler.serving import FrameResult, NodeOutput

log = logging.getLogger(__name__)

DEFAULT_LATENCY_MS = 100.0
DEFAULT_LOAD_MS = 1000.0
TAUGHT_FRAMES = 500  # rotation frames kept for the next period's fine-tuning (the oldest dropped)
LEARN_GAP = 4  # pairs taught per real frame: this many real frames of the camera either side
EPS = 1e-6


class Rotation:
    """Hybrid serving over one planner (see the module docstring). Not thread-safe: the
    pipeline thread alone calls it."""

    def __init__(
        self,
        cfg: HybridConfig,
        planner: Planner,
        maps: Callable[[Any], Any],
        diff: DiffFn,
        reuse: ReuseModel | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.planner = planner
        self.maps = maps
        self.changes = Changes(diff)
        self.reuse = reuse if reuse is not None else ReuseModel()
        self.audit = LinkAudit()  # the links' accuracy as rotation measures it
        self.clock = clock
        self.nodes = {m: [f"{m}:{o}" for o in outs] for m, outs in planner.served.items()}
        self.latency_ms: dict[str, float] = {}
        self.modes: Modes | None = None
        self.buffer: list[Held] = []
        self.recent: list[Held] = []  # the last closed buffer: what modes are chosen on
        self.last: dict[tuple[str, str], Real] = {}  # (model, camera) -> last real output
        self.bank_ms = 0.0
        self.peak_charged = 0  # the pool's charged bytes, highest seen after a rotation load
        self.loads: list[dict[str, Any]] = []  # every rotation load: model, bytes before, cost, after
        self.windows: list[dict[str, Any]] = []  # what each closed buffer ran (the last 50)
        self._plan_id: int | None = None
        self._rechosen = False

    # -- figures ---------------------------------------------------------------------------
    def _load_ms(self, m: str) -> float:
        seconds = self.planner.pool.load_seconds.get(m)
        return 1000.0 * seconds[-1] if seconds else DEFAULT_LOAD_MS

    def figures(self) -> Figures:
        models = list(self.nodes)
        lat = {m: self.latency_ms.get(m, DEFAULT_LATENCY_MS) for m in models}
        return Figures(
            nodes=self.nodes,
            link=self.link,
            latency_ms=lat,
            load_ms={m: self._load_ms(m) for m in models},
            time_budget_ms=self.cfg.gpu_share * sum(lat.values()),
        )

    def link(self, active: frozenset[str], node: str) -> float:
        """The links' expected accuracy: the planner's held-out figure, corrected by what the
        rotation measured since (:class:`~mlink.scheduler.hybrid.LinkAudit`)."""
        held = self.planner.accuracy.node(active, node)
        return held if node_model(node) in active else self.audit.corrected(node, active, held)

    def _audit(self, held: Held, node: str, real: np.ndarray) -> None:
        """A rotating model's real output scores the links' prediction served for it at once."""
        old = held.result.outputs.get(node)
        if old is None or old.provenance != "predicted" or old.value is None:
            return
        if any(s.startswith("temporal:") for s in old.sources):
            return  # served from the camera's last real output: nothing to say of the links
        active = frozenset(held.result.executed)
        spec = model_info(node_model(node)).output(node.split(":", 1)[1])
        self.audit.record(node, active, self.planner.accuracy.node(active, node), spec.accuracy(old.value, real))

    def _note_latency(self, m: str, ms: float) -> None:
        old = self.latency_ms.get(m)
        self.latency_ms[m] = ms if old is None else 0.7 * old + 0.3 * ms

    # -- modes -----------------------------------------------------------------------------
    def on_plan(self) -> bool:
        """Choose the modes when the planner made a new plan (or once the first buffer closed);
        True when the plan was replaced by the resident set's."""
        plan = self.planner.plan
        if plan is None or plan.id == self._plan_id:
            return False
        fig = self.figures()
        pool = self.planner.pool
        unavailable = set(pool.unavailable())
        costs = {m: float(c) for m, c in pool.costs().items() if m not in unavailable}
        models = [m for m in self.nodes if m in costs]
        options = mode_options(models, costs, float(self.planner.budget))
        tensors = {m: window_tensors(self.reuse, self.changes, self.nodes[m], self.recent, {}) for m in models}
        modes, expected, ms = choose_modes(
            options, lambda o: simulate(fig, o, tensors, len(self.recent)), fig.time_budget_ms
        )
        self.modes = modes
        log.info("hybrid: modes %s (expected %.4f, %.1f ms per frame)", modes.label(), expected, ms)
        resident = frozenset(modes.resident)
        for m in sorted(pool.loaded() - resident):
            pool.unload(m, reason="hybrid")
        for m in sorted(resident - pool.loaded()):
            try:
                pool.load(m)
            except BudgetExceeded as exc:
                log.warning("hybrid: resident %s refused: %s", m, exc)
        held = frozenset(pool.loaded()) & resident
        replaced = held != plan.active
        if replaced:
            sel = self.planner._evaluate(held, selector=plan.selector)
            self.planner.plan = self.planner._make_plan(sel, "hybrid", self.clock())
        self._plan_id = self.planner.plan.id if self.planner.plan is not None else None
        return replaced

    # -- serving at once -------------------------------------------------------------------
    def serve(self, results: Sequence[FrameResult]) -> list[FrameResult]:
        """Each result with its non-executed nodes served from the camera's last real output
        where that is expected to be better; buffered for rotation (module docstring, 2)."""
        out = []
        for r in results:
            held = Held(r, self.maps(r.frame.image), ran=set(r.executed))
            self._note_step(r)
            self._remember(held)
            held.result = self._with_temporal(held)
            self.buffer.append(held)
            out.append(held.result)
        return out

    def _note_step(self, r: FrameResult) -> None:
        if r.executed and r.seconds > 0:
            for m in r.executed:
                self._note_latency(m, 1000.0 * r.seconds / len(r.executed))

    def _remember(self, held: Held) -> None:
        for m in held.ran:
            real = real_of(held, m, self.nodes.get(m, []))
            if real is not None:
                self.last[(m, held.camera)] = real

    def _with_temporal(self, held: Held) -> FrameResult:
        r = held.result
        outputs = dict(r.outputs)
        for m, nodes in self.nodes.items():
            ref = self.last.get((m, held.camera))
            if m in held.ran or ref is None:
                continue
            X = self.changes.vector(ref.maps, ref.wall_time, held.maps, held.wall_time)[None, :]
            for k in nodes:
                cur = outputs.get(k)
                if cur is not None and cur.provenance == "predicted" and self.audit.audits:
                    corrected = self.link(frozenset(r.executed), k)  # the links' figure, drift included
                    cur = outputs[k] = dataclasses.replace(cur, expected_accuracy=corrected)
                if cur is None or not self.reuse.knows(k):
                    continue
                q = float(self.reuse.expected(k, X)[0])
                if q > (cur.expected_accuracy or 0.0) + EPS:
                    outputs[k] = temporal_output(k, ref, held.wall_time, q)
        return dataclasses.replace(r, outputs=outputs)

    # -- buffers ---------------------------------------------------------------------------
    def due(self, now: float | None = None) -> bool:
        """The buffer's oldest frame waited half of ``max_delay_s``."""
        now = self.clock() if now is None else now
        return bool(self.buffer) and now - self.buffer[0].wall_time >= self.cfg.max_delay_s / 2

    def close(self) -> list[FrameResult]:
        """Plan the buffer, run the rotating models picked, teach; the revised results."""
        window, self.buffer = self.buffer, []
        if not window:
            return []
        modes = self.modes or Modes(frozenset(), frozenset(), frozenset(self.nodes))
        fig = self.figures()
        unavailable = set(self.planner.pool.unavailable())
        rot = sorted(m for m in modes.rotating if m not in unavailable)
        tensors = {}
        for m in rot:
            prior = {cam: real for (mm, cam), real in self.last.items() if mm == m}
            tensors[m] = window_tensors(self.reuse, self.changes, self.nodes[m], window, prior)
        budget = window_budget(fig, modes, len(window))
        resident = frozenset(self.planner.plan.active if self.planner.plan is not None else ())
        wp = plan_window(
            {m: tensors[m][0] for m in rot},
            {m: tensors[m][1] for m in rot},
            {m: np.array([fig.link(resident, k) for k in self.nodes[m]]) for m in rot},
            {m: fig.latency_ms[m] for m in rot},
            {m: fig.load_ms[m] for m in rot},
            budget + self.bank_ms,
        )
        self.bank_ms = min(max(0.0, budget + self.bank_ms - wp.spent_ms), budget)
        revised: set[int] = set()
        for m, picks in wp.runs.items():
            if picks and self._run(m, window, picks):
                revised |= set(picks)
                revised |= self._spread(m, window, picks, tensors[m][0])
        self._teach(window)
        self._teach_links(window, {m for m, picks in wp.runs.items() if picks})
        self._finish(window, wp.to_json(), budget)
        out = []
        for i in sorted(revised):
            h = window[i]
            h.revision += 1
            h.result = dataclasses.replace(h.result, revision=h.revision)
            out.append(h.result)
        return out

    def _finish(self, window: list[Held], planned: dict[str, Any], budget: float) -> None:
        for h in window:
            self._remember(h)
        self.recent = window
        self.changes.clear()
        self.windows.append({**planned, "frames": len(window), "budget_ms": budget, "bank_ms": self.bank_ms})
        del self.windows[:-50]
        if not self._rechosen:  # the first buffer seen: choose again, on real figures
            self._rechosen = True
            self._plan_id = None
            self.on_plan()

    def _run(self, m: str, window: list[Held], picks: Sequence[int]) -> bool:
        """Load ``m``, run it on the picked frames, unload it; their results become executed."""
        pool = self.planner.pool
        before = pool.charged()
        try:
            if not pool.load(m):
                return False
        except BudgetExceeded as exc:
            log.warning("hybrid: rotating %s refused: %s", m, exc)
            return False
        after = pool.charged()
        self.peak_charged = max(self.peak_charged, after)
        self.loads.append({"model": m, "charged_before": before, "cost": pool.cost(m), "charged_after": after})
        try:
            with pool.pin(m) as model:
                t0 = time.perf_counter()
                outs = model.infer([window[j].result.frame.image for j in picks])
                self._note_latency(m, 1000.0 * (time.perf_counter() - t0) / len(picks))
        except Exception as exc:  # a failing model must not fail the pipeline
            log.warning("hybrid: rotating %s failed: %s", m, exc)
            return False
        finally:
            pool.unload(m, reason="rotation")
        for j, out in zip(picks, outs):
            h = window[j]
            outputs = dict(h.result.outputs)
            for k in self.nodes[m]:
                self._audit(h, k, out[k.split(":", 1)[1]])
                outputs[k] = executed_output(k, out[k.split(":", 1)[1]])
            executed = tuple(sorted({*h.result.executed, m}))
            h.result = dataclasses.replace(h.result, outputs=outputs, executed=executed)
            h.ran.add(m)
        return True

    def _spread(self, m: str, window: list[Held], picks: Sequence[int], reuse: np.ndarray) -> set[int]:
        """The buffer's other frames served from the new real outputs where that is better."""
        revised = set()
        for i, h in enumerate(window):
            if m in h.ran:
                continue
            outputs = dict(h.result.outputs)
            for ki, k in enumerate(self.nodes[m]):
                j = max(picks, key=lambda j: reuse[ki, i, j])
                q = float(reuse[ki, i, j])
                cur: NodeOutput | None = outputs.get(k)
                if cur is None or q <= (cur.expected_accuracy or 0.0) + EPS:
                    continue
                ref = real_of(window[j], m, self.nodes[m])
                if ref is not None:
                    outputs[k] = temporal_output(k, ref, h.wall_time, q)
                    revised.add(i)
            if i in revised:
                h.result = dataclasses.replace(h.result, outputs=outputs)
        return revised

    # -- learning --------------------------------------------------------------------------
    def _teach(self, window: Sequence[Held]) -> None:
        """Pairs of real outputs of one camera (this buffer's, and the last before it)."""
        for m, nodes in self.nodes.items():
            by_cam: dict[str, dict[float, Real]] = {}  # camera -> wall time -> real (each frame once)
            for (mm, cam), last in self.last.items():
                if mm == m:
                    by_cam.setdefault(cam, {})[last.wall_time] = last
            for h in window:
                real = real_of(h, m, nodes) if m in h.ran else None
                if real is not None:
                    by_cam.setdefault(h.camera, {})[real.wall_time] = real
            for reals in by_cam.values():
                self._teach_camera(nodes, [reals[t] for t in sorted(reals)])

    def _teach_links(self, window: Sequence[Held], rotated: set[str]) -> None:
        """The frames a rotating model ran on, with every model real there, for the planner's
        next fine-tuning (``Planner.taught``; at most ``TAUGHT_FRAMES`` frames wait)."""
        groups: dict[frozenset[str], list[tuple[Held, dict[str, np.ndarray]]]] = {}
        for h in window:
            if not h.ran & rotated:
                continue
            reals = {m: real_of(h, m, self.nodes.get(m, [])) for m in h.ran}
            values = {k: v for r in reals.values() if r is not None for k, v in r.outputs.items()}
            models = frozenset(m for m, r in reals.items() if r is not None)
            if len(models) >= 2:
                groups.setdefault(models, []).append((h, values))
        for models, frames in groups.items():
            part = TupleSet.for_models(
                {m: [model_info(m).output(k.split(":", 1)[1]) for k in self.nodes[m]] for m in models}
            )
            for h, values in frames:
                part.append(h.camera, h.wall_time, values)
            self.planner.taught.append(part)
        while sum(len(t) for t in self.planner.taught) > TAUGHT_FRAMES:
            self.planner.taught.pop(0)

    def _teach_camera(self, nodes: Sequence[str], reals: Sequence[Real]) -> None:
        rows: list[np.ndarray] = []
        pairs: list[tuple[Real, Real]] = []
        for a, p in enumerate(reals):
            for b in range(max(0, a - LEARN_GAP), min(len(reals), a + LEARN_GAP + 1)):
                if a != b:
                    r = reals[b]
                    rows.append(self.changes.vector(r.maps, r.wall_time, p.maps, p.wall_time))
                    pairs.append((r, p))
        if not rows:
            return
        X = np.stack(rows)
        for k in nodes:
            spec = model_info(node_model(k)).output(k.split(":", 1)[1])
            y = np.array([spec.accuracy(r.outputs[k], p.outputs[k]) for r, p in pairs], dtype=np.float64)
            self.reuse.learn(k, X, y)

    def bootstrap(self, tuples: TupleSet, maps: Mapping[tuple[str, float], Any], max_gap: int = LEARN_GAP) -> int:
        """Start the temporal links from profiled tuples (every model real on them) whose
        frames' maps are known (``(stream, timestamp)`` -> maps); the pairs taught per node."""
        positions = [i for i in range(len(tuples)) if (tuples.streams[i], tuples.timestamps[i]) in maps]
        if len(positions) < 2:
            return 0

        def diff(a: int, b: int) -> Sequence[float]:
            ka = (tuples.streams[a], tuples.timestamps[a])
            kb = (tuples.streams[b], tuples.timestamps[b])
            return self.changes.diff(maps[ka], maps[kb])

        nodes = [k for ks in self.nodes.values() for k in ks if k in tuples.specs]
        pairs = camera_pairs(tuples, positions, diff, max_gap, nodes)
        for k, (X, y) in pairs.items():
            self.reuse.learn(k, X, y)
        return max((len(y) for _, y in pairs.values()), default=0)

    # -- views -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "modes": self.modes.to_json() if self.modes is not None else None,
            "buffered": len(self.buffer),
            "latency_ms": {m: round(v, 3) for m, v in self.latency_ms.items()},
            "bank_ms": round(self.bank_ms, 3),
            "peak_charged_bytes": self.peak_charged,
            "loads": len(self.loads),
            "windows": self.windows[-5:],
            "reuse_pairs": {k: self.reuse.n_pairs(k) for ks in self.nodes.values() for k in ks},
        }
