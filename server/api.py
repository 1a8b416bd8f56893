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
import math
from collections.abc import Mapping
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from mlink.scheduler.plans import Plan
from mlink.server.cache import CacheStats, CacheUnavailable, records_json
from mlink.server.daemon import Daemon
from mlink.server.ingest import CameraStatus
from mlink.server.metrics import Metric, per_label, placement_metrics, render
from mlink.server.snapshot import ServedCounts, Snapshot

SNAPSHOT_HEADER = "X-Mlink-Snapshot"
PLAN_HEADER = "X-Mlink-Plan"


def snapshot_headers(snap: Snapshot) -> dict[str, str]:
    headers = {SNAPSHOT_HEADER: str(snap.version)}
    if snap.plan_id is not None:
        headers[PLAN_HEADER] = str(snap.plan_id)
    return headers


def _tag(response: Response, snap: Snapshot) -> None:
    response.headers.update(snapshot_headers(snap))


async def get_daemon(request: Request) -> Daemon:
    """The daemon this app serves (``create_app`` keeps it on ``app.state``)."""
    daemon: Daemon = request.app.state.daemon
    return daemon


DaemonDep = Annotated[Daemon, Depends(get_daemon)]


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
cameras_router = APIRouter(tags=["cameras"])
results_router = APIRouter(tags=["results"])
scheduler_router = APIRouter(tags=["scheduler"])
operator = APIRouter(tags=["operator"])


@health.get("/healthz")
def healthz(daemon: DaemonDep) -> dict[str, Any]:
    """The process is alive (not that it is ready: see /readyz)."""
    return {"status": "ok", "state": daemon.state}


@health.get("/readyz")
def readyz(daemon: DaemonDep) -> JSONResponse:
    """200 when Redis is reachable, a plan is loaded and every stream is open or retrying."""
    ok, reasons = daemon.readiness()
    return JSONResponse({"ready": ok, "reasons": reasons}, status_code=200 if ok else 503)


@health.get("/metrics", response_class=PlainTextResponse)
def metrics(daemon: DaemonDep) -> PlainTextResponse:
    snap = daemon.snapshot
    return PlainTextResponse(
        render(collect_metrics(daemon, snap)), media_type="text/plain; version=0.0.4", headers=snapshot_headers(snap)
    )


@cameras_router.get("/api/v1/cameras")
def cameras(daemon: DaemonDep, response: Response) -> list[dict[str, Any]]:
    snap = daemon.snapshot
    _tag(response, snap)
    status = daemon.ingest.status() if daemon.ingest else {}
    return [status[c].to_dict() if c in status else {"id": c, "state": "unknown"} for c in snap.cameras]


@cameras_router.get("/api/v1/cameras/{camera_id}")
def camera(daemon: DaemonDep, camera_id: str) -> dict[str, Any]:
    camera_or_404(daemon, camera_id)
    status = daemon.ingest.status() if daemon.ingest else {}
    return status[camera_id].to_dict() if camera_id in status else {"id": camera_id, "state": "unknown"}


@results_router.get("/api/v1/cameras/{camera_id}/results/latest")
def latest(daemon: DaemonDep, camera_id: str) -> dict[str, Any]:
    camera_or_404(daemon, camera_id)
    try:
        rec = daemon.cache.latest(camera_id) if daemon.cache else None
    except CacheUnavailable as exc:
        raise HTTPException(503, {"error": str(exc)}) from None
    if rec is None:
        raise HTTPException(404, {"error": f"no result for camera {camera_id!r} yet"})
    return rec.to_dict()


@results_router.get("/api/v1/cameras/{camera_id}/results")
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
        raise HTTPException(503, {"error": str(exc)}) from None
    return {"camera": camera_id, "count": len(recs), "results": records_json(recs)}


@scheduler_router.get("/api/v1/models")
def models(daemon: DaemonDep, response: Response) -> list[dict[str, Any]]:
    snap = daemon.snapshot
    _tag(response, snap)
    return list(snap.models)


@scheduler_router.get("/api/v1/schedule")
def schedule(daemon: DaemonDep, response: Response) -> dict[str, Any]:
    snap = daemon.snapshot
    if snap.plan_json is None:
        raise HTTPException(503, {"error": f"no plan yet (daemon is {daemon.state})"})
    _tag(response, snap)
    return {"state": daemon.state, "plan": snap.plan_json, "pool": snap.pool}


@scheduler_router.get("/api/v1/links")
def links(daemon: DaemonDep, response: Response) -> dict[str, Any]:
    snap = daemon.snapshot
    if snap.links.matrix is None:
        raise HTTPException(503, {"error": f"no links yet (daemon is {daemon.state})"})
    _tag(response, snap)
    return snap.links.matrix


@operator.post("/api/v1/config/reload", dependencies=[Depends(require_token)])
async def reload(daemon: DaemonDep, request: Request) -> JSONResponse:
    """Reload the config file (empty body) or apply the YAML in the body. Invalid: 400, nothing changes."""
    body = (await request.body()).decode("utf-8", "replace")
    if body.strip():
        result = await anyio.to_thread.run_sync(daemon.reload_text, body)
    else:
        result = await anyio.to_thread.run_sync(daemon.reload_file)
    status = 200 if result.ok else (400 if result.errors else 409)
    payload = result.to_json()
    if not result.ok:
        payload["error"] = result.message
    return JSONResponse(payload, status_code=status)


def create_app(daemon: Daemon) -> FastAPI:
    """The app serving ``daemon``: its handlers reach it through the :func:`get_daemon` dependency."""
    app = FastAPI(
        title="mlink",
        version="0.1.0",
        description="Results of every model on every camera: executed, or predicted by model links, with expected accuracy.",
    )
    app.state.daemon = daemon
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for router in (health, cameras_router, results_router, scheduler_router, operator):
        app.include_router(router)
    return app


def collect_metrics(daemon: Daemon, snap: Snapshot | None = None) -> list[Metric]:
    """The /metrics families: plan, pool, models and links from ``snap`` (default: the current
    snapshot), frame and output counts as of the last batch, camera and cache counters as their
    owners copy them out now."""
    snap = daemon.snapshot if snap is None else snap
    ms = [
        Metric("mlink_snapshot_version", "Version of the published state these figures come from.", "gauge").add(
            snap.version
        ),
        Metric("mlink_snapshot_timestamp_seconds", "When that state was published (unix seconds).", "gauge").add(
            snap.published_at
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
    links = Metric("mlink_link_accuracy", "Held-out accuracy of each single link.", "gauge")
    for src, dst, acc in snap.links.single:
        links.add(acc, source=src, target=dst)
    ms.append(links)
    if daemon.cache is not None:
        ms += _cache_metrics(daemon.cache.stats())
    return ms


def _served_metrics(served: ServedCounts) -> list[Metric]:
    outputs = Metric(
        "mlink_outputs_total", "Outputs served, by model and provenance (executed/predicted/unavailable).", "counter"
    )
    for (model, prov), n in sorted(served.outputs.items()):
        outputs.add(n, model=model, provenance=prov)
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
        Metric("mlink_gpu_budget_bytes", "Memory budget of the model pool.", "gauge").add(pm["budget_bytes"]),
        Metric("mlink_gpu_memory_used_bytes", f"Memory charged to loaded models ({pm['source']}).", "gauge").add(
            pm["charged_bytes"]
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
        Metric("mlink_plan_id", "Id of the plan being served.", "gauge").add(plan.id),
        Metric("mlink_plan_expected_accuracy", "Expected mean output accuracy of the plan (Eq. 1).", "gauge").add(
            plan.objective
        ),
        per_label(
            "mlink_output_expected_accuracy",
            "Expected accuracy per served output.",
            "gauge",
            "output",
            dict(plan.expected_nodes),
        ),
    ]


def _cache_metrics(st: CacheStats) -> list[Metric]:
    return [
        Metric("mlink_cache_buffered", "Results waiting in memory for Redis.", "gauge").add(st.buffered),
        Metric("mlink_cache_dropped_total", "Results dropped because the outage buffer was full.", "counter").add(
            st.dropped
        ),
        Metric("mlink_cache_reconnects_total", "Reconnects to Redis.", "counter").add(st.reconnects),
        Metric("mlink_cache_up", "1 while Redis is reachable.", "gauge").add(float(st.connected)),
    ]
