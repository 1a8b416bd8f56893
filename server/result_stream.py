"""Push: every result the cache stores is also appended to Redis streams, so other services consume
results without polling (``XREAD BLOCK`` from the last id they saw) and the API serves them as
server-sent events (:mod:`mlink.server.api_events`).

Two streams per cache (names: :class:`mlink.server.cache_layout.Keys`): ``P:cam:ID:events`` per
camera and ``P:events`` for all cameras, each entry added by ``XADD ... MAXLEN ~ N *`` in the same
MULTI/EXEC as the result's history member and latest (:meth:`ResultCache._write
<mlink.server.cache.ResultCache>`), so a stream never holds a result the history lacks nor the
reverse. Why streams here when the history is a sorted set: a consumer needs a cursor that only
grows (the entry id Redis assigns at the write) to resume exactly after what it saw, which a
score (the frame's capture time, possibly equal or out of order) cannot give.

- Order: entries are appended in put order. Results buffered during a Redis outage are appended
  when the buffer is flushed, in put order, before any newer result (the flusher writes them
  through the same call), so their stream ids are the flush time, not the capture time (``ts``).
- Revisions (hybrid plans revise an earlier frame's result) are appended as they are put, with
  the field ``revision`` = ``1``; the result inside carries its ``revision`` count. A consumer
  that wants one answer per frame keeps the last entry per (camera, ``result.frame``).
- An entry's fields: ``data``, the JSON text ``{"camera", "id", "ts", "result"}`` (``id``: the
  history member's unique id, the same across retries), and ``revision`` for revisions.
- Bounds: ``MAXLEN ~ N`` per camera (``cache.stream_length``), ``N`` x the cameras put so far for
  the all-cameras stream; ``~`` lets Redis trim whole nodes, so slightly more than N may stay.
- A batch re-sent after an ambiguous failure (applied, reply lost) appends its entries again
  (XADD, unlike ZADD, is not idempotent): consumers that must not see a result twice drop an
  ``id`` they have seen.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

    from mlink.server.cache_layout import Entry, Keys

REVISION = {"revision": "1"}


def event_data(camera: str, member: str) -> str:
    """The JSON text of a stream entry: the history envelope ``{"id", "ts", "result"}`` with the
    camera first. Camera ids match ``[A-Za-z0-9_.-]+``, so they need no escaping."""
    return f'{{"camera":"{camera}",{member[1:]}'  # member: '{"id":...}', never empty


def append_streams(
    pipe: redis.client.Pipeline, keys: Keys, entries: Iterable[Entry], maxlen: int, cameras: int
) -> None:
    """Queue on ``pipe`` (a MULTI, executed by its caller) one XADD per entry to its camera's
    stream and one to the all-cameras stream, in order, each trimmed to about ``maxlen`` per
    camera (``cameras``: how many cameras the all-cameras stream interleaves)."""
    total = maxlen * max(1, cameras)
    for e in entries:
        fields = {"data": event_data(e.camera, e.member), **(REVISION if e.revision else {})}
        pipe.xadd(keys.stream(e.camera), fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
        pipe.xadd(keys.events, fields, maxlen=total, approximate=True)  # type: ignore[arg-type]
