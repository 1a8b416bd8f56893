"""Faults of the daemon's lifecycle (issue 14 items 2, 3, 8, 9), with real processes.

- ``mlink serve`` as a subprocess: SIGTERM stops it cleanly (exit 0, its private folders gone,
  Redis stopped), and a second start on the same ``$MLINK_HOME`` is ready without profiling
  (the first start stored its profile next to its links). The restart-to-ready time is printed.
- A pipeline thread whose step keeps failing ends after bounded retries: ``/healthz`` answers 503
  with the reason, ``/readyz`` says why, and the serve loop returns the reason (``mlink serve``
  exits 1 on it).
- A reload that times out before the pipeline took it is cancelled and never applied later;
  a failed apply of a new model set closes the new pool before the old plan is restored.

One small site (two cheap models, one looping clip, 20 profiling frames) keeps this under a
minute or so on two cores; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from daemons import running_daemon  # tests/daemons.py
from waiting import wait_for  # tests/waiting.py

from mlink.configs.load import parse_config
from mlink.models.assets import AssetStore
from mlink.models.catalog import zoo_catalog
from mlink.server.api import create_app
from mlink.server.daemon import Daemon
from mlink.server.plan_request import PlanRequest
from mlink.server.serve_lifecycle import serve_until_stopped

SITE: dict[str, Any] = {
    "site": "faults",
    "models": [{"name": "hog_people", "params": {"upscale": 1.0}}, {"name": "yolox_nano", "outputs": ["object_count"]}],
    "streams": [{"id": "walkway", "url": "asset://vtest", "fps": 4, "loop": True}],
    "links": {"profile_frames": 20},
    "scheduler": {"period_s": 3600, "batch_size": 2},
    "api": {"token": "t0ken", "read_workers": 1},
}
# Left in TMPDIR by third-party libraries during a run, not by mlink (checked: neither importing
# torch nor the CLI creates them): torch's per-user inductor cache folder (empty) and a
# session-id file.
THIRD_PARTY_TMP = re.compile(r"^(torchinductor_.+|\.ses)$")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One $MLINK_HOME for the module: the subprocess starts profile into it, the in-process
    daemons below start from what they stored."""
    return tmp_path_factory.mktemp("faults-home")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """``mlink serve`` as a child process with its own TMPDIR and a log file."""

    def __init__(self, home: Path, store: AssetStore, tmp: Path, name: str) -> None:
        self.port = _free_port()
        self.log = home / f"{name}.log"
        config = home / "site.yaml"
        config.write_text(yaml.safe_dump(SITE))
        env = {
            **os.environ,
            "MLINK_HOME": str(home),
            "MLINK_ASSET_MIRROR": str(store.mirror or ""),
            "MLINK_OFFLINE": "1",
            "TMPDIR": str(tmp),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, "-m", "mlink.server.cli", "serve", "--config", str(config), "--port", str(self.port)]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def ready(self, timeout: float) -> float:
        """Seconds from the start to the first 200 of /readyz."""

        def check() -> bool:
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}:\n{self.text()[-3000:]}"
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(check, timeout, "mlink serve to be ready", every=0.2)
        return time.monotonic() - self.started

    def stop(self, sig: int, timeout: float = 60) -> int:
        self.proc.send_signal(sig)  # to the daemon alone, as Docker does (systemd signals the whole group)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def ready_then_stop(self, sig: int, timeout: float = 300) -> tuple[float, str]:
        """(seconds to ready, the log) of a start stopped by ``sig`` once ready; it must exit 0."""
        try:
            seconds = self.ready(timeout)
        finally:
            rc = self.stop(sig)
        log = self.text()
        assert rc == 0, log[-3000:]
        return seconds, log


def _api_folders(log: str) -> list[Path]:
    """The private folders the log names (the daemon app's unix socket)."""
    return [Path(m).parent for m in re.findall(r"unix socket (\S+\.sock)", log)]


def test_sigterm_exits_0_clean_and_a_restart_is_ready_without_profiling(
    home: Path, store: AssetStore, tmp_path: Path
) -> None:
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    first_s, log = Serve(home, store, tmp, "first").ready_then_stop(signal.SIGTERM)
    assert "profile stored at" in log, "the first start profiles and stores that profile"
    assert "SIGTERM: stopping" in log and "Traceback" not in log, log[-3000:]
    assert re.search(r"redis-server .* stopped", log), "Redis is stopped by the daemon, not by its parent's death"
    assert [p.name for p in tmp.iterdir() if not THIRD_PARTY_TMP.match(p.name)] == []
    assert _api_folders(log) and not any(p.exists() for p in _api_folders(log))

    restart_s, log = Serve(home, store, tmp, "second").ready_then_stop(signal.SIGINT)
    assert "profile stored at" not in log and "training links" not in log and "profiling" not in log, log[-3000:]
    print(f"\nready after start: first (profiles, trains) {first_s:.1f} s; restart (stored profile) {restart_s:.1f} s")


def test_plan_request_is_applied_once_or_never() -> None:
    cfg = parse_config(yaml.safe_dump(SITE), catalog=zoo_catalog())
    queued = PlanRequest(cfg)
    assert not queued.wait(0.05) and queued.state == "cancelled"
    assert not queued.begin(), "the pipeline skips a cancelled request"
    started = PlanRequest(cfg)
    assert started.begin()
    finisher = threading.Timer(0.3, started.finish)
    finisher.start()
    assert started.wait(0.05), "an apply in progress at the timeout is waited for, not abandoned"
    assert started.state == "done"
    finisher.join()


@pytest.fixture(scope="module")
def daemon(home: Path, store: AssetStore) -> Iterator[Daemon]:
    """A daemon of the same site, started from what the subprocess stored (its profile, its links)."""
    with running_daemon(SITE, home, store, ready_s=300) as run:
        yield run.daemon


def test_a_timed_out_reload_is_never_applied_later(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    before = daemon.snapshot.plan
    assert before is not None
    gate, busy = threading.Event(), threading.Event()
    step = Daemon._step

    def held(self: Daemon, batch: list[Any]) -> None:
        busy.set()
        gate.wait(30)  # the pipeline is busy: the reload's request stays queued
        step(self, batch)

    monkeypatch.setattr(Daemon, "_step", held)
    assert busy.wait(30), "no frame reached the pipeline"
    old_budget = daemon.cfg.budget
    new = parse_config(yaml.safe_dump({**SITE, "budget": "0.5x"}), catalog=zoo_catalog())
    assert new.budget != old_budget
    try:
        result = daemon.reload(new, timeout=0.5)
    finally:
        gate.set()
    assert not result.ok and "cancelled" in result.message, result.message
    monkeypatch.setattr(Daemon, "_step", step)
    applied = daemon.reloads["applied"]
    served = sum(daemon.frames_total.values())
    wait_for(lambda: sum(daemon.frames_total.values()) > served + 2, 60, "the pipeline to serve on")
    assert daemon._requests.empty()
    assert daemon.snapshot.plan is not None and daemon.snapshot.plan.id == before.id, "a cancelled reload re-planned"
    assert daemon.planner is not None and daemon.planner.cfg.budget == old_budget
    assert daemon.reloads["applied"] == applied and daemon.cfg.budget == old_budget


def test_a_failed_apply_closes_the_new_pool_first(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    old_pool = daemon.pool
    built: list[Any] = []
    plan_on = Daemon._plan_on

    def failing(self: Daemon, cfg: Any, pool: Any, *rest: Any) -> Any:
        planner = plan_on(self, cfg, pool, *rest)  # the new set is measured and loaded...
        if pool is not old_pool:
            built.append((pool, set(pool.loaded())))
            raise RuntimeError("injected: the new plan fails after loading")  # ...then the apply fails
        return planner

    monkeypatch.setattr(Daemon, "_plan_on", failing)
    models = [{**m, "params": {"upscale": 1.05}} if m["name"] == "hog_people" else m for m in SITE["models"]]
    new = parse_config(yaml.safe_dump({**SITE, "models": models}), catalog=zoo_catalog())
    result = daemon.reload(new, timeout=120)
    assert not result.ok and "injected" in result.message, result.message
    assert built, "the new model set got its own pool"
    new_pool, loaded_then = built[0]
    assert loaded_then, "the new pool had loaded models before the failure"
    assert not new_pool.loaded(), "the failed apply left the new pool's models loaded"
    assert daemon.pool is old_pool and daemon.pool.loaded(), "the previous plan was restored on its own pool"
    assert daemon.cfg.models[0].params == SITE["models"][0]["params"]


def test_a_dead_pipeline_thread_fails_health_and_ends_serve(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def broken(self: Daemon, batch: list[Any]) -> None:
        calls.append(len(batch))
        raise RuntimeError("injected step failure")

    daemon.steps.backoff_s = 0.05
    monkeypatch.setattr(Daemon, "_step", broken)
    server = uvicorn.Server(uvicorn.Config(create_app(daemon), host="127.0.0.1", port=0, log_level="warning"))
    died = serve_until_stopped(server, daemon, every_s=0.1)  # returns once the thread is dead
    assert died is not None and "injected step failure" in died
    assert len(calls) == daemon.steps.retries, "a failing step is retried a bounded number of times"
    assert daemon._thread is not None and not daemon._thread.is_alive()
    from fastapi.testclient import TestClient

    with TestClient(create_app(daemon)) as client:
        health = client.get("/healthz")
        assert health.status_code == 503 and "injected step failure" in " ".join(health.json()["reasons"])
        ready = client.get("/readyz")
        assert ready.status_code == 503 and any(r.startswith("pipeline:") for r in ready.json()["reasons"])
