"""A real daemon for a test module: its site written to a file, its own home, optionally its HTTP API.

Every daemon test starts one the same way (config file under a fresh home, the session's asset
mirror, offline, no progress bars), waits for it to serve, and stops everything afterwards even
when the test failed; this is that one way.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from waiting import wait_for  # tests/waiting.py

from mlink.configs.load import load_config
from mlink.models.assets import AssetStore
from mlink.models.catalog import zoo_catalog
from mlink.server.daemon import Daemon


@dataclass
class Running:
    daemon: Daemon
    config_path: Path
    client: httpx.Client | None = None  # the HTTP API on an ephemeral loopback port, when asked for


@contextmanager
def running_daemon(
    site: dict[str, Any], home: Path, store: AssetStore, *, http: bool = False, ready_s: float = 600.0
) -> Iterator[Running]:
    config_path = home / "site.yaml"
    config_path.write_text(yaml.safe_dump(site))
    daemon = Daemon(
        load_config(config_path, catalog=zoo_catalog()),
        config_path,
        AssetStore(home=home, mirror=store.mirror, offline=True),
        progress=False,
    )
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    client: httpx.Client | None = None
    daemon.start()
    try:
        if http:
            from mlink.server.api import create_app

            server = uvicorn.Server(uvicorn.Config(create_app(daemon), host="127.0.0.1", port=0, log_level="warning"))
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            srv = server
            wait_for(lambda: srv.started, 30, "the HTTP server", every=0.1)
            port = server.servers[0].sockets[0].getsockname()[1]
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        assert daemon.wait_ready(ready_s), f"daemon did not become ready: {daemon.state} {daemon.error}"
        yield Running(daemon, config_path, client)
    finally:
        if client is not None:
            client.close()
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(10)
        daemon.stop()
