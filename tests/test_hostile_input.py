"""Hostile input at the API's edge (issue 14 items 4-7, 11): every answer a 4xx, nothing secret out.

The app is the real one (``create_app``) over a real, unstarted daemon whose config file plants
three secrets: an environment variable (the API token), a camera password holding ``/`` and
``@``, and a query token in the camera URL. The result store is a real ``ResultCache`` on a unix
socket nobody listens on (Redis down), whose path must not reach a client either. Each hostile
request of the issue is sent; every response body and every log line captured is grepped for the
secrets. Cheap: no models load, no camera opens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from fastapi.testclient import TestClient
from waiting import wait_for  # tests/waiting.py

from mlink.configs.load import load_config
from mlink.models.assets import AssetStore
from mlink.models.catalog import zoo_catalog
from mlink.server.access_log import ACCESS_LOGGER
from mlink.server.api import create_app
from mlink.server.cache import ResultCache
from mlink.server.daemon import Daemon

ENV_SECRET = "envS3cretT0ken"  # the API token, planted as an environment variable
PASSWORD = "pa/ss@w0rd"  # a camera password with "/" and "@", not percent-encoded
QUERY_TOKEN = "qT0kenXYZ"
SOCKET_DIR = "redis-hidden-dir"
SECRETS = (ENV_SECRET, PASSWORD, "w0rd", QUERY_TOKEN)  # in no response and no log line
INTERNAL = (SOCKET_DIR, "redis.sock")  # in no response (the operator's log may name them)
CAMERA_URL = f"rtsp://admin:{PASSWORD}@127.0.0.1:1/live?token={QUERY_TOKEN}"


def site(**extra: Any) -> dict[str, Any]:
    return {
        "site": "hostile",
        "budget": "0.8x",
        "models": [{"name": "hog_people"}],
        "streams": [{"id": "cam", "url": CAMERA_URL, "fps": 1}],
        **extra,
    }


def body(**extra: Any) -> str:
    return yaml.safe_dump(site(**extra))


def bomb(levels: int = 9) -> str:
    lines = ["site: hostile", 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def app_client(
    tmp_path: Path, store: AssetStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Iterator[tuple[TestClient, Daemon]]:
    monkeypatch.setenv("MLINK_HOSTILE_TOKEN", ENV_SECRET)
    config_path = tmp_path / "site.yaml"
    config_path.write_text(body(api={"token": "${MLINK_HOSTILE_TOKEN}"}))
    cfg = load_config(config_path, catalog=zoo_catalog())
    daemon = Daemon(cfg, config_path, AssetStore(home=tmp_path, mirror=store.mirror, offline=True), progress=False)
    (tmp_path / SOCKET_DIR).mkdir()
    daemon.cache = ResultCache(f"unix://{tmp_path / SOCKET_DIR / 'redis.sock'}", socket_timeout=0.2)
    caplog.set_level(logging.DEBUG)
    try:
        with TestClient(create_app(daemon), raise_server_exceptions=False) as client:
            yield client, daemon
    finally:
        daemon.cache.close(flush_timeout=0)


def auth(token: str = ENV_SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def hostile_requests() -> list[tuple[str, str, dict[str, Any], int]]:
    """(what, path, request kwargs, the 4xx expected) for each input of issue 14."""
    reload = "/api/v1/config/reload"
    results = "/api/v1/cameras/cam/results"
    return [
        ("since=nan", results, {"params": {"since": "nan"}}, 422),
        ("until=-inf", results, {"params": {"until": "-inf"}}, 422),
        ("since after until", results, {"params": {"since": 5, "until": 1}}, 400),
        ("unknown camera", "/api/v1/cameras/nope", {}, 404),
        ("non-ASCII bearer", reload, {"headers": {"Authorization": "Bearer é".encode()}, "content": body()}, 401),
        ("no token", reload, {"content": body()}, 401),
        ("${VAR} in a body", reload, {"headers": auth(), "content": body(site="${MLINK_HOSTILE_TOKEN}")}, 400),
        ("10 MB body", reload, {"headers": auth(), "content": "site: x\nl: [" + "1," * 5_000_000 + "1]\n"}, 413),
        ("60k-item list", reload, {"headers": auth(), "content": "site: x\nl: [" + "1," * 60_000 + "1]\n"}, 400),
        ("alias bomb", reload, {"headers": auth(), "content": bomb()}, 400),
        ("deep nesting", reload, {"headers": auth(), "content": "site: " + "[" * 200 + "]" * 200}, 400),
        ("not UTF-8", reload, {"headers": auth(), "content": b"site: \xff\xfe"}, 400),
        ("budget nanx", reload, {"headers": auth(), "content": body(budget="nanx")}, 400),
        ("budget inf", reload, {"headers": auth(), "content": body(budget="inf")}, 400),
        ("asset://../..", reload, {"headers": auth(), "content": stream_body("asset://../../etc/passwd")}, 400),
        ("concat: scheme", reload, {"headers": auth(), "content": stream_body("concat:/etc/passwd|x.mp4")}, 400),
        ("file outside", reload, {"headers": auth(), "content": stream_body("file:///etc/shadow")}, 400),
        ("path outside", reload, {"headers": auth(), "content": stream_body("../../../../etc/passwd")}, 400),
        (
            "widened allowed_dirs",
            reload,
            {"headers": auth(), "content": body(ingest={"allowed_dirs": ["/"]})},
            400,
        ),
        ("1000TiB before serving", reload, {"headers": auth(), "content": body(budget="1000TiB")}, 409),
    ]


def stream_body(url: str) -> str:
    return yaml.safe_dump({**site(), "streams": [{"id": "cam", "url": url}]})


def test_every_hostile_input_gets_a_4xx_and_no_secret(
    app_client: tuple[TestClient, Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    client, daemon = app_client
    seen: list[str] = []
    for what, path, kwargs, expected in hostile_requests():
        method = "GET" if "content" not in kwargs else "POST"
        t0 = time.monotonic()
        r = client.request(method, path, **kwargs)
        took = time.monotonic() - t0
        assert r.status_code == expected, (what, r.status_code, r.text[:500])
        assert "error" in r.json(), what
        assert took < 30, f"{what} took {took:.1f} s"  # a bound on work, not a speed target
        seen.append(r.text)
    assert daemon.cfg.streams[0].url == CAMERA_URL  # nothing was applied
    # Redis down: a 503 that names neither the socket path nor its folder
    for path in ("/api/v1/cameras/cam/results/latest", "/api/v1/cameras/cam/results"):
        r = client.get(path)
        assert r.status_code == 503 and "unreachable" in r.json()["error"], r.text
        seen.append(r.text)
    seen += [client.get(p).text for p in ("/api/v1/cameras", "/api/v1/cameras/cam", "/healthz", "/openapi.json")]
    logged = "\n".join(f"{rec.getMessage()} {rec.exc_text or ''}" for rec in caplog.records)
    for secret in SECRETS:
        assert not [t for t in seen if secret in t], f"{secret!r} in a response"
        assert secret not in logged, f"{secret!r} in the log"
    for internal in INTERNAL:
        assert not [t for t in seen if internal in t], f"{internal!r} in a response"


def test_a_file_outside_the_allowed_folders_is_refused_the_same_whether_it_exists(
    app_client: tuple[TestClient, Daemon], tmp_path: Path
) -> None:
    client, _ = app_client
    outside = tmp_path.parent / "outside-allowed"
    outside.mkdir(exist_ok=True)
    (outside / "real.mp4").write_bytes(b"\0" * 16)
    inside = tmp_path / "inside.mp4"  # in the config's folder: allowed (a missing file is the camera's error)
    answers = [
        client.post("/api/v1/config/reload", headers=auth(), content=stream_body(url))
        for url in (str(outside / "real.mp4"), str(outside / "missing.mp4"), f"file://{outside}/real.mp4")
    ]
    assert [a.status_code for a in answers] == [400, 400, 400]
    assert answers[0].json() == answers[1].json() == answers[2].json()
    assert "allowed folders" in answers[0].json()["errors"][0]["message"]
    valid = yaml.safe_dump({**site(budget="0.7x"), "streams": [{"id": "cam", "url": str(inside)}]})
    ok = client.post("/api/v1/config/reload", headers=auth(), content=valid)
    assert ok.status_code == 409 and "try again" in ok.json()["error"], ok.text  # valid; not serving yet


def test_every_status_code_a_route_returns_is_in_the_openapi_document(app_client: tuple[TestClient, Daemon]) -> None:
    client, _ = app_client
    paths = client.get("/openapi.json").json()["paths"]
    declared = {(p, m): set(op["responses"]) for p, ops in paths.items() for m, op in ops.items()}
    expected = {
        ("/api/v1/config/reload", "post"): {"200", "400", "401", "403", "409", "413"},
        ("/api/v1/cameras/{camera_id}/results", "get"): {"200", "400", "404", "422", "503"},
        ("/api/v1/cameras/{camera_id}/results/latest", "get"): {"200", "404", "422", "503"},
        ("/api/v1/cameras/{camera_id}", "get"): {"200", "404", "422"},
        ("/api/v1/schedule", "get"): {"200", "503"},
        ("/api/v1/links", "get"): {"200", "503"},
        ("/api/v1/cameras/{camera_id}/snapshot.jpg", "get"): {"200", "404", "422"},
        ("/api/v1/cameras/{camera_id}/events", "get"): {"200", "404", "422", "503"},
        ("/api/v1/events", "get"): {"200", "422", "503"},
        ("/readyz", "get"): {"200", "503"},
    }
    for route, codes in expected.items():
        assert codes <= declared[route], (route, declared[route])


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_the_access_log_has_no_query_strings(tmp_path: Path, store: AssetStore) -> None:
    """uvicorn's own access log, configured as ``mlink serve`` configures it (after ``create_app``,
    which installs the filter)."""
    cfg = load_config(_write(tmp_path), catalog=zoo_catalog())
    daemon = Daemon(cfg, tmp_path / "site.yaml", AssetStore(home=tmp_path, mirror=store.mirror), progress=False)
    server = uvicorn.Server(uvicorn.Config(create_app(daemon), host="127.0.0.1", port=0, log_level="info"))
    lines = _Lines()
    logging.getLogger(ACCESS_LOGGER).addHandler(lines)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "the HTTP server", every=0.1)
        port = server.servers[0].sockets[0].getsockname()[1]
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/cameras?token={QUERY_TOKEN}&x=1", timeout=10)
        assert r.status_code == 200
        wait_for(lambda: lines.lines, 10, "the access log line", every=0.05)
    finally:
        server.should_exit = True
        thread.join(10)
        logging.getLogger(ACCESS_LOGGER).removeHandler(lines)
    assert any("GET /api/v1/cameras " in line for line in lines.lines), lines.lines
    assert not [line for line in lines.lines if QUERY_TOKEN in line or "?" in line]


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(body())
    return path


def test_the_camera_reader_resolves_only_asset_names_and_file_urls(store: AssetStore) -> None:
    """Behind the config's check, :func:`resolve_url` refuses an asset path on its own."""
    from mlink.server.frames import FrameSourceError, resolve_url

    with pytest.raises(FrameSourceError, match="not an asset name"):
        resolve_url("asset://../../etc/passwd", store)
    assert resolve_url("file:///srv/videos/a%20b.mp4") == "/srv/videos/a b.mp4"
    assert resolve_url("asset://vtest", store).endswith(".avi")
