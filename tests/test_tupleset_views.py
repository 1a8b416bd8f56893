"""TupleSet helpers the planner uses: restrict, merge, copy, tail."""

from __future__ import annotations

import pytest

from mlink.links import TupleSet
from mlink.links.synthetic import synthetic_tuples


@pytest.fixture(scope="module")
def synth() -> TupleSet:
    return synthetic_tuples(40, seed=5)


def test_restrict_keeps_the_nodes_it_has(synth: TupleSet) -> None:
    keep = synth.nodes[:2]
    part = synth.restrict([*keep, "nobody:nothing"])
    assert part.nodes == keep and len(part) == len(synth)
    with pytest.raises(KeyError):
        synth.select([*keep, "nobody:nothing"])


def test_merge_joins_nodes_over_the_same_frames(synth: TupleSet) -> None:
    by_model = {m: synth.restrict([k for k in synth.nodes if k.startswith(m + ":")]) for m in synth.models}
    merged = TupleSet.merge(by_model.values())
    assert set(merged.nodes) == set(synth.nodes)
    assert merged.select(synth.nodes).version() == synth.version()
    shifted = synth.subset(range(1, len(synth)))
    with pytest.raises(ValueError, match="different frames"):
        TupleSet.merge([synth, shifted.restrict(synth.nodes[:1])])


def test_copy_and_tail(synth: TupleSet) -> None:
    window = synth.head(10).copy()
    window.extend(synth.subset(range(10, 15)))
    assert len(synth.head(10)) == 10 and len(window) == 15
    assert window.tail(5).version() == synth.subset(range(10, 15)).version()
    assert len(window.tail(100)) == 15 and len(window.tail(0)) == 0
