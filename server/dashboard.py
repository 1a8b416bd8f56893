"""The operator's dashboard at ``/``: one HTML page, its script and its style sheet.

Plain files shipped as package data (``server/dashboard-ui/``): no build step, nothing fetched from
a CDN, so it works on a site with no way out. The page reads the same JSON API any client reads
(cameras, results, schedule, models, links; the result event stream when the daemon has one) and
posts the operator's reload with the token typed into it; the server keeps nothing for it. Left
out of the OpenAPI document: it is a page for people, not part of the API.

Read once at import into memory (three small files), so serving them never touches the disk.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

__all__ = ["FILES", "dashboard_router"]

# path served -> (file in server/dashboard-ui/, media type)
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/dashboard/style.css": ("style.css", "text/css; charset=utf-8"),
}
# The page runs only its own script and style and talks only to this origin.
_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'"

dashboard_router = APIRouter(include_in_schema=False)


def _read(name: str) -> bytes:
    return (resources.files("mlink.server") / "dashboard-ui" / name).read_bytes()


def _route(path: str, name: str, media_type: str) -> None:
    body = _read(name)
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff"}

    def serve() -> Response:
        return Response(body, media_type=media_type, headers=headers)

    serve.__name__ = f"dashboard_{name.replace('.', '_')}"
    dashboard_router.add_api_route(path, serve, methods=["GET"], response_class=Response)


for _path, (_name, _media) in FILES.items():
    _route(_path, _name, _media)
