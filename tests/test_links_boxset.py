"""Structure-aware links (links/boxset.py, links/matching.py, links/candidates.py): the
assignment, the order-free matching loss, what the box-set links learn on synthetic mappings,
the choice between them and the paper's links, and their life in a LinkSet (ensembles,
store, fine-tuning). Everything runs single-threaded from fixed seeds, a few seconds a test."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from mlink.links import LinkSet, LinkStoreError, Seq2Seq, Seq2Vec, TrainConfig, TupleSet
from mlink.links.boxset import BoxCount, BoxSet
from mlink.links.candidates import candidate_classes, choose
from mlink.links.encode import encode_one, encode_source, encode_target
from mlink.links.matching import assignment
from mlink.links.train import fit_link, torch_threads
from mlink.models.spec import BOX_DIM, OutputSpec, Task

BOXES = OutputSpec("boxes", "sequence", BOX_DIM, Task.BOXES, max_len=100)
COUNT = OutputSpec("count", "vector", 1, Task.COUNT)
PROBS = OutputSpec("probs", "vector", 10, Task.CLASS)


def _boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 0.8, (n, 2))
    wh = rng.uniform(0.05, 0.15, (n, 2))
    arr = np.concatenate([xy, xy + wh, rng.uniform(0, 1, (n, 1))], axis=1).astype(np.float32)
    return arr[np.argsort(-arr[:, 4])]


def _shift_and_drop(b: np.ndarray) -> np.ndarray:
    """The synthetic box -> box mapping: boxes scored under 0.4 dropped, the rest moved."""
    t = b[b[:, 4] >= 0.4].copy()
    t[:, [0, 2]] += 0.05
    t[:, [1, 3]] -= 0.03
    t[:, 4] = 0.9
    return t


def _above(b: np.ndarray) -> np.ndarray:
    return np.array([float((b[:, 4] > 0.5).sum())], np.float32)


@pytest.fixture(scope="module")
def sets() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [_boxes(rng, int(rng.integers(0, 9))) for _ in range(300)]


def _f1(preds, exact) -> float:
    return float(np.mean([BOXES.accuracy(p, e) for p, e in zip(preds, exact)]))


# -- matching ---------------------------------------------------------------------------------
def test_assignment_is_the_minimum_cost_one_to_one_matching() -> None:
    rng = np.random.default_rng(1)
    for n, m in [(0, 3), (3, 0), (1, 1), (3, 5), (5, 3), (4, 4), (6, 2)]:
        cost = rng.random((n, m))
        rows, cols = assignment(cost)
        assert len(rows) == min(n, m) == len(set(rows.tolist())) == len(set(cols.tolist()))
        if min(n, m) == 0:
            continue
        if n <= m:
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        else:
            best = min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))
        assert cost[rows, cols].sum() == pytest.approx(best, abs=1e-12)


def test_matching_loss_ignores_the_order_of_boxes(sets) -> None:
    torch.manual_seed(0)
    link = BoxSet(BOXES, BOXES)
    with torch.no_grad():
        for p in link.parameters():
            p.add_(torch.randn(p.shape) * 0.1)  # away from the identity initialisation
    link.eval()
    rng = np.random.default_rng(2)
    src, tgt = sets[:12], [_shift_and_drop(b) for b in sets[:12]]
    shuffled_t = [t[rng.permutation(len(t))] for t in tgt]
    shuffled_s = [s[rng.permutation(len(s))] for s in src]
    with torch.no_grad():
        # encode_target puts boxes in a canonical order; a raw batch in any order must score the same
        base = link.loss(encode_source(BOXES, src), encode_target(BOXES, tgt))
        raw_y = encode_target(BOXES, tgt)
        for i, t in enumerate(shuffled_t):
            raw_y.x[i, : len(t)] = torch.from_numpy(t)
        raw_s = encode_source(BOXES, src)
        for i, s in enumerate(shuffled_s):
            raw_s.x[i, : len(s)] = torch.from_numpy(s)
        assert not torch.equal(raw_y.x, encode_target(BOXES, tgt).x)  # the shuffle did reorder
        assert float(link.loss(encode_source(BOXES, src), raw_y)) == pytest.approx(float(base), rel=1e-5)
        assert float(link.loss(raw_s, raw_y)) == pytest.approx(float(base), rel=1e-5)
        moved = encode_target(BOXES, tgt)
        moved.x[:, :, :4] += 0.02  # and it is not blind: other targets, another loss
        assert float(link.loss(encode_source(BOXES, src), moved)) != pytest.approx(float(base), rel=1e-3)


# -- what the links learn ---------------------------------------------------------------------
def test_box_set_link_learns_shift_and_drop(sets) -> None:
    tgt = [_shift_and_drop(b) for b in sets]
    cfg = TrainConfig(epochs=30)
    with torch_threads(1):
        torch.manual_seed(1)
        link = BoxSet(BOXES, BOXES, **cfg.link_hparams())
        fit_link(link, encode_source(BOXES, sets[:220]), encode_target(BOXES, tgt[:220]), None, None, cfg, seed=1)
    preds = link.predict(encode_source(BOXES, sets[220:]))
    f1 = _f1(preds, tgt[220:])
    assert f1 > 0.85, f1
    for p in preds:
        BOXES.check(p)
        assert np.all((p >= 0) & (p <= 1)) and np.all(np.diff(p[:, 4]) <= 0)


def test_box_count_link_learns_counts_above_a_score_threshold(sets) -> None:
    counts = [_above(b) for b in sets]
    cfg = TrainConfig(epochs=60)
    with torch_threads(1):
        torch.manual_seed(1)
        link = BoxCount(BOXES, COUNT, **cfg.link_hparams())
        y = encode_target(COUNT, counts[:220])
        link.head.fit(y.x)
        fit_link(link, encode_source(BOXES, sets[:220]), y, None, None, cfg, seed=1)
    acc = np.mean([COUNT.accuracy(p, e) for p, e in zip(link.predict(encode_source(BOXES, sets[220:])), counts[220:])])
    assert acc > 0.9, acc


def test_empty_source_sets_give_valid_outputs(sets) -> None:
    torch.manual_seed(0)
    empty = encode_source(BOXES, [BOXES.empty(), sets[1]])
    assert BoxSet(BOXES, BOXES, free=0).predict(empty)[0].shape == (0, BOX_DIM)  # nothing to keep
    for p in BoxSet(BOXES, BOXES, free=4).predict(empty):
        BOXES.check(p)
    assert np.isfinite(BoxCount(BOXES, COUNT).predict(empty)[0]).all()


@pytest.mark.parametrize("cls,target", [(BoxSet, BOXES), (BoxCount, COUNT)])
def test_numpy_inference_matches_torch(cls, target, sets) -> None:
    torch.manual_seed(4)
    link = cls(BOXES, target)
    with torch.no_grad():
        for p in link.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    link.compile()
    values = [sets[0], BOXES.empty(), *sets[2:8]]
    batch = encode_source(BOXES, values)
    with torch.inference_mode():
        ref = link.forward_sets(batch.x, batch.lengths) if cls is BoxSet else (link.preact(batch),)
    got = link.sets_np(batch.x.numpy(), batch.lengths.numpy()) if cls is BoxSet else (link.preact_np(batch),)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r.numpy(), rtol=1e-4, atol=1e-5)
    # a batch predicts what each frame alone does
    alone = [link.predict(encode_one(BOXES, v))[0] for v in values]
    for a, b in zip(alone, link.predict(batch)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# -- the choice -------------------------------------------------------------------------------
def test_candidates_follow_the_outputs_structure() -> None:
    assert candidate_classes(BOXES, BOXES) == [Seq2Seq, BoxSet]
    assert candidate_classes(BOXES, COUNT) == [Seq2Vec, BoxCount]
    assert candidate_classes(BOXES, PROBS) == [Seq2Vec]
    assert candidate_classes(BOXES, BOXES, extra=False) == [Seq2Seq]


def test_the_paper_link_is_kept_unless_a_candidate_wins_beyond_noise() -> None:
    rng = np.random.default_rng(3)
    paper = rng.random(200)
    pick, rec = choose(["Seq2Seq", "BoxSet"], [paper, paper + rng.normal(0, 0.3, 200) * 0.1])  # noise
    assert pick == 0 and rec["chosen"] == "Seq2Seq" and abs(rec["gain"]) <= rec["paired_se"]
    pick, rec = choose(["Seq2Seq", "BoxSet"], [paper, np.clip(paper + 0.2, 0, 1)])
    assert pick == 1 and rec["chosen"] == "BoxSet" and rec["gain"] > rec["paired_se"] > 0
    assert set(rec["accuracy"]) == {"Seq2Seq", "BoxSet"} and rec["n"] == 200


def _two_models(sets: list[np.ndarray]) -> TupleSet:
    """Model a sees boxes; model b sees the same scene shifted and thinned, and counts a's
    confident boxes: structure the order-free links capture and the sequence links hardly do."""
    ts = TupleSet.for_models({"a": [BOXES], "b": [BOXES, COUNT]})
    for i, b in enumerate(sets):
        ts.append("s", float(i), {"a:boxes": b, "b:boxes": _shift_and_drop(b), "b:count": _above(b)})
    return ts


@pytest.fixture(scope="module")
def chosen(sets) -> tuple[LinkSet, TupleSet]:
    ts = _two_models(sets)
    cfg = TrainConfig(epochs=20, patience=5, combiner_steps=50)
    return LinkSet.train(ts.head(240), config=cfg, targets=["b:boxes", "b:count"]), ts.subset(range(240, 300))


def test_linkset_keeps_the_candidate_that_wins_on_held_out_tuples(chosen) -> None:
    ls, test = chosen
    assert type(ls.link("a:boxes", "b:boxes")) is BoxSet
    assert type(ls.link("a:boxes", "b:count")) is BoxCount
    for (s, t), rec in ls.choices.items():
        assert rec["chosen"] == ls.link(s, t).arch and rec["gain"] > rec["paired_se"]
        assert set(rec["fits"]) == set(rec["accuracy"]) == {rec["paper"], rec["chosen"]}
    assert set(ls.choices) == {("a:boxes", "b:boxes"), ("a:boxes", "b:count")}
    m = ls.matrix(test)
    assert m.single[("a:boxes", "b:boxes")] > 0.5 and m.ensemble["b:boxes"] == m.single[("a:boxes", "b:boxes")]
    out = ls.predict({"a"}, {"a:boxes": test.values["a:boxes"][0]})
    BOXES.check(out["b:boxes"])
    # without the choice, the paper's links (and nothing is recorded)
    plain = LinkSet.train(test, config=TrainConfig(epochs=1, arch_choice=False), targets=["b:count"])
    assert type(plain.link("a:boxes", "b:count")) is Seq2Vec and not plain.choices


def test_chosen_links_round_trip_through_the_store(chosen, tmp_path) -> None:
    ls, test = chosen
    ls.save(tmp_path / "l")
    back = LinkSet.load(tmp_path / "l", expect_specs=test.specs)
    assert back.choices == {k: json.loads(json.dumps(v)) for k, v in ls.choices.items()}
    assert {k: type(v) for k, v in back.links.items()} == {k: type(v) for k, v in ls.links.items()}
    frames = [{"a:boxes": v} for v in test.values["a:boxes"][:10]]
    for a, b in zip(ls.predict_batch({"a"}, frames), back.predict_batch({"a"}, frames)):
        for k in a:
            assert np.array_equal(a[k], b[k])
    manifest = tmp_path / "l" / "manifest.json"
    old = json.loads(manifest.read_text())
    old["format"] = "mlink-links/2"  # a store from before the candidates is refused (and retrained)
    manifest.write_text(json.dumps(old))
    with pytest.raises(LinkStoreError, match="format"):
        LinkSet.load(tmp_path / "l")


def test_fine_tuning_updates_the_box_set_links(sets) -> None:
    ts = _two_models(sets)
    ls = LinkSet.train(ts.head(200), config=TrainConfig(epochs=10, patience=5), targets=["b:boxes", "b:count"])
    before = {k: [p.detach().clone() for p in link.parameters()] for k, link in ls.links.items()}
    results = ls.fine_tune(ts.subset(range(200, 230)), epochs=3)
    assert set(results) == {"a:boxes->b:boxes", "a:boxes->b:count"}
    for k, link in ls.links.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[k], link.parameters())), k
        r = results[f"{k[0]}->{k[1]}"]
        assert np.isfinite(r["loss_before"]) and np.isfinite(r["loss_after"])
    for v in ls.predict({"a"}, {"a:boxes": sets[250]}).values():
        assert np.isfinite(v).all()


def test_restarts_keep_the_lowest_validation_loss() -> None:
    """A class with ``restarts`` trains from consecutive seeds and keeps the best on validation."""
    from mlink.links import Vec2Vec
    from mlink.links.fitting import _Data, _fit_candidate, link_seed

    class Restarted(Vec2Vec):
        restarts = 3

    rng = np.random.default_rng(5)
    ts = TupleSet.for_models({"a": [COUNT], "b": [COUNT]})
    for i in range(60):
        v = float(rng.integers(0, 9))
        ts.append("s", float(i), {"a:count": np.array([v], np.float32), "b:count": np.array([v + 1], np.float32)})
    train, val = ts.split(0.25, 0)
    srcs = {n: {"a:count": encode_source(COUNT, p.values["a:count"])} for n, p in (("train", train), ("val", val))}
    cfg = TrainConfig(epochs=5)
    with torch_threads(1):
        _, fit = _fit_candidate(
            Restarted, "a:count", "b:count", ts.specs, srcs, _Data(ts, train, val, "b:count", 32), cfg
        )
        losses = []
        for r in range(3):
            torch.manual_seed(link_seed(cfg.seed, "a:count", "b:count") + r)
            single = Vec2Vec(COUNT, COUNT, **cfg.link_hparams())
            y = encode_target(COUNT, train.values["b:count"])
            single.head.fit(y.x)
            seed = link_seed(cfg.seed, "a:count", "b:count") + r
            losses.append(
                fit_link(
                    single,
                    srcs["train"]["a:count"],
                    y,
                    srcs["val"]["a:count"],
                    encode_target(COUNT, val.values["b:count"]),
                    cfg,
                    seed=seed,
                ).val_loss
            )
    assert fit.val_loss == min(losses) and len(set(losses)) > 1
