"""The link accuracy matrix: how well each link and each ensemble predicts its target.

Every accuracy is measured on held-out tuples against the target model's own output, with the
target's own metric (``OutputSpec.accuracy``: count within 0.5, top-1 agreement, box F1):

- ``single[(i, j)]``: p(g_ij), the single link from source node i to target node j;
- ``ensemble[j]``: p(h_{A,j}) with A = every other model of the site active;
- ``model_links[(m, j)]``: p(h_{{m},j}), the ensemble with model m alone active (all of m's
  nodes): the model-level link accuracy a scheduler uses for P1/P2;
- ``subsets[(A, j)]``: p(h_{A,j}) for every subset A (only when asked for);
- ``trivial[j]``: the trivial predictor fitted on the training split (majority class, rounded
  mean count, empty sequence), measured on the same held-out tuples;
- ``gap[j]``: the ensemble's accuracy minus its best single link's, with the standard error of
  that paired difference (per-frame scores on the same frames): whether "the ensemble is as good
  as its best link" is a finding or noise.

A matrix is the mean of per-frame scores (:func:`frame_scores`); ``crossval.cross_validate``
pools the scores of K folds, so every profiled frame is held out once (K link sets, each trained
on the other folds): on a few hundred held-out frames the best of several links is picked partly
for its luck, and one split cannot tell a 1-point difference from noise.

The functions here read a link set only through :class:`Linked` (its ensembles and training
config), so this module imports nothing of ``linkset``, which builds on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from mlink.links.encode import Batch, encode_source
from mlink.links.ensemble import Ensemble, all_subsets
from mlink.links.train import TrainConfig
from mlink.links.tuples import TupleSet, node_model

HELDOUT_SHARE = (
    0.2  # of a site's profile: links never train on it, the matrix and expected accuracies are measured on it
)


def heldout_split(tuples: TupleSet) -> tuple[TupleSet, TupleSet]:
    """(training part, held-out part) of a site's profile, the one split that ``mlink links
    train|eval``, ``mlink schedule plan`` and the daemon use (seeded), so their figures agree."""
    return tuples.split(HELDOUT_SHARE, seed=0)


class Linked(Protocol):
    """What the matrix reads of a link set (``LinkSet``): one ensemble per target node, and the
    training config (its ``cap`` bounds the encoded sequences)."""

    @property
    def ensembles(self) -> Mapping[str, Ensemble]: ...
    @property
    def config(self) -> TrainConfig: ...


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
    gap: dict[str, tuple[float, float]] = field(default_factory=dict)  # target -> (ensemble - best single, paired SE)
    folds: int = 1

    def best_single(self, target: str) -> tuple[str, float]:
        """The most accurate single link into ``target``: (source node, accuracy)."""
        cands = [(s, a) for (s, t), a in self.single.items() if t == target]
        return max(cands, key=lambda sa: sa[1])

    def beats_trivial(self) -> dict[tuple[str, str], bool]:
        return {(s, t): a > self.trivial[t] for (s, t), a in self.single.items()}

    def to_json(self) -> dict:
        return {
            "n_tuples": self.n,
            "folds": self.folds,
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
                    **(
                        {"gap_vs_best_single": {"mean": self.gap[t][0], "paired_se": self.gap[t][1]}}
                        if t in self.gap
                        else {}
                    ),
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
        w = max([*(len(c) for c in cols), 8])
        head = " " * (max(len(t) for t in self.targets) + 2) + " ".join(
            c.rjust(w) for c in [*cols, "ensemble", "trivial"]
        )
        lines = [head]
        for t in self.targets:
            cells = [f"{self.single[(s, t)]:.3f}".rjust(w) if (s, t) in self.single else "-".rjust(w) for s in cols]
            cells += [f"{self.ensemble[t]:.3f}".rjust(w), f"{self.trivial[t]:.3f}".rjust(w)]
            lines.append(t.ljust(max(len(x) for x in self.targets) + 2) + " ".join(cells))
        held = f"{self.n} held-out frames" + (f" ({self.folds}-fold cross-validation)" if self.folds > 1 else "")
        lines.append(f"\nensemble (all other models active) minus its best single link, {held}:")
        for t in self.targets:
            if t in self.gap:
                src, _ = self.best_single(t)
                mean, se = self.gap[t]
                lines.append(f"  {t}: {100 * mean:+.1f} points (paired SE {100 * se:.1f}) vs {src}")
        return "\n".join(lines)

    def plot_heatmap(self, path: str | Path, title: str | None = None) -> Path:
        """Write the matrix as an annotated heatmap PNG (matplotlib, Agg backend)."""
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        cols = [*self.sources, "ensemble\n(all others)", "trivial"]
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
                ax.text(
                    c,
                    r,
                    text,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if (math.isnan(v) or v > 0.6) else "white",
                )
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


def encode_sources(linkset: Linked, tuples: TupleSet) -> dict[str, Batch]:
    needed = {s for ens in linkset.ensembles.values() for s in ens.sources}
    missing = needed - set(tuples.specs)
    if missing:
        raise ValueError(f"tuples lack source nodes {sorted(missing)}")
    return {s: encode_source(tuples.specs[s], tuples.values[s], linkset.config.cap) for s in sorted(needed)}


def ensemble_accuracy(
    linkset: Linked,
    tuples: TupleSet,
    target: str,
    active_models: Iterable[str],
) -> float:
    """p(h_{A,j}) on ``tuples`` for target ``target`` and active models ``A`` (trivial when A
    holds no source model of the target)."""
    if len(tuples) == 0:
        raise ValueError("an ensemble's accuracy needs at least one tuple")
    ens = linkset.ensembles[target]
    plan = ens.plan(frozenset(active_models))
    return float(ens.frame_scores(plan, encode_sources(linkset, tuples), tuples.values[target]).mean())


Scores = dict[
    tuple, np.ndarray
]  # ("single", s, t) / ("ensemble", t) / ("model", m, t) / ("subset", A, t) / ("trivial", t)


def frame_scores(linkset: Linked, tuples: TupleSet, subsets: bool = False) -> Scores:
    """Per-frame accuracy (each target's own metric) of every link, ensemble and trivial predictor."""
    if len(tuples) == 0:
        raise ValueError("the accuracy matrix needs at least one held-out tuple")
    enc = encode_sources(linkset, tuples)
    out: Scores = {}

    def score(ens, plan) -> np.ndarray:
        return ens.frame_scores(plan, enc, tuples.values[ens.target])

    for t, ens in linkset.ensembles.items():
        for i, s in enumerate(ens.sources):
            out[("single", s, t)] = score(ens, [(i, 1.0)])
        every = frozenset(ens.source_models)
        out[("ensemble", t)] = score(ens, ens.plan(every))
        for m in ens.source_models:
            out[("model", m, t)] = score(ens, ens.plan({m}))
        if subsets:
            for act in all_subsets(ens.source_models):
                out[("subset", act, t)] = (
                    out[("ensemble", t)]
                    if act == every
                    else out[("model", next(iter(act)), t)]
                    if len(act) == 1
                    else score(ens, ens.plan(act))
                )
        out[("trivial", t)] = score(ens, [])
    return out


def matrix_from_scores(scores: Scores, targets: list[str], data_version: str | None, folds: int = 1) -> LinkMatrix:
    """Means of per-frame scores, and each ensemble's paired gap to its best single link."""
    mean = {k: float(v.mean()) for k, v in scores.items()}
    single = {(k[1], k[2]): a for k, a in mean.items() if k[0] == "single"}
    m = LinkMatrix(
        targets=list(targets),
        sources=sorted({s for s, _ in single}, key=lambda s: (node_model(s), s)),
        single=single,
        ensemble={k[1]: a for k, a in mean.items() if k[0] == "ensemble"},
        trivial={k[1]: a for k, a in mean.items() if k[0] == "trivial"},
        model_links={(k[1], k[2]): a for k, a in mean.items() if k[0] == "model"},
        subsets={(k[1], k[2]): a for k, a in mean.items() if k[0] == "subset"},
        n=len(next(iter(scores.values()))) if scores else 0,
        data_version=data_version,
        folds=folds,
    )
    for t in m.targets:
        best, _ = m.best_single(t)
        d = scores[("ensemble", t)] - scores[("single", best, t)]
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        m.gap[t] = (float(d.mean()), se)
    return m


def compute_matrix(linkset: Linked, tuples: TupleSet, subsets: bool = False) -> LinkMatrix:
    return matrix_from_scores(frame_scores(linkset, tuples, subsets), list(linkset.ensembles), tuples.version())
