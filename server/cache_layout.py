"""What the result cache keeps in Redis and how, shared by the writer (:mod:`mlink.server.cache`, in
the daemon) and the API's reader processes (:mod:`mlink.server.reader_state`), which read the same
keys without importing the writer.

Key layout (``P`` is the prefix, default ``mlink``; the daemon uses ``mlink:SITE``)::

    P:cameras               SET     camera ids that ever had a result
    P:cam:ID:latest         STRING  envelope of the last result put for camera ID
    P:cam:ID:history        ZSET    envelopes scored by their timestamp ``ts`` (unix seconds, float)
    P:latest                CHANNEL "ID ENVELOPE", published in the same MULTI/EXEC as each SET of
                                    P:cam:ID:latest, so a subscriber that applies the messages in
                                    order holds every camera's latest result without asking Redis
    P:snapshot              HASH    the daemon's published snapshot as JSON views (server/snapshot_publish.py)
    P:snapshot              CHANNEL its version, published when the hash changes
    P:status                STRING  JSON: the daemon's state and every camera's status, every 0.5 s
    P:cam:ID:events         STREAM  every result put for camera ID, in put order, the newest ~N kept
    P:events                STREAM  the same for all cameras, interleaved in put order
                                    (both written in each put's MULTI/EXEC: server/result_stream.py)

An envelope is the JSON text ``{"id": UNIQUE, "ts": SECONDS, "result": {...}}``. Camera ids match
``[A-Za-z0-9_.-]+`` (no space), so the first space of a P:latest message ends the id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

CAMERA_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


def connect(url: str, *, timeout: float = 2.0, **kwargs: Any) -> redis.Redis:
    """A client for ``url`` that retries nothing inside redis-py: a Redis that is away fails the
    call at once, and its caller owns reconnection and its backoff."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), **kwargs
    )


class CacheUnavailable(RuntimeError):
    """Redis is unreachable and the answer cannot be given from the buffer."""


@dataclass(frozen=True)
class Keys:
    """The Redis names of one cache (one prefix)."""

    prefix: str = "mlink"

    @property
    def cameras(self) -> str:
        return f"{self.prefix}:cameras"

    def latest(self, camera: str) -> str:
        return f"{self.prefix}:cam:{camera}:latest"

    def history(self, camera: str) -> str:
        return f"{self.prefix}:cam:{camera}:history"

    def stream(self, camera: str) -> str:
        """Camera's result stream (XADD per put; what ``/api/v1/cameras/ID/events`` reads)."""
        return f"{self.prefix}:cam:{camera}:events"

    @property
    def events(self) -> str:
        """Every camera's results in one stream (what ``/api/v1/events`` reads)."""
        return f"{self.prefix}:events"

    @property
    def latest_channel(self) -> str:
        return f"{self.prefix}:latest"

    @property
    def snapshot(self) -> str:
        """The snapshot hash, and the channel announcing its new versions."""
        return f"{self.prefix}:snapshot"

    @property
    def status(self) -> str:
        return f"{self.prefix}:status"


@dataclass(frozen=True)
class Record:
    camera: str
    ts: float  # the score: unix seconds (the daemon's results: the frame's wall time of capture)
    result: dict[str, Any]
    id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"camera": self.camera, "ts": self.ts, "result": self.result}


@dataclass
class CacheStats:
    connected: bool
    buffered: int  # results waiting in memory for Redis
    buffer_limit: int
    written: int  # results written straight to Redis by put()
    flushed: int  # results written to Redis from the buffer
    dropped: int  # results lost: buffer overflow (oldest first) or still buffered at close
    reconnects: int  # times Redis came back after being unreachable
    errors: int  # Redis errors seen
    last_error: str | None
    dropped_by_camera: dict[str, int] = field(default_factory=dict)


def decode(camera: str, raw: str | bytes) -> Record:
    """The record of an envelope."""
    env = json.loads(raw)
    return Record(camera=camera, ts=env["ts"], result=env["result"], id=env["id"])


def json_body(value: Any) -> bytes:
    """``value`` as the API's JSON bytes (as FastAPI's JSONResponse encodes it)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def response_body(record: Record) -> bytes:
    """The bytes the API answers for ``record``."""
    return json_body(record.to_dict())


@dataclass(frozen=True)
class PutBatch:
    """What :meth:`ResultCache.put_many` did: ``written`` True when the batch reached Redis now (False:
    buffered); ``stored`` results accepted; ``rejected`` (index in the batch, error) for the others."""

    written: bool
    stored: int
    rejected: list[tuple[int, Exception]] = field(default_factory=list)


def records_json(records: Iterable[Record]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in records]


@dataclass
class Entry:
    """One result on its way to Redis (the writer's; readers see envelopes)."""

    camera: str
    ts: float
    id: str
    member: str  # the envelope JSON
    revision: bool = False  # put as a revision of an earlier frame's result
    latest: bool = True  # becomes the camera's latest (a revision of an older frame does not)


def write_entries(pipe: redis.client.Pipeline, keys: Keys, entries: list[Entry], history_limit: int) -> None:
    """One MULTI/EXEC on ``pipe``: every entry's ZADD, each camera's last SET and its publish, the
    trims to ``history_limit``, the SADD. Raises redis.RedisError when Redis does not take it."""
    last: dict[str, Entry | None] = {}
    for e in entries:
        pipe.zadd(keys.history(e.camera), {e.member: e.ts})
        last[e.camera] = e if e.latest else last.get(e.camera)
    for cam, le in last.items():
        if le is not None:
            pipe.set(keys.latest(cam), le.member)
            pipe.publish(keys.latest_channel, f"{cam} {le.member}")  # the readers' copy (not in the AOF)
        pipe.zremrangebyrank(keys.history(cam), 0, -(history_limit + 1))
    pipe.sadd(keys.cameras, *last)
    pipe.execute()
