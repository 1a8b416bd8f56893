"""One ``prometheus-client`` registry per app: what the daemon's ``/metrics`` scrapes.

Its collectors: the daemon's figures (:class:`~mlink.server.metrics.DaemonCollector`), the
pipeline's histograms (the daemon's :class:`~mlink.server.stage_histograms.StageHistograms`,
counting since the daemon started), the HTTP request histogram of this app and of the reader
processes in front of it (:class:`~mlink.server.http_metrics.RequestCollector`), and the process
collector (``process_*``: the daemon's memory, CPU and open files). A registry per app, not the
library's global one: tests run several daemons in one process, and the global registry refuses
a second metric of a name it holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import generate_latest

from mlink.server.http_metrics import RequestCollector, RequestTimer, request_histogram
from mlink.server.metrics import DaemonCollector

if TYPE_CHECKING:
    from fastapi import FastAPI

    from mlink.server.daemon import Daemon
    from mlink.server.snapshot import Snapshot


class AppMetrics:
    """The registry of one app serving ``daemon``; ``readers_dir``: the reader processes'
    histogram folder (:attr:`ReaderPool.metrics_dir <mlink.server.readers.ReaderPool>`), if any."""

    def __init__(self, daemon: Daemon, readers_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.daemon = DaemonCollector(daemon)
        self.requests = request_histogram()
        self.registry.register(self.daemon)
        self.registry.register(daemon.stages.histograms)
        self.registry.register(RequestCollector(self.requests, readers_dir))
        ProcessCollector(registry=self.registry)

    def scrape(self, snap: Snapshot) -> bytes:
        """The text exposition, with the daemon's figures from ``snap`` (the version the
        response's header names)."""
        with self.daemon.pinned(snap):
            return generate_latest(self.registry)


def install_metrics(app: FastAPI, daemon: Daemon, readers: Any = None) -> AppMetrics:
    """Give ``app`` its registry (``app.state.metrics``) and time its requests."""
    metrics = AppMetrics(daemon, getattr(readers, "metrics_dir", None))
    app.state.metrics = metrics
    app.add_middleware(RequestTimer, histogram=metrics.requests)
    return metrics
