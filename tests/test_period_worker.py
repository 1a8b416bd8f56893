"""A re-profiling period beside serving, in a real daemon: real video paced in real time, real
models, the real embedded Redis.

The period's worker is held once its work is done (``PeriodWorker.hold``), so the test can look
at serving while the period is in flight without timing anything: results made with the old plan
keep arriving in Redis, and no camera queue drops a frame, until the period is released and
applied. The pool's high-water mark stays within the budget throughout.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml
from daemons import running_daemon  # tests/daemons.py
from waiting import wait_for  # tests/waiting.py

from mlink.configs.load import parse_config
from mlink.models.assets import AssetStore
from mlink.models.catalog import zoo_catalog
from mlink.server.daemon import Daemon

SITE = """
site: period-worker
budget: 0.8x
models:
  - name: hog_people
    params: {upscale: 1.0}
  - name: mobilenet_v2
  - name: yolox_nano
    outputs: [object_count, person_count]
streams:
  - {id: walkway, url: "asset://vtest", fps: 1, loop: true}
links:
  profile_frames: 24
scheduler:
  period_s: 4
  profile_share: 0.5
  batch_size: 2
  batch_wait_ms: 0
ingest:
  queue: 8
  realtime: true
"""


@pytest.fixture(scope="module")
def daemon(store: AssetStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    site = yaml.safe_load(SITE)
    assert parse_config(SITE, "period-worker test", catalog=zoo_catalog()).scheduler.period_worker  # the default
    with running_daemon(site, tmp_path_factory.mktemp("period-home"), store) as run:
        yield run.daemon


def test_serving_goes_on_while_a_period_runs_in_the_worker(daemon: Daemon) -> None:
    worker = daemon.periods
    assert worker is not None and worker.background
    worker.hold.clear()  # the first period waits, once its work is done, until released
    assert worker.started.wait(120), "no period began"
    old = daemon.planner.plan
    assert old is not None and old.period == 0
    at_start = dict(worker.at_start)
    assert worker.worked.wait(300), "the period's work did not finish"
    # The period is in flight (worked, not applied): serving goes on with the old plan.
    assert daemon.planner.plan is old and daemon.planner.period == 1
    assert daemon.cache is not None
    wait_for(
        lambda: (
            sum(1 for r in daemon.cache.history("walkway", since=0) if r.result["plan_id"] == old.id)
            >= at_start["served"] + 3
        ),
        120,
        "three more results with the old plan while the period is held",
    )
    held_counts = worker.counts() if worker.counts is not None else {}
    assert held_counts["dropped"] == at_start["dropped"]  # no frame dropped so far in the period
    worker.hold.set()
    wait_for(lambda: not worker.busy, 60, "the period applied")
    # period 1's record (period_s is 4: by now a second period may have run too)
    run = next(r for r in worker.runs if r["period"] == 1)
    assert run["mode"] == "worker"
    assert run["during"]["served"] >= 3 and run["during"]["dropped"] == 0, run
    report = next(r for r in daemon.planner.reports if r.period == 1)
    assert sorted(report.profiled) == ["hog_people", "mobilenet_v2", "yolox_nano"]
    assert report.fine_tuned and daemon.planner.plan.id > old.id
    assert daemon.planner.links is not None and daemon.planner.links.history  # the fine-tuned copy, swapped in
    new_id = daemon.planner.plan.id
    wait_for(
        lambda: any(r.result["plan_id"] >= new_id for r in daemon.cache.history("walkway", limit=5)),
        60,
        "a result with the period's plan",
    )
    pool = daemon.pool
    assert pool is not None and 0 < pool.high_water <= pool.budget
    assert pool.calls.calls > 0  # every model call took its turn
