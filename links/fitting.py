"""Training a site's links and grouping them into ensembles (the first half of ``LinkSet.train``).

For every (source, target) pair the candidate architectures (:mod:`mlink.links.candidates`)
are trained from the same seed, and a ``judge`` (``LinkSet.train`` passes one that scores them
on its held-out selection tuples) keeps one. Where a pair has one candidate, or no judge is
given, the paper's link is trained alone, exactly as before candidates existed: same seed,
same data, same weights.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mlink.links.arch import Link
from mlink.links.candidates import candidate_classes
from mlink.links.encode import Batch, encode_source, encode_target
from mlink.links.ensemble import Ensemble, trivial_output
from mlink.links.train import FitResult, TrainConfig, fit_link
from mlink.links.tuples import TupleSet

# judge(source, target, trained candidates, the paper's first) -> (index kept, record of the choice)
Judge = Callable[[str, str, list[Link]], tuple[int, dict[str, Any]]]


def link_seed(seed: int, source: str, target: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{source}->{target}".encode())) % (2**31 - 1)


class _Data:
    """One target's encoded training data: its early-stopping split and all of it, lazily."""

    def __init__(self, tuples: TupleSet, train: TupleSet, val: TupleSet, t: str, cap: int) -> None:
        spec = tuples.specs[t]
        self.y_tr = encode_target(spec, train.values[t], cap)
        self.y_va = encode_target(spec, val.values[t], cap)
        self._all = lambda: encode_target(spec, tuples.values[t], cap)
        self._y_all: Batch | None = None

    @property
    def y_all(self) -> Batch:
        if self._y_all is None:
            self._y_all = self._all()
        return self._y_all


def _fit_candidate(
    cls: type[Link],
    s: str,
    t: str,
    specs: Mapping[str, Any],
    srcs: Mapping[str, dict],
    data: _Data,
    config: TrainConfig,
) -> tuple[Link, FitResult]:
    """One candidate of pair (s, t), trained from the pair's seed. Links that early-stop train on
    the rest of the split and stop on it; the others (decoders) train on every tuple for the
    configured epochs (see :mod:`mlink.links.train`). A class with ``restarts`` > 1 that
    early-stops trains from seeds ``seed, seed + 1, ...`` and keeps the lowest validation loss."""
    best: tuple[Link, FitResult] | None = None
    for restart in range(max(1, cls.restarts)):
        seed = link_seed(config.seed, s, t) + restart
        torch.manual_seed(seed)
        link = cls(specs[s], specs[t], **config.link_hparams())
        if link.head is not None:
            link.head.fit(data.y_tr.x)
        if not link.early_stops():
            return link, fit_link(link, srcs["all"][s], data.y_all, None, None, config, seed=seed)
        fit = fit_link(link, srcs["train"][s], data.y_tr, srcs["val"][s], data.y_va, config, seed=seed)
        if best is None or (fit.val_loss is not None and fit.val_loss < (best[1].val_loss or float("inf"))):
            best = (link, fit)
    assert best is not None
    return best


def fit_ensembles(
    tuples: TupleSet,
    pairs: Sequence[tuple[str, str]],
    val_share: float,
    config: TrainConfig,
    update: Callable[[str], None],
    judge: Judge | None = None,
) -> tuple[dict[str, Ensemble], dict[str, Any], tuple[int, int]]:
    """Train the links of ``pairs`` on ``tuples`` (each pair's candidates, one kept by ``judge``)
    and group them into one ensemble per target, with its mixing weights fitted on a
    ``val_share`` split of ``tuples`` but nothing chosen yet. ``update(what)`` after each pair.
    Returns the ensembles, per-link metrics (``"choice"``: the judge's record) and the split's sizes."""
    specs = tuples.specs
    train, val = tuples.split(val_share, config.seed)
    cap = config.cap
    used_sources = sorted({s for s, _ in pairs})
    srcs = {
        name: {s: encode_source(specs[s], part.values[s], cap) for s in used_sources}
        for name, part in (("train", train), ("val", val), ("all", tuples))
    }
    ensembles: dict[str, Ensemble] = {}
    link_metrics: dict[str, Any] = {}
    for t in dict.fromkeys(t for _, t in pairs):
        data = _Data(tuples, train, val, t, cap)
        links: dict[str, Link] = {}
        for s in (s for s, tt in pairs if tt == t):
            classes = candidate_classes(specs[s], specs[t], extra=config.arch_choice and judge is not None)
            fitted = [_fit_candidate(cls, s, t, specs, srcs, data, config) for cls in classes]
            pick, record = (
                judge(s, t, [link for link, _ in fitted]) if judge is not None and len(fitted) > 1 else (0, {})
            )
            links[s], fit = fitted[pick]
            link_metrics[f"{s}->{t}"] = {"arch": links[s].arch, "fit": fit.to_dict()}
            if record:
                record["fits"] = {link.arch: f.to_dict() for link, f in fitted}
                link_metrics[f"{s}->{t}"]["choice"] = record
            update(f"{s} -> {t}")
        ens = Ensemble(t, specs[t], links)
        if ens.head is not None:
            first = next(iter(links.values()))
            ens.head.set_stats(first.head.mean, first.head.std)  # type: ignore[union-attr]
        ens.trivial = trivial_output(specs[t], train.values[t])
        steps, lr = config.combiner_steps, config.combiner_lr
        ens.fit_combiner(srcs["val"], data.y_va, steps, lr, link_seed(config.seed, "*", t))
        ens.invalidate()
        ensembles[t] = ens
    return ensembles, link_metrics, (len(train), len(val))
