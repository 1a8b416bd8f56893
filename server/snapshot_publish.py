"""The daemon's published state, written to Redis for the API's reader processes.

The reader processes (:mod:`mlink.server.reader_app`) answer the read routes without touching
the daemon's interpreter, so what those routes need leaves the process through Redis
(key names in :mod:`mlink.server.cache_layout`):

- every installed :class:`~mlink.server.snapshot.Snapshot` as its JSON views (cameras, models,
  plan, plan history, pool, link matrix, measured accuracy) in one hash, written in one
  MULTI/EXEC with a PUBLISH of its version, so a reader reads one whole snapshot and learns of the next without polling;
- the daemon's state and every camera's status, every ``interval_s``.

Cheap on the pipeline thread: the snapshot listener only wakes this publisher's thread (no I/O,
no encoding there). A view is encoded again only when its object changed (a refresh replaces the
pool figures; the link matrix and the plan are carried over until a new plan), as FastAPI would
encode it (``jsonable_encoder``), so a reader's answer is the daemon's. A Redis outage is logged
once; the next write after it rewrites everything.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

import redis
from fastapi.encoders import jsonable_encoder

from mlink.server.cache_layout import Keys, connect

if TYPE_CHECKING:
    from mlink.server.daemon import Daemon
    from mlink.server.snapshot import Snapshot

log = logging.getLogger("mlink.publish")


def _dumps(value: Any) -> str:
    return json.dumps(jsonable_encoder(value), ensure_ascii=False, separators=(",", ":"))


class SnapshotPublisher:
    """Copies ``daemon``'s snapshot and status to Redis on its own thread; see the module docstring."""

    def __init__(self, daemon: Daemon, url: str, prefix: str, *, interval_s: float = 0.5) -> None:
        self.daemon = daemon
        self.keys = Keys(prefix)
        self.interval_s = interval_s
        self._client = connect(url)
        self._encoded: dict[str, tuple[object, str]] = {}  # view -> (the object encoded, its JSON)
        self._written = -1  # the snapshot version Redis holds (-1: unknown, write it)
        self._down = False
        self.writes = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlink-publish", daemon=True)

    def start(self) -> SnapshotPublisher:
        """Register as the daemon's snapshot listener and start writing."""
        self.daemon.snapshot_listeners.append(self.on_snapshot)
        self._thread.start()
        return self

    def on_snapshot(self, _snap: Snapshot) -> None:
        """The daemon's listener (pipeline thread): only wakes the publisher."""
        self._wake.set()

    def _encode(self, name: str, value: object) -> str:
        held = self._encoded.get(name)
        if held is not None and held[0] is value:
            return held[1]
        text = _dumps(value)
        self._encoded[name] = (value, text)
        return text

    def views(self, snap: Snapshot) -> dict[str, str]:
        """The snapshot's fields as the reader reads them (JSON text each)."""
        return {
            "version": str(snap.version),
            "published_at": repr(snap.published_at),
            "reason": snap.reason,
            "plan_id": json.dumps(snap.plan_id),
            "period": str(snap.period),
            "cameras": self._encode("cameras", snap.cameras),
            "models": self._encode("models", snap.models),
            "plan_json": self._encode("plan_json", snap.plan_json),
            "pool": self._encode("pool", snap.pool),
            "links_matrix": self._encode("links_matrix", snap.links.matrix),
            "history": self._encode("history", snap.history),
            "measured": self._encode("measured", snap.measured),
        }

    def status(self) -> dict[str, Any]:
        ingest = self.daemon.ingest
        cams = {c: s.to_dict() for c, s in ingest.status().items()} if ingest is not None else {}
        return {"state": self.daemon.state, "cameras": cams}

    def write(self) -> None:
        """One MULTI/EXEC: the snapshot (when its version is new to Redis) and the status."""
        snap = self.daemon.snapshot
        pipe = self._client.pipeline(transaction=True)
        if snap.version != self._written:
            pipe.hset(self.keys.snapshot, mapping=self.views(snap))  # type: ignore[arg-type]
            pipe.publish(self.keys.snapshot, str(snap.version))
        pipe.set(self.keys.status, _dumps(self.status()))
        pipe.execute()
        self._written = snap.version
        self.writes += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.write()
                if self._down:
                    log.info("snapshot publishing to Redis resumed")
                self._down = False
            except redis.RedisError as exc:
                if not self._down:
                    log.warning("cannot publish the snapshot to Redis (%s); the readers forward to the daemon", exc)
                self._down = True
                self._written = -1
            except Exception:
                log.exception("snapshot publishing failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def close(self) -> None:
        if self.on_snapshot in self.daemon.snapshot_listeners:
            self.daemon.snapshot_listeners.remove(self.on_snapshot)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._client.close()
