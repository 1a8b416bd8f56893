"""The daemon's figures for ``/metrics``, as a ``prometheus-client`` collector.

:class:`DaemonCollector` builds its families at each scrape from what the daemon publishes (its
:class:`~mlink.server.snapshot.Snapshot` of plan, pool and links, and the counts as of the last
batch) and from the counters the camera readers and the cache copy out under their own short
locks; it never waits for the pipeline nor computes on its state. The histograms (pipeline
stages, HTTP requests) are other collectors of the same registry
(:mod:`~mlink.server.metrics_app`). Names follow the conventions page: ``mlink_`` prefix,
``_total`` for counters, ``_bytes``/``_seconds`` units.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from mlink.scheduler.plans import Plan
    from mlink.server.cache import CacheStats
    from mlink.server.daemon import Daemon
    from mlink.server.ingest import CameraStatus
    from mlink.server.snapshot import ServedCounts, Snapshot

MetricType = Literal["counter", "gauge"]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes


def family(name: str, help: str, type: MetricType, labels: Iterable[str] = ()) -> Metric:
    """An empty family: a counter's samples are named ``<name>`` (which ends in ``_total``)."""
    cls = CounterMetricFamily if type == "counter" else GaugeMetricFamily
    return cls(name, help, labels=list(labels))


def single(name: str, help: str, type: MetricType, value: float) -> Metric:
    fam = family(name, help, type)
    fam.add_metric([], float(value))  # type: ignore[attr-defined]
    return fam


def per_label(name: str, help: str, type: MetricType, label: str, values: Mapping[str, float]) -> Metric:
    fam = family(name, help, type, [label])
    for key, value in values.items():
        fam.add_metric([str(key)], float(value))  # type: ignore[attr-defined]
    return fam


def placement_metrics(rows: Iterable[Mapping[str, Any]]) -> list[Metric]:
    """Where each model executes, from the /api/v1/models rows (``executes_on``, ``fallback``):
    ``mlink_model_device{device,model} 1`` and ``mlink_model_fallback{model}`` (1 when the model
    runs somewhere other than the site's device, e.g. on the CPU of a CUDA site). Models not
    loaded yet have neither."""
    device = family(
        "mlink_model_device",
        "1 on the device the model executes on (at its latest load).",
        "gauge",
        ["device", "model"],
    )
    fallback = family(
        "mlink_model_fallback",
        "1 when the model cannot run on the site's device and executes elsewhere (reason in /api/v1/models).",
        "gauge",
        ["model"],
    )
    for row in rows:
        if row.get("executes_on") is None:
            continue
        device.add_metric([str(row["executes_on"]), str(row["name"])], 1.0)  # type: ignore[attr-defined]
        fallback.add_metric([str(row["name"])], float(row.get("fallback") is not None))  # type: ignore[attr-defined]
    return [device, fallback]


def collect_metrics(daemon: Daemon, snap: Snapshot | None = None) -> list[Metric]:
    """The daemon's families: plan, pool, models and links from ``snap`` (default: the current
    snapshot), frame and output counts as of the last batch, camera and cache counters as their
    owners copy them out now."""
    snap = daemon.snapshot if snap is None else snap
    ms = [
        single(
            "mlink_snapshot_version", "Version of the published state these figures come from.", "gauge", snap.version
        ),
        single(
            "mlink_snapshot_timestamp_seconds",
            "When that state was published (unix seconds).",
            "gauge",
            snap.published_at,
        ),
        *_served_metrics(daemon.served),
    ]
    if daemon.ingest is not None:
        ms += _camera_metrics(daemon.ingest.status())
    if snap.pool is not None:
        ms += _pool_metrics(snap.pool, [row["name"] for row in snap.models])
    ms += placement_metrics(snap.models)  # where each model executes; 1 on a fallback
    if snap.plan is not None:
        ms += _plan_metrics(snap.plan)
    if snap.measured is not None:
        ms += _measured_metrics(snap.measured)
    links = family("mlink_link_accuracy", "Held-out accuracy of each single link.", "gauge", ["source", "target"])
    for src, dst, acc in snap.links.single:
        links.add_metric([src, dst], float(acc))  # type: ignore[attr-defined]
    ms.append(links)
    if daemon.cache is not None:
        ms += _cache_metrics(daemon.cache.stats())
    return ms


class DaemonCollector(Collector):
    """:func:`collect_metrics` at each scrape. A scrape that must agree with a response header
    (the snapshot version) pins its snapshot with :meth:`pinned`; otherwise the current one is read."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._pinned: contextvars.ContextVar[Snapshot | None] = contextvars.ContextVar("mlink_scrape", default=None)

    @contextmanager
    def pinned(self, snap: Snapshot) -> Iterator[None]:
        token = self._pinned.set(snap)
        try:
            yield
        finally:
            self._pinned.reset(token)

    def collect(self) -> Iterable[Metric]:
        return collect_metrics(self.daemon, self._pinned.get())


def _served_metrics(served: ServedCounts) -> list[Metric]:
    outputs = family(
        "mlink_outputs_total",
        "Outputs served, by model and provenance (executed/predicted/unavailable).",
        "counter",
        ["model", "provenance"],
    )
    for (model, prov), n in sorted(served.outputs.items()):
        outputs.add_metric([model, prov], float(n))  # type: ignore[attr-defined]
    return [
        per_label("mlink_frames_total", "Frames served per camera.", "counter", "camera", dict(served.frames)),
        outputs,
    ]


def _camera_metrics(status: Mapping[str, CameraStatus]) -> list[Metric]:
    return [
        per_label(
            "mlink_frames_dropped_total",
            "Frames dropped by full camera queues.",
            "counter",
            "camera",
            {c: s.drops for c, s in status.items()},
        ),
        per_label(
            "mlink_stream_reconnects_total",
            "Camera reconnect attempts.",
            "counter",
            "camera",
            {c: s.reconnects for c, s in status.items()},
        ),
        per_label(
            "mlink_stream_connected",
            "1 while the camera is connected.",
            "gauge",
            "camera",
            {c: float(s.state == "connected") for c, s in status.items()},
        ),
    ]


def _pool_metrics(pm: dict[str, Any], names: list[str]) -> list[Metric]:
    return [
        single("mlink_gpu_budget_bytes", "Memory budget of the model pool.", "gauge", pm["budget_bytes"]),
        single(
            "mlink_gpu_memory_used_bytes",
            f"Memory charged to loaded models ({pm['source']}).",
            "gauge",
            pm["charged_bytes"],
        ),
        per_label(
            "mlink_model_loaded",
            "1 when the model is loaded.",
            "gauge",
            "model",
            {n: float(n in pm["loaded"]) for n in names},
        ),
        per_label(
            "mlink_model_memory_bytes",
            "Measured memory cost (peak over load + warm-up).",
            "gauge",
            "model",
            {n: pm["costs"][n] for n in names if n in pm["costs"]},
        ),
        per_label(
            "mlink_model_load_seconds",
            "Duration of the model's last load.",
            "gauge",
            "model",
            {n: v[-1] for n, v in pm["load_seconds"].items() if v},
        ),
        per_label("mlink_model_unloads_total", "Unloads by reason.", "counter", "reason", pm["unloads"]),
    ]


def _plan_metrics(plan: Plan) -> list[Metric]:
    return [
        single("mlink_plan_id", "Id of the plan being served.", "gauge", plan.id),
        single(
            "mlink_plan_expected_accuracy",
            "Expected mean output accuracy of the plan (Eq. 1).",
            "gauge",
            plan.objective,
        ),
        per_label(
            "mlink_output_expected_accuracy",
            "Expected accuracy per served output.",
            "gauge",
            "output",
            dict(plan.expected_nodes),
        ),
    ]


def _measured_metrics(measured: Mapping[str, Any]) -> list[Metric]:
    """The links' accuracy as serving checked it (``schedule_views.MeasuredAccuracy``): outputs
    never checked have a count of 0 and no accuracy sample (no figure is invented)."""
    nodes: Mapping[str, Mapping[str, Any]] = measured.get("nodes") or {}
    checked = {k: v for k, v in nodes.items() if v.get("n") and v.get("measured") is not None}
    return [
        per_label(
            "mlink_output_accuracy_checks_total",
            "Predictions of each output checked against a real execution (rotation).",
            "counter",
            "output",
            {k: float(v.get("n") or 0) for k, v in nodes.items()},
        ),
        per_label(
            "mlink_output_measured_accuracy",
            "Mean accuracy of each output's checked predictions.",
            "gauge",
            "output",
            {k: float(v["measured"]) for k, v in checked.items()},
        ),
        per_label(
            "mlink_output_checked_expected_accuracy",
            "Mean expected accuracy of the same checked predictions (compare with the measured one).",
            "gauge",
            "output",
            {k: float(v["expected"]) for k, v in checked.items()},
        ),
    ]


def _cache_metrics(st: CacheStats) -> list[Metric]:
    return [
        single("mlink_cache_buffered", "Results waiting in memory for Redis.", "gauge", st.buffered),
        single(
            "mlink_cache_dropped_total", "Results dropped because the outage buffer was full.", "counter", st.dropped
        ),
        single("mlink_cache_reconnects_total", "Reconnects to Redis.", "counter", st.reconnects),
        single("mlink_cache_up", "1 while Redis is reachable.", "gauge", float(st.connected)),
    ]
