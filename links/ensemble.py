"""One ensemble per target node, usable with any subset of active source models.

h_{A,j} combines the pre-activation outputs of the links g_ij (logits for classes, standardised
counts, element and end logits for sequences) with one weight per source node:

    z = sum_{i active} w_i z_i

and applies the target's activation. For sequence targets the links decode in lockstep: each
step combines their element and end logits and feeds the combined element back to all.

What an ensemble serves for a subset A of active source models is *chosen*, not assumed, and
chosen so that it is right by construction:

- **On data that neither trained the links nor stopped their training.** :meth:`LinkSet.train`
  holds out a share of the tuples (``TrainConfig.select_share``, 25%); the links train on the
  rest and early-stop on a split of the rest. The served links themselves are scored: training
  a box decoder on a couple of hundred frames is a lottery (one link's F1 on the same held-out
  frames was 0.25, 0.26 and 0.12 for seeds 0-2), so scores of other copies of a link, such as
  cross-fitted ones, do not tell how good the served copy is. (The first version fitted
  weights, stopped training and routed on one 20% split, 39 frames in the test suite: every
  figure on it was optimistic, and the ensemble came out up to 14.6 points below its best link.)
- **On the target's own metric** (count within 0.5, top-1, box F1 of greedy decodes), not on a
  training loss: a loss-fitted mix once gave 0.79 of the weight to the worst box link by F1.
- **The best single active link is the default.** For each subset the candidates are its single
  links, the trivial output, the loss-fitted mix (:meth:`fit_combiner` on the early-stopping
  split, with random source-model dropout so one set of mixing logits serves every subset) and
  the uniform mix. The best single link on the held-out tuples is served unless another candidate
  beats it there by more than one standard error of the paired per-frame difference; then the
  best such candidate is.

No candidate is fitted on the selection tuples, so their scores there are clean; and the
accuracy recorded for a choice is estimated by cross-validating the choice itself (see
:meth:`select`). So a combination is served only where it measurably helps, nowhere is the
ensemble meaningfully worse than its best active single link, and what it expects of itself is
not optimistic. A choice can still differ between machines
whose floating-point paths differ, but only between candidates within about one standard error
of each other, so either is as good as the other up to noise.

A link that is not ``mixable`` (``BoxSet``: it emits a set at once, with no decoder steps or
pre-activation to combine) is a candidate as a single link only; the mixes combine the others.

Sources whose renormalised mix weight is below 1% are dropped from a mix (and the rest
renormalised), so a prediction never pays for links that contribute nothing. Above
``MAX_SELECTED_MODELS`` source models (2^8 subsets) nothing is enumerated: every subset serves
its best active single link.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mlink.links.arch import Encoded, Link, VectorHead, seq_loss
from mlink.links.encode import Batch, present
from mlink.links.errors import LinkError
from mlink.links.infer import DecoderBank, greedy_decode_np
from mlink.links.tuples import node_model
from mlink.models.spec import OutputSpec, Task

PRUNE = 0.01
MAX_SELECTED_MODELS = 8  # a choice is made for every subset up to 2^8 - 1; above, best single link

SELECT_FOLDS = 5  # folds of the selection frames that estimate a choice's accuracy (Ensemble.select)

Plan = list[tuple[int, float]]  # (link index, weight); empty: the trivial output


def trivial_output(spec: OutputSpec, train_values: Sequence[np.ndarray]) -> np.ndarray:
    """The trivial predictor from training outputs: rounded mean count / majority class / empty."""
    if spec.task is Task.COUNT:
        mean = float(np.mean([float(v[0]) for v in train_values])) if len(train_values) else 0.0
        return np.array([float(np.round(max(mean, 0.0)))], dtype=np.float32)
    if spec.task is Task.CLASS:
        # Frequencies of the training top-1 classes: a distribution whose argmax is the majority class.
        freq = np.zeros(spec.dim, dtype=np.float64)
        for v in train_values:
            freq[int(np.argmax(v))] += 1.0
        if freq.sum() == 0:
            freq[:] = 1.0
        return (freq / freq.sum()).astype(np.float32)
    return spec.empty()


def choose_rows(table: np.ndarray, n_single: int, frames: np.ndarray) -> tuple[int, float]:
    """The selection rule on some frames of a (candidates, frames) score table whose first
    ``n_single`` rows are single links: the best single link, unless another candidate beats
    it by more than one paired SE (then the best such). Returns (row, that SE or 0)."""
    sub = table[:, frames]
    means = sub.mean(axis=1)
    best = int(np.argmax(means[:n_single]))
    pick, gain, noise = best, 0.0, 0.0
    for row in range(len(table)):
        d = sub[row] - sub[best]
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
        if float(d.mean()) > max(se, gain):
            pick, gain, noise = row, float(d.mean()), se
    return pick, noise


def all_subsets(models: Sequence[str]) -> list[frozenset[str]]:
    return [frozenset(c) for r in range(1, len(models) + 1) for c in itertools.combinations(models, r)]


class Ensemble(nn.Module):
    """h_{A,j} for one target node over links from every node of the other models."""

    def __init__(self, target: str, spec: OutputSpec, links: Mapping[str, Link]) -> None:
        super().__init__()
        if not links:
            raise LinkError(f"ensemble for {target}: no source links")
        tmodel = node_model(target)
        for s, link in links.items():
            if node_model(s) == tmodel:
                raise LinkError(f"ensemble for {target}: source {s} is of the same model")
            if link.target != spec:
                raise LinkError(f"ensemble for {target}: link from {s} targets another spec")
        self.target = target
        self.spec = spec
        self.sources = sorted(links)
        self.source_models = sorted({node_model(s) for s in self.sources})
        self._model_set = frozenset(self.source_models)
        ordered = [links[s] for s in self.sources]
        self.links = nn.ModuleList(ordered)  # registers the links' parameters
        self.by_index: list[Link] = ordered  # the same links, typed; indexing a ModuleList costs microseconds per call
        self.mix = nn.Parameter(torch.zeros(len(self.sources)))
        self.head = VectorHead(spec) if spec.kind == "vector" else None
        # What each subset of active source models serves: [(source node, weight)], [] = trivial.
        self.selection: dict[frozenset[str], list[tuple[str, float]]] = {}
        self.trivial: np.ndarray = trivial_output(spec, [])
        # Accuracies on the held-out selection tuples (never trained or stopped on):
        self.link_val_accuracy: dict[str, float] = {}  # each single link
        self.val_accuracy: dict[frozenset[str], float] = {}  # what each subset serves
        self.val_noise: dict[frozenset[str], float] = {}  # SE of (served - best single link) per subset
        self._plans: dict[frozenset[str], Plan] = {}
        self._banks: dict[tuple[int, ...], DecoderBank] = {}  # sequence targets: the plan's decoders, stacked

    # -- plans ------------------------------------------------------------------------------
    def link(self, source: str) -> Link:
        return self.by_index[self.sources.index(source)]

    def active(self, active_models: Iterable[str]) -> frozenset[str]:
        return self._model_set.intersection(active_models)

    def plan(self, active_models: Iterable[str]) -> Plan:
        """Which links to run for these active models, with their weights (empty: trivial)."""
        act = active_models if isinstance(active_models, frozenset) else frozenset(active_models)
        act = self._model_set & act
        plan = self._plans.get(act)
        if plan is None:
            plan = self._make_plan(act)
            self._plans[act] = plan
        return plan

    def _make_plan(self, act: frozenset[str]) -> Plan:
        if not act:
            return []
        chosen = self.selection.get(act)
        if chosen is not None:
            return [(self.sources.index(s), w) for s, w in chosen]
        if self.link_val_accuracy:  # more source models than were enumerated
            return [(self._best_single(act), 1.0)]
        return self._mix_plan(act)  # never selected (a hand-built ensemble): the mix

    def _active_indices(self, act: frozenset[str]) -> list[int]:
        return [i for i, s in enumerate(self.sources) if node_model(s) in act]

    def _best_single(self, act: frozenset[str]) -> int:
        """The active link with the highest accuracy on the held-out selection tuples (the first on a tie)."""
        return max(self._active_indices(act), key=lambda i: self.link_val_accuracy.get(self.sources[i], 0.0))

    def _mixable(self, act: frozenset[str]) -> list[int]:
        """The active links a mix may combine (a box-set link has nothing to mix: it serves alone)."""
        return [i for i in self._active_indices(act) if self.by_index[i].mixable]

    def _mix_plan(self, act: frozenset[str]) -> Plan:
        """The loss-fitted mixing weights over the active mixable sources, renormalised and pruned."""
        idx = self._mixable(act)
        if not idx:
            return [(self._active_indices(act)[0], 1.0)]
        w = torch.softmax(self.mix.detach()[idx].double(), dim=0).numpy()
        keep = [(i, float(wi)) for i, wi in zip(idx, w) if wi >= PRUNE]
        total = sum(wi for _, wi in keep)
        if len(keep) == 1:
            return [(keep[0][0], 1.0)]
        return [(i, wi / total) for i, wi in keep]

    def candidates(self, act: frozenset[str]) -> list[Plan]:
        """Every plan a subset may serve: its single links first (the rule's default is the
        best of them), then the trivial output and, with several active sources, the
        loss-fitted and the uniform mix (of the mixable ones)."""
        plans: list[Plan] = [[(i, 1.0)] for i in self._active_indices(act)] + [[]]
        idx = self._mixable(act)
        if len(idx) > 1:
            plans += [self._mix_plan(act), [(i, 1.0 / len(idx)) for i in idx]]
        return plans

    def invalidate(self) -> None:
        self._plans.clear()
        self._banks.clear()
        for link in self.links:
            link.compile()
        if self.head is not None:
            self.head._np = None

    # -- prediction -------------------------------------------------------------------------
    def predict_encoded(
        self, plan: Plan, enc: Mapping[str, Batch], encoded: Mapping[int, Encoded] | None = None
    ) -> list[np.ndarray]:
        """Outputs for a batch of frames, given encoded source batches (keyed by source node)
        and, optionally, encoder states some links' sequence encoders already computed (keyed
        by link index; see :meth:`LinkSet.predict_batch`)."""
        pre = encoded or {}
        if not plan:
            n = len(next(iter(enc.values()))) if enc else 1
            return [self.trivial.copy() for _ in range(n)]
        if len(plan) == 1 and not self.by_index[plan[0][0]].mixable:  # a link that serves alone
            return self.by_index[plan[0][0]].predict(enc[self.sources[plan[0][0]]])
        if self.head is not None:
            z = None
            for i, w in plan:
                zi = self.by_index[i].preact_np(enc[self.sources[i]], pre.get(i))
                z = zi * w if z is None else z + zi * w
            assert z is not None  # the plan is not empty
            return list(self.head.activate(z))
        idx = tuple(i for i, _ in plan)
        bank = self._banks.get(idx)
        if bank is None:
            bank = self._banks[idx] = DecoderBank([self.by_index[i]._compiled().decoder for i in idx])
        memories = [self.by_index[i].memory_np(enc[self.sources[i]], pre.get(i)) for i in idx]
        out = greedy_decode_np(bank, np.array([w for _, w in plan], np.float32), memories, self.by_index[0].cap)
        return [present(self.spec, v) for v in out]

    def frame_scores(self, plan: Plan, enc: Mapping[str, Batch], exact: Sequence[np.ndarray]) -> np.ndarray:
        """Per-frame accuracy (the target's own metric) of a plan's predictions against the
        target model's own outputs ``exact``; an empty plan scores the trivial output."""
        preds = self.predict_encoded(plan, enc) if plan else [self.trivial] * len(exact)
        return np.array([self.spec.accuracy(p, e) for p, e in zip(preds, exact)])

    # -- fitting ----------------------------------------------------------------------------
    @torch.no_grad()
    def _link_outputs(self, enc: Mapping[str, Batch], y: Batch, idx: Sequence[int]) -> list[torch.Tensor]:
        outs = []
        for i in idx:
            s, link = self.sources[i], self.by_index[i]
            link.eval()
            if self.head is not None:
                outs.append(link.preact(enc[s]))
            else:
                elem, stop = link.teacher(enc[s], y)
                outs.append(torch.cat([elem, stop[..., None]], dim=-1))
        return outs

    def _model_masks(self, n: int, gen: torch.Generator) -> torch.Tensor:
        m = len(self.source_models)
        keep = torch.rand((n, m), generator=gen) < 0.5
        empty = ~keep.any(1)
        keep[empty, torch.randint(0, m, (int(empty.sum()),), generator=gen)] = True
        keep[: max(1, n // 4)] = True
        col = torch.tensor([self.source_models.index(node_model(s)) for s in self.sources])
        return keep[:, col]  # (n, S) node-level mask

    def fit_combiner(self, enc: Mapping[str, Batch], y: Batch, steps: int, lr: float, seed: int) -> float:
        """Fit the mixing logits on tuples the selection will not score, with random
        source-model dropout; return the last step's loss. Links that serve alone (not
        ``mixable``) take no part: their weights stay, unused."""
        idx = [i for i, link in enumerate(self.by_index) if link.mixable]
        if len(idx) < 2 or len(y) == 0:
            self._plans.clear()
            return float("nan")
        outs = torch.stack(self._link_outputs(enc, y, idx))  # (S', N, ...)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam([self.mix], lr=lr)
        n = len(y)
        y_scaled = self.head.scale(y.x) if self.head is not None else y.x  # sequences: unused
        loss_value = float("nan")
        for _ in range(steps):
            mask = self._model_masks(n, gen)[:, idx]
            mask[~mask.any(1)] = True  # only models whose links serve alone were kept: mix them all
            logits = self.mix[idx][None, :].expand(n, -1).masked_fill(~mask, float("-inf"))
            w = torch.softmax(logits, dim=1)  # (N, S)
            z = (w.T.reshape((w.shape[1], n) + (1,) * (outs.dim() - 2)) * outs).sum(0)
            if self.head is not None:
                loss = self.head.loss(z, y_scaled)
            else:
                loss = seq_loss(z[..., :-1], z[..., -1], y.x, y.seq_lengths)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())
        self._plans.clear()
        return loss_value

    def select(self, score: Callable[[Plan], np.ndarray]) -> None:
        """Choose what every subset of active source models serves (see the module docstring).

        ``score(plan)`` gives the per-frame accuracy of a plan on the selection frames (held
        out: the links never trained or stopped on them), always the same frames in order.

        The accuracy recorded for a choice (``val_accuracy``, what the operator is told to
        expect) is not the chosen candidate's score on those frames: the best of several
        candidates on the same frames is partly the luckiest, and that score was up to 8
        points above its accuracy on other frames. It is the rule's own accuracy, estimated
        by cross-validating the choice: on each of ``SELECT_FOLDS`` folds of the selection
        frames, the candidate the rule picks on the other folds is scored."""
        self.selection, self.val_accuracy, self.val_noise = {}, {}, {}
        self._plans.clear()
        self._banks.clear()
        memo: dict[tuple, np.ndarray] = {}

        def scores(plan: Plan) -> np.ndarray:
            key = tuple((i, round(w, 12)) for i, w in plan)
            if key not in memo:
                memo[key] = score(plan)
            return memo[key]

        self.link_val_accuracy = {s: float(scores([(i, 1.0)]).mean()) for i, s in enumerate(self.sources)}
        if len(self.source_models) > MAX_SELECTED_MODELS:
            return
        n = len(scores([]))
        folds = np.array_split(np.random.default_rng(0).permutation(n), min(SELECT_FOLDS, n)) if n > 1 else []
        for act in all_subsets(self.source_models):
            plans = self.candidates(act)
            table = np.stack([scores(p) for p in plans])  # (candidates, frames)
            n_single = len(self._active_indices(act))  # the single links come first
            pick, noise = choose_rows(table, n_single, np.arange(n))
            self.selection[act] = [(self.sources[i], w) for i, w in plans[pick]]
            self.val_noise[act] = noise
            if len(folds) < 2:
                self.val_accuracy[act] = float(table[pick].mean())
                continue
            held = np.concatenate(
                [table[choose_rows(table, n_single, np.setdiff1d(np.arange(n), f))[0], f] for f in folds]
            )
            self.val_accuracy[act] = float(held.mean())
        self._plans.clear()

    # -- description ------------------------------------------------------------------------
    def weights(self, active_models: Iterable[str]) -> dict[str, float]:
        """The source nodes a prediction for these active models uses, with their weights."""
        return {self.sources[i]: w for i, w in self.plan(active_models)}
