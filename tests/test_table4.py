"""The Table 4 harness (bench/table4*.py, `mlink bench table4`) end to end on a short real slice.

The whole harness runs on a 60-frame profile of the building site made here from the real
models (real videos from the mirror), with few epochs and DQN steps so that it stays quick;
the assertions are the structural properties every run must have, whatever the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from mlink.bench.cli import bench_app
from mlink.bench.table4 import METHOD_ORDER, run_table4
from mlink.bench.table4_costs import budgets, fitting_sets, k_fit_budget
from mlink.bench.table4_data import make_protocol, pick_evenly, score, time_order
from mlink.bench.table4_methods import BudgetViolation, Context, Residency, load_ms_per_frame, result, time_share
from mlink.configs.load import CONFIG_DIR, load_config
from mlink.links.tuples import TupleSet
from mlink.models.assets import AssetStore
from mlink.models.catalog import zoo_catalog
from mlink.models.spec import OutputSpec, Task

FAST = [
    "--periods",
    "2",
    "--train-share",
    "0.3",
    "--sweep",
    "3",
    "--epochs",
    "5",
    "--mtl-epochs",
    "60",
    "--dqn-steps",
    "300",
    "--latency-frames",
    "2",
    "--cost-repeats",
    "1",
]


# -- pure pieces -----------------------------------------------------------------------------------


def test_budget_rule_gives_the_papers_budgets_for_the_papers_costs() -> None:
    costs = {"openpose": 4.6, "resnet50": 1.5, "yolov3": 3.7}
    b = budgets(costs, sweep=8)
    assert b["one"] == pytest.approx(4.9) and b["two"] == pytest.approx(9.05)
    assert max(len(s) for s in fitting_sets(costs, b["one"])) == 1
    assert max(len(s) for s in fitting_sets(costs, b["two"])) == 2
    assert b["sweep"][0] == pytest.approx(1.5) and b["sweep"][-1] == pytest.approx(9.8)
    # A dear model dearer than the two cheap ones together cannot fit the one-model budget.
    skewed = {"a": 10.0, "b": 30.0, "c": 45.0}
    one = k_fit_budget(skewed, 1)
    assert 30.0 < one < 40.0
    assert max(len(s) for s in fitting_sets(skewed, one)) == 1


def test_time_order_interleaves_cameras_and_the_protocol_never_scores_training_or_profiled_frames() -> None:
    spec = OutputSpec("n", "vector", 1, Task.COUNT)
    ts = TupleSet(
        specs={"m:n": spec},
        values={"m:n": [np.array([float(i)], np.float32) for i in range(30)]},
        streams=["a"] * 20 + ["b"] * 10,
        timestamps=[float(i) for i in range(20)] + [float(i) for i in range(10)],
    )
    order = time_order(ts)
    assert sorted(order) == list(range(30))
    first = [ts.streams[i] for i in order[:6]]
    assert first.count("b") == 2  # b is half as long: one b frame per two a frames
    proto = make_protocol(300, 0.1, periods=10, profile_share=0.01, min_profile=2)
    assert proto.train == list(range(30))
    assert all(len(p) == 2 for p in proto.profiled)
    assert len(proto.scored) == 270 - 20
    assert not set(proto.scored) & set(proto.train)
    assert not set(proto.scored) & {p for ps in proto.profiled for p in ps}
    assert pick_evenly(10, 4) == [0, 3, 6, 9]


def test_time_shared_schedule_stays_within_the_budget_and_charges_each_load() -> None:
    costs = {"a": 4.0, "b": 3.0, "c": 2.0}
    load_s = {"a": 0.5, "b": 0.2, "c": 0.1}
    # One model fits at a time: two buffers of 4 positions; a needs both, b only the first, c the second.
    res = Residency(costs, budget=4.5)
    windows = [[0, 1, 2, 3], [4, 5, 6, 7]]
    time_share(res, windows, {"a": [0, 5], "b": [2], "c": [7]})
    # Buffer 1: a, b loaded (a unloaded for b). Buffer 2: a again (b unloaded), then c (a unloaded).
    assert res.loads == ["a", "b", "a", "c"]
    assert res.peak == 4.0 and res.peak <= 4.5
    assert load_ms_per_frame(load_s, res.loads, frames=8) == pytest.approx(1000 * (0.5 + 0.2 + 0.5 + 0.1) / 8)
    # The model still held from the last buffer goes first: one model throughout is loaded once.
    single = Residency(costs, budget=4.5)
    time_share(single, windows, {"a": [0, 1, 4]})
    assert single.loads == ["a"]
    # Everything fits at once: each model loaded once, nothing unloaded.
    roomy = Residency(costs, budget=9.0)
    time_share(roomy, windows, {"a": [0, 5], "b": [2, 6], "c": [3, 7]})
    assert sorted(roomy.loads) == ["a", "b", "c"] and roomy.peak == 9.0
    # Two fit: the protected set is never split to load one of its own models.
    pair = Residency(costs, budget=7.5)
    pair.hold(["a", "b"])
    pair.load("c", protect={"a", "c"})
    assert sorted(pair.held) == ["a", "c"] and pair.peak <= 7.5
    with pytest.raises(KeyError):
        load_ms_per_frame(load_s, ["d"], frames=8)


def _tiny_context(buffer_frames: int = 2) -> Context:
    from mlink.bench.table4_data import Oracle

    spec = OutputSpec("n", "vector", 1, Task.COUNT)
    n = 12
    ts = TupleSet(
        specs={"a:n": spec, "b:n": spec},
        values={k: [np.array([1.0], np.float32)] * n for k in ("a:n", "b:n")},
        streams=["s"] * n,
        timestamps=[float(i) for i in range(n)],
    )
    oracle = Oracle(ts, {"a": ["n"], "b": ["n"]}, "test", "v", list(range(n)))
    proto = make_protocol(n, 0.3, periods=2, profile_share=0.01, min_profile=1)
    return Context(
        oracle,
        proto,
        costs={"a": 4.0, "b": 3.0},
        latency={"a": 10.0, "b": 5.0},
        features=cast(Any, None),
        options={"buffer_frames": buffer_frames},
        progress=False,
        load_s={"a": 0.4, "b": 0.2},
    )


def test_a_result_charges_its_loads_and_is_refused_over_the_budget_at_any_instant() -> None:
    ctx = _tiny_context(buffer_frames=3)
    assert ctx.protocol.eval == list(range(4, 12))  # 4 training frames at least
    assert ctx.windows(ctx.protocol.eval[::-1]) == [[4, 5, 6], [7, 8, 9], [10, 11]]
    res = Residency(ctx.costs, budget=5.0)
    res.load("a")
    res.load("b")  # b does not fit next to a: a unloaded first
    assert res.held == ["b"] and res.peak == 4.0
    r = result(ctx, "t", 5.0, {}, 12.0, 0, 0.0, memory_mode="time-shared", residency=res)
    # 0.6 s of loads over 8 evaluation frames: 75 ms a frame on top of the 12 ms of execution.
    assert r["load_ms_per_frame"] == pytest.approx(75.0) and r["loads"] == 2
    assert r["ms_per_frame"] == pytest.approx(87.0) and r["exec_ms_per_frame"] == pytest.approx(12.0)
    assert r["memory_bytes"] == 4.0 and r["expected_accuracy"] is None
    # A method charging its own loads: frame_ms already includes them.
    own = result(ctx, "t", 5.0, {}, 20.0, 0, 4.0, memory_mode="x", load_ms_per_frame=5.0, loads=3)
    assert (own["ms_per_frame"], own["exec_ms_per_frame"], own["loads"]) == (20.0, 15.0, 3)
    over = Residency(ctx.costs, budget=3.5)
    over.load("b")
    over.load("a")  # alone over the budget: recorded, refused by result()
    with pytest.raises(BudgetViolation):
        result(ctx, "t", 3.5, {}, 1.0, 0, 0.0, memory_mode="x", residency=over)


# -- the whole harness -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_run(store: AssetStore, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    import mlink.models.assets as assets

    home = tmp_path_factory.mktemp("table4-home")
    out = tmp_path_factory.mktemp("table4-out")
    saved = assets._default_store
    assets._default_store = store  # the CLI's store: the test's offline store over the mirror
    try:
        app = typer.Typer()
        app.add_typer(bench_app, name="bench")  # as server.cli.main adds it (mlink.commands entry point)
        res = CliRunner().invoke(
            app,
            [
                "bench",
                "table4",
                "--site",
                "building",
                "--frames",
                "60",
                "--home",
                str(home),
                "--out",
                str(out),
                "--json",
                "--quiet",
                *FAST,
            ],
        )
    finally:
        assets._default_store = saved
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), home, out


def test_every_method_runs_at_both_budgets_within_them(bench_run: tuple[dict, Path, Path]) -> None:
    report, _, _ = bench_run
    assert list(report["methods"]) == METHOD_ORDER
    n_budgets = len(report["budgets"]["all"])
    for name, per in report["methods"].items():
        for which in ("one", "two"):
            r = per[which]
            assert r["budget_bytes"] == pytest.approx(report["budgets"][which])
            assert 0.0 <= r["accuracy"] <= 1.0, (name, which)
            assert all(0.0 <= a <= 1.0 for a in r["accuracy_by_node"].values())
            assert r["memory_bytes"] <= r["budget_bytes"] + 1e-6, (name, which)
            assert r["ms_per_frame"] >= 0.0 and 0.0 <= r["executions_saved"] <= 1.0
            assert r["ms_per_frame"] == pytest.approx(r["exec_ms_per_frame"] + r["load_ms_per_frame"])
            assert r["loads"] >= (1 if r["runs"] else 0) and r["load_ms_per_frame"] >= 0.0
            e = r["expected_accuracy"]
            assert e is None or 0.0 <= e <= 1.0, (name, which)
            assert r["scored_frames"] == report["protocol"]["scored_frames"]
        assert len(per["curve"]) == n_budgets
        assert all(c["memory_bytes"] <= c["budget_bytes"] + 1e-6 for c in per["curve"])
    assert report["fits"]["one"]["max_models_at_once"] == 1
    assert report["fits"]["two"]["max_models_at_once"] == 2


def test_accuracies_are_on_frames_no_method_trained_on(bench_run: tuple[dict, Path, Path]) -> None:
    report, _, _ = bench_run
    p = report["protocol"]
    assert p["frames"] == 60
    assert p["train_frames"] == 18
    assert p["scored_frames"] == p["eval_frames"] - sum(p["profiled_per_period"])
    assert p["scored_frames"] > 0


def test_standalone_and_mlink_at_the_one_model_budget(bench_run: tuple[dict, Path, Path]) -> None:
    report, _, _ = bench_run
    m = report["methods"]
    assert m["Standalone"]["one"]["accuracy"] == pytest.approx(1 / 3)
    assert m["Standalone"]["two"]["accuracy"] == pytest.approx(2 / 3)
    assert m["Standalone"]["one"]["executions_saved"] == pytest.approx(2 / 3)
    for sel in ("MLink (paper greedy)", "MLink (objective)"):
        r = m[sel]["one"]
        assert r["accuracy"] >= m["Standalone"]["one"]["accuracy"] - 1e-9
        assert all(len(p["active"]) <= 1 for p in r["periods"])
        assert r["executions_saved"] > 0.5
    # DRLS never runs more models on a frame than fit at once.
    assert m["DRLS"]["one"]["models_per_frame"] <= 1.0 + 1e-9
    # Reducto's tuned filters are real features; MTL fits the two-model budget here or says why not.
    assert {t["feature"] for t in report["reducto_tuning"].values()} <= {"pixel", "area", "edge", "corner"}
    mtl = m["MTL"]["two"]
    assert mtl["runs"] or any("does not fit" in n for n in mtl["notes"])
    # Loads: Standalone and MTL load once per model they hold; time-sharing swaps cost loads.
    load_s = {k: c["load_s"] for k, c in report["costs"].items()}
    eval_frames = report["protocol"]["eval_frames"]
    for which in ("one", "two"):
        st = m["Standalone"][which]
        assert st["loads"] == len(st["active"])
        assert st["load_ms_per_frame"] == pytest.approx(1000 * sum(load_s[a] for a in st["active"]) / eval_frames)
        assert m["MTL"][which]["loads"] == (1 if m["MTL"][which]["runs"] else 0)
        assert st["expected_accuracy"] == pytest.approx(st["accuracy"])
    red = m["Reducto"]["one"]
    windows = -(-eval_frames // report["options"]["buffer_frames"])
    assert len(red["active"]) <= red["loads"] <= len(red["active"]) * windows
    for sel in ("MLink (paper greedy)", "MLink (objective)"):
        r = m[sel]["one"]
        assert r["loads"] >= 1
        assert r["expected_accuracy"] is not None
    assert m["DRLS"]["one"]["expected_accuracy"] is None and m["MTL"]["one"]["expected_accuracy"] is None


def test_outputs_are_written_and_caches_are_reused(bench_run: tuple[dict, Path, Path], store: AssetStore) -> None:
    report, home, out = bench_run
    png = out / "table4.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "table4.md").read_text()
    assert all(f"| {m} |" in md for m in METHOD_ORDER)
    assert "expected % (one / two)" in md
    # An extra method row (e.g. another MLink variant) renders without any change here.
    from mlink.bench.table4 import markdown, plot

    extra = json.loads(json.dumps(report))
    methods = extra["methods"]
    for i in range(3):
        row = json.loads(json.dumps(methods["MLink (objective)"]))
        for r in (row["one"], row["two"], *row["curve"]):
            r.pop("active_sets", None)
            r["expected_accuracy"] = 0.5
        methods[f"MLink (extra {i})"] = row
    md2 = markdown(extra)
    assert "| MLink (extra 2) |" in md2 and "50.0 / 50.0" in md2
    assert plot(extra, out / "extra.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "table4.json").read_text())["site"] == "building"
    # A shorter run on the same home reuses the stored 60-frame profile (40 frames spread
    # evenly over it) and the cost table.
    cfg = load_config(CONFIG_DIR / "building.yaml", catalog=zoo_catalog())
    again = run_table4(
        cfg,
        store=store,
        home=home,
        out_dir=out,
        config_path=CONFIG_DIR / "building.yaml",
        frames=40,
        progress=False,
        options={"periods": 2, "train_share": 0.3, "sweep": 0, "epochs": 3, "mtl_epochs": 20, "dqn_steps": 100},
    )
    assert again["protocol"]["frames"] == 40
    assert again["profile"] == report["profile"]
    assert again["cost_source"].startswith("cache")
    assert again["methods"]["Standalone"]["one"]["accuracy"] == pytest.approx(1 / 3)


def test_score_counts_a_missing_output_as_zero() -> None:
    from mlink.bench.table4_data import Oracle

    spec = OutputSpec("n", "vector", 1, Task.COUNT)
    ts = TupleSet(
        specs={"a:n": spec, "b:n": spec},
        values={"a:n": [np.array([1.0], np.float32)] * 4, "b:n": [np.array([2.0], np.float32)] * 4},
        streams=["s"] * 4,
        timestamps=[0.0, 1.0, 2.0, 3.0],
    )
    oracle = Oracle(ts, {"a": ["n"], "b": ["n"]}, "test", "v", [0, 1, 2, 3])
    sc = score(
        oracle,
        [0, 1, 2, 3],
        {"a:n": ts.values["a:n"], "b:n": [None, None, np.array([2.2], np.float32), np.array([3.0], np.float32)]},
    )
    assert sc["by_model"] == {"a": 1.0, "b": 0.25}
    assert sc["accuracy"] == pytest.approx(0.625)
