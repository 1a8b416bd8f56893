"""The link matrix by K-fold cross-validation over a whole profile.

Fold k's frames are scored (:func:`mlink.links.matrix.frame_scores`) by a link set trained on
the other folds, and the scores of all folds are pooled, so every profiled frame is held out
once: on a few hundred held-out frames the best of several links is picked partly for its luck,
and one split cannot tell a 1-point difference from noise (``mlink links eval --folds K``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mlink.links.linkset import LinkSet
from mlink.links.matrix import LinkMatrix, Scores, frame_scores, matrix_from_scores
from mlink.links.tuples import TupleSet


def cross_validated_scores(
    tuples: TupleSet,
    folds: int = 5,
    *,
    seed: int = 0,
    subsets: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **train_kw: Any,
) -> tuple[Scores, list[LinkSet]]:
    """Per-frame scores by K-fold cross-validation: fold k's frames are scored by a link set
    trained (with its own selection and early-stopping splits) on the other folds, and the
    scores of all folds are pooled in fold order, so every frame is held out once. Returns the
    pooled scores and the K link sets. ``progress(k, folds)`` after each fold."""
    pooled: dict[tuple, list[np.ndarray]] = {}
    linksets: list[LinkSet] = []
    for k, (rest, held) in enumerate(tuples.folds(folds, seed)):
        ls = LinkSet.train(tuples.subset(rest), **train_kw)
        linksets.append(ls)
        for key, v in frame_scores(ls, tuples.subset(held), subsets).items():
            pooled.setdefault(key, []).append(v)
        if progress is not None:
            progress(k + 1, folds)
    return {k: np.concatenate(v) for k, v in pooled.items()}, linksets


def cross_validate(
    tuples: TupleSet,
    folds: int = 5,
    *,
    seed: int = 0,
    subsets: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **train_kw: Any,
) -> LinkMatrix:
    """The link matrix by K-fold cross-validation (:func:`cross_validated_scores`): on a few
    hundred held-out frames the best of several links is picked partly for its luck, and one
    split cannot tell a 1-point difference from noise."""
    scores, linksets = cross_validated_scores(tuples, folds, seed=seed, subsets=subsets, progress=progress, **train_kw)
    return matrix_from_scores(scores, list(linksets[0].ensembles), tuples.version(), folds)
