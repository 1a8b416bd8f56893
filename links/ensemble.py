"""One ensemble per target node, usable with any subset of active source models.

h_{A,j} combines the pre-activation outputs of the links g_ij (logits for classes, standardised
counts, element and end logits for sequences) with one trainable weight per source node:

    z = sum_{i active} w_i z_i,   w = softmax(mix over the active sources only)

and applies the target's activation. Because the weights are renormalised over whichever
sources are active, one set of parameters serves every subset A (with a single active source
it *is* that link, exactly). The mixing logits are fitted with random source-model dropout:
each training row draws its own subset of active source models (every model kept with
probability 1/2, at least one; a quarter of the rows use all of them), so the weights are
fitted for the subsets they will meet. For sequence targets the links decode in lockstep:
each step combines their element and end logits and feeds the combined element back to all.

The mixing weights are fitted on the validation split, not on the links' training split: on
their own training data the links look better than they are (a 1000-input MLP memorises a few
hundred frames), and weights fitted there would favour the most over-fitted link.

Safety net (routing): on the same validation split, for every subset of source models, the
combination is compared frame by frame with the best single active link; where the single link
is more accurate by more than one standard error of that paired difference, the subset is
routed to it. The margin is there because the best of several links on a couple of hundred
validation frames is partly the luckiest (its advantage there is biased upward), and switching
on any difference made things worse: measured by 5-fold cross-validation on our two sites'
1200-frame profiles, routing on any difference left the city's vehicle-count ensemble 2.8
points (SE 0.8) below its best link, and never routing left box ensembles up to 12 points
below theirs (a mix of box decoders can be far off); with the margin, every one of the ten
ensembles was within 0.8 points of its best single link or above it.

Sources whose renormalised weight is below 1% are dropped from a subset's plan (and the rest
renormalised), so a prediction never pays for links that contribute nothing.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mlink.links.arch import Encoded, Link, VectorHead, seq_loss
from mlink.links.infer import DecoderBank, greedy_decode_np
from mlink.links.encode import Batch, present
from mlink.links.errors import LinkError
from mlink.links.tuples import node_model
from mlink.models.spec import OutputSpec, Task

PRUNE = 0.01
MAX_ROUTED_MODELS = 8  # routes are computed for every subset up to 2^8 - 1; above, combine always


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
        self.links = nn.ModuleList([links[s] for s in self.sources])
        self.by_index: list[Link] = list(self.links)  # plain list: indexing a ModuleList costs microseconds per call
        self.mix = nn.Parameter(torch.zeros(len(self.sources)))
        self.head = VectorHead(spec) if spec.kind == "vector" else None
        self.routes: dict[frozenset[str], str] = {}
        self.trivial: np.ndarray = trivial_output(spec, [])
        self.link_val_accuracy: dict[str, float] = {}
        self.val_accuracy: dict[frozenset[str], float] = {}
        self.val_noise: dict[frozenset[str], float] = {}  # SE of (best single - combination) on validation
        self._plans: dict[frozenset[str], list[tuple[int, float]]] = {}
        self._banks: dict[tuple[int, ...], DecoderBank] = {}  # sequence targets: the plan's decoders, stacked

    # -- plans ------------------------------------------------------------------------------
    def link(self, source: str) -> Link:
        return self.links[self.sources.index(source)]

    def active(self, active_models: Iterable[str]) -> frozenset[str]:
        return self._model_set.intersection(active_models)

    def plan(self, active_models: Iterable[str]) -> list[tuple[int, float]]:
        """Which links to run for these active models, with their weights (empty: trivial)."""
        act = active_models if isinstance(active_models, frozenset) else frozenset(active_models)
        act = self._model_set & act
        plan = self._plans.get(act)
        if plan is None:
            plan = self._make_plan(act)
            self._plans[act] = plan
        return plan

    def _make_plan(self, act: frozenset[str], routed: bool = True) -> list[tuple[int, float]]:
        if not act:
            return []
        if routed and act in self.routes:
            return [(self.sources.index(self.routes[act]), 1.0)]
        idx = [i for i, s in enumerate(self.sources) if node_model(s) in act]
        w = torch.softmax(self.mix.detach()[idx].double(), dim=0).numpy()
        keep = [(i, float(wi)) for i, wi in zip(idx, w) if wi >= PRUNE]
        total = sum(wi for _, wi in keep)
        if len(keep) == 1:
            return [(keep[0][0], 1.0)]
        return [(i, wi / total) for i, wi in keep]

    def invalidate(self) -> None:
        self._plans.clear()
        self._banks.clear()
        for link in self.links:
            link.compile()
        if self.head is not None:
            self.head._np = None

    # -- prediction -------------------------------------------------------------------------
    def predict_encoded(
        self, plan: list[tuple[int, float]], enc: Mapping[str, Batch], encoded: Mapping[int, Encoded] | None = None
    ) -> list[np.ndarray]:
        """Outputs for a batch of frames, given encoded source batches (keyed by source node)
        and, optionally, encoder states some links' sequence encoders already computed (keyed
        by link index; see :meth:`LinkSet.predict_batch`)."""
        pre = encoded or {}
        if not plan:
            n = len(next(iter(enc.values()))) if enc else 1
            return [self.trivial.copy() for _ in range(n)]
        if self.head is not None:
            z = None
            for i, w in plan:
                zi = self.by_index[i].preact_np(enc[self.sources[i]], pre.get(i))
                z = zi * w if z is None else z + zi * w
            return list(self.head.activate(z))
        idx = tuple(i for i, _ in plan)
        bank = self._banks.get(idx)
        if bank is None:
            bank = self._banks[idx] = DecoderBank([self.by_index[i]._compiled().decoder for i in idx])
        memories = [self.by_index[i].memory_np(enc[self.sources[i]], pre.get(i)) for i in idx]
        out = greedy_decode_np(bank, np.array([w for _, w in plan], np.float32), memories, self.by_index[0].cap)
        return [present(self.spec, v) for v in out]

    def frame_scores(self, plan: list[tuple[int, float]], enc: Mapping[str, Batch], exact: Sequence[np.ndarray]) -> np.ndarray:
        """Per-frame accuracy (the target's own metric) of a plan's predictions against the
        target model's own outputs ``exact``; an empty plan scores the trivial output."""
        preds = self.predict_encoded(plan, enc) if plan else [self.trivial] * len(exact)
        return np.array([self.spec.accuracy(p, e) for p, e in zip(preds, exact)])

    # -- fitting ----------------------------------------------------------------------------
    @torch.no_grad()
    def _link_outputs(self, enc: Mapping[str, Batch], y: Batch) -> list[torch.Tensor]:
        outs = []
        for s, link in zip(self.sources, self.links):
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
        """Fit the mixing weights on (validation) tuples with random source-model dropout."""
        if len(self.sources) == 1 or len(y) == 0:
            self._plans.clear()
            return float("nan")
        outs = torch.stack(self._link_outputs(enc, y))  # (S, N, ...)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam([self.mix], lr=lr)
        n = len(y)
        y_scaled = self.head.scale(y.x) if self.head is not None else None
        loss_value = float("nan")
        for _ in range(steps):
            mask = self._model_masks(n, gen)
            logits = self.mix[None, :].expand(n, -1).masked_fill(~mask, float("-inf"))
            w = torch.softmax(logits, dim=1)  # (N, S)
            shape = (w.shape[1], n) + (1,) * (outs.dim() - 2)
            z = (w.T.reshape(shape) * outs).sum(0)
            if self.head is not None:
                loss = self.head.loss(z, y_scaled)
            else:
                loss = seq_loss(z[..., :-1], z[..., -1], y.x, y.lengths)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())
        self._plans.clear()
        return loss_value

    def fit_routes(self, enc: Mapping[str, Batch], exact: Sequence[np.ndarray]) -> None:
        """Measure single links and combinations on validation tuples; route a subset to its best
        single link where that link beats the combination by more than noise (one paired SE)."""
        self.routes = {}
        self._plans.clear()
        self._banks.clear()
        self.val_accuracy = {}
        self.val_noise = {}
        if not len(exact):
            return
        single = {s: self.frame_scores([(i, 1.0)], enc, exact) for i, s in enumerate(self.sources)}
        self.link_val_accuracy = {s: float(v.mean()) for s, v in single.items()}
        if len(self.source_models) > MAX_ROUTED_MODELS:
            return
        for act in all_subsets(self.source_models):
            plan = self._make_plan(act, routed=False)
            best = max((s for s in self.sources if node_model(s) in act), key=lambda s: self.link_val_accuracy[s])
            comb = single[self.sources[plan[0][0]]] if len(plan) == 1 else self.frame_scores(plan, enc, exact)
            d = single[best] - comb
            se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
            self.val_noise[act] = se
            if float(d.mean()) > se:
                self.routes[act] = best
                self.val_accuracy[act] = self.link_val_accuracy[best]
            else:
                self.val_accuracy[act] = float(comb.mean())
        self._plans.clear()

    # -- description ------------------------------------------------------------------------
    def weights(self, active_models: Iterable[str]) -> dict[str, float]:
        """The source nodes a prediction for these active models uses, with their weights."""
        return {self.sources[i]: w for i, w in self.plan(active_models)}
