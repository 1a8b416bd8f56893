"""HTTP request latency by route, for ``/metrics``: an ASGI middleware and the histogram it fills.

``mlink_http_request_duration_seconds{route,method,status}``: ``route`` is the route's template
(``/api/v1/cameras/{camera_id}/results``, never the path a client sent: camera ids and probes of
unknown paths must not create series), ``other`` for a request no route matched; ``method`` one
of the HTTP methods (``other`` for anything else); ``status`` the class (``2xx``...``5xx``). The
time runs from the request's arrival to the last byte of its response; a server-sent-events
stream counts until its headers are sent (its life is not a latency).

Where a request is counted: by the app that answered it, once. Without reader processes that is
the daemon's app. With them (``api.read_workers``), a reader counts what it answered itself
(its answers carry ``x-mlink-served-by: reader``) and the daemon's app counts what the readers
forwarded to it. The readers are other processes: theirs are ``prometheus-client``'s
multiprocess histograms, files in a folder the daemon's :class:`~mlink.server.readers.ReaderPool`
owns (:data:`MULTIPROC_ENV` set for them alone), which the daemon's scrape reads and adds to its
own series (:class:`RequestCollector`). A restarted reader's counts stay (its files remain), so
the counters never go backwards while the daemon runs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

from prometheus_client import Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mlink.server.stage_histograms import without_created

NAME = "mlink_http_request_duration_seconds"
HELP = "HTTP request latency: arrival to the response's last byte (an event stream: to its headers)."
LABELS = ("route", "method", "status")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when a reader imports it
Scope = MutableMapping[str, Any]


def request_histogram() -> Histogram:
    """A histogram of no registry (each app's registry collects it: several apps may share a
    process). In a reader process started with :data:`MULTIPROC_ENV`, its values live in files there."""
    return Histogram(NAME, HELP, list(LABELS), buckets=BUCKETS, registry=None)


def route_of(scope: Scope, fallback: Callable[[str], str | None] | None = None) -> str:
    """The template of the route that handled the request (Starlette puts it in the scope), else
    ``fallback(path)`` (a plain ASGI handler's own), else :data:`OTHER`."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if isinstance(template, str) and template:
        return template
    found = fallback(scope.get("path", "")) if fallback is not None else None
    return found or OTHER


class RequestTimer:
    """ASGI middleware observing each HTTP request in ``histogram`` (see the module docstring).

    ``only_with``: a response header (lower-case name, value) that a response must carry to be
    counted (a reader counts only its own answers); ``fallback``: the template of a path no
    Starlette route handles (a reader's plain ASGI handler)."""

    def __init__(
        self,
        app: Any,
        histogram: Histogram,
        only_with: tuple[bytes, bytes] | None = None,
        fallback: Callable[[str], str | None] | None = None,
    ) -> None:
        self.app = app
        self.histogram = histogram
        self.only_with = only_with
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state: dict[str, Any] = {"status": 500, "counted": self.only_with is None, "done": False}

        def observe() -> None:
            if state["done"]:
                return
            state["done"] = True
            if state["counted"]:
                method = scope.get("method", "")
                self.histogram.labels(
                    route=route_of(scope, self.fallback),
                    method=method if method in METHODS else OTHER,
                    status=f"{state['status'] // 100}xx",
                ).observe(time.perf_counter() - start)

        async def timed_send(msg: MutableMapping[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                state["status"] = int(msg["status"])
                headers = [(bytes(k).lower(), bytes(v)) for k, v in msg.get("headers", ())]
                if self.only_with is not None:
                    state["counted"] = self.only_with in headers
                if any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers):
                    observe()  # a stream: its opening is the latency
            elif msg["type"] == "http.response.body" and not msg.get("more_body"):
                observe()
            await send(msg)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            observe()  # no response at all (an error the server answers 500 for) counts too


def reader_metrics_dir(parent: Path) -> Path:
    """The folder the reader processes' histograms live in, under the pool's private folder."""
    path = parent / "metrics"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


class RequestCollector(Collector):
    """The app's own request histogram plus, with readers, theirs from ``readers_dir``, summed
    series by series into one family (two families of one name are not valid exposition)."""

    def __init__(self, histogram: Histogram, readers_dir: Path | None = None) -> None:
        self.histogram = histogram
        self.readers_dir = readers_dir

    def _sources(self) -> Iterator[Metric]:
        yield from without_created(self.histogram.collect())
        if self.readers_dir is not None and self.readers_dir.is_dir():
            yield from MultiProcessCollector(None, path=str(self.readers_dir)).collect()

    def collect(self) -> Iterator[Metric]:
        totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for fam in self._sources():
            if fam.name != NAME:
                continue
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                totals[key] = totals.get(key, 0.0) + s.value
        out = Metric(NAME, HELP, "histogram")
        for (name, labels), value in sorted(totals.items(), key=_exposition_order):
            out.add_sample(name, dict(labels), value)
        yield out


def _exposition_order(item: tuple[tuple[str, tuple[tuple[str, str], ...]], float]) -> tuple[Any, ...]:
    """Series by series; in each, the buckets by bound, then ``_count`` and ``_sum``."""
    (name, labels), _ = item
    series = tuple(kv for kv in labels if kv[0] != "le")
    le = dict(labels).get("le")
    bound = float(le) if le is not None else 0.0
    return (series, {f"{NAME}_bucket": 0, f"{NAME}_count": 1, f"{NAME}_sum": 2}.get(name, 3), bound)


def _latest_template(pattern: re.Pattern[str], template: str) -> Callable[[str], str | None]:
    return lambda path: template if pattern.match(path) else None


def time_reader(app: Any, served_by: tuple[bytes, bytes], latest: re.Pattern[str]) -> RequestTimer:
    """A reader process's app with its requests timed: only those it answered (``served_by``),
    its hot path under the daemon's template for it. Counted in :data:`MULTIPROC_ENV`'s folder
    when the pool set it; without it (a reader started by hand) they are kept in-process only."""
    return RequestTimer(
        app,
        request_histogram(),
        only_with=served_by,
        fallback=_latest_template(latest, "/api/v1/cameras/{camera_id}/results/latest"),
    )
