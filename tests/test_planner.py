"""The planner and the serving step on the CPU with the real zoo (yolox_nano, mobilenet_v2, hog_people).

A small real site: 40 frames of vtest.avi (5 fps, downscaled to 384x288 so HOG stays fast) are
profiled and links trained on them (few epochs); later frames of the same video are the stream.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mlink.configs.load import parse_config
from mlink.links import LinkSet, TrainConfig, TupleSet
from mlink.models.assets import AssetStore
from mlink.models.catalog import create_model, model_info, zoo_catalog
from mlink.scheduler.accuracy import LinkAccuracy
from mlink.scheduler.frame import FrameRecord
from mlink.scheduler.options import PlannerOptions
from mlink.scheduler.planner import Planner
from mlink.scheduler.pool import ModelPool
from mlink.scheduler.profiler import ProfileFrame, loader, profile
from mlink.scheduler.selection import objective_select
from mlink.scheduler.serving import serve
from mlink.scheduler.site import build_pool, model_factory, site_served
from mlink.server.frames import read_frames

MiB = 1 << 20
FAST = TrainConfig(epochs=6, patience=3, combiner_steps=40, fine_tune_epochs=2)

SITE = """
site: planner-test
device: cpu
budget: {budget}
models:
  - name: hog_people
    outputs: [person_count, boxes]
  - name: mobilenet_v2
  - name: yolox_nano
    outputs: [person_count, boxes]
links:
  profile_frames: 40
scheduler:
  selector: {selector}
  period_s: 2
  profile_share: 0.4
  switch_margin: 0.0
  min_residency_s: 0
  batch_size: 4
"""


def site_cfg(budget: str = "0.95x", selector: str = "objective"):
    return parse_config(SITE.format(budget=budget, selector=selector), catalog=zoo_catalog())


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def frames(store: AssetStore) -> list[ProfileFrame]:
    out = []
    for f in read_frames(str(store.path("vtest")), sample_fps=5.0, max_frames=100):
        out.append(ProfileFrame("walkway", f.timestamp, cv2.resize(f.image, (384, 288), interpolation=cv2.INTER_AREA)))
    assert len(out) == 100
    return out


@pytest.fixture(scope="module")
def trained(store: AssetStore, frames, tmp_path_factory) -> tuple[Path, TupleSet, TupleSet]:
    """Links trained on 32 of the first 40 frames' tuples (saved), the 8 held-out tuples, all 40."""
    cfg = site_cfg()
    tuples = profile(frames[:40], site_served(cfg), loader(cfg, store), batch_size=4, progress=False)
    train, test = tuples.split(0.2, seed=0)
    links = LinkSet.train(train, val_share=0.25, config=FAST)
    path = tmp_path_factory.mktemp("links") / "site"
    links.save(path)
    return path, test, tuples


def fresh_links(trained) -> LinkSet:
    return LinkSet.load(trained[0])


def replay_within_budget(pool: ModelPool, budget: int) -> int:
    """Replay the pool's measured load/unload records in time order; return the highest total."""
    events = sorted(
        [(r.at, 1, r) for r in pool.load_records] + [(r.at, 0, r) for r in pool.unload_records],
        key=lambda e: (e[0], e[1]),
    )
    loaded: dict[str, int] = {}
    peak = 0
    for _, is_load, rec in events:
        if is_load:
            total = sum(loaded.values()) + rec.cost
            assert total <= budget, (
                f"loading {rec.name} ({rec.cost} B) with {loaded} loaded: {total} B > budget {budget} B"
            )
            peak = max(peak, total)
            loaded[rec.name] = rec.cost
        else:
            loaded.pop(rec.name, None)
    return peak


# -- model-level accuracies -------------------------------------------------------------------


def test_model_accuracy_is_the_mean_of_its_node_ensembles(trained) -> None:
    links = fresh_links(trained)
    test = trained[1]
    served = site_served(site_cfg())
    acc = LinkAccuracy(links, test, served)
    nodes = {m: [f"{m}:{o}" for o in outs] for m, outs in served.items()}
    for active in (frozenset(), frozenset({"hog_people"}), frozenset({"yolox_nano", "hog_people"})):
        for m in served:
            if m in active:
                assert acc(active, m) == 1.0
                continue
            want = float(np.mean([links.ensemble_accuracy(test, k, active) for k in nodes[m]]))
            assert acc(active, m) == pytest.approx(want, abs=1e-12)
    single = acc.single()
    assert set(single) == {(i, j) for i in served for j in served if i != j}
    for (i, j), p in single.items():
        assert p == acc(frozenset({i}), j)
    # Cached per (the ensemble's active sources, node): asking again evaluates nothing new, and
    # a set that adds only the target itself changes nothing for the target's own nodes.
    n = acc.evaluations
    acc.single()
    acc(frozenset({"hog_people", "mobilenet_v2"}), "yolox_nano")
    assert acc.evaluations == n + len(nodes["yolox_nano"])
    # Expected accuracies are probabilities, and every node is covered.
    table = acc.nodes(frozenset({"hog_people"}))
    assert set(table) == {k for ks in nodes.values() for k in ks}
    assert all(0.0 <= v <= 1.0 for v in table.values())


# -- serving ----------------------------------------------------------------------------------


def test_serving_executes_active_models_and_predicts_the_rest(store: AssetStore, frames, trained) -> None:
    cfg = site_cfg(budget="60MB")
    costs = {"hog_people": 8 * MiB, "mobilenet_v2": 90 * MiB, "yolox_nano": 40 * MiB}
    pool = build_pool(cfg, store=store, costs=costs)
    links = fresh_links(trained)
    planner = Planner(cfg, pool, links, heldout=trained[1], clock=lambda: 0.0)
    plan = planner.initial()
    assert plan.active and plan.active <= pool.loaded()
    assert plan.cost <= plan.budget == 60_000_000
    batch = frames[50:54]
    results = serve(batch, plan, pool, links, batch_size=3, accuracy=planner.accuracy.node)
    assert [r.timestamp for r in results] == [f.timestamp for f in batch]
    # a frame record goes through the step unchanged, into the result and its JSON
    record = FrameRecord("walkway", 7, batch[0].timestamp, 1.7e9, batch[0].image, seq=3)
    (mine,) = serve([record], plan, pool, links, accuracy=planner.accuracy.node)
    assert mine.frame is record
    js = mine.to_json()
    assert (js["camera"], js["frame_index"], js["timestamp"], js["wall_time"]) == (
        "walkway",
        7,
        batch[0].timestamp,
        1.7e9,
    )

    # Executed outputs are the model's real output on the same frames.
    real = {}
    for m in plan.active:
        model = create_model(m, store=store)
        model.load("cpu")
        real[m] = model.infer([f.image for f in batch])
        model.unload()
    served = site_served(cfg)
    for i, r in enumerate(results):
        assert r.plan_id == plan.id and set(r.executed) == set(plan.active) and not r.missing
        assert set(r.outputs) == {f"{m}:{o}" for m, outs in served.items() for o in outs}
        source_outputs = {}
        for m in plan.active:
            for o in served[m]:
                out = r.outputs[f"{m}:{o}"]
                assert out.provenance == "executed" and out.expected_accuracy == 1.0
                np.testing.assert_allclose(out.value, real[m][i][o], rtol=1e-5, atol=1e-5)
                assert out.json == model_info(m).output(o).to_json(real[m][i][o])
                source_outputs[f"{m}:{o}"] = real[m][i][o]
        direct = links.predict(plan.active, source_outputs)
        for k, out in r.outputs.items():
            if out.provenance == "executed":
                continue
            assert out.provenance == "predicted"
            assert set(out.sources) <= set(plan.active)
            assert out.expected_accuracy == pytest.approx(plan.expected_nodes[k])
            np.testing.assert_allclose(out.value, direct[k], rtol=1e-5, atol=1e-6)
        js = r.to_json()
        assert js["plan_id"] == plan.id and all("provenance" in v for v in js["outputs"].values())

    # An active model that went missing: its outputs are predicted from the remaining ones.
    gone = sorted(plan.active)[0]
    pool.unload(gone, reason="test")
    results = serve(batch[:2], plan, pool, links, accuracy=planner.accuracy.node)
    left = plan.active - {gone}
    for r in results:
        assert gone in r.missing and set(r.executed) == left
        for o in served[gone]:
            out = r.outputs[f"{gone}:{o}"]
            assert out.provenance == "predicted" and set(out.sources) <= left
            assert out.expected_accuracy == pytest.approx(planner.accuracy.node(left, f"{gone}:{o}"))
            assert out.value is not None and out.json is not None
    pool.close()


# -- failures ---------------------------------------------------------------------------------


def test_injected_load_failure_replans_and_serves_every_output(store: AssetStore, frames, trained, tmp_path) -> None:
    cfg = site_cfg(budget="60MB")
    costs = {"hog_people": 8 * MiB, "mobilenet_v2": 90 * MiB, "yolox_nano": 40 * MiB}
    links = fresh_links(trained)
    served = site_served(cfg)
    # What the planner will choose (the same numbers, through the public selection API).
    acc = LinkAccuracy(links, trained[1], served)
    first = objective_select(
        {m: math.ceil(c * 1.1) for m, c in costs.items()}, acc, 60_000_000, models=list(served), prune=False
    )
    breakable = sorted(first.active - {"hog_people"})  # models with assets
    assert breakable, f"precondition: the first plan {sorted(first.active)} should hold a model with an asset"
    broken = breakable[-1]
    (tmp_path / "empty-mirror").mkdir()
    bare = AssetStore(home=tmp_path / "home", mirror=tmp_path / "empty-mirror", offline=True)
    good = model_factory(cfg, store)
    bad = model_factory(cfg, bare)
    failures: list[str] = []

    pool = build_pool(
        cfg,
        factory=lambda n: bad(n) if n == broken else good(n),
        costs=costs,
        on_failure=lambda n, why: failures.append(n),
    )
    planner = Planner(cfg, pool, links, heldout=trained[1], clock=lambda: 8.0)
    plan = planner.initial()  # never raises
    report = planner.reports[-1]
    assert broken in pool.unavailable() and failures == [broken]  # the previous callback still runs
    assert broken in report.failures and report.replans >= 1
    assert sorted(report.candidate["active"]) == sorted(first.active)  # it did try the broken model first
    assert plan.reason == "failure" and broken not in plan.active
    assert broken in plan.unavailable and plan.active <= pool.loaded()
    assert plan.expected[broken] < 1.0

    results = planner.serve(frames[60:64])
    for r in results:
        assert r.plan_id == plan.id
        for o in served[broken]:
            out = r.outputs[f"{broken}:{o}"]
            assert out.provenance == "predicted" and out.value is not None
            assert set(out.sources) <= set(plan.active)
        assert all(r.outputs[f"{m}:{o}"].provenance == "executed" for m in plan.active for o in served[m])

    # A later period: the broken model cannot be profiled; it is skipped, not fatal, and its
    # outputs stay predicted.
    tick = None
    for i in range(64, 80, 2):
        tick = planner.on_frames(frames[i : i + 2], now=frames[i + 1].timestamp)
        if tick.period is not None:
            break
    assert tick is not None and tick.period is not None
    assert broken in tick.period.skipped and broken not in tick.plan.active
    assert tick.period.fine_tune_note  # no complete tuples without the broken model
    pool.close()


# -- periods ----------------------------------------------------------------------------------


@pytest.mark.parametrize("selector", ["objective", "paper"])
def test_periods_reprofile_reselect_and_load_once_per_period(store: AssetStore, frames, trained, selector) -> None:
    cfg = site_cfg(budget="0.95x", selector=selector)
    pool = build_pool(cfg, store=store)
    links = fresh_links(trained)
    planner = Planner(
        cfg, pool, links, heldout=trained[1], options=PlannerOptions.from_site(cfg, frame_rate=5.0, cost_margin=0.3)
    )
    assert planner.profile_target() == 4  # 40% of 2 s at 5 fps
    t0 = frames[40].timestamp
    plan = planner.initial(now=t0)
    budget = planner.budget
    costs = pool.costs()
    assert set(costs) == set(site_served(cfg)) and all(c > 0 for c in costs.values())
    # 0.95x: a share of the costs measured in period 0 (each model alone), set on the pool too.
    assert budget == int(0.95 * sum(pool.cost_history(m)[0] for m in site_served(cfg)))
    assert planner.reports[0].measured == {m: 1 for m in site_served(cfg)}
    assert pool.budget == budget and max(costs.values()) <= budget < sum(costs.values())
    assert plan.selector.startswith(selector)

    plans = [plan]
    served = site_served(cfg)
    end, n_periods = (100, 5) if selector == "objective" else (80, 3)  # the paper variant runs shorter
    for i in range(40, end, 2):
        chunk = frames[i : i + 2]
        tick = planner.on_frames(chunk, now=chunk[-1].timestamp)
        assert tick.plan is planner.plan
        results = planner.serve(chunk)
        for r in results:
            assert r.plan_id == tick.plan.id
            for k, out in r.outputs.items():
                if out.provenance == "executed":
                    assert k.split(":")[0] in tick.plan.active and out.expected_accuracy == 1.0
                else:
                    assert out.provenance == "predicted" and set(out.sources) <= tick.plan.active
                    assert out.expected_accuracy == pytest.approx(tick.plan.expected_nodes[k])
        if tick.period is not None:
            plans.append(tick.plan)

    periods = [r for r in planner.reports if r.period >= 1]
    assert len(periods) == n_periods  # boundaries at 10, 12, 14 (, 16, 18) s
    for r in periods:
        assert r.frames == 4
        assert sorted(r.profiled) == sorted(served)  # every model re-profiled (each fits alone)
        assert r.fine_tuned and r.eval_tuples > len(trained[1])
        assert r.candidate is not None and r.current_objective is not None
        assert all(n <= 1 for n in r.loads.values()), r.loads
        assert all(n <= 1 for n in r.unloads.values()), r.unloads
        assert r.peak_charged <= budget
    assert len(links.history) == n_periods  # fine-tuned once per period
    # Re-selection made a new plan each period, with increasing ids and fresh numbers.
    ids = [p.id for p in plans]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == n_periods + 1
    assert [p.period for p in plans] == list(range(n_periods + 1))
    assert all(p.next_reselect_at > p.created_at for p in plans)

    # The planner's counts agree with the pool's own records of completed loads and unloads.
    counted = {m: sum(r.loads[m] for r in planner.reports) + planner.reports[0].measured.get(m, 0) for m in served}
    assert counted == {m: pool.loads[m] for m in served}
    unloads_counted = sum(sum(r.unloads.values()) for r in planner.reports) + len(served)  # + period 0's measuring
    assert unloads_counted == len(pool.unload_records)
    # The budget held as measured: no refusal, and replaying every measured load fits.
    assert sum(pool.refusals.values()) == 0
    assert replay_within_budget(pool, budget) <= budget
    assert planner.peak_charged <= budget
    pool.close()


def _one_period(store: AssetStore, frames, trained, split: bool):
    """A planner's period 0 and period 1 on the same frames: inline, or in the worker's steps
    (begin with a copy of the links, profile, learn and warm, stage, finish) in this thread."""
    from mlink.scheduler.period_job import learn
    from mlink.scheduler.period_worker import stage

    cfg = site_cfg(budget="0.95x")
    pool = build_pool(cfg, store=store)
    links = fresh_links(trained)
    planner = Planner(cfg, pool, links, heldout=trained[1], options=PlannerOptions.from_site(cfg, frame_rate=5.0))
    t0 = frames[40].timestamp
    planner.initial(now=t0)
    for i in range(40, 60, 2):
        if planner.on_frames(frames[i : i + 2], now=t0 + 2.5, run=False).collecting and planner.period_due(t0 + 2.5):
            break
    if not split:
        report = planner.run_period(now=t0 + 2.5)
    else:
        job = planner.begin_period(now=t0 + 2.5, copy_links=True)
        planner.profile_period(job)
        learn(job, planner.served, planner.options, len(trained[1]), warm=True)
        # Serving still predicts with the links and figures of before: nothing was swapped in.
        assert planner.links is links and job.links is not links and not links.history
        assert planner.accuracy is not job.accuracy
        stage(planner, job)
        report = planner.finish_period(job)
        assert planner.links is job.links and planner.job is None
    plan = planner.plan
    out = (report, plan, planner.accuracy.table(), sorted(pool.loaded()), pool.high_water, planner.budget)
    pool.close()
    return out


def test_a_period_in_the_worker_steps_makes_the_inline_plan(store: AssetStore, frames, trained) -> None:
    """profile / learn / apply, split as the period worker runs them, give the plan and the
    accuracies the inline period gives for the same frames and seed; memory stays in budget."""
    inline = _one_period(store, frames, trained, split=False)
    split = _one_period(store, frames, trained, split=True)
    for report, plan, _table, loaded, high_water, budget in (inline, split):
        assert report.frames == 4 and sorted(report.profiled) == sorted(site_served(site_cfg()))
        assert report.fine_tuned and plan.period == 1 and set(plan.active) <= set(loaded)
        assert 0 < high_water <= budget
    (r1, p1, t1, *_), (r2, p2, t2, *_) = inline, split
    assert t1 == t2  # the same fine-tuned links measured on the same window
    assert p1.active == p2.active and p1.expected == p2.expected
    assert p1.objective == pytest.approx(p2.objective)
    assert r1.eval_tuples == r2.eval_tuples and r1.switched == r2.switched


# -- the CLI and the GPU check ----------------------------------------------------------------


def test_schedule_plan_cli_measures_costs_selects_and_reuses_what_it_stored(
    store: AssetStore, trained, tmp_path, monkeypatch
) -> None:
    import json as _json

    import typer
    from typer.testing import CliRunner

    import mlink.models.assets as assets
    from mlink.scheduler.profiler import link_store_dir, save_profile
    from mlink.server.cli_schedule import schedule_app

    home = tmp_path / "home"
    monkeypatch.setattr(assets, "_default_store", AssetStore(home=home, mirror=store.mirror, offline=True))
    cfg_path = tmp_path / "site.yaml"
    cfg_path.write_text(SITE.format(budget="60MB", selector="objective"))
    cfg = site_cfg(budget="60MB")
    save_profile(trained[2], home, cfg.site)
    app = typer.Typer()
    app.add_typer(schedule_app, name="schedule")
    runner = CliRunner()

    res = runner.invoke(app, ["schedule", "plan", "--config", str(cfg_path), "--json", "--epochs", "3"])
    assert res.exit_code == 0, res.output
    out = _json.loads(res.stdout.strip().splitlines()[-1])
    models = set(site_served(cfg))
    assert set(out["costs"]) == models and all(c > 0 for c in out["costs"].values())
    assert out["cost_source"].startswith("measured now")
    assert out["budget_bytes"] == 60_000_000 and out["held_out"] == 8 and out["tuples"] == 40
    assert out["links_retrained"]  # nothing was stored: trained on the profile's training split
    assert (link_store_dir(cfg, home) / "manifest.json").is_file()
    active = set(out["active"])
    assert active <= models and set(out["predicted"]) == models - active
    assert out["cost_bytes"] == sum(out["costs"][m] for m in active) <= out["budget_bytes"]
    assert out["objective"] == pytest.approx(sum(out["expected"].values()) / len(models))
    assert all(out["expected"][m] == 1.0 for m in active)
    assert set(out["selections"]) == {"paper", "objective"}
    # Eq. 1 is what the objective selector maximises: the paper's greedy cannot beat it.
    assert out["selections"]["objective"]["objective"] >= out["selections"]["paper"]["objective"] - 1e-9

    res = runner.invoke(app, ["schedule", "plan", "--config", str(cfg_path), "--saved-costs", "--selector", "paper"])
    assert res.exit_code == 0, res.output
    assert "saved table" in res.stdout and "selector paper" in res.stdout and "expected objective" in res.stdout
    assert "training links" not in res.output  # the stored links match the split: reused


def test_gpu_check_skips_cleanly_without_cuda() -> None:
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the check would run for real")
    proc = subprocess.run(
        [sys.executable, "-m", "mlink.bench.gpu_check"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("skipped: no CUDA device (")


def test_gpu_check_hybrid_step_dry_run_on_cpu(store: AssetStore) -> None:
    """The GPU check's hybrid step on the CPU meter, tiny: two small models, no periods."""
    import json
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "MLINK_ASSET_MIRROR": str(store.mirror or ""),
        "MLINK_OFFLINE": "1",
        "MLINK_HOME": str(store.home),
    }
    args = ["--dry-run-cpu", "--models", "mobilenet_v2,efficientnet_lite0", "--frames", "6", "--periods", "0"]
    args += ["--hybrid-buffers", "2", "--hybrid-frames", "6", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "mlink.bench.gpu_check", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    h = out["hybrid"]
    assert out["ok"] and h["ok"]
    costs = sorted(h["costs"].values())
    assert costs[1] <= h["budget_bytes"] < costs[0] + costs[1]  # one model at a time
    assert h["served_frames"] == 12 and h["buffers"] == 2
    assert h["rotation_loads"] == h["rotation_unloads"]
    assert 0 <= h["frames_rotated"] <= h["frames_revised"] <= h["served_frames"]
    assert h["peak_charged"] <= h["budget_bytes"]
    assert h["measured"]["source"] == "anon" and h["measured"]["samples"] > 0
    assert h["peak_above_baseline"] is not None and h["peak_above_baseline"] <= h["budget_bytes"]
    modes = h["modes"]
    assert sorted(modes["resident"] + modes["rotating"] + modes["predicted"]) == sorted(h["costs"])
    assert len(modes["resident"]) <= 1
