"""Unit tests of mlink.links on small synthetic tuples: datasets, architectures, masking,
determinism, ensembles over subsets, the link store. Real-data tests: test_links_real.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mlink.links import (
    DatasetError,
    IncompatibleLinksError,
    LinkError,
    LinkSet,
    LinkStoreError,
    Seq2Seq,
    Seq2Vec,
    TrainConfig,
    TupleSet,
    Vec2Seq,
    Vec2Vec,
    make_link,
)
from mlink.links.arch import greedy_decode, hidden_width, seq_loss
from mlink.links.encode import Batch, canonical, encode_one, encode_source, encode_target
from mlink.links.synthetic import synthetic_tuples
from mlink.links.train import fit_link
from mlink.models.spec import BOX_DIM, OutputSpec, Task

COUNT = OutputSpec("person_count", "vector", 1, Task.COUNT)
PROBS = OutputSpec("probs", "vector", 1000, Task.CLASS)
BOXES = OutputSpec("boxes", "sequence", BOX_DIM, Task.BOXES, max_len=100)


@pytest.fixture(scope="module")
def synth() -> TupleSet:
    return synthetic_tuples(240, seed=3)


def _fast(**kw) -> TrainConfig:
    base = dict(epochs=25, patience=5, combiner_steps=120)
    base.update(kw)
    return TrainConfig(**base)


# -- tuple sets -------------------------------------------------------------------------------
def test_tupleset_append_checks_nodes_and_specs() -> None:
    ts = TupleSet.for_models({"a": [COUNT], "b": [BOXES]})
    ts.append("s", 0.0, {"a:person_count": np.array([2.0]), "b:boxes": np.zeros((0, 5))})
    with pytest.raises(ValueError, match="missing"):
        ts.append("s", 1.0, {"a:person_count": np.array([2.0])})
    with pytest.raises(ValueError, match="expected shape"):
        ts.append("s", 1.0, {"a:person_count": np.array([2.0, 3.0]), "b:boxes": np.zeros((0, 5))})
    assert len(ts) == 1 and ts.models == ["a", "b"]


def test_tupleset_split_subset_extend(synth: TupleSet) -> None:
    train, val = synth.split(0.25, seed=1)
    assert len(train) + len(val) == len(synth) and len(val) == 60
    assert sorted(train.timestamps + val.timestamps) == sorted(synth.timestamps)
    again_train, _ = synth.split(0.25, seed=1)
    assert again_train.timestamps == train.timestamps
    other_train, _ = synth.split(0.25, seed=2)
    assert other_train.timestamps != train.timestamps
    head = synth.head(10)
    head.extend(synth.subset(range(10, 20)))
    assert head.version() == synth.head(20).version()


def test_tupleset_save_load_round_trip(synth: TupleSet, tmp_path) -> None:
    version = synth.save(tmp_path / "d")
    assert version == synth.version()
    back = TupleSet.load(tmp_path / "d")
    assert back.version() == version and len(back) == len(synth)
    assert (
        back.specs == synth.specs
        and back.specs["mobilenet_v2:probs"].labels == synth.specs["mobilenet_v2:probs"].labels
    )
    for k in synth.specs:
        assert all(np.array_equal(a, b) for a, b in zip(back.values[k], synth.values[k]))
    assert back.streams == synth.streams and back.timestamps == synth.timestamps
    # same content -> same version, whenever saved
    assert synth.save(tmp_path / "e") == version


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta_garbage", "meta_edit", "missing"])
def test_corrupt_dataset_is_refused(synth: TupleSet, tmp_path, damage: str) -> None:
    d = tmp_path / "d"
    synth.head(30).save(d)
    data, meta = d / "tuples.npz", d / "meta.json"
    if damage == "truncate":
        raw = data.read_bytes()
        data.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "meta_garbage":
        meta.write_text("{not json")
    elif damage == "meta_edit":  # data file intact, but the recorded content changed
        m = json.loads(meta.read_text())
        m["timestamps"][0] += 1.0
        meta.write_text(json.dumps(m))
    else:
        data.unlink()
    with pytest.raises(DatasetError):
        TupleSet.load(d)


# -- architectures ----------------------------------------------------------------------------
def test_architecture_follows_source_and_target_kinds() -> None:
    assert type(make_link(COUNT, PROBS)) is Vec2Vec
    assert type(make_link(BOXES, COUNT)) is Seq2Vec
    assert type(make_link(PROBS, BOXES)) is Vec2Seq
    assert type(make_link(BOXES, BOXES)) is Seq2Seq
    # 2 * out, clamped: a count gets 16 hidden units, 1000 classes get 256
    assert hidden_width(1) == 16 and hidden_width(10) == 20 and hidden_width(1000) == 256
    assert make_link(PROBS, COUNT).mlp[0].out_features == 16
    assert make_link(COUNT, PROBS).mlp[0].out_features == 256


def _boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 0.8, (n, 2))
    arr = np.concatenate([xy, xy + 0.1, rng.uniform(0.3, 1, (n, 1))], axis=1).astype(np.float32)
    return arr[np.argsort(-arr[:, 4])]


def test_padding_does_not_change_sequence_encodings() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    link = make_link(BOXES, COUNT).eval()
    short, long_ = _boxes(rng, 2), _boxes(rng, 9)
    alone = encode_source(BOXES, [short])
    padded = encode_source(BOXES, [short, long_])
    garbage = Batch(padded.x.clone(), padded.lengths)
    garbage.x[0, 2:] = 7.0  # padding positions of the short sequence
    with torch.inference_mode():
        a = link.preact(alone)[0]
        b = link.preact(padded)[0]
        c = link.preact(garbage)[0]
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(b, c, atol=1e-6)
    # Seq2Seq memory: padded steps are masked out of the attention
    s2s = make_link(BOXES, BOXES).eval()
    y = encode_target(BOXES, [short, long_])
    with torch.inference_mode():
        e1, s1 = s2s.teacher(padded, y)
        e2, s2 = s2s.teacher(garbage, y)
    assert torch.allclose(e1[0], e2[0], atol=1e-6) and torch.allclose(s1[0], s2[0], atol=1e-6)


def test_sequence_loss_ignores_padded_targets() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    y = encode_target(BOXES, [_boxes(rng, 1), _boxes(rng, 4)])
    elem = torch.randn(2, 5, BOX_DIM)
    stop = torch.randn(2, 5)
    base = seq_loss(elem, stop, y.x, y.lengths)
    y2 = y.x.clone()
    y2[0, 1:] = 0.9  # padding of the 1-element target
    elem2, stop2 = elem.clone(), stop.clone()
    elem2[0, 2:] = 5.0  # decoder steps after the end of the first target
    stop2[0, 2:] = -5.0
    assert torch.allclose(base, seq_loss(elem2, stop2, y2, y.lengths))
    stop3 = stop.clone()
    stop3[0, 1] = -9.0  # the end step of the first target does count
    assert not torch.allclose(base, seq_loss(elem, stop3, y.x, y.lengths))


def test_canonical_box_order_is_left_to_right_and_capped() -> None:
    rng = np.random.default_rng(2)
    arr = _boxes(rng, 40)
    c = canonical(BOXES, arr, 32)
    assert len(c) == 32
    assert set(map(tuple, c)) == set(map(tuple, arr[:32]))  # the 32 best-scored, reordered
    centres = c[:, 0] + c[:, 2]
    assert np.all(np.diff(centres) >= 0)


def test_greedy_decoding_respects_cap_and_format() -> None:
    torch.manual_seed(0)
    link = make_link(COUNT, BOXES, cap=6).eval()
    with torch.no_grad():
        link.decoder.out.bias[-1] = -50.0  # never end: decoding must stop at the cap
    link.compile()
    src = encode_source(COUNT, [np.array([3.0], np.float32), np.array([7.0], np.float32)])
    out = link.predict(src)
    assert [o.shape for o in out] == [(6, BOX_DIM)] * 2
    # the numpy decoder decodes what the torch reference decodes (before re-ordering by score)
    ref = greedy_decode([(link, 1.0)], [src], 6, BOX_DIM)
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o, r[np.argsort(-r[:, 4], kind="stable")], rtol=1e-4, atol=1e-5)
    assert np.all((out[0] >= 0) & (out[0] <= 1)) and np.all(np.diff(out[0][:, 4]) <= 0)
    with torch.no_grad():
        link.decoder.out.bias[-1] = 50.0  # end at once: empty sequences
    link.compile()
    assert [o.shape for o in link.predict(encode_source(COUNT, [np.array([3.0], np.float32)]))] == [(0, BOX_DIM)]
    BOXES.check(out[0])


def _values(spec: OutputSpec, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    if spec.task is Task.COUNT:
        return [np.array([rng.integers(0, 12)], np.float32) for _ in range(n)]
    if spec.task is Task.CLASS:
        return [rng.dirichlet(np.full(spec.dim, 0.05)).astype(np.float32) for _ in range(n)]
    return [_boxes(rng, int(rng.integers(0, 7))) for _ in range(n)]


@pytest.mark.parametrize(
    "source,target",
    [
        (COUNT, COUNT),
        (PROBS, COUNT),
        (COUNT, PROBS),
        (BOXES, COUNT),
        (BOXES, PROBS),
        (COUNT, BOXES),
        (PROBS, BOXES),
        (BOXES, BOXES),
    ],
)
def test_numpy_inference_matches_torch(source: OutputSpec, target: OutputSpec) -> None:
    """Predictions run in numpy (links/infer.py); they must compute what the torch modules do."""
    rng = np.random.default_rng(5)
    link = make_link(source, target, seed=4)
    with torch.no_grad():
        for p in link.parameters():
            p.add_(torch.randn(p.shape) * 0.2)  # away from the initialisation's symmetries
    link.compile()
    values = _values(source, rng, 9)
    if source.kind == "sequence":
        values[2] = source.empty()  # an empty sequence among them
    batch = encode_source(source, values)
    singles = [encode_one(source, v) for v in values]
    if target.kind == "vector":
        with torch.inference_mode():
            ref = link.preact(batch).numpy()
        np.testing.assert_allclose(link.preact_np(batch), ref, rtol=1e-4, atol=1e-5)
        for i, one in enumerate(singles):
            np.testing.assert_allclose(link.preact_np(one)[0], ref[i], rtol=1e-4, atol=1e-5)
        return
    # sequences: teacher-forced steps of the torch decoder against numpy steps fed the same inputs
    y = encode_target(target, _values(target, rng, 9))
    with torch.inference_mode():
        elem, stop = link.teacher(batch, y)
    bank = link._np.bank
    for src, rows in [(batch, slice(None))] + [(one, slice(i, i + 1)) for i, one in enumerate(singles)]:
        state = bank.begin([link.memory_np(src)])
        for t in range(y.x.shape[1] + 1):
            prev = None if t == 0 else y.x[rows, t - 1].numpy()
            e, s = bank.step(state, prev)
            np.testing.assert_allclose(e[0], elem[rows, t].numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(s[0], stop[rows, t].numpy(), rtol=1e-4, atol=1e-5)


def test_a_decoder_bank_steps_each_decoder_as_it_would_alone() -> None:
    """An ensemble's links decode in lockstep through one DecoderBank (stacked weights, memories
    padded to the longest and widest): each decoder's logits must be its own, and the weighted
    greedy decode must equal the torch reference over the same links."""
    from mlink.links.infer import DecoderBank, greedy_decode_np

    rng = np.random.default_rng(11)
    links = [
        make_link(src, BOXES, seed=20 + i) for i, src in enumerate([COUNT, BOXES, PROBS])
    ]  # memories of 4, L+1, 4 slots
    for link in links:
        with torch.no_grad():
            for p in link.parameters():
                p.add_(torch.randn(p.shape) * 0.2)
        link.compile()
    srcs = [encode_source(link.source, _values(link.source, rng, 7)) for link in links]
    memories = [link.memory_np(src) for link, src in zip(links, srcs)]
    bank = DecoderBank([link._np.decoder for link in links])
    state = bank.begin(memories)
    alone = [(link._np.bank, link._np.bank.begin([m])) for link, m in zip(links, memories)]
    prev = None
    for _ in range(4):
        e, s = bank.step(state, prev)
        for k, (b, st) in enumerate(alone):
            e1, s1 = b.step(st, prev)
            np.testing.assert_allclose(e[k], e1[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(s[k], s1[0], rtol=1e-5, atol=1e-6)
        prev = rng.random((7, BOX_DIM)).astype(np.float32)
    weights = [0.5, 0.3, 0.2]
    got = greedy_decode_np(bank, np.array(weights, np.float32), memories, links[0].cap)
    ref = greedy_decode(list(zip(links, weights)), srcs, links[0].cap, BOX_DIM)
    assert [len(g) for g in got] == [len(r) for r in ref]
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [1, 6])
def test_an_encoder_bank_runs_each_encoder_as_it_would_alone(n: int) -> None:
    """Links that read the same box sequence run their encoders as one EncoderBank: each
    encoder's states must be its own, for one frame and for a padded batch (an empty sequence
    among them)."""
    from mlink.links.infer import EncoderBank

    rng = np.random.default_rng(13)
    links = [make_link(BOXES, tgt, seed=30 + i) for i, tgt in enumerate([COUNT, BOXES, PROBS])]
    for link in links:
        with torch.no_grad():
            for p in link.parameters():
                p.add_(torch.randn(p.shape) * 0.2)
        link.compile()
    values = _values(BOXES, rng, n)
    if n > 1:
        values[1] = BOXES.empty()
    src = encode_source(BOXES, values)
    x, lengths = src.x.numpy(), src.lengths.numpy()
    bank = EncoderBank([link.np_encoder() for link in links])
    states, last, mask = bank(x, lengths)
    for k, link in enumerate(links):
        s1, l1, m1 = link.np_encoder()(x, lengths)
        np.testing.assert_allclose(states[k], s1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(last[k], l1, rtol=1e-5, atol=1e-6)
        assert np.array_equal(mask, m1)
        with torch.inference_mode():
            ref = link.encoder(src.x, src.lengths)[1].numpy()  # the torch encoder's last state
        np.testing.assert_allclose(last[k], ref, rtol=1e-4, atol=1e-5)


# -- training ---------------------------------------------------------------------------------
def _count_pairs(n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 10, n)
    return [np.array([v], np.float32) for v in x], [np.array([v + 1], np.float32) for v in x]


def test_training_is_deterministic_and_learns() -> None:
    xs, ys = _count_pairs(300, 0)
    src, tgt = encode_source(COUNT, xs[:240]), encode_target(COUNT, ys[:240])
    vsrc, vtgt = encode_source(COUNT, xs[240:]), encode_target(COUNT, ys[240:])
    cfg = TrainConfig(epochs=30, patience=8)

    def train(seed: int):
        link = make_link(COUNT, COUNT, seed=seed)
        link.head.fit(tgt.x)
        fit = fit_link(link, src, tgt, vsrc, vtgt, cfg, seed=seed)
        return link, fit

    a, fit = train(1)
    b, _ = train(1)
    c, _ = train(2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    assert fit.epochs >= 1 and fit.val_loss is not None
    acc = COUNT.mean_accuracy(a.predict(vsrc), ys[240:])
    trivial = COUNT.mean_accuracy([np.array([round(float(np.mean(ys[:240])))], np.float32)] * 60, ys[240:])
    assert acc >= 0.9 > trivial


def test_training_respects_thread_setting() -> None:
    xs, ys = _count_pairs(64, 1)
    before = torch.get_num_threads()
    seen = []
    link = make_link(COUNT, COUNT)
    fit_link(
        link,
        encode_source(COUNT, xs),
        encode_target(COUNT, ys),
        None,
        None,
        TrainConfig(epochs=1),
        on_epoch=lambda *a: seen.append(torch.get_num_threads()),
    )
    assert seen == [before]  # fit_link alone never touches the thread count
    from mlink.links.train import torch_threads

    with torch_threads(8):
        assert torch.get_num_threads() <= 2
    assert torch.get_num_threads() == before


# -- link sets and ensembles ------------------------------------------------------------------
VECTOR_SOURCES = ["yolox_nano:person_count", "yolox_nano:object_count", "mobilenet_v2:probs"]


@pytest.fixture(scope="module")
def vector_links(synth: TupleSet) -> tuple[LinkSet, TupleSet]:
    train, test = synth.head(180), synth.subset(range(180, 240))
    ls = LinkSet.train(
        train,
        config=_fast(),
        targets=["hog_people:person_count", "mobilenet_v2:probs"],
        sources=[*VECTOR_SOURCES, "hog_people:person_count"],
    )
    return ls, test


def test_linkset_structure(vector_links) -> None:
    ls, _ = vector_links
    assert set(ls.targets) == {"hog_people:person_count", "mobilenet_v2:probs"}
    assert set(ls.links) == {
        ("yolox_nano:person_count", "hog_people:person_count"),
        ("yolox_nano:object_count", "hog_people:person_count"),
        ("mobilenet_v2:probs", "hog_people:person_count"),
        ("yolox_nano:person_count", "mobilenet_v2:probs"),
        ("yolox_nano:object_count", "mobilenet_v2:probs"),
        ("hog_people:person_count", "mobilenet_v2:probs"),
    }
    assert all(type(link) is Vec2Vec for link in ls.links.values())


def test_ensemble_serves_every_subset(vector_links) -> None:
    ls, test = vector_links
    ens = ls.ensembles["hog_people:person_count"]
    frame = {k: test.values[k][0] for k in test.specs}
    for active in [set(), {"yolox_nano"}, {"mobilenet_v2"}, {"yolox_nano", "mobilenet_v2"}]:
        out = ls.predict(active, {k: v for k, v in frame.items() if k.split(":")[0] in active})
        assert set(out) == {t for t in ls.targets if t.split(":")[0] not in active}
        for t, v in out.items():
            ls.specs[t].check(v)
            if ls.specs[t].task is Task.COUNT:
                assert v[0] >= 0
            else:
                assert abs(float(v.sum()) - 1.0) < 1e-4
        used = set(ens.weights(active))
        assert {s.split(":")[0] for s in used} <= active
        assert abs(sum(ens.weights(active).values()) - 1.0) < 1e-9 or not active
    # no active source: the trivial output; an active target model is not predicted
    assert np.array_equal(ls.predict(set(), {})["hog_people:person_count"], ens.trivial)
    assert "hog_people:person_count" not in ls.predict({"hog_people", "yolox_nano"}, frame)


def test_single_source_ensemble_is_that_link(vector_links) -> None:
    ls, test = vector_links
    ens = ls.ensembles["mobilenet_v2:probs"]
    frame = {k: test.values[k][5] for k in test.specs}
    w = ens.weights({"hog_people"})
    assert w == {"hog_people:person_count": 1.0}
    link = ls.link("hog_people:person_count", "mobilenet_v2:probs")
    alone = link.predict(encode_source(COUNT, [frame["hog_people:person_count"]]))[0]
    assert np.array_equal(ls.predict({"hog_people"}, frame)["mobilenet_v2:probs"], alone)


def test_missing_output_of_an_active_model_is_an_error(vector_links) -> None:
    from mlink.links import LinkError

    ls, test = vector_links
    with pytest.raises(LinkError, match="gave no output"):
        ls.predict({"yolox_nano"}, {"yolox_nano:person_count": test.values["yolox_nano:person_count"][0]})


def test_store_round_trip_and_refusals(vector_links, tmp_path) -> None:
    ls, test = vector_links
    d = tmp_path / "links"
    manifest = ls.save(d)
    assert manifest["data_version"] == ls.data_version and len(manifest["weights"]["sha256"]) == 64
    back = LinkSet.load(d, expect_specs=test.specs)
    for i in range(len(test)):
        frame = {k: test.values[k][i] for k in test.specs}
        for active in [{"yolox_nano"}, {"mobilenet_v2"}, {"yolox_nano", "mobilenet_v2"}]:
            a, b = ls.predict(active, frame), back.predict(active, frame)
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # incompatible: a spec changed, a node missing, other training data
    other = dict(test.specs)
    other["hog_people:person_count"] = OutputSpec("person_count", "vector", 1, Task.COUNT, max_len=None, labels=("n",))
    with pytest.raises(IncompatibleLinksError, match="hog_people:person_count"):
        LinkSet.load(d, expect_specs=other)
    with pytest.raises(IncompatibleLinksError, match="expected"):
        LinkSet.load(d, expect_specs={k: v for k, v in test.specs.items() if k != "mobilenet_v2:probs"})
    with pytest.raises(IncompatibleLinksError, match="trained on data"):
        LinkSet.load(d, expect_data_version="0" * 64)
    assert LinkSet.load(d, expect_data_version=ls.data_version).data_version == ls.data_version
    # corrupt: weights flipped, weights truncated, manifest edited, manifest missing
    for damage in ("flip", "truncate", "manifest", "missing"):
        dd = tmp_path / damage
        shutil.copytree(d, dd)
        w, m = dd / "links.pt", dd / "manifest.json"
        if damage == "flip":
            raw = bytearray(w.read_bytes())
            raw[-100] ^= 0x01
            w.write_bytes(bytes(raw))
        elif damage == "truncate":
            w.write_bytes(w.read_bytes()[:1000])
        elif damage == "manifest":
            mm = json.loads(m.read_text())
            mm["targets"]["hog_people:person_count"]["trivial"][0] += 1.0
            m.write_text(json.dumps(mm))
        else:
            m.unlink()
        with pytest.raises(LinkStoreError):
            LinkSet.load(dd)


def test_load_or_train_replaces_a_corrupt_store(vector_links, synth: TupleSet, tmp_path) -> None:
    ls, _ = vector_links
    d = tmp_path / "links"
    ls.save(d)
    (d / "links.pt").write_bytes(b"garbage")
    small = synth.head(60)
    kw = dict(config=_fast(epochs=3), targets=["hog_people:person_count"], sources=["yolox_nano:person_count"])
    fresh, why = LinkSet.load_or_train(d, small, **kw)
    assert why is not None and "corrupt" in why
    assert fresh.data_version == small.version()
    again, why2 = LinkSet.load_or_train(d, small, **kw)
    assert why2 is None and again.data_version == small.version()


def test_fine_tune_moves_links_towards_new_tuples(vector_links, synth: TupleSet) -> None:
    ls, _ = vector_links
    import copy

    copy_ls = copy.deepcopy(ls)
    # a drifted scene: the hog count is now doubled
    new = synth.subset(range(180, 240))
    for v in new.values["hog_people:person_count"]:
        v[...] *= 2  # in place: the tuple set holds the same arrays
    link = copy_ls.link("yolox_nano:person_count", "hog_people:person_count")
    src = encode_source(COUNT, new.values["yolox_nano:person_count"])
    tgt = encode_target(COUNT, new.values["hog_people:person_count"])
    with torch.no_grad():
        before = float(link.eval().loss(src, tgt))
    results = copy_ls.fine_tune(new)
    with torch.no_grad():
        after = float(link.eval().loss(src, tgt))
    assert set(results) == {f"{s}->{t}" for s, t in ls.links}
    # drift-aware: links into the changed output adapt, links the change does not touch are
    # only nudged
    assert results["yolox_nano:person_count->hog_people:person_count"]["mode"] == "adapt"
    assert results["yolox_nano:person_count->mobilenet_v2:probs"]["mode"] == "gentle"
    assert all(r["loss_after"] < r["loss_before"] for r in results.values() if r["mode"] == "adapt")
    assert after < before
    assert len(copy_ls.history) == 1 and copy_ls.history[0]["n"] == len(new)
    # explicit settings apply to every link
    fixed = copy.deepcopy(ls).fine_tune(new, epochs=1, lr_scale=0.01)
    assert {r["mode"] for r in fixed.values()} == {"fixed"} and all(r["fit"]["epochs"] == 1 for r in fixed.values())
    # the original is untouched
    orig = ls.link("yolox_nano:person_count", "hog_people:person_count")
    assert not all(torch.equal(a, b) for a, b in zip(orig.state_dict().values(), link.state_dict().values()))


def test_partial_tuples_fine_tune_only_the_links_between_their_nodes(vector_links, synth: TupleSet) -> None:
    """A rotating model's real outputs beside the resident ones teach the links among them."""
    import copy

    ls, _ = vector_links
    held = ["yolox_nano:person_count", "hog_people:person_count"]
    part = synth.subset(range(180, 240)).select(held)
    with pytest.raises(LinkError, match="missing"):
        copy.deepcopy(ls).fine_tune(part)
    tuned = copy.deepcopy(ls)
    results = tuned.fine_tune(part, partial=True)
    assert set(results) == {f"{s}->{t}" for s, t in ls.links if s in held and t in held}
    assert results  # the yolox -> hog count link is among them
    untouched = ("yolox_nano:person_count", "mobilenet_v2:probs")
    assert all(
        torch.equal(a, b)
        for a, b in zip(ls.link(*untouched).state_dict().values(), tuned.link(*untouched).state_dict().values())
    )


def test_matrix_json_and_heatmap(vector_links, tmp_path) -> None:
    ls, test = vector_links
    m = ls.matrix(test, subsets=True)
    js = m.to_json()
    json.dumps(js)
    assert len(js["links"]) == len(ls.links) and set(js["ensembles"]) == set(ls.targets)
    assert {(e["source_model"], e["target"]) for e in js["model_links"]} == {
        ("yolox_nano", "hog_people:person_count"),
        ("mobilenet_v2", "hog_people:person_count"),
        ("yolox_nano", "mobilenet_v2:probs"),
        ("hog_people", "mobilenet_v2:probs"),
    }
    assert len(js["subsets"]) == 6
    for acc in m.single.values():
        assert 0.0 <= acc <= 1.0
    png = m.plot_heatmap(tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ensemble" in m.table()


def test_cross_validation_holds_out_every_frame_once(synth: TupleSet) -> None:
    from mlink.links.crossval import cross_validate

    vec = [k for k, sp in synth.specs.items() if sp.kind == "vector"]
    data = synth.head(120)
    folds_done: list[int] = []
    m = cross_validate(
        data, 3, config=_fast(epochs=3), targets=vec, sources=vec, progress=lambda k, n: folds_done.append(k)
    )
    assert folds_done == [1, 2, 3] and m.folds == 3 and m.n == len(data)
    assert set(m.gap) == set(m.targets) and m.targets
    for t in m.targets:
        mean, se = m.gap[t]
        assert abs(mean - (m.ensemble[t] - m.best_single(t)[1])) < 1e-9  # paired over the same pooled frames
        assert se >= 0.0
    js = m.to_json()
    assert js["folds"] == 3 and all("gap_vs_best_single" in e for e in js["ensembles"].values())
    assert "3-fold cross-validation" in m.table()
    with pytest.raises(ValueError, match="folds"):
        cross_validate(data, 1)


def test_training_reports_progress(synth: TupleSet) -> None:
    seen: list[tuple[int, int, str]] = []
    ls = LinkSet.train(
        synth.head(60),
        config=_fast(epochs=2),
        targets=["hog_people:person_count"],
        sources=["yolox_nano:person_count", "mobilenet_v2:probs"],
        progress=lambda d, t, w: seen.append((d, t, w)),
    )
    # one step per link and one per ensemble, in order, ending at the total
    assert [d for d, _, _ in seen] == [1, 2, 3] and all(t == 3 for _, t, _ in seen)
    assert {w for _, _, w in seen[:2]} == {
        "yolox_nano:person_count -> hog_people:person_count",
        "mobilenet_v2:probs -> hog_people:person_count",
    }
    assert seen[-1][2] == "ensemble hog_people:person_count"
    # a quarter held out to choose the ensemble's plans, the rest split for training and stopping
    assert ls.metrics["n_selection"] == 15 and ls.metrics["n_train"] + ls.metrics["n_val"] == 45
    with pytest.raises(Exception, match="two models"):
        LinkSet.train(
            synth.head(20), config=_fast(epochs=1), targets=["hog_people:person_count"], sources=["hog_people:boxes"]
        )
