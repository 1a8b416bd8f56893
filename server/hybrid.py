"""The daemon's side of hybrid plans: frames' change maps in, a :class:`Rotation` out.

:class:`ProfileTap` passes the first profile's frames through unchanged and keeps each one's
Reducto maps (:mod:`mlink.server.change`), so :func:`build_rotation` can start the temporal
links from the profile (pairs of profiled frames of one camera, every model real on them: the
planner's held-out tuples); with links from disk there is no profile to tap and the temporal
links start empty (the cross-model links serve until rotation teaches them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from mlink.configs.schema import SiteConfig
from mlink.scheduler.planner import Planner
from mlink.scheduler.rotation import Rotation
from mlink.server.change import Maps, diffs

log = logging.getLogger("mlink.hybrid")


class ProfileTap:
    """Re-iterable like the frames it wraps; remembers each frame's maps once."""

    def __init__(self, frames: Iterable[Any]) -> None:
        self.frames = list(frames) if iter(frames) is frames else frames  # one-shot: read once, as head() would
        self.maps: dict[tuple[str, float], Maps] = {}

    def __iter__(self) -> Iterator[Any]:
        for f in self.frames:
            key = (str(f.stream), float(f.timestamp))
            if key not in self.maps:
                self.maps[key] = Maps.of(f.image)
            yield f


def build_rotation(cfg: SiteConfig, planner: Planner, tap: ProfileTap | None) -> Rotation | None:
    """A rotation for ``planner`` when ``scheduler.hybrid.enabled`` (None otherwise), its
    temporal links started from the tapped profile, its modes chosen and applied."""
    if not cfg.scheduler.hybrid.enabled:
        return None
    rotation = Rotation(cfg.scheduler.hybrid, planner, Maps.of, diffs)
    if tap is not None and planner.heldout is not None:
        n = rotation.bootstrap(planner.heldout, tap.maps)
        log.info("hybrid: temporal links started from %d profiled pairs per output", n)
    rotation.on_plan()
    return rotation
