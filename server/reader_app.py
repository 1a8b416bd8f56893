"""A reader process: answers the API's read routes on the public port, outside the daemon's process.

Started by :class:`mlink.server.readers.ReaderPool` (``python -m mlink.server.reader_app``) on the
listening socket the daemon bound, which every reader accepts from. Per request:

- ``GET /api/v1/cameras/{id}/results/latest``, the hot route: answered by a plain ASGI handler
  from the bytes :class:`~mlink.server.reader_state.ReaderState` holds (no Redis round trip, no
  FastAPI, no thread hop), with the daemon's status codes and JSON;
- the other read routes (cameras, results history, models, schedule, links): the same FastAPI
  routes as the daemon's (:mod:`mlink.server.api_read`), over the published snapshot and Redis;
- the event streams (``/api/v1/events``, ``/api/v1/cameras/{id}/events``): the daemon's routes
  (:mod:`mlink.server.api_events`), each reading the Redis streams on its own connection, so a
  long-lived client holds nothing of the daemon's;
- everything else (health, /metrics, reload, the docs, unknown paths, other methods), and every
  request while the reader has no current copy (Redis down, nothing published yet): forwarded
  to the daemon's own app on its private unix socket, headers (the bearer token) and body as
  they came. So paths, JSON, auth, status codes and redaction are the daemon's.

Its settings come in ``$MLINK_READER`` (JSON), not on the command line, which other users of the
machine can read (a Redis URL may hold a password).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
from collections.abc import MutableMapping
from typing import Any

import httpx
from fastapi import FastAPI

from mlink.configs.load import MAX_CONFIG_BYTES
from mlink.server.access_log import quiet_http_clients
from mlink.server.api_events import events_router
from mlink.server.api_read import READ_ROUTERS, add_error_handlers, too_large
from mlink.server.cache import ResultCache
from mlink.server.cache_layout import json_body
from mlink.server.freshness import latest_body
from mlink.server.http_metrics import time_reader
from mlink.server.reader_state import ReaderState, ReaderView

log = logging.getLogger("mlink.reader")

ENV = "MLINK_READER"
LATEST = re.compile(r"^/api/v1/cameras/([^/]+)/results/latest$")
READ = re.compile(r"^/api/v1/(?:cameras(?:/[^/]+(?:/results(?:/latest)?)?)?|models|schedule|links)$")
EVENTS = re.compile(r"^/api/v1/(?:cameras/[^/]+/)?events$")  # answered here too (server/api_events.py)
HOP = {
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
    b"proxy-authorization",
    b"proxy-authenticate",
    b"content-length",
}
DROP_RESPONSE = HOP - {b"content-length"} | {b"date", b"server"}  # the reader's server sets these
JSON = [(b"content-type", b"application/json")]
SERVED_BY = (b"x-mlink-served-by", b"reader")  # on what a reader answered itself (not on forwarded answers)
Scope = dict[str, Any]


def _json(status: int, body: dict[str, Any]) -> tuple[int, bytes]:
    return status, json_body(body)


def read_app(view: ReaderView) -> FastAPI:
    """The read routes over ``view`` (no docs here: /docs and /openapi.json are the daemon's)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.daemon = view
    add_error_handlers(app)
    for router in READ_ROUTERS:
        app.include_router(router)
    app.include_router(events_router)
    return app


class ReaderApp:
    """The ASGI app of a reader process; see the module docstring."""

    def __init__(self, state: ReaderState, reads: FastAPI, upstream: str) -> None:
        self.state = state
        self.reads = reads
        self.upstream = upstream
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=upstream),
            base_url="http://mlink-daemon",
            timeout=httpx.Timeout(660.0, connect=5.0),  # a reload may take minutes
        )

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        snap = self.state.snapshot
        if (
            snap is not None
            and self.state.live
            and scope["method"] in ("GET", "HEAD")
            and (READ.match(scope["path"]) or EVENTS.match(scope["path"]))
        ):
            m = LATEST.match(scope["path"])
            if m is not None and scope["method"] == "GET":
                await self._latest(m.group(1), snap, send)
            else:

                async def tagged(msg: MutableMapping[str, Any]) -> None:
                    if msg["type"] == "http.response.start":
                        msg["headers"] = [*msg.get("headers", ()), SERVED_BY]
                    await send(msg)

                await self.reads(scope, receive, tagged)
            return
        await self.forward(scope, receive, send)

    async def _latest(self, camera: str, snap: Any, send: Any) -> None:
        if camera not in snap.camera_set:
            status, body = _json(404, {"error": f"no camera {camera!r}", "cameras": list(snap.cameras)})
        else:
            held = self.state.latest.get(camera)
            if held is None:
                status, body = _json(404, {"error": f"no result for camera {camera!r} yet"})
            else:
                status, body = 200, latest_body(*held, time.time(), self.state.camera_status(camera))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*JSON, (b"content-length", b"%d" % len(body)), SERVED_BY],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def forward(self, scope: Scope, receive: Any, send: Any) -> None:
        """Send the request to the daemon's app and its answer back, as they are."""
        body = bytearray()
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if len(body) > MAX_CONFIG_BYTES:  # the daemon refuses it too: do not hold more of it here
                status, data = _json(413, too_large(MAX_CONFIG_BYTES))
                headers = [*JSON, (b"content-length", b"%d" % len(data)), (b"connection", b"close"), SERVED_BY]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": data})
                return
            if not msg.get("more_body"):
                break
        target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP]
        request = self.client.build_request(scope["method"], target, headers=headers, content=bytes(body))
        response = None
        for _ in range(50):  # the daemon's app may still be starting: up to 5 s
            try:
                response = await self.client.send(request, stream=True)
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.1)
            except httpx.HTTPError as exc:
                log.warning("forwarding %s %s failed: %s", scope["method"], scope["path"], type(exc).__name__)
                break
        if response is None:
            status, data = _json(502, {"error": "the daemon's API did not answer"})
            await send({"type": "http.response.start", "status": status, "headers": JSON})
            await send({"type": "http.response.body", "body": data})
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in DROP_RESPONSE],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


def main() -> None:
    import uvicorn

    cfg = json.loads(os.environ.pop(ENV))
    logging.basicConfig(
        level=cfg.get("log_level", "warning").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    quiet_http_clients()  # the forwarding client would log query strings (tokens) at INFO
    sock = socket.socket(fileno=int(cfg["fd"]))
    state = ReaderState(cfg["redis_url"], cfg["prefix"]).start()
    cache = ResultCache(cfg["redis_url"], prefix=cfg["prefix"])
    app = ReaderApp(state, read_app(ReaderView(state, cache)), cfg["upstream"])
    server = uvicorn.Server(
        uvicorn.Config(
            time_reader(app, SERVED_BY, LATEST),  # its own answers' latency, read by the daemon's /metrics
            lifespan="off",
            log_level=cfg.get("log_level", "warning"),
            access_log=False,
        )
    )
    try:
        server.run(sockets=[sock])
    finally:
        state.close()
        cache.close(flush_timeout=0)


if __name__ == "__main__":
    main()
