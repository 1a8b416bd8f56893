"""Server-sent events: each camera's results pushed as they are stored, read from the cache's Redis
streams (:mod:`mlink.server.result_stream`) with blocking ``XREAD``.

``GET /api/v1/cameras/{id}/events`` streams one camera, ``GET /api/v1/events`` all of them. Each
event is ``id: <stream id>``, ``event: result``, ``data: {"camera", "id", "ts", "result"}``
(revisions too: ``result.revision`` counts them). Its ``id`` is the Redis stream entry id, so a
client that reconnects with ``Last-Event-ID`` (a browser's ``EventSource`` does by itself) gets
every entry after it, with no gap and no repeat, as long as the stream still holds it (it keeps
``cache.stream_length`` per camera; an ``event: gap`` says when the given id is older than the
oldest entry kept). Without ``Last-Event-ID`` the stream starts with the next result.

Served the same by the daemon's app and by the reader processes (nothing here is the daemon's:
only ``daemon.cache``'s URL and prefix, and the published camera list). Bounds: at most
``MAX_CLIENTS`` open streams per process (503 past it), one Redis connection each, closed when the
client goes (a disconnect is seen within ``BLOCK_MS``), a heartbeat comment every ``HEARTBEAT_S``
so proxies keep an idle stream open. 503 when Redis does not answer at the start; when it stops
answering later the stream ends, and the client resumes from its last id.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.responses import StreamingResponse

from mlink.server.api_read import DaemonDep, camera_or_404, error_responses, unavailable
from mlink.server.cache_layout import Keys

log = logging.getLogger("mlink.api.events")

MAX_CLIENTS = 64  # open event streams per process (each holds one Redis connection)
HEARTBEAT_S = 15.0
BLOCK_MS = 1000  # one XREAD waits this long at most, so a gone client is noticed this soon
COUNT = 500  # entries per XREAD
STREAM_ID = re.compile(r"^[0-9]{1,20}(?:-[0-9]{1,20})?$")
CLIENT_NAME = "mlink-events"  # in Redis's CLIENT LIST: one per open event stream
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

events_router = APIRouter(tags=["events"])

_SSE_200: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "text/event-stream: `id:` the Redis stream id, `event: result`, `data:` the result's JSON",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}
_LAST_EVENT_ID = Header(
    None,
    alias="Last-Event-ID",
    description="resume after this stream id (the `id:` of the last event received)",
)


class _Slots:
    """How many event streams this process has open (one event loop: no lock needed)."""

    def __init__(self) -> None:
        self.open = 0


_slots = _Slots()


def _stream_id(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    if not STREAM_ID.match(raw.strip()):
        raise HTTPException(422, {"error": "Last-Event-ID must be a stream id (MS-SEQ, digits)"})
    return raw.strip()


def _parse(sid: str) -> tuple[int, int]:
    ms, _, seq = sid.partition("-")
    return int(ms), int(seq or 0)


async def _open(cache: Any, key: str, resume: str | None) -> tuple[aioredis.Redis, str, bytes]:
    """A connection for this client, the id to read after, and a gap notice (b"" when none)."""
    if _slots.open >= MAX_CLIENTS:
        raise HTTPException(
            503,
            {"error": f"too many event streams open ({MAX_CLIENTS}); try again later"},
            headers={"Retry-After": "5"},
        )
    client = aioredis.Redis.from_url(
        cache.url, socket_connect_timeout=2.0, socket_timeout=BLOCK_MS / 1000 + 5.0, client_name=CLIENT_NAME
    )
    try:
        if resume is None:
            newest: Any = await client.xrevrange(key, count=1)  # [(id, fields)]: bytes (no decoding)
            return client, newest[0][0].decode() if newest else "0-0", b""
        oldest: Any = await client.xrange(key, count=1)
    except (redis.RedisError, OSError) as exc:
        await client.aclose()
        raise unavailable(exc) from None
    gap = b""
    if oldest and resume not in ("0", "0-0") and _parse(resume) < _parse(oldest[0][0].decode()):
        gap = b'event: gap\ndata: {"after":"%s","oldest":"%s"}\n\n' % (resume.encode(), oldest[0][0])
    return client, resume, gap


async def _events(request: Request, client: aioredis.Redis, key: str, after: str, first: bytes) -> AsyncIterator[bytes]:
    yield b"retry: 1000\n\n" + first
    beat = time.monotonic()
    while not await request.is_disconnected():
        try:
            got: Any = await client.xread({key: after}, count=COUNT, block=BLOCK_MS)  # [(key, [(id, fields)])]
        except (redis.RedisError, OSError) as exc:
            log.warning("event stream ended: the result store stopped answering (%s)", type(exc).__name__)
            yield b": the result store stopped answering; reconnect with Last-Event-ID\n\n"
            return
        chunks = []
        for _, entries in got:
            for sid, fields in entries:
                chunks.append(b"id: %s\nevent: result\ndata: %s\n\n" % (sid, fields[b"data"]))
                after = sid.decode()
        if chunks:
            yield b"".join(chunks)
            beat = time.monotonic()
        elif time.monotonic() - beat >= HEARTBEAT_S:
            yield b": heartbeat\n\n"
            beat = time.monotonic()


class EventStream(StreamingResponse):
    """One client's event stream: holds a slot and its Redis connection from its creation until it
    ends however it ends (done, client gone and the stream cancelled, error)."""

    def __init__(self, request: Request, client: aioredis.Redis, key: str, after: str, first: bytes) -> None:
        _slots.open += 1
        self._redis = client
        super().__init__(
            _events(request, client, key, after, first), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _slots.open -= 1
            with anyio.CancelScope(shield=True):  # closed even when the stream was cancelled
                await self._redis.aclose()


async def _respond(request: Request, daemon: Any, camera: str | None, last_event_id: str | None) -> EventStream:
    """``camera``'s stream, or every camera's when None."""
    resume = _stream_id(last_event_id)
    cache = daemon.cache
    if cache is None:
        raise unavailable("no result store")
    keys: Keys = cache.keys
    key = keys.events if camera is None else keys.stream(camera)
    client, after, gap = await _open(cache, key, resume)
    return EventStream(request, client, key, after, gap)


@events_router.get(
    "/api/v1/cameras/{camera_id}/events",
    response_class=StreamingResponse,
    responses={**_SSE_200, **error_responses(404, 422, 503)},
)
async def camera_events(
    request: Request, daemon: DaemonDep, camera_id: str, last_event_id: str | None = _LAST_EVENT_ID
) -> StreamingResponse:
    """The camera's results as server-sent events, from ``Last-Event-ID`` on (else from now)."""
    camera_or_404(daemon, camera_id)
    return await _respond(request, daemon, camera_id, last_event_id)


@events_router.get(
    "/api/v1/events", response_class=StreamingResponse, responses={**_SSE_200, **error_responses(422, 503)}
)
async def all_events(
    request: Request, daemon: DaemonDep, last_event_id: str | None = _LAST_EVENT_ID
) -> StreamingResponse:
    """Every camera's results as server-sent events, in the order they were stored."""
    return await _respond(request, daemon, None, last_event_id)
