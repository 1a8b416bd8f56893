"""/metrics through prometheus-client (issue 15 items 4 and 5): the histograms count a real run,
the exposition passes ``promtool check metrics``, the shipped alert rules pass ``promtool check
rules`` and fire on the series they are meant for (``promtool test rules``), and the reader
processes' request latencies reach the daemon's scrape.

A real daemon on a real clip (two cheap models, 20 profiling frames, a budget that predicts one
of them) for the run; a daemon object that is not started (no models: quick) with real reader
processes for the readers' part, as in tests/test_readers.py. promtool is Debian's
``prometheus`` package (``.ci/debian-packages`` installs it); without it those checks skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from daemons import Running, behind_readers, running_daemon  # tests/daemons.py
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_for  # tests/waiting.py

from mlink.models.assets import AssetStore
from mlink.server.readers import ReaderPool

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = REPO / "docker" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: Debian's `prometheus` package (.ci/debian-packages installs it)"
)
LATEST = "/api/v1/cameras/{camera_id}/results/latest"
# The names operators' dashboards and the conventions page rely on (before this rewrite too).
NAMES = {
    "mlink_snapshot_version",
    "mlink_frames_total",
    "mlink_outputs_total",
    "mlink_frames_dropped_total",
    "mlink_stream_reconnects_total",
    "mlink_stream_connected",
    "mlink_gpu_budget_bytes",
    "mlink_gpu_memory_used_bytes",
    "mlink_model_loaded",
    "mlink_model_memory_bytes",
    "mlink_model_load_seconds",
    "mlink_plan_id",
    "mlink_plan_expected_accuracy",
    "mlink_output_expected_accuracy",
    "mlink_link_accuracy",
    "mlink_cache_up",
    "mlink_cache_buffered",
    "mlink_cache_dropped_total",
    "mlink_cache_reconnects_total",
}
SITE = {
    "site": "prom",
    "budget": "0.6x",  # one of the two fits: the other is predicted by a link
    "models": [{"name": "hog_people", "params": {"upscale": 1.0}}, {"name": "yolox_nano", "outputs": ["object_count"]}],
    "streams": [{"id": "walkway", "url": "asset://vtest", "fps": 4, "loop": True}],
    "links": {"profile_frames": 20},
    "scheduler": {"period_s": 3600, "batch_size": 2},
}


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``{sample name: [(labels, value)]}`` of an exposition, parsed by prometheus-client's parser."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(found: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    return sum(v for lab, v in found.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


def check_histogram(found: dict, name: str, **labels: str) -> float:
    """Buckets cumulative and the +Inf one equal to ``_count``; returns the count."""
    buckets = sorted(
        (
            (float(lab["le"]), v)
            for lab, v in found.get(f"{name}_bucket", [])
            if all(lab.get(k) == w for k, w in labels.items())
        ),
    )
    assert buckets, f"no {name} buckets for {labels}"
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), f"{name} buckets are not cumulative"
    assert buckets[-1][0] == float("inf") and buckets[-1][1] == value(found, f"{name}_count", **labels)
    return buckets[-1][1]


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def running(store: AssetStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_daemon(SITE, tmp_path_factory.mktemp("prom-home"), store, http=True) as run:
        yield run


def test_histograms_count_a_real_run(running: Running) -> None:
    daemon, client = running.daemon, running.client
    assert client is not None
    wait_for(lambda: sum(daemon.frames_total.values()) >= 6, 120, "six served frames", every=0.2)
    codes = [
        client.get(p).status_code
        for p in ("/api/v1/cameras/walkway/results/latest", "/api/v1/cameras/nope/results/latest", "/nope")
    ]
    assert codes == [200, 404, 404]
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples(r.text)
    assert value(found, "mlink_snapshot_version") == int(r.headers["x-mlink-snapshot"])
    missing = NAMES - set(found)
    assert not missing, missing

    executed = {m for (m, prov) in daemon.served.outputs if prov == "executed"}
    predicted = {m for (m, prov) in daemon.served.outputs if prov == "predicted"}
    assert executed and predicted, daemon.served.outputs  # the site is built so that both happen
    for model in executed:
        assert check_histogram(found, "mlink_model_inference_seconds", model=model) > 0
    assert {lab["model"] for lab, _ in found["mlink_model_inference_seconds_count"]} == executed
    assert check_histogram(found, "mlink_link_prediction_seconds") > 0
    frames = check_histogram(found, "mlink_frame_latency_seconds")
    assert frames >= 6 and value(found, "mlink_frame_latency_seconds_sum") > 0  # capture precedes the cache write

    assert check_histogram(found, "mlink_http_request_duration_seconds", route=LATEST, method="GET", status="2xx") >= 1
    assert check_histogram(found, "mlink_http_request_duration_seconds", route=LATEST, method="GET", status="4xx") >= 1
    assert check_histogram(found, "mlink_http_request_duration_seconds", route="other", status="4xx") >= 1
    routes = {lab["route"] for lab, _ in found["mlink_http_request_duration_seconds_count"]}
    assert not any("walkway" in r or "nope" in r for r in routes), routes  # templates, never client paths
    assert not any(n.endswith("_created") for n in found)

    again = samples(client.get("/metrics").text)  # counters only grow between two scrapes
    assert value(again, "mlink_frame_latency_seconds_count") >= frames
    assert value(again, "mlink_http_request_duration_seconds_count", route="/metrics") >= 1


@needs_promtool
def test_promtool_accepts_a_real_scrape(running: Running) -> None:
    assert running.client is not None
    wait_for(lambda: sum(running.daemon.frames_total.values()) >= 2, 120, "served frames", every=0.2)
    text = running.client.get("/metrics").text
    proc = promtool("check", "metrics", stdin=text)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_accepts_the_shipped_rules_and_they_fire() -> None:
    proc = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"), "--syntax-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = promtool("test", "rules", str(PROMETHEUS / "alerts.test.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """The Grafana panels' queries, parsed by promtool (as recording rules; ``$job`` filled in)."""
    import json

    dashboard = json.loads((REPO / "docker" / "grafana" / "dashboards" / "mlink.json").read_text())
    exprs = [t["expr"].replace("$job", "mlink") for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"q{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    (tmp_path / "q.yml").write_text(yaml.safe_dump(rules))
    proc = promtool("check", "rules", str(tmp_path / "q.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_use_metric_names_the_daemon_exports() -> None:
    """Every ``mlink_`` name in the rules and the Grafana dashboard is one /metrics has."""
    import re

    from mlink.server import http_metrics, metrics, stage_histograms

    source = "".join(Path(m.__file__).read_text() for m in (metrics, http_metrics, stage_histograms))  # type: ignore[arg-type]
    exported = set(re.findall(r'"(mlink_[a-z_]+)"', source))
    exported |= {f"{n}{s}" for n in exported for s in ("_bucket", "_count", "_sum")}
    for f in (PROMETHEUS / "alerts.yml", REPO / "docker" / "grafana" / "dashboards" / "mlink.json"):
        used = set(re.findall(r"\bmlink_[a-z_]+", f.read_text()))
        assert used and used <= exported, (f.name, used - exported)


# -- the reader processes' requests -----------------------------------------------------------

READER_SITE = {
    "site": "promreaders",
    "models": [{"name": "mobilenet_v2"}],
    "streams": [{"id": "gate", "url": "asset://vtest"}],
    "api": {"token": "t0ken", "read_workers": 1},
}


@pytest.fixture(scope="module")
def readers(store: AssetStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ReaderPool, httpx.Client]]:
    with behind_readers(READER_SITE, tmp_path_factory.mktemp("home"), store) as (_, pool):
        public = httpx.Client(base_url=f"http://127.0.0.1:{pool.port}", timeout=30)
        with public:
            wait_for(
                lambda: public.get("/api/v1/models").headers.get("x-mlink-served-by") == "reader", 30, "a live reader"
            )
            yield pool, public


def test_reader_requests_reach_the_daemons_scrape(readers: tuple[ReaderPool, httpx.Client]) -> None:
    pool, public = readers
    before = samples(public.get("/metrics").text)  # forwarded: the daemon's app answers it
    for _ in range(3):
        r = public.get("/api/v1/cameras/gate/results/latest")
        assert r.status_code == 404 and r.headers.get("x-mlink-served-by") == "reader"
        assert public.get("/api/v1/models").headers.get("x-mlink-served-by") == "reader"
    assert "x-mlink-served-by" not in public.get("/healthz").headers  # forwarded
    after = samples(public.get("/metrics").text)

    def grew(route: str, status: str | None) -> float:
        labels = {"route": route, "method": "GET", **({"status": status} if status else {})}
        return value(after, "mlink_http_request_duration_seconds_count", **labels) - value(
            before, "mlink_http_request_duration_seconds_count", **labels
        )

    assert grew(LATEST, "4xx") == 3  # the reader's hot path, under the daemon's template
    assert grew("/api/v1/models", "2xx") == 3  # the reader's FastAPI routes
    assert grew("/healthz", None) == 1  # counted once, by the daemon's app it was forwarded to
    check_histogram(after, "mlink_http_request_duration_seconds", route=LATEST, status="4xx")
    assert any(pool.metrics_dir.glob("histogram_*.db"))  # the reader's multiprocess files
    if PROMTOOL is not None:
        proc = promtool("check", "metrics", stdin=public.get("/metrics").text)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    # a reader killed and started again: what the dead one counted stays in the scrape
    (pid,) = pool.pids()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pool.pids() not in ([], [pid]) and pool.health()["alive"] == 1, 30, "a new reader")
    wait_for(lambda: public.get("/api/v1/models").headers.get("x-mlink-served-by") == "reader", 30, "a live reader")
    assert public.get("/api/v1/cameras/gate/results/latest").headers.get("x-mlink-served-by") == "reader"
    later = samples(public.get("/metrics").text)
    labels = {"route": LATEST, "method": "GET", "status": "4xx"}
    assert value(later, "mlink_http_request_duration_seconds_count", **labels) == (
        value(after, "mlink_http_request_duration_seconds_count", **labels) + 1
    )
