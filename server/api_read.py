"""The API's read routes (cameras, results, models, schedule, links), and what they share with the
rest of the API: the snapshot headers, the JSON error shape, the daemon dependency.

Served twice: by the daemon's own app (:func:`mlink.server.api.create_app`) and by the reader
processes (:mod:`mlink.server.reader_app`), where ``get_daemon`` gives a
:class:`~mlink.server.reader_state.ReaderView` with the same attributes, read from Redis and the
published snapshot. So this module imports nothing heavy (no daemon, no models): a reader
process starts in a fraction of a second and holds no torch.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from mlink.server.cache_layout import CacheUnavailable, records_json, response_body
from mlink.server.freshness import latest_body
from mlink.server.redact import redact

if TYPE_CHECKING:
    from mlink.server.daemon import Daemon
    from mlink.server.snapshot import Snapshot

SNAPSHOT_HEADER = "X-Mlink-Snapshot"
PLAN_HEADER = "X-Mlink-Plan"
log = logging.getLogger("mlink.api")


def snapshot_headers(snap: Snapshot) -> dict[str, str]:
    headers = {SNAPSHOT_HEADER: str(snap.version)}
    if snap.plan_id is not None:
        headers[PLAN_HEADER] = str(snap.plan_id)
    return headers


def _tag(response: Response, snap: Snapshot) -> None:
    response.headers.update(snapshot_headers(snap))


async def get_daemon(request: Request) -> Daemon:
    """The daemon this app serves (``create_app`` keeps it on ``app.state``; a reader process, its
    :class:`~mlink.server.reader_state.ReaderView`)."""
    daemon: Daemon = request.app.state.daemon
    return daemon


# FastAPI resolves the annotation when the routes are declared: at run time it names no class, so
# this module does not import the daemon (and, through it, the scheduler and torch).
if TYPE_CHECKING:
    DaemonDep = Annotated[Daemon, Depends(get_daemon)]
else:
    DaemonDep = Annotated[Any, Depends(get_daemon)]


class ErrorBody(BaseModel):
    """Every error the API answers: a message, and for validation each error's path."""

    error: str
    errors: list[dict[str, Any]] | None = None


_REASONS = {
    400: "the request is invalid (e.g. a config that fails validation: each error with its path)",
    401: "a valid bearer token is required",
    403: "operator actions are disabled (no api.token in the config)",
    404: "no such camera, or no result yet",
    409: "the change cannot be applied; the running config is unchanged",
    413: "the request body is too large",
    422: "a parameter is invalid (each error with its path)",
    503: "not available yet or for now (no plan yet, the result store unreachable)",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that can answer ``codes``: each with :class:`ErrorBody`, so the
    OpenAPI document lists every status code a client can get."""
    return {c: {"model": ErrorBody, "description": _REASONS[c]} for c in codes}


def too_large(limit: int) -> dict[str, str]:
    """The 413 body for a request body over ``limit`` bytes (the daemon's reload route, and a
    reader that refuses to hold such a body before forwarding it)."""
    return {"error": f"the body is larger than {limit // 1024} KiB, the most a config may be"}


def unavailable(why: Exception | str) -> HTTPException:
    """A 503 for a result store that cannot answer. The reason stays in the log: it names the
    store's address (a unix socket path, a host), which is nobody's business outside."""
    log.warning("result store unavailable: %s", redact(why if isinstance(why, str) else f"{type(why).__name__}: {why}"))
    return HTTPException(
        503, {"error": "the result store is unreachable; try again shortly"}, headers={"Retry-After": "1"}
    )


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    body = exc.detail if isinstance(exc.detail, dict) else {"error": str(exc.detail)}
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"path": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
    return JSONResponse({"error": "invalid request", "errors": errors}, status_code=422)


def camera_or_404(daemon: Daemon, camera_id: str) -> None:
    cameras = daemon.snapshot.cameras
    if camera_id not in cameras:
        raise HTTPException(404, {"error": f"no camera {camera_id!r}", "cameras": list(cameras)})


cameras_router = APIRouter(tags=["cameras"])
results_router = APIRouter(tags=["results"])
scheduler_router = APIRouter(tags=["scheduler"])
READ_ROUTERS = (cameras_router, results_router, scheduler_router)


def add_error_handlers(app: FastAPI) -> None:
    """JSON errors (``{"error": ..., "errors": [...]}``), the same from every process."""
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


@cameras_router.get("/api/v1/cameras")
def cameras(daemon: DaemonDep, response: Response) -> list[dict[str, Any]]:
    snap = daemon.snapshot
    _tag(response, snap)
    status = daemon.ingest.status() if daemon.ingest else {}
    return [status[c].to_dict() if c in status else {"id": c, "state": "unknown"} for c in snap.cameras]


@cameras_router.get("/api/v1/cameras/{camera_id}", responses=error_responses(404, 422))
def camera(daemon: DaemonDep, camera_id: str) -> dict[str, Any]:
    camera_or_404(daemon, camera_id)
    status = daemon.ingest.status() if daemon.ingest else {}
    return status[camera_id].to_dict() if camera_id in status else {"id": camera_id, "state": "unknown"}


class LatestResult(BaseModel):
    """A camera's newest result, with how old it is now (``server/freshness.py``)."""

    camera: str
    ts: float  # unix seconds: when its frame was captured
    result: dict[str, Any]
    age_s: float  # seconds from ts to this answer
    stale: bool  # the camera is not delivering, or the result is older than its rate allows


@results_router.get(
    "/api/v1/cameras/{camera_id}/results/latest",
    response_model=LatestResult,
    responses=error_responses(404, 422, 503),
)
def latest(daemon: DaemonDep, camera_id: str) -> Response:
    camera_or_404(daemon, camera_id)
    try:
        rec = daemon.cache.latest(camera_id) if daemon.cache else None
    except CacheUnavailable as exc:
        raise unavailable(exc) from None
    if rec is None:
        raise HTTPException(404, {"error": f"no result for camera {camera_id!r} yet"})
    st = daemon.ingest.status().get(camera_id) if daemon.ingest else None
    body = latest_body(response_body(rec), rec.ts, time.time(), st.to_dict() if st is not None else None)
    return Response(body, media_type="application/json")


@results_router.get("/api/v1/cameras/{camera_id}/results", responses=error_responses(400, 404, 422, 503))
def results(
    daemon: DaemonDep,
    camera_id: str,
    since: float | None = Query(None, description="unix seconds, inclusive"),
    until: float | None = Query(None, description="unix seconds, inclusive"),
    limit: int = Query(100, ge=1, le=10000, description="the newest results in the range"),
) -> dict[str, Any]:
    camera_or_404(daemon, camera_id)
    for name, value in (("since", since), ("until", until)):
        if value is not None and not math.isfinite(value):  # nan/inf parse as floats; Redis refuses them
            raise HTTPException(422, {"error": f"{name} must be a finite number of unix seconds, got {value}"})
    if since is not None and until is not None and since > until:
        raise HTTPException(400, {"error": "since is after until"})
    try:
        recs = daemon.cache.history(camera_id, since, until, limit) if daemon.cache else []
    except CacheUnavailable as exc:
        raise unavailable(exc) from None
    return {"camera": camera_id, "count": len(recs), "results": records_json(recs)}


@scheduler_router.get("/api/v1/models")
def models(daemon: DaemonDep, response: Response) -> list[dict[str, Any]]:
    snap = daemon.snapshot
    _tag(response, snap)
    return list(snap.models)


@scheduler_router.get("/api/v1/schedule", responses=error_responses(503))
def schedule(daemon: DaemonDep, response: Response) -> dict[str, Any]:
    snap = daemon.snapshot
    if snap.plan_json is None:
        raise HTTPException(503, {"error": f"no plan yet (daemon is {daemon.state})"})
    _tag(response, snap)
    return {"state": daemon.state, "plan": snap.plan_json, "pool": snap.pool, "history": list(snap.history)}


@scheduler_router.get("/api/v1/links", responses=error_responses(503))
def links(daemon: DaemonDep, response: Response) -> dict[str, Any]:
    snap = daemon.snapshot
    if snap.links.matrix is None:
        raise HTTPException(503, {"error": f"no links yet (daemon is {daemon.state})"})
    _tag(response, snap)
    return {**snap.links.matrix, "measured": snap.measured}
