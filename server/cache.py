"""The result cache: per camera, the latest result and a time-indexed history, in Redis.

Key layout: :mod:`mlink.server.cache_layout` (per camera a latest STRING, a history ZSET of
envelopes ``{"id", "ts", "result"}`` scored by ``ts``, and a channel carrying each new latest to
the API's reader processes). ``ts`` is what ``history(since, until)`` selects on: the ``ts``
given to :meth:`ResultCache.put` (now when none is given). The daemon gives the wall time at which
the frame was captured (:attr:`mlink.scheduler.frame.FrameRecord.wall_time`, also the result's
``wall_time``), so ``since``/``until`` mean when the frame was taken, not when it was stored.
:meth:`ResultCache.put_many` writes a batch in one round trip. The history is a sorted set rather than a stream because the score is that time, not
the time of the write: a result buffered during an outage is written later with its own
timestamp, out-of-order or equal timestamps and clock steps are harmless (a stream's ids must
grow, and its ``*`` ids would stamp the flush time), ``ZRANGEBYSCORE``/``ZREVRANGEBYSCORE ...
LIMIT`` answer time-range queries, and ``ZREMRANGEBYRANK`` keeps the newest N. The unique id
makes members distinct and makes every write idempotent, so a batch re-sent after an ambiguous
failure (applied, reply lost) adds nothing twice.

Availability: ``put`` never raises on Redis errors. While Redis is unreachable, results go into a
bounded in-memory FIFO (``buffer``); a background flusher reconnects with exponential backoff and
writes the buffer in put order, in batches, before any newer result (a put while the buffer is
non-empty joins the queue). When the buffer is full the oldest entry is dropped and counted
(``stats().dropped``, per camera in ``dropped_by_camera``) and logged; nothing is lost silently,
and results still buffered at ``close()`` are counted as dropped too.

Reads: the buffer always holds the newest results, so ``latest`` answers from it when it holds
the camera, even while Redis is down; otherwise, and for ``history`` and ``cameras``, a down Redis
raises ``CacheUnavailable`` (the API answers 503) rather than serving a partial history as if it
were complete. While Redis is up, reads merge any not-yet-flushed entries. Revisions (hybrid
plans revise a frame's result; its ``revision`` counts from 0): each put is a history member, so
the history lists every revision; ``put(..., revision=True)`` replaces ``latest`` only when no
later frame was put since. Every write also appends each result to the camera's Redis stream and
the all-cameras stream, in the same MULTI/EXEC (push: :mod:`mlink.server.result_stream`). Results must be JSON objects; they round-trip exactly (``json`` writes floats by ``repr``), except
that tuples come back as lists.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import redis

from mlink.server.backoff import Backoff
from mlink.server.cache_layout import (
    CAMERA_ID,
    CacheStats,
    CacheUnavailable,
    Entry,
    Keys,
    PutBatch,
    Record,
    connect,
    decode,
    write_entries,
)
from mlink.server.redact import redact_url
from mlink.server.result_stream import append_streams

if TYPE_CHECKING:
    from pathlib import Path

    from mlink.configs.schema import CacheConfig
    from mlink.server.redis_embedded import EmbeddedRedis

log = logging.getLogger("mlink.cache")

__all__ = ["CacheStats", "CacheUnavailable", "PutBatch", "Record", "ResultCache", "open_cache"]


class ResultCache:
    """Latest result and history per camera in Redis, with an outage buffer. Thread-safe."""

    def __init__(
        self,
        url: str,
        *,
        history: int = 10000,
        buffer: int = 10000,
        prefix: str = "mlink",
        batch: int = 500,
        stream: int = 1000,
        backoff_base: float = 0.05,
        backoff_max: float = 5.0,
        socket_timeout: float = 2.0,
    ) -> None:
        if history < 1 or buffer < 1 or batch < 1 or stream < 1:
            raise ValueError("history, buffer, batch and stream must be >= 1")
        self.url = url
        self.history_limit = history
        self.buffer_limit = buffer
        self.stream_limit = stream  # entries kept per camera in its result stream (server/result_stream.py)
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.batch = batch
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        # No retries inside redis-py: an outage must send results to the buffer at once, and the
        # flusher owns reconnection and its backoff.
        self._client = connect(url, timeout=socket_timeout, decode_responses=True)
        self._lock = threading.RLock()
        self._drained = threading.Condition(self._lock)
        self._buffer: deque[Entry] = deque()
        self._node = uuid.uuid4().hex[:10]
        self._ids = itertools.count()
        self._newest: dict[str, float] = {}  # camera -> the ts of its last put (not a revision)
        self._written = self._flushed = 0
        self._dropped: Counter[str] = Counter()
        self._reconnects = self._errors = 0
        self._last_error: str | None = None
        # jittered so that many daemons do not reconnect in step
        self._backoff = Backoff(backoff_base, backoff_max, jitter=0.25)
        self._connected = True
        self._closing = False
        self._wake = threading.Event()
        self._retry = threading.Event()  # cuts the flusher's backoff short: Redis answered again
        self._stop = threading.Event()
        self._connected = self._ping()
        if not self._connected:
            log.warning("redis %s unreachable at start; results are buffered until it answers", self._safe_url)
        self._thread = threading.Thread(target=self._run, name="mlink-cache-flusher", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(
        cls, cfg: CacheConfig, url: str | None = None, *, prefix: str = "mlink", **kwargs: Any
    ) -> ResultCache:
        """A cache for ``cfg``; ``url`` (an embedded server's) is used when cfg has no redis_url."""
        target = cfg.redis_url or url
        if not target:
            raise ValueError("no Redis URL: the config has none and no embedded server URL was given")
        return cls(target, history=cfg.history, buffer=cfg.buffer, stream=cfg.stream_length, prefix=prefix, **kwargs)

    @property
    def _safe_url(self) -> str:
        return redact_url(self.url)

    # -- writing ---------------------------------------------------------------------------
    def put(self, camera: str, result: dict[str, Any], ts: float | None = None, *, revision: bool = False) -> bool:
        """Store ``result`` as camera's latest (a ``revision``: if no later ts was put since) and in
        its history. True: written to Redis now; False: buffered (Redis unreachable, or older results
        waiting). Never raises on Redis errors; ValueError/TypeError for a bad camera id or result."""
        return self._admit([self._prepare(camera, result, ts, revision)])

    def put_many(self, items: Iterable[tuple[str, dict[str, Any], float | None, bool]]) -> PutBatch:
        """Store a batch of ``(camera, result, ts, revision)`` as :meth:`put` would one by one, in
        one Redis round trip (one MULTI/EXEC) instead of one per result. An item that ``put`` would
        refuse (bad camera id, result not a JSON object) is left out and named in
        ``PutBatch.rejected`` with its error; the others are stored, in order."""
        entries: list[Entry] = []
        rejected: list[tuple[int, Exception]] = []
        for i, (camera, result, ts, revision) in enumerate(items):
            try:
                entries.append(self._prepare(camera, result, ts, revision))
            except (TypeError, ValueError) as exc:
                rejected.append((i, exc))
        return PutBatch(written=self._admit(entries) if entries else True, stored=len(entries), rejected=rejected)

    def _prepare(self, camera: str, result: dict[str, Any], ts: float | None, revision: bool) -> Entry:
        if not isinstance(camera, str) or not CAMERA_ID.match(camera):
            raise ValueError(f"camera id must match {CAMERA_ID.pattern}, got {camera!r}")
        if not isinstance(result, dict):
            raise TypeError(f"a result must be a dict (a JSON object), got {type(result).__name__}")
        ts = time.time() if ts is None else float(ts)
        if not math.isfinite(ts):
            raise ValueError(f"timestamp must be finite, got {ts}")
        rid = f"{self._node}-{next(self._ids):x}"
        try:
            member = json.dumps({"id": rid, "ts": ts, "result": result}, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"result for camera {camera} is not JSON-serialisable: {exc}") from None
        return Entry(camera, ts, rid, member, revision)

    def _admit(self, entries: list[Entry]) -> bool:
        """Write ``entries`` now (one round trip) or queue them behind the buffer."""
        with self._lock:
            if self._closing:
                raise RuntimeError("the cache is closed")
            for e in entries:
                e.latest = not e.revision or e.ts >= self._newest.get(e.camera, -math.inf)
                self._newest[e.camera] = e.ts if not e.revision else self._newest.get(e.camera, e.ts)
            if not self._buffer and self._connected:
                try:
                    self._write(entries)
                    self._written += len(entries)
                    return True
                except redis.RedisError as exc:
                    self._mark_down(exc)
            for e in entries:
                self._enqueue(e)
        self._wake.set()
        return False

    def _enqueue(self, entry: Entry) -> None:
        # caller holds the lock
        if len(self._buffer) >= self.buffer_limit:
            old = self._buffer.popleft()
            self._dropped[old.camera] += 1
            total = sum(self._dropped.values())
            if total == 1 or total % 1000 == 0:
                log.error(
                    "result buffer full (%d): dropped the oldest result (camera %s); %d dropped so far",
                    self.buffer_limit,
                    old.camera,
                    total,
                )
        self._buffer.append(entry)

    def _write(self, entries: list[Entry]) -> None:
        # caller holds the lock: the streams get entries in put order, buffered ones at their flush
        pipe = self._client.pipeline(transaction=True)
        append_streams(pipe, self.keys, entries, self.stream_limit, len(self._newest))
        write_entries(pipe, self.keys, entries, self.history_limit)

    def _mark_down(self, exc: BaseException) -> None:
        # caller holds the lock
        self._errors += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self._connected:
            log.warning(
                "redis %s unreachable (%s); buffering results (limit %d)",
                self._safe_url,
                self._last_error,
                self.buffer_limit,
            )
        self._connected = False

    def _drain(self) -> bool:
        """Write the buffer in order, batch by batch; True when it is empty, False on an error."""
        while True:
            with self._lock:
                if not self._buffer:
                    self._drained.notify_all()
                    return True
                batch = list(itertools.islice(self._buffer, 0, self.batch))
                try:
                    self._write(batch)
                except redis.RedisError as exc:
                    self._mark_down(exc)
                    return False
                for _ in batch:
                    self._buffer.popleft()
                self._flushed += len(batch)
                if not self._connected:
                    self._connected = True
                    self._reconnects += 1
                    log.info(
                        "redis %s reachable again; flushing %d buffered results",
                        self._safe_url,
                        len(self._buffer) + len(batch),
                    )

    def _reconnect_if_idle(self) -> None:
        # Down with an empty buffer (every buffered result dropped at close, or down since the
        # start): a PING is the only way to learn that Redis is back.
        if self._ping():
            with self._lock:
                if not self._connected:
                    self._connected = True
                    self._reconnects += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                pending = bool(self._buffer)
                connected = self._connected
            if not pending and connected:
                self._wake.wait()
                self._wake.clear()
                continue
            if pending:
                ok = self._drain()
            else:
                self._reconnect_if_idle()
                ok = self._connected
            if ok:
                self._backoff.reset()
                continue
            self._retry.wait(self._backoff.next())
            self._retry.clear()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wake the flusher and wait until the buffer is empty; False if it is not within timeout."""
        self._backoff.reset()
        self._retry.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.set()
                self._drained.wait(min(left, 0.05))
            return True

    # -- reading ---------------------------------------------------------------------------
    def _buffered(self, camera: str) -> list[Entry]:
        with self._lock:
            return [e for e in self._buffer if e.camera == camera]

    def _fail(self, exc: redis.RedisError) -> CacheUnavailable:
        with self._lock:
            self._mark_down(exc)
            n = len(self._buffer)
        self._wake.set()
        return CacheUnavailable(f"redis {self._safe_url} unreachable ({exc}); {n} results buffered")

    def _down(self) -> CacheUnavailable | None:
        with self._lock:
            if self._connected:
                return None
            return CacheUnavailable(
                f"redis {self._safe_url} unreachable ({self._last_error}); {len(self._buffer)} results buffered"
            )

    def latest(self, camera: str) -> Record | None:
        """The last result put for camera, None if it has none."""
        pending = [e for e in self._buffered(camera) if e.latest]
        if pending:
            e = pending[-1]
            return decode(camera, e.member)
        err = self._down()
        if err:
            raise err
        try:
            raw = self._client.get(self.keys.latest(camera))
        except redis.RedisError as exc:
            raise self._fail(exc) from None
        return decode(camera, raw) if raw is not None else None

    def history(
        self,
        camera: str,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[Record]:
        """Results with since <= ts <= until, oldest first; with ``limit``, the newest ``limit`` of them."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if since is not None and until is not None and since > until:
            raise ValueError(f"since ({since}) is after until ({until})")
        err = self._down()
        if err:
            raise err
        lo = "-inf" if since is None else repr(float(since))
        hi = "+inf" if until is None else repr(float(until))
        try:
            if limit is None:
                raw = list(self._client.zrangebyscore(self.keys.history(camera), lo, hi))
            else:
                raw = list(
                    reversed(self._client.zrevrangebyscore(self.keys.history(camera), hi, lo, start=0, num=limit))
                )
        except redis.RedisError as exc:
            raise self._fail(exc) from None
        records = [decode(camera, cast(str, r)) for r in raw]  # members: str (decode_responses)
        pending = [
            e for e in self._buffered(camera) if (since is None or e.ts >= since) and (until is None or e.ts <= until)
        ]
        if pending:
            seen = {r.id for r in records}
            records += [decode(camera, e.member) for e in pending if e.id not in seen]
            records.sort(key=lambda r: r.ts)  # stable: equal timestamps keep put order
            if limit is not None:
                records = records[-limit:]
        return records

    def cameras(self) -> list[str]:
        """Camera ids that have results (in Redis or still buffered), sorted."""
        err = self._down()
        if err:
            raise err
        try:
            ids = {str(c) for c in self._client.smembers(self.keys.cameras)}  # str already (decode_responses)
        except redis.RedisError as exc:
            raise self._fail(exc) from None
        with self._lock:
            ids |= {e.camera for e in self._buffer}
        return sorted(ids)

    def _ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except redis.RedisError as exc:
            with self._lock:
                self._errors += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
            return False

    def ping(self) -> bool:
        """True when Redis answers PING now (never raises); when it does, the flusher retries at once
        rather than at the end of its backoff (an embedded server's ``on_restart`` calls this)."""
        ok = self._ping()
        if ok:
            self._retry.set()
            self._wake.set()
        return ok

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                connected=self._connected,
                buffered=len(self._buffer),
                buffer_limit=self.buffer_limit,
                written=self._written,
                flushed=self._flushed,
                dropped=sum(self._dropped.values()),
                reconnects=self._reconnects,
                errors=self._errors,
                last_error=self._last_error,
                dropped_by_camera=dict(self._dropped),
            )

    # -- lifecycle -------------------------------------------------------------------------
    def close(self, flush_timeout: float = 2.0) -> None:
        """Try to flush what is buffered, stop the flusher; what is left is counted as dropped."""
        if self._stop.is_set():
            return
        if flush_timeout > 0:
            self.flush(flush_timeout)
        with self._lock:
            self._closing = True
            left = list(self._buffer)
            self._buffer.clear()
            for e in left:
                self._dropped[e.camera] += 1
        if left:
            log.error("cache closed with %d results still buffered (Redis unreachable): counted as dropped", len(left))
        self._stop.set()
        self._wake.set()
        self._retry.set()
        self._thread.join(timeout=5.0)
        self._client.close()

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_cache(
    cfg: CacheConfig,
    *,
    prefix: str = "mlink",
    directory: str | Path | None = None,
    home: str | Path | None = None,
) -> tuple[ResultCache, EmbeddedRedis | None]:
    """The daemon's cache: cfg.redis_url, or an embedded, supervised redis-server (returned, to be
    closed after the cache) when it has none. Its data folder, kept and reused by the next start
    (the AOF reloads the history): ``directory``, else ``HOME/redis/SITE`` with HOME ``home`` or
    ``$MLINK_HOME`` and SITE from the prefix ``mlink:SITE``. After each restart of a crashed
    server the cache pings it, so the outage buffer flushes at once, not at the end of a backoff."""
    server = None
    if not cfg.redis_url:
        from mlink.models.assets import default_home
        from mlink.server.redis_embedded import EmbeddedRedis
        from mlink.server.redis_folder import site_folder, site_of_prefix

        if directory is None:
            directory = site_folder(home if home is not None else default_home(), site_of_prefix(prefix))
        server = EmbeddedRedis(directory, appendonly=True, appendfsync=cfg.fsync)
    try:
        if server is not None:
            server.start()
        cache = ResultCache.from_config(cfg, server.url if server else None, prefix=prefix)
    except BaseException:
        if server is not None:
            server.close()
        raise
    if server is not None:
        server.on_restart(cache.ping)
    return cache, server
