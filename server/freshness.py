"""How old a camera's latest result is, and whether it is stale (issue 14 item 11).

A camera whose stream stopped keeps its last result in Redis; without a mark, a client cannot
tell a count from a second ago from one of an hour ago. ``GET .../results/latest`` therefore
adds, at the moment it answers (so never stored):

- ``age_s``: seconds from the frame's capture (the record's ``ts``) to now;
- ``stale``: true when the camera is not delivering (its state is ``retrying``, ``ended``,
  ``stopped`` or unknown) or when the result is older than :func:`stale_after_s` of its sampled
  rate -- a stalled pipeline makes results stale although the camera is up.

The daemon's own route and the reader processes' hot route both answer through
:func:`latest_body`, so the two stay byte-identical apart from the clock they read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlink.server.cache_layout import json_body

STALE_MIN_S = 5.0  # never stale sooner: batching and a busy CPU delay results by a second or two
STALE_PERIODS = 10.0  # ... or ten sample periods of the camera's rate, whichever is longer
DELIVERING = frozenset({"connecting", "connected"})


def stale_after_s(fps_target: float | None) -> float:
    """The age past which a delivering camera's latest result is stale."""
    if not fps_target or fps_target <= 0:
        return STALE_MIN_S
    return max(STALE_MIN_S, STALE_PERIODS / fps_target)


def freshness(ts: float, now: float, status: Mapping[str, Any] | None) -> tuple[float, bool]:
    """(age_s, stale) of a result taken at ``ts`` for a camera whose status is ``status``
    (a :class:`~mlink.server.camera_status.CameraStatus` dict; None: unknown, so stale)."""
    age = max(0.0, now - ts)
    if status is None or status.get("state") not in DELIVERING:
        return age, True
    return age, age > stale_after_s(status.get("fps_target"))


def latest_body(body: bytes, ts: float, now: float, status: Mapping[str, Any] | None) -> bytes:
    """``body`` (a record's JSON object, as :func:`~mlink.server.cache_layout.response_body`
    makes it) with ``age_s`` and ``stale`` appended, without parsing it again."""
    if not body.endswith(b"}"):
        raise ValueError("not a JSON object")
    age, stale = freshness(ts, now, status)
    return body[:-1] + b"," + json_body({"age_s": round(age, 3), "stale": stale})[1:]
