"""``GET /api/v1/cameras/{camera_id}/snapshot.jpg``: a camera's latest frame with its outputs drawn.

Frigate's ``/api/<camera>/latest.jpg``, for mlink: the newest frame served, with each model's
boxes in its colour (executed solid, predicted dashed) and the legend of every output's value,
provenance and expected accuracy (:mod:`mlink.server.overlay`); ``?raw=1`` gives the frame
alone. Served by the daemon's own app only: the frames live in its process
(:mod:`mlink.server.latest_frames`), so a reader process forwards this route to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.responses import Response

from mlink.server.api_read import DaemonDep, camera_or_404, error_responses, snapshot_headers
from mlink.server.latest_frames import LatestFrames, latest_frames

if TYPE_CHECKING:
    from mlink.server.daemon import Daemon

router = APIRouter(tags=["cameras"])


@router.get(
    "/api/v1/cameras/{camera_id}/snapshot.jpg",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "the latest frame as JPEG (at most 960 pixels wide)"},
        **error_responses(404, 422),
    },
)
def snapshot_jpg(
    daemon: DaemonDep,
    request: Request,
    camera_id: str,
    raw: bool = Query(False, description="true: the frame without the outputs drawn"),
) -> Response:
    """The camera's latest served frame as JPEG, its outputs drawn unless ``raw``. 404: no such
    camera, or no frame of it served yet (the error says which)."""
    camera_or_404(daemon, camera_id)
    frames: LatestFrames = request.app.state.latest_frames
    held = frames.held(camera_id)
    if held is None:
        raise HTTPException(404, {"error": f"no frame of camera {camera_id!r} served yet"})
    body = frames.encode(held, drawn=not raw)
    headers = {
        **snapshot_headers(daemon.snapshot),
        "Cache-Control": "no-store",
        "X-Mlink-Frame-Index": str(held.index),
        "X-Mlink-Frame-Time": f"{held.wall_time:.3f}",
    }
    return Response(body, media_type="image/jpeg", headers=headers)


def install_snapshots(app: FastAPI, daemon: Daemon) -> None:
    """The route on ``app``, over the daemon's :class:`LatestFrames` (registered on first use)."""
    app.state.latest_frames = latest_frames(daemon)
    app.include_router(router)
