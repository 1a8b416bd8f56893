"""A real daemon for a test module: its site written to a file, its own home, optionally its HTTP API.

Every daemon test starts one the same way (config file under a fresh home, the session's asset
mirror, offline, no progress bars), waits for it to serve, and stops everything afterwards even
when the test failed; this is that one way.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
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

from mlink.configs.load import load_config, parse_config
from mlink.models.assets import AssetStore
from mlink.models.catalog import zoo_catalog
from mlink.server.cache import open_cache
from mlink.server.daemon import Daemon
from mlink.server.readers import ReaderPool


@dataclass
class Running:
    daemon: Daemon
    config_path: Path
    client: httpx.Client | None = None  # the HTTP API on an ephemeral loopback port, when asked for


@functools.cache
def _session_costs() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="mlink-test-costs-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def share_costs(home: Path) -> None:
    """Let ``home``'s daemon reuse the models' isolated memory costs that earlier daemons of this
    test session measured (``<home>/costs``, keyed by model, params, device, library versions
    and threads), as a restart on the same machine does. Each measurement spawns a child that
    imports torch and loads the model: measured once per session instead of once per module.
    The tests of the measurement itself (test_memory_isolation, test_faults_lifecycle) do not
    use this."""
    link = home / "costs"
    if not link.exists():
        link.symlink_to(_session_costs(), target_is_directory=True)


@contextmanager
def running_daemon(
    site: dict[str, Any], home: Path, store: AssetStore, *, http: bool = False, ready_s: float = 600.0
) -> Iterator[Running]:
    config_path = home / "site.yaml"
    config_path.write_text(yaml.safe_dump(site))
    share_costs(home)
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


@contextmanager
def app_behind_readers(daemon: Daemon, log_level: str = "warning") -> Iterator[ReaderPool]:
    """``daemon``'s app on the upstream socket of one reader process that listens on an ephemeral
    loopback port (``ReaderPool.port``), as ``mlink serve`` wires them."""
    from mlink.server.api import create_app

    readers = ReaderPool(daemon, 1, "127.0.0.1", 0, log_level=log_level).start()
    server = uvicorn.Server(
        uvicorn.Config(create_app(daemon, readers=readers), uds=readers.upstream, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "the daemon's app")
        yield readers
    finally:
        server.should_exit = True
        thread.join(10)
        readers.close()


@contextmanager
def behind_readers(
    site: dict[str, Any], home: Path, store: AssetStore, log_level: str = "warning"
) -> Iterator[tuple[Daemon, ReaderPool]]:
    """A daemon that is not started (no pipeline, no plan): its cache on a real embedded Redis,
    and its app behind a reader process (:func:`app_behind_readers`). For tests of what the
    readers answer and forward; results are put into ``daemon.cache`` by the test. Redis's
    prefix: ``mlink:SITE``."""
    cfg = parse_config(yaml.safe_dump(site), catalog=zoo_catalog())
    daemon = Daemon(cfg, None, store, progress=False)
    daemon.cache, daemon._redis = open_cache(cfg.cache, prefix=f"mlink:{cfg.site}", home=home)
    try:
        with app_behind_readers(daemon, log_level) as readers:
            yield daemon, readers
    finally:
        daemon.stop()
