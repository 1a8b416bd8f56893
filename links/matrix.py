"""The link accuracy matrix: how well each link and each ensemble predicts its target.

Every accuracy is measured on held-out tuples against the target model's own output, with the
target's own metric (``OutputSpec.accuracy``: count within 0.5, top-1 agreement, box F1):

- ``single[(i, j)]``: p(g_ij), the single link from source node i to target node j;
- ``ensemble[j]``: p(h_{A,j}) with A = every other model of the site active;
- ``model_links[(m, j)]``: p(h_{{m},j}), the ensemble with model m alone active (all of m's
  nodes): the model-level link accuracy a scheduler uses for P1/P2;
- ``subsets[(A, j)]``: p(h_{A,j}) for every subset A (only when asked for);
- ``trivial[j]``: the trivial predictor fitted on the training split (majority class, rounded
  mean count, empty sequence), measured on the same held-out tuples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np

from mlink.links.encode import Batch, encode_source
from mlink.links.ensemble import all_subsets
from mlink.links.tuples import TupleSet, node_model

if TYPE_CHECKING:
    from mlink.links.linkset import LinkSet


@dataclass
class LinkMatrix:
    targets: list[str]
    sources: list[str]
    single: dict[tuple[str, str], float]
    ensemble: dict[str, float]
    trivial: dict[str, float]
    model_links: dict[tuple[str, str], float]
    subsets: dict[tuple[frozenset[str], str], float] = field(default_factory=dict)
    n: int = 0
    data_version: str | None = None

    def best_single(self, target: str) -> tuple[str, float]:
        """The most accurate single link into ``target``: (source node, accuracy)."""
        cands = [(s, a) for (s, t), a in self.single.items() if t == target]
        return max(cands, key=lambda sa: sa[1])

    def beats_trivial(self) -> dict[tuple[str, str], bool]:
        return {(s, t): a > self.trivial[t] for (s, t), a in self.single.items()}

    def to_json(self) -> dict:
        return {
            "n_tuples": self.n,
            "data_version": self.data_version,
            "targets": list(self.targets),
            "sources": list(self.sources),
            "links": [
                {"source": s, "target": t, "accuracy": a, "beats_trivial": a > self.trivial[t]}
                for (s, t), a in sorted(self.single.items(), key=lambda kv: (kv[0][1], kv[0][0]))
            ],
            "ensembles": {
                t: {
                    "sources": "all other models",
                    "accuracy": self.ensemble[t],
                    "best_single": dict(zip(("source", "accuracy"), self.best_single(t))),
                    "trivial": self.trivial[t],
                }
                for t in self.targets
            },
            "trivial": dict(self.trivial),
            "model_links": [
                {"source_model": m, "target": t, "accuracy": a} for (m, t), a in sorted(self.model_links.items())
            ],
            "subsets": [
                {"active_models": sorted(a), "target": t, "accuracy": acc}
                for (a, t), acc in sorted(self.subsets.items(), key=lambda kv: (kv[0][1], sorted(kv[0][0])))
            ],
        }

    def table(self) -> str:
        """A plain-text rendering (rows: targets; columns: source nodes, ensemble, trivial)."""
        cols = list(self.sources)
        w = max([len(c) for c in cols] + [8])
        head = " " * (max(len(t) for t in self.targets) + 2) + " ".join(c.rjust(w) for c in cols + ["ensemble", "trivial"])
        lines = [head]
        for t in self.targets:
            cells = [
                f"{self.single[(s, t)]:.3f}".rjust(w) if (s, t) in self.single else "-".rjust(w) for s in cols
            ]
            cells += [f"{self.ensemble[t]:.3f}".rjust(w), f"{self.trivial[t]:.3f}".rjust(w)]
            lines.append(t.ljust(max(len(x) for x in self.targets) + 2) + " ".join(cells))
        return "\n".join(lines)

    def plot_heatmap(self, path: str | Path, title: str | None = None) -> Path:
        """Write the matrix as an annotated heatmap PNG (matplotlib, Agg backend)."""
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        cols = list(self.sources) + ["ensemble\n(all others)", "trivial"]
        data = np.full((len(self.targets), len(cols)), np.nan)
        for r, t in enumerate(self.targets):
            for c, s in enumerate(self.sources):
                if (s, t) in self.single:
                    data[r, c] = self.single[(s, t)]
            data[r, -2] = self.ensemble[t]
            data[r, -1] = self.trivial[t]
        fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 3, 0.6 * len(self.targets) + 2.5))
        cmap = matplotlib.colormaps["viridis"]
        cmap = cmap.with_extremes(bad="#dddddd") if hasattr(cmap, "with_extremes") else cmap
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(self.targets)), labels=self.targets, fontsize=8)
        ax.axvline(len(self.sources) - 0.5, color="white", lw=2)
        for r in range(data.shape[0]):
            for c in range(data.shape[1]):
                v = data[r, c]
                text = "-" if math.isnan(v) else f"{v:.2f}"
                ax.text(c, r, text, ha="center", va="center", fontsize=7, color="black" if (math.isnan(v) or v > 0.6) else "white")
        ax.set_xlabel("source node")
        ax.set_ylabel("target node")
        ax.set_title(title or f"link accuracy on {self.n} held-out tuples (target's own metric)")
        fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out


def encode_sources(linkset: "LinkSet", tuples: TupleSet) -> dict[str, Batch]:
    needed = {s for ens in linkset.ensembles.values() for s in ens.sources}
    missing = needed - set(tuples.specs)
    if missing:
        raise ValueError(f"tuples lack source nodes {sorted(missing)}")
    return {s: encode_source(tuples.specs[s], tuples.values[s], linkset.config.cap) for s in sorted(needed)}


def ensemble_accuracy(
    linkset: "LinkSet",
    tuples: TupleSet,
    target: str,
    active_models: Iterable[str],
    _enc: Mapping[str, Batch] | None = None,
) -> float:
    """p(h_{A,j}) on ``tuples`` for target ``target`` and active models ``A`` (trivial when A
    holds no source model of the target)."""
    ens = linkset.ensembles[target]
    enc = _enc if _enc is not None else encode_sources(linkset, tuples)
    plan = ens.plan(frozenset(active_models))
    if not plan:
        preds = [ens.trivial.copy() for _ in range(len(tuples))]
    else:
        preds = ens.predict_encoded(plan, enc)
    return ens.spec.mean_accuracy(preds, tuples.values[target])


def compute_matrix(linkset: "LinkSet", tuples: TupleSet, subsets: bool = False) -> LinkMatrix:
    if len(tuples) == 0:
        raise ValueError("the accuracy matrix needs at least one held-out tuple")
    enc = encode_sources(linkset, tuples)
    single: dict[tuple[str, str], float] = {}
    ensemble: dict[str, float] = {}
    trivial: dict[str, float] = {}
    model_links: dict[tuple[str, str], float] = {}
    subset_acc: dict[tuple[frozenset[str], str], float] = {}
    for t, ens in linkset.ensembles.items():
        exact = tuples.values[t]
        for i, s in enumerate(ens.sources):
            single[(s, t)] = ens.spec.mean_accuracy(ens.predict_encoded([(i, 1.0)], enc), exact)
        every = frozenset(ens.source_models)
        ensemble[t] = ensemble_accuracy(linkset, tuples, t, every, enc)
        for m in ens.source_models:
            model_links[(m, t)] = ensemble_accuracy(linkset, tuples, t, {m}, enc)
        if subsets:
            for act in all_subsets(ens.source_models):
                subset_acc[(act, t)] = (
                    ensemble[t] if act == every else model_links[(next(iter(act)), t)] if len(act) == 1
                    else ensemble_accuracy(linkset, tuples, t, act, enc)
                )
        trivial[t] = ens.spec.mean_accuracy([ens.trivial] * len(tuples), exact)
    sources = sorted({s for s, _ in single}, key=lambda s: (node_model(s), s))
    return LinkMatrix(
        targets=list(linkset.ensembles),
        sources=sources,
        single=single,
        ensemble=ensemble,
        trivial=trivial,
        model_links=model_links,
        subsets=subset_acc,
        n=len(tuples),
        data_version=tuples.version(),
    )
