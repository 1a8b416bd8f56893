"""Table 4 harness, MLink (hybrid): resident, rotating and predicted models with temporal links.

The same protocol as :mod:`mlink.bench.table4_mlink` (links on the first share, periods that
start by profiling a few frames through every model, fine-tuning, re-selection), with the
hybrid plan of :mod:`mlink.scheduler.hybrid` instead of a fixed active set:

1. **Temporal links** (:class:`mlink.links.temporal.ReuseModel`) are fitted on pairs of frames of
   the same camera in the training share (every model real there), at most two buffers apart.
2. **Each period** profiles its first frames (all models real, one at a time), fine-tunes the
   links on them, and chooses the modes (:func:`~mlink.scheduler.hybrid.choose_modes`) by
   planning the last frames already seen (expected accuracy only, no oracle) under the memory
   budget at every instant and the GPU-time budget: ``hybrid_share`` of the time every model
   would take on every frame.
3. **Each buffer** (``buffer_frames`` consecutive positions, the longest a revised output may be
   late) is planned by :func:`~mlink.scheduler.hybrid.plan_window`: resident models run on every
   frame, rotating models where the expected gain per ms is largest, paying their load on their
   first run in the buffer, unless it is the one the last buffer left loaded (it runs first). Unspent
   time carries over to the next buffers (at most ``BANK_BUFFERS`` buffers' worth).
4. **Serving**: a model's own output where it ran; elsewhere, per node, the better (by expected
   accuracy) of the temporal link's best real output of that camera (the last one before the
   buffer, or one in the buffer) and the cross-model ensemble over the models that ran on the
   frame. ``accuracy`` scores the outputs as revised at the end of the buffer; ``accuracy_first``
   those served on arrival (last real output before the buffer, or the resident models' links).
5. **Every real execution teaches**: pairs of real outputs of one camera (rotation, profiling)
   are added to the temporal links' data after each buffer.

Per-frame time: executions and loads as charged, the Reducto maps of every frame, the frame
differences computed (timed), and the links' per-frame inference (timed, as MLink's).
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mlink.bench.table4_hybrid_state import Diffs, State, hybrid_result
from mlink.bench.table4_methods import Context
from mlink.bench.table4_mlink import TrainedLinks, _extend, _link_ms, _train_links
from mlink.links import LinkSet, TupleSet, node_model
from mlink.links.temporal import ReuseModel, camera_pairs, change_vector, output_change
from mlink.scheduler.accuracy import LinkAccuracy
from mlink.scheduler.hybrid import Modes, choose_modes, mode_options, plan_window, window_figures

PLAN_WINDOWS = 4  # buffers of recent frames the modes are chosen on
OVERHEAD_MS = 4.0  # planned per frame for differences and links (measured: 2-4 ms on our CPU sites)
BANK_BUFFERS = 4  # unspent time carried over, at most this many buffers' worth


class Hybrid:
    """The hybrid method over every budget of the harness (module docstring)."""

    def __init__(self, ctx: Context, budgets: Sequence[float], time_ms: Mapping[float, float] | None = None) -> None:
        self.ctx = ctx
        self.budgets = list(budgets)
        self.load_ms = {m: 1000.0 * float(ctx.load_s.get(m, 0.0)) for m in ctx.models}
        self.share = float(ctx.opt("hybrid_share", 1.0 / 3.0))
        self.diffs = Diffs(ctx)
        self.served = {m: tuple(ctx.oracle.served[m]) for m in ctx.models}
        all_ms = sum(ctx.latency.values())
        self.frame_ms = {b: (time_ms or {}).get(b, self.share * all_ms) for b in self.budgets}
        self.link_ms: dict[tuple[str, frozenset[str]], float] = {}
        self.tuples = ctx.oracle.tuples
        self.out_change: dict[tuple[str, int, int], float] = {}

    def overhead_ms(self) -> float:
        """Per-frame time the plan leaves for what is not execution or loads: the Reducto maps
        (measured once, cached with the features) and ``OVERHEAD_MS`` for the differences and
        the links. A fixed allowance, not the running measurement, so the same inputs make the
        same plan on any machine; the result charges what was measured."""
        return self.ctx.features.map_ms + OVERHEAD_MS

    def period_ms(self, st: State, chunk: Sequence[int], prof: Sequence[int], modes: Modes | None) -> float:
        """A period's fixed charges per frame: its profiled frames (every model that fits alone,
        beyond what the plan would spend on them) and its loads for profiling and the resident set."""
        models = [m for m in self.ctx.models if self.ctx.costs[m] <= st.budget + 1e-9]
        resident = modes.resident if modes is not None else frozenset()
        ms = sum(self.ctx.latency[m] for m in models) * len(prof)
        ms += sum(self.load_ms[m] for m in models) + sum(self.load_ms[m] for m in resident)
        return ms / max(1, len(chunk))

    def time_budget(self, st: State) -> float:
        """Execution and load ms per frame this budget's plan may spend in its buffers."""
        return max(0.0, self.frame_ms[st.budget] - self.overhead_ms() - st.fixed_ms)

    # -- setup ------------------------------------------------------------------------------

    def fit_reuse(self, positions: Sequence[int]) -> ReuseModel:
        pairs = camera_pairs(
            self.tuples, positions, self.diffs, max_gap=self.ctx.buffer_frames, nodes=self.ctx.oracle.nodes
        )
        return ReuseModel.fit(pairs)

    def nodes(self, model: str) -> list[str]:
        return self.ctx.oracle.nodes_of(model)

    def camera(self, p: int) -> str:
        return self.tuples.streams[p]

    def change(self, st: State, model: str, ref: int, p: int, real_p: Iterable[str]) -> np.ndarray:
        """The temporal link's inputs for serving ``model`` at ``p`` from its real output at
        ``ref``; the context is the other models real at ``p`` (``real_p``) and at ``ref``."""
        age = abs(self.tuples.timestamps[p] - self.tuples.timestamps[ref])
        cam = self.camera(p)
        others = [m for m in real_p if m != model and st.is_real(m, cam, ref)]
        context = None
        if others:
            context = float(np.mean([self._output_change(m, ref, p) for m in others]))
        return change_vector(self.diffs(ref, p), age, ref > p, context)

    def _output_change(self, model: str, r: int, p: int) -> float:
        key = (model, r, p)
        hit = self.out_change.get(key)
        if hit is None:
            hit = self.out_change[key] = output_change(self.tuples, self.nodes(model), r, p)
        return hit

    # -- planning one buffer -----------------------------------------------------------------

    def _tensors(
        self, st: State, model: str, window: Sequence[int], real: Sequence[set[str]], in_window: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """(reuse (nodes, n, n), prior (nodes, n)) of ``model`` over ``window`` (module doc);
        ``real[i]`` are the models known to be real on the window's frame ``i``."""
        start = min(window)
        rows: list[np.ndarray] = []
        where: list[tuple[int, int]] = []
        for i, p in enumerate(window):
            ref = st.prior(model, self.camera(p), start)
            if ref is not None:
                rows.append(self.change(st, model, ref, p, real[i]))
                where.append((i, -1))
            for j, r in enumerate(window if in_window else ()):
                if j != i and self.camera(r) == self.camera(p):
                    rows.append(self.change(st, model, r, p, real[i]))
                    where.append((i, j))
        return window_figures(st.reuse, self.nodes(model), rows, where, len(window))

    @staticmethod
    def link_acc(st: State, acc: LinkAccuracy, node: str, active: frozenset[str]) -> float:
        """The links' expected accuracy for ``node`` from ``active``: held out, corrected by
        the audits of real executions since (:class:`~mlink.scheduler.hybrid.LinkAudit`)."""
        held = acc.node(active, node)
        return held if node_model(node) in active else st.audit.corrected(node, active, held)

    def _link(self, st: State, acc: LinkAccuracy, model: str, active: frozenset[str]) -> np.ndarray:
        return np.array([self.link_acc(st, acc, k, active) for k in self.nodes(model)])

    def plan(
        self, st: State, modes: Modes, acc: LinkAccuracy, window: Sequence[int], budget_ms: float
    ) -> tuple[Any, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """The buffer's executions under ``budget_ms`` of rotation time, and per model the
        (reuse, prior, link) figures they were planned on (every model, predicted ones too)."""
        figures = self.figures(st, modes, acc, window, [set(modes.resident)] * len(window))
        rot = sorted(modes.rotating)
        wp = plan_window(
            {m: figures[m][0] for m in rot},
            {m: figures[m][1] for m in rot},
            {m: figures[m][2] for m in rot},
            {m: self.ctx.latency[m] for m in rot},
            {m: 0.0 if m == st.held else self.load_ms[m] for m in rot},
            budget_ms,
        )
        return wp, figures

    def figures(
        self, st: State, modes: Modes, acc: LinkAccuracy, window: Sequence[int], real: Sequence[set[str]]
    ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per non-resident model, (reuse, prior, link) over the window given what is real."""
        out = {}
        for m in self.ctx.models:
            if m not in modes.resident:
                reuse, prior = self._tensors(st, m, window, real, in_window=m in modes.rotating)
                out[m] = (reuse, prior, self._link(st, acc, m, modes.resident))
        return out

    def resident_ms(self, modes: Modes) -> float:
        return sum(self.ctx.latency[m] for m in modes.resident)

    def window_budget(self, st: State, modes: Modes, n: int) -> float:
        return max(0.0, self.time_budget(st) - self.resident_ms(modes)) * n

    def simulate(self, st: State, modes: Modes, acc: LinkAccuracy, positions: Sequence[int]) -> tuple[float, float]:
        """(expected accuracy, ms per frame) of ``modes`` planned over ``positions`` (already
        seen frames), from expected figures only: what :func:`choose_modes` compares."""
        if self.resident_ms(modes) > self.time_budget(st) + 1e-9:
            return 0.0, self.resident_ms(modes)
        sim = State(st.budget, st.links, st.reuse)
        start = min(positions)
        sim.history = {key: [p for p in seq if p < start] for key, seq in st.history.items()}
        per_model: dict[str, list[float]] = {m: [] for m in self.ctx.models}
        spent, bank = 0.0, 0.0
        for window in self.ctx.windows(positions):
            budget = self.window_budget(st, modes, len(window))
            wp, figures = self.plan(sim, modes, acc, window, budget + bank)
            bank = min(max(0.0, budget + bank - wp.spent_ms), budget)
            spent += wp.spent_ms
            for m in self.ctx.models:
                if m in modes.resident:
                    per_model[m].extend([1.0] * len(window))
                elif m in modes.rotating:
                    per_model[m].extend(wp.expected[m].tolist())
                else:
                    _, prior, link = figures[m]
                    per_model[m].extend(np.maximum(prior, link[:, None]).mean(axis=0).tolist())
            for m, runs in wp.runs.items():
                for j in runs:
                    sim.real(m, self.camera(window[j]), window[j])
        exp = float(np.mean([np.mean(v) for v in per_model.values()]))
        return exp, self.resident_ms(modes) + spent / len(positions)

    # -- serving one buffer ------------------------------------------------------------------

    def _predictions(
        self, links: LinkSet, groups: Mapping[frozenset[str], list[int]]
    ) -> dict[frozenset[str], dict[int, dict[str, Any]]]:
        """Cross-model predictions per set of models that ran: {A: {position: {node: value}}}."""
        out: dict[frozenset[str], dict[int, dict[str, Any]]] = {}
        for active, positions in groups.items():
            pred = links.predict_tuples(active, self.tuples.subset(positions))
            out[active] = {p: {k: v[i] for k, v in pred.items()} for i, p in enumerate(positions)}
        return out

    def _charge(self, st: State, modes: Modes, wp: Any, window: Sequence[int], links: LinkSet, traj: str) -> None:
        n = len(window)
        st.exec_ms += self.resident_ms(modes) * n + sum(self.ctx.latency[m] * len(r) for m, r in wp.runs.items())
        st.executions += len(modes.resident) * n + sum(len(r) for r in wp.runs.values())
        st.load_ms += sum(self.load_ms[m] for m in wp.loads)
        st.loads += len(wp.loads)
        ran = {p: set(modes.resident) for p in window}
        for m, runs in wp.runs.items():
            for j in runs:
                ran[window[j]].add(m)
        for p in window:
            active = frozenset(ran[p])
            key = (traj, active)
            if key not in self.link_ms:
                self.link_ms[key] = _link_ms(links, self.tuples, active, window[:5])
            st.link_ms += self.link_ms[key]

    def serve(self, st: State, modes: Modes, acc: LinkAccuracy, links: LinkSet, window: list[int], traj: str) -> None:
        """Plan one buffer, charge it, serve every node of every frame (module docstring, 3-5)."""
        budget = self.window_budget(st, modes, len(window))
        wp, figures = self.plan(st, modes, acc, window, budget + st.bank_ms)
        st.bank_ms = min(max(0.0, budget + st.bank_ms - wp.spent_ms), BANK_BUFFERS * budget)
        self._charge(st, modes, wp, window, links, traj)
        ran_models = [m for m, r in wp.runs.items() if r]
        if ran_models:  # it runs first next buffer: the one with the most runs stays loaded
            st.held = max(ran_models, key=lambda m: (len(wp.runs[m]), m == st.held, m))
        ran = {i: set(modes.resident) | {m for m, r in wp.runs.items() if i in r} for i in range(len(window))}
        for i, p in enumerate(window):
            for m in ran[i]:
                st.real(m, self.camera(p), p)
            if ran[i] - modes.resident:
                st.rotated.append((p, frozenset(ran[i])))
        figures = self.figures(st, modes, acc, window, [ran[i] for i in range(len(window))])
        groups: dict[frozenset[str], list[int]] = {}
        for i, p in enumerate(window):
            groups.setdefault(frozenset(ran[i]), []).append(p)
            groups.setdefault(frozenset(modes.resident), []).append(p)
        groups = {a: sorted(set(ps)) for a, ps in groups.items()}
        preds = self._predictions(links, groups)
        self._audit(st, acc, modes, window, ran, preds)
        for m in self.ctx.models:
            for ki, k in enumerate(self.nodes(m)):
                vals = self.tuples.values[k]
                for i, p in enumerate(window):
                    self._serve_node(st, acc, m, ki, k, vals, window, i, p, ran, wp, figures, preds, modes)
        self._learn(st, modes, wp, window)

    def _audit(
        self, st: State, acc: LinkAccuracy, modes: Modes, window: list[int], ran: Mapping[int, set[str]], preds: Mapping
    ) -> None:
        """Where a rotating model ran, its nodes' predictions from the resident set are scored
        against its real output: the links' drift, measured as serving goes."""
        resident = frozenset(modes.resident)
        for i, p in enumerate(window):
            for m in ran[i] - resident:
                for k in self.nodes(m):
                    spec = self.tuples.specs[k]
                    measured = spec.accuracy(preds[resident][p][k], self.tuples.values[k][p])
                    st.audit.record(k, resident, acc.node(resident, k), measured)

    def _serve_node(
        self, st: State, acc: LinkAccuracy, m: str, ki: int, k: str, vals: Sequence[Any], window: list[int],
        i: int, p: int, ran: Mapping[int, set[str]], wp: Any, figures: Mapping[str, Any], preds: Mapping, modes: Modes,
    ) -> None:  # fmt: skip
        """One node of one frame: its real output, a real output of the camera, or the links."""
        resident = frozenset(modes.resident)
        if m in ran[i]:
            st.preds[k][p] = vals[p]
            st.expected[k][p] = 1.0
            st.first[k][p] = vals[p] if m in resident else self._first(st, acc, m, ki, k, vals, p, figures, preds)
            return
        reuse, prior, _ = figures[m]
        cands = [(st.prior(m, self.camera(p), min(window)), float(prior[ki, i]))]
        cands += [
            (window[j], float(reuse[ki, i, j])) for j in wp.runs.get(m, ()) if self.camera(window[j]) == self.camera(p)
        ]
        real = [(r, q) for r, q in cands if r is not None]
        link = self.link_acc(st, acc, k, frozenset(ran[i]))
        best = max(real, key=lambda c: c[1], default=None)
        if best is not None and best[1] > link:
            st.preds[k][p], st.expected[k][p] = vals[best[0]], best[1]
        else:
            st.preds[k][p], st.expected[k][p] = preds[frozenset(ran[i])][p][k], link
        st.first[k][p] = self._first(st, acc, m, ki, k, vals, p, figures, preds)

    def _first(self, st: State, acc: LinkAccuracy, m: str, ki: int, k: str, vals: Sequence[Any], p: int,
               figures: Mapping[str, Any], preds: Mapping) -> Any:  # fmt: skip
        """What a frame gets on arrival: the last real output before the buffer, or the links
        over the resident models, whichever is expected to be better."""
        resident = frozenset(set(self.ctx.models) - set(figures))
        ref = st.prior(m, self.camera(p), p)  # the history holds nothing of this buffer yet
        link = self.link_acc(st, acc, k, resident)
        if ref is not None:
            q = float(st.reuse.expected(k, self.change(st, m, ref, p, resident)[None])[0])
            if q > link:
                return vals[ref]
        return preds[resident][p][k]

    def _learn(self, st: State, modes: Modes, wp: Any, window: list[int]) -> None:
        """Every pair of real outputs of a camera (this buffer's runs, the last one before) teaches."""
        start = min(window)
        for m, runs in wp.runs.items():
            by_cam: dict[str, list[int]] = {}
            for j in runs:
                by_cam.setdefault(self.camera(window[j]), []).append(window[j])
            for cam, ps in by_cam.items():
                ref = st.prior(m, cam, start)
                self._teach(st, m, ([ref] if ref is not None else []) + ps)

    def _teach(self, st: State, model: str, reals: Sequence[int]) -> None:
        pairs = [(r, p) for r in reals for p in reals if r != p]
        if not pairs:
            return
        X = np.stack([self.change(st, model, r, p, self.ctx.models) for r, p in pairs])
        for k in self.nodes(model):
            spec, vals = self.tuples.specs[k], self.tuples.values[k]
            st.reuse.learn(k, X, np.array([spec.accuracy(vals[r], vals[p]) for r, p in pairs]))

    def teach_links(self, st: State, links: LinkSet) -> None:
        """Every real execution teaches the links too: the frames where rotating models ran
        since the last call, grouped by the models real there, fine-tune the links among
        those models (``LinkSet.fine_tune(partial=True)``)."""
        if not bool(self.ctx.opt("hybrid_teach_links", True)):
            st.rotated.clear()
            return
        groups: dict[frozenset[str], list[int]] = {}
        for p, models in st.rotated:
            if len(models) >= 2:
                groups.setdefault(models, []).append(p)
        st.rotated.clear()
        for models, positions in sorted(groups.items(), key=lambda g: sorted(g[0])):
            nodes = [k for m in self.ctx.models if m in models for k in self.nodes(m)]
            part = self.tuples.subset(positions).select(nodes)
            links.fine_tune(part, epochs=self.ctx.options.get("fine_tune_epochs"), partial=True)

    def audit_held(
        self, st: State, links: LinkSet, acc: LinkAccuracy, held: TupleSet, cache: dict[frozenset[str], Any]
    ) -> None:
        """A period's held-out profiled frames, before the links fine-tune on its other ones:
        every node of every model real there, predicted from every set of the others, scored
        against its real output (the drift since the links were last scored). ``cache`` holds
        the predictions per set, shared by the budgets on the same links."""
        real = [m for m in self.ctx.models if self.ctx.costs[m] <= st.budget + 1e-9]
        for r in range(len(real)):
            for combo in itertools.combinations(real, r):
                active = frozenset(combo)
                if active not in cache:
                    cache[active] = links.predict_tuples(active, held)
                for k in (k for m in real if m not in active for k in self.nodes(m)):
                    spec = self.tuples.specs[k]
                    for got, exact in zip(cache[active][k], held.values[k]):
                        st.audit.record(k, active, acc.node(active, k), spec.accuracy(got, exact))

    # -- periods -----------------------------------------------------------------------------

    def profile(self, st: State, prof: Sequence[int]) -> None:
        """A period's profiled frames: every model that fits alone runs, one at a time."""
        models = [m for m in self.ctx.models if self.ctx.costs[m] <= st.budget + 1e-9]
        st.exec_ms += sum(self.ctx.latency[m] for m in models) * len(prof)
        st.executions += len(models) * len(prof)
        st.load_ms += sum(self.load_ms[m] for m in models)
        st.loads += len(models)
        st.memory = max(st.memory, max((self.ctx.costs[m] for m in models), default=0.0))
        for m in models:
            for cam, ps in self.ctx.stream_runs(prof).items():
                ref = st.prior(m, cam, min(ps))
                self._teach(st, m, ([ref] if ref is not None else []) + ps)
                for p in ps:
                    st.real(m, cam, p)

    def period(
        self, st: State, pi: int, chunk: list[int], prof: list[int], seen: list[int], links: LinkSet, acc: LinkAccuracy
    ) -> None:
        """Profile, choose the modes on the frames seen last, serve the period buffer by buffer."""
        self.profile(st, prof)
        st.held = None  # profiling swapped every model through
        st.fixed_ms = self.period_ms(st, chunk, prof, st.modes)
        options = mode_options(self.ctx.models, self.ctx.costs, st.budget)
        recent = seen[-PLAN_WINDOWS * self.ctx.buffer_frames :]
        t0 = time.perf_counter()
        modes, expected, ms = choose_modes(options, lambda o: self.simulate(st, o, acc, recent), self.time_budget(st))
        choose_s = time.perf_counter() - t0
        st.modes = modes
        st.load_ms += sum(self.load_ms[m] for m in modes.resident)
        st.loads += len(modes.resident)
        st.memory = max(st.memory, modes.peak_bytes(self.ctx.costs))
        served = [p for p in chunk if p not in set(prof)]
        for window in self.ctx.windows(served):
            self.serve(st, modes, acc, links, window, st.links)
        st.periods.append(
            {
                "period": pi,
                "modes": modes.to_json(),
                "expected_accuracy_planned": round(expected, 4),
                "planned_ms_per_frame": round(ms, 3),
                "choose_s": round(choose_s, 3),
            }
        )


def run_hybrid(
    ctx: Context,
    budgets: Sequence[float],
    time_ms: Mapping[float, float] | None = None,
    trained: TrainedLinks | None = None,
) -> dict[float, dict[str, Any]]:
    """The hybrid method at every budget, over the protocol's periods; {budget: result}.
    ``time_ms`` is the per-frame time each budget may spend (all of it: executions, loads,
    maps, differences, links); default ``hybrid_share`` of every model on every frame."""
    from tqdm import tqdm

    proto = ctx.protocol
    hy = Hybrid(ctx, budgets, time_ms)
    links, _, heldout, train_s = trained or _train_links(ctx)  # never changed here: each budget copies
    t0 = time.perf_counter()
    reuse = hy.fit_reuse(proto.train)
    reuse_s = time.perf_counter() - t0
    hy.diffs.seconds = 0.0  # the training pairs' differences are set-up (in reuse_fit_s), not serving
    max_cost = max(ctx.costs.values())
    traj_of = {b: ("tuned" if b + 1e-9 >= max_cost else "frozen") for b in budgets}
    states = {b: State(b, traj_of[b], copy.deepcopy(reuse)) for b in budgets}
    own = {b: copy.deepcopy(links) for b in budgets}  # each budget's links learn from its own executions
    heldout_window = heldout
    for st in states.values():
        st.preds = {k: {} for k in ctx.oracle.nodes}
        st.first = {k: {} for k in ctx.oracle.nodes}
        st.expected = {k: {} for k in ctx.oracle.nodes}
        for m in ctx.models:  # the training share ran every model
            for p in proto.train:
                st.real(m, hy.camera(p), p)
    seen = list(proto.train)
    accs: dict[float, LinkAccuracy] = {}
    cap = max(len(heldout), 50)
    bar = tqdm(total=len(proto.periods), desc="MLink (hybrid) periods", unit="period", disable=not ctx.progress)
    try:
        for pi, (chunk, prof) in enumerate(zip(proto.periods, proto.profiled)):
            new = ctx.oracle.tuples.subset(prof)
            tune, held = new.split(0.5, int(ctx.opt("seed", 0)) + pi + 1) if len(new) >= 2 else (new, None)
            tuned_window = _extend(heldout_window, held, cap)
            for b, st in states.items():
                if held is not None and b in accs:
                    hy.audit_held(st, own[b], accs[b], held, {})
                if st.links == "tuned":
                    own[b].fine_tune(tune, epochs=ctx.options.get("fine_tune_epochs"))
                hy.teach_links(st, own[b])
                accs[b] = LinkAccuracy(own[b], tuned_window if st.links == "tuned" else heldout, hy.served)
                hy.period(st, pi, chunk, prof, seen, own[b], accs[b])
            heldout_window = tuned_window
            seen.extend(chunk)
            bar.update(1)
    finally:
        bar.close()
    meta = {"train_s": train_s, "reuse_fit_s": reuse_s}
    return {b: hybrid_result(hy, st, {**meta, "frame_ms_budget": hy.frame_ms[b]}) for b, st in states.items()}
