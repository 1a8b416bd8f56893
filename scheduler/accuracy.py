"""Model-level accuracies from node-level links: p(h_{A,j}) for the selectors and the plans.

A model may serve several outputs (nodes ``"model:output"``); links and ensembles are per node,
selection is per model. :class:`LinkAccuracy` defines

- p(h_{A,j}) for a *model* j not in the active set A: the mean, over j's served nodes, of the
  node ensemble's accuracy on held-out tuples (:meth:`LinkSet.ensemble_accuracy`, each node with
  its own metric against model j's own output); 1.0 for j in A; a node without links (its model
  was never profiled) counts 0;
- the single-link accuracy the paper's greedy uses, p(g_ij) = p(h_{{i},j}): model i alone active
  predicting model j (all of i's nodes feed j's node ensembles, whose selections pick what helps).

Values are computed lazily and cached per (the ensemble's active source models, node): two sets
A that contain the same sources of a node's ensemble share the figure. For 3-6 models all
subsets cost a few dozen evaluations on a few hundred tuples, well under a second. Eq. 1 is then
the mean over models, as in :mod:`mlink.scheduler.selection`. Link costs c(h_{A,j}) are not
charged against the budget: every link of the site stays in host memory all the time (loaded
once, run on the CPU), so it does not depend on A and is not part of the memory the pool spends
on models.

A :class:`LinkAccuracy` object stands for one link set on one set of evaluation tuples: the
planner replaces it whenever the links are fine-tuned or the evaluation tuples change, and
readers of its figures (the daemon's snapshots) rely on that.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mlink.links import LinkSet, TupleSet, node_key, node_model


class LinkAccuracy:
    """p(h_{A,j}) per model and per node from a link set's node ensembles (module docstring).

    ``served`` is ``{model: outputs}``, the universe F. Callable as ``acc(active, model)``, the
    :data:`~mlink.scheduler.selection.EnsembleAcc` the selectors take.
    """

    def __init__(self, links: LinkSet | None, tuples: TupleSet | None, served: Mapping[str, Sequence[str]]) -> None:
        self.links = links
        self.tuples = tuples
        self.served = {m: tuple(outs) for m, outs in served.items()}
        self.models = tuple(self.served)
        self._cache: dict[tuple[frozenset[str], str], float] = {}
        self.evaluations = 0
        self.seconds = 0.0

    @property
    def n(self) -> int:
        return len(self.tuples) if self.tuples is not None else 0

    def node_nodes(self, model: str) -> list[str]:
        return [node_key(model, o) for o in self.served.get(model, ())]

    def predictable(self, node: str) -> bool:
        return self.links is not None and node in self.links.ensembles

    def _key(self, active: frozenset[str], node: str) -> frozenset[str]:
        ens = self.links.ensembles[node]  # type: ignore[union-attr]
        return frozenset(ens.active(active))

    def node(self, active: Iterable[str], node: str) -> float:
        """p(h_{A,node}); 1.0 when the node's model is active, 0.0 for a node without links."""
        act = frozenset(active)
        if node_model(node) in act:
            return 1.0
        if not self.predictable(node) or self.n == 0:
            return 0.0
        key = (self._key(act, node), node)
        hit = self._cache.get(key)
        if hit is None:
            t0 = time.perf_counter()
            assert self.links is not None and self.tuples is not None  # predictable, and n > 0
            hit = float(self.links.ensemble_accuracy(self.tuples, node, key[0]))
            hit = min(max(hit, 0.0), 1.0) if math.isfinite(hit) else 0.0
            self.seconds += time.perf_counter() - t0
            self.evaluations += 1
            self._cache[key] = hit
        return hit

    def model(self, active: Iterable[str], model: str) -> float:
        """p(h_{A,model}): mean over the model's served nodes."""
        act = frozenset(active)
        if model in act:
            return 1.0
        nodes = self.node_nodes(model)
        if not nodes:
            return 0.0
        return sum(self.node(act, k) for k in nodes) / len(nodes)

    __call__ = model

    def nodes(self, active: Iterable[str]) -> dict[str, float]:
        act = frozenset(active)
        return {k: self.node(act, k) for m in self.models for k in self.node_nodes(m)}

    def single(self) -> dict[tuple[str, str], float]:
        """p(g_ij) = p(h_{{i},j}) for every ordered pair of distinct models."""
        return {(i, j): self.model(frozenset([i]), j) for i in self.models for j in self.models if i != j}

    def sources(self, active: Iterable[str], node: str) -> list[str]:
        """The active models whose links a prediction of ``node`` uses (empty: the trivial output)."""
        act = frozenset(active)
        if not self.predictable(node):
            return []
        return used_sources(self.links, act, node)  # type: ignore[arg-type]

    def table(self, limit: int = 12) -> list[dict[str, Any]]:
        """Every subset A (up to ``limit`` models) with p(h_{A,j}) per model; for reports."""
        if len(self.models) > limit:
            return []
        rows = []
        for r in range(len(self.models) + 1):
            for combo in itertools.combinations(self.models, r):
                act = frozenset(combo)
                rows.append({"active": sorted(act), "accuracy": {m: round(self.model(act, m), 6) for m in self.models}})
        return rows


def used_sources(links: LinkSet, active: frozenset[str], node: str) -> list[str]:
    """Source models the ensemble of ``node`` runs links from for this active set."""
    ens = links.ensembles.get(node)
    if ens is None:
        return []
    try:
        return sorted({node_model(ens.sources[i]) for i, _ in ens.plan(active)})
    except Exception:  # an ensemble without plans: everything active it has links from
        return sorted(ens.active(active))
