"""Candidate link architectures per (source, target), and the choice among them.

The paper's four shapes (:mod:`mlink.links.arch`) follow from the source and target *kinds*;
where the outputs have structure a kind does not see, an order-free link
(:mod:`mlink.links.boxset`) is a second candidate:

=====================  ===============  ===========
source -> target       paper's link     candidate
=====================  ===============  ===========
boxes -> boxes         Seq2Seq          BoxSet
boxes -> count         Seq2Vec          BoxCount
=====================  ===============  ===========

``LinkSet.train`` trains every candidate of a pair and keeps one, chosen like an ensemble's
plan (:func:`mlink.links.ensemble.choose_rows`): on the held-out selection tuples, which no
link trained or early-stopped on, with the target's own metric, the paper's link is kept
unless a candidate beats it by more than one standard error of the paired per-frame
difference. So a choice between two links within noise of each other always falls the same
way (the paper's), and a candidate is served only where it measurably helps. The choice, both
scores and the paired difference are recorded in the link's metrics (``"choice"``), which the
link store persists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mlink.links.arch import ARCH_BY_NAME as PAPER_ARCHS
from mlink.links.arch import Link, link_class
from mlink.links.boxset import BoxCount, BoxSet
from mlink.links.encode import Batch
from mlink.links.ensemble import choose_rows
from mlink.models.spec import OutputSpec, Task

# Every architecture a stored link may have, by name (the link store rebuilds links from it).
ARCH_BY_NAME: dict[str, type[Link]] = {**PAPER_ARCHS, BoxSet.arch: BoxSet, BoxCount.arch: BoxCount}


def candidate_classes(source: OutputSpec, target: OutputSpec, extra: bool = True) -> list[type[Link]]:
    """The architectures to try for a link, the paper's first (and alone when ``extra`` is False)."""
    out: list[type[Link]] = [link_class(source, target)]
    if extra and source.task is Task.BOXES:
        if target.task is Task.BOXES:
            out.append(BoxSet)
        elif target.task is Task.COUNT:
            out.append(BoxCount)
    return out


def frame_scores(link: Link, src: Batch, exact: Sequence[np.ndarray]) -> np.ndarray:
    """Per-frame accuracy (the target's own metric) of one link's predictions on ``src``."""
    return np.array([link.target.accuracy(p, e) for p, e in zip(link.predict(src), exact)], dtype=np.float64)


def choose(archs: Sequence[str], scores: Sequence[np.ndarray]) -> tuple[int, dict[str, Any]]:
    """Which candidate to keep (index into ``archs``, the paper's first) from their per-frame
    scores on the same held-out frames, and the record of the choice: every candidate's mean,
    and the best other candidate's paired difference to the paper's link with its SE."""
    table = np.stack([np.asarray(s, dtype=np.float64) for s in scores])
    n = table.shape[1]
    pick, _ = choose_rows(table, 1, np.arange(n)) if n else (0, 0.0)
    means = table.mean(axis=1) if n else np.zeros(len(archs))
    rival = pick if pick else (1 + int(np.argmax(means[1:])) if len(archs) > 1 else 0)
    d = table[rival] - table[0]
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return pick, {
        "chosen": archs[pick],
        "paper": archs[0],
        "accuracy": {a: float(m) for a, m in zip(archs, means)},
        "rival": archs[rival],
        "gain": float(d.mean()) if n else 0.0,  # rival minus the paper's link
        "paired_se": se,
        "n": int(n),
    }
