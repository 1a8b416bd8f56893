"""The HTTP API (FastAPI; OpenAPI at ``/docs``): health, metrics, cameras, results, models,
schedule, links, and the operator's config reload.

Reads come from Redis (results), from the daemon's published :class:`Snapshot` (plan, pool,
links, models, camera list) and from counters the camera readers and the cache copy out when
asked; never from the pipeline thread's working state (planner, links, pool), and nothing on
the request path computes link accuracies. A handler takes ``daemon.snapshot`` once, so one
response never mixes two snapshots; the ``X-Mlink-Snapshot`` header names its version (and
``X-Mlink-Plan`` the plan id, when there is a plan). Errors are JSON
``{"error": message, "errors": [...]}`` with, for validation, the path of each error. Camera
URLs are redacted everywhere.
"""

from __future__ import annotations

import hmac
from typing import Any, Protocol

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from mlink.configs.load import MAX_CONFIG_BYTES
from mlink.server.access_log import strip_query_strings
from mlink.server.api_events import events_router
from mlink.server.api_read import (
    READ_ROUTERS,
    DaemonDep,
    add_error_handlers,
    error_responses,
    snapshot_headers,
    too_large,
)
from mlink.server.api_snapshots import install_snapshots
from mlink.server.daemon import Daemon
from mlink.server.dashboard import dashboard_router
from mlink.server.metrics import CONTENT_TYPE
from mlink.server.metrics_app import AppMetrics, install_metrics

__all__ = ["create_app"]


class ReaderHealth(Protocol):
    """What /healthz reports of the reader processes (:class:`mlink.server.readers.ReaderPool`)."""

    def health(self) -> dict[str, Any]: ...


def require_token(daemon: DaemonDep, authorization: str | None = Header(None)) -> None:
    token = daemon.cfg.api.token
    if not token:
        raise HTTPException(403, {"error": "operator actions are disabled: set api.token in the config"})
    given = (authorization or "").removeprefix("Bearer ").strip()
    # compared as UTF-8 bytes: compare_digest refuses str with non-ASCII characters (a 500)
    if (
        not authorization
        or not authorization.startswith("Bearer ")
        or not hmac.compare_digest(given.encode(), token.encode())
    ):
        raise HTTPException(401, {"error": "a valid bearer token is required"}, headers={"WWW-Authenticate": "Bearer"})


health = APIRouter(tags=["health"])
operator = APIRouter(tags=["operator"])


@health.get(
    "/healthz", responses={503: {"description": "the pipeline thread died or the embedded Redis cannot recover"}}
)
def healthz(daemon: DaemonDep, request: Request) -> JSONResponse:
    """The process is alive (not that it is ready: see /readyz): 503 with ``reasons`` when the
    pipeline thread died or the embedded Redis cannot recover (a supervisor restarts it). With
    reader processes: how many are alive and how often they were restarted; ``status`` is
    ``degraded`` while one is down."""
    alive, reasons = daemon.health()
    body: dict[str, Any] = {"status": "ok" if alive else "failing", "state": daemon.state}
    if reasons:
        body["reasons"] = reasons
    readers: ReaderHealth | None = getattr(request.app.state, "readers", None)
    if readers is not None:
        body["readers"] = health = readers.health()
        if alive and health["alive"] < health["workers"]:
            body["status"] = "degraded"
    return JSONResponse(body, status_code=200 if alive else 503)


@health.get("/readyz", responses={503: {"description": "not ready: the reasons say why"}})
def readyz(daemon: DaemonDep) -> JSONResponse:
    """200 when Redis is reachable, a plan is loaded and every stream is open or retrying."""
    ok, reasons = daemon.readiness()
    return JSONResponse({"ready": ok, "reasons": reasons}, status_code=200 if ok else 503)


@health.get("/metrics", response_class=PlainTextResponse)
def metrics(daemon: DaemonDep, request: Request) -> Response:
    """Prometheus text format (``mlink.server.metrics_app``): the figures of the snapshot the
    ``X-Mlink-Snapshot`` header names, the pipeline's and the HTTP requests' histograms."""
    snap = daemon.snapshot
    registry: AppMetrics = request.app.state.metrics
    return Response(registry.scrape(snap), media_type=CONTENT_TYPE, headers=snapshot_headers(snap))


async def read_body(request: Request, limit: int = MAX_CONFIG_BYTES) -> str:
    """The request body as text, refused (413) past ``limit`` bytes before more is read (a 10 MB
    body once parsed for minutes) and (400) when it is not UTF-8."""
    too_big = HTTPException(413, too_large(limit))
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, {"error": "the body is not UTF-8 text"}) from None


@operator.post(
    "/api/v1/config/reload",
    dependencies=[Depends(require_token)],
    responses=error_responses(400, 401, 403, 409, 413),
    openapi_extra={
        "requestBody": {
            "required": False,
            "description": "a whole site config as YAML (at most 256 KiB); empty: reload the config file",
            "content": {"application/yaml": {"schema": {"type": "string", "maxLength": MAX_CONFIG_BYTES}}},
        }
    },
)
async def reload(daemon: DaemonDep, request: Request) -> JSONResponse:
    """Reload the config file (empty body) or apply the YAML in the body (at most 256 KiB, plain
    values: see ``mlink.configs.load``). Invalid: 400, nothing changes; too large: 413."""
    body = await read_body(request)
    if body.strip():
        result = await anyio.to_thread.run_sync(daemon.reload_text, body)
    else:
        result = await anyio.to_thread.run_sync(daemon.reload_file)
    status = 200 if result.ok else (400 if result.errors else 409)
    payload = result.to_json()
    if not result.ok:
        payload["error"] = result.message
    return JSONResponse(payload, status_code=status)


def create_app(daemon: Daemon, readers: ReaderHealth | None = None) -> FastAPI:
    """The app serving ``daemon``: its handlers reach it through the :func:`~mlink.server.api_read.get_daemon` dependency.
    ``readers``: the reader processes in front of it, whose health /healthz reports. Installs the
    access log's query-string filter (uvicorn's logging setup keeps a logger's filters)."""
    app = FastAPI(
        title="mlink",
        version="0.1.0",
        description="Results of every model on every camera: executed, or predicted by model links, with expected accuracy.",
    )
    app.state.daemon = daemon
    app.state.readers = readers
    strip_query_strings()  # a token sent as ?token=... stays out of uvicorn's access log
    add_error_handlers(app)
    for router in (health, *READ_ROUTERS, operator):
        app.include_router(router)
    install_metrics(app, daemon, readers)  # its own registry; request latency by route
    app.include_router(events_router)  # server-sent events of each camera's results
    install_snapshots(app, daemon)  # /api/v1/cameras/{id}/snapshot.jpg
    app.include_router(dashboard_router)  # the operator's page at / (server/dashboard-ui/)
    return app
