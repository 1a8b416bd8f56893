"""What a reader process knows, kept current from Redis: the daemon's published snapshot and the
response body of every camera's latest result.

One thread subscribes to the cache's channels (:mod:`mlink.server.cache_layout`): a ``latest``
message carries the envelope just SET as a camera's latest, in the same MULTI/EXEC, so applying
the messages in order keeps the copy equal to Redis's with no round trip per request; a
``snapshot`` message announces a new version of the snapshot hash, which is then read whole
(HGETALL is atomic: one snapshot, never two mixed). After (re)subscribing, everything is read
again, so nothing published while the subscription was down is missed. While the subscription
is down, :attr:`ReaderState.live` is False and the reader forwards every request to the daemon,
which answers from its outage buffer, as it would without readers.

:class:`ReaderView` is what the read routes of :mod:`mlink.server.api_read` take for a daemon.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from mlink.server.backoff import Backoff
from mlink.server.cache import ResultCache
from mlink.server.cache_layout import Keys, connect, decode, response_body

log = logging.getLogger("mlink.reader")


@dataclass(frozen=True)
class Links:
    matrix: dict[str, Any] | None


@dataclass(frozen=True)
class PublishedSnapshot:
    """The fields of :class:`~mlink.server.snapshot.Snapshot` the read routes use, as published."""

    version: int
    published_at: float
    reason: str
    plan_id: int | None
    period: int
    cameras: tuple[str, ...]
    models: tuple[dict[str, Any], ...]
    plan_json: dict[str, Any] | None
    pool: dict[str, Any] | None
    links: Links
    history: tuple[dict[str, Any], ...] = ()
    measured: dict[str, Any] | None = None
    camera_set: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_hash(cls, h: dict[bytes, bytes]) -> PublishedSnapshot:
        f = {k.decode(): v for k, v in h.items()}
        cameras = tuple(json.loads(f["cameras"]))
        return cls(
            version=int(f["version"]),
            published_at=float(f["published_at"]),
            reason=f["reason"].decode(),
            plan_id=json.loads(f["plan_id"]),
            period=int(f["period"]),
            cameras=cameras,
            models=tuple(json.loads(f["models"])),
            plan_json=json.loads(f["plan_json"]),
            pool=json.loads(f["pool"]),
            links=Links(json.loads(f["links_matrix"])),
            history=tuple(json.loads(f.get("history", b"[]"))),
            measured=json.loads(f.get("measured", b"null")),
            camera_set=frozenset(cameras),
        )


class ReaderState:
    """The snapshot and the latest bodies of one reader process; see the module docstring."""

    def __init__(self, url: str, prefix: str) -> None:
        self.keys = Keys(prefix)
        self._client = connect(url)
        self.snapshot: PublishedSnapshot | None = None
        self.latest: dict[str, tuple[bytes, float]] = {}  # camera -> (its latest record's body, its ts)
        self.live = False  # subscribed and loaded: snapshot and latest are current
        self._status: dict[str, Any] = {}
        self._status_at = -1e9
        self._backoff = Backoff(0.05, 2.0, jitter=0.25)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlink-reader-sub", daemon=True)

    def start(self) -> ReaderState:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._client.close()

    def published_status(self) -> dict[str, Any]:
        """The daemon's state and camera statuses as it last published them (one GET)."""
        raw = self._client.get(self.keys.status)
        return json.loads(raw) if raw else {}

    def camera_status(self, camera: str, max_age_s: float = 1.0) -> dict[str, Any] | None:
        """``camera``'s published status, re-read at most every ``max_age_s`` (the hot route
        asks on every request; the daemon publishes it about once a second anyway)."""
        now = time.monotonic()
        if now - self._status_at > max_age_s:
            try:
                self._status = self.published_status()
            except redis.RedisError:
                self._status = {}  # unknown: the result shows stale
            self._status_at = now
        cameras = self._status.get("cameras", {})
        return cameras.get(camera) if isinstance(cameras, dict) else None

    # -- loading -----------------------------------------------------------------------------
    def _load_snapshot(self) -> None:
        h = self._client.hgetall(self.keys.snapshot)
        if not h:
            return
        snap = PublishedSnapshot.from_hash(h)  # type: ignore[arg-type]
        current = self.snapshot
        if current is None or snap.version >= current.version or snap.published_at > current.published_at:
            self.snapshot = snap  # one assignment: a request sees the old one or the new one

    def _load_latest(self) -> None:
        cams = sorted(c.decode() for c in self._client.smembers(self.keys.cameras))  # type: ignore[union-attr]
        if not cams:
            return
        for cam, raw in zip(cams, self._client.mget([self.keys.latest(c) for c in cams])):
            if raw is not None:
                rec = decode(cam, raw)
                self.latest[cam] = (response_body(rec), rec.ts)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if channel == self._latest_channel:
            cam, _, member = data.partition(b" ")
            camera = cam.decode()
            rec = decode(camera, member)
            self.latest[camera] = (response_body(rec), rec.ts)
        else:
            self._load_snapshot()

    # -- the subscription ----------------------------------------------------------------------
    def _run(self) -> None:
        self._latest_channel = self.keys.latest_channel.encode()
        while not self._stop.is_set():
            pubsub = self._client.pubsub()
            try:
                self._subscribe(pubsub)
                self._load_snapshot()
                self._load_latest()
                self.live = self.snapshot is not None
                self._backoff.reset()
                self._listen(pubsub)
            except (redis.RedisError, OSError) as exc:
                if self.live:
                    log.warning("reader lost Redis (%s): forwarding to the daemon until it is back", exc)
                self.live = False
                self._stop.wait(self._backoff.next())
            except Exception:
                log.exception("reader subscription failed")
                self.live = False
                self._stop.wait(self._backoff.next())
            finally:
                pubsub.close()

    def _subscribe(self, pubsub: Any) -> None:
        """Subscribe, and return once Redis confirmed both channels: what is published after that
        reaches this reader, so loading the keys next misses nothing."""
        pubsub.subscribe(self.keys.latest_channel, self.keys.snapshot)
        confirmed = 0
        for _ in range(20):  # 10 s
            msg = pubsub.get_message(timeout=0.5)
            if msg is None:
                continue
            if msg["type"] == "subscribe":
                confirmed += 1
                if confirmed == 2:
                    return
            elif msg["type"] == "message":
                self._on_message(msg["channel"], msg["data"])
        raise redis.TimeoutError("Redis did not confirm the reader's subscription within 10 s")

    def _listen(self, pubsub: Any) -> None:
        while not self._stop.is_set():
            msg = pubsub.get_message(timeout=0.5)
            if msg is None:
                if self.snapshot is None:  # published nothing yet: the publisher writes within a second
                    self._load_snapshot()
                    self.live = self.snapshot is not None
                continue
            if msg["type"] == "message":
                self._on_message(msg["channel"], msg["data"])


class _PublishedIngest:
    """``daemon.ingest`` for the read routes: the camera statuses the daemon published last."""

    def __init__(self, view: ReaderView) -> None:
        self._view = view

    def status(self) -> dict[str, _Status]:
        return {c: _Status(d) for c, d in self._view.published_status().get("cameras", {}).items()}


@dataclass(frozen=True)
class _Status:
    fields: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.fields


class ReaderView:
    """The daemon, as the read routes see it, in a reader process: the published snapshot, the
    published state and camera statuses (at most ``interval_s`` old), and the cache's history."""

    def __init__(self, state: ReaderState, cache: ResultCache) -> None:
        self._state = state
        self.cache = cache
        self.ingest = _PublishedIngest(self)

    @property
    def snapshot(self) -> PublishedSnapshot | None:
        return self._state.snapshot

    def published_status(self) -> dict[str, Any]:
        return self._state.published_status()

    @property
    def state(self) -> str:
        return str(self.published_status().get("state", "unknown"))
