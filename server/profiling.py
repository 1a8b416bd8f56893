"""Profiling a site from its video files: which frames, decoded from where, and the profile.

The scheduler's profiler (:func:`mlink.scheduler.profiler.profile`) runs models over frames it
is given; opening a site's streams is this floor's job. :func:`plan_stream_frames` decides how
many frames each video file gives and at which rate, :class:`SiteFrames` decodes them (again on
every pass, so a thousand frames need not sit in memory), :func:`profile_site` profiles every
served output of a site on them, and :func:`site_profile` reuses the latest stored profile when
it fits the config (:func:`stored_profile`, which the daemon and the scheduler bench ask too).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import cv2

from mlink.configs.schema import SiteConfig
from mlink.links.tuples import TupleSet
from mlink.models.assets import AssetError, AssetStore
from mlink.scheduler.profiler import ProfileFrame, latest_profile, loader, profile, save_profile
from mlink.scheduler.site import site_served
from mlink.server.frames import FrameSourceError, is_live, open_capture, read_frames, resolve_url

log = logging.getLogger(__name__)


class NoProfileFiles(ValueError):
    """None of a site's streams is a readable video file to profile from."""


def plan_stream_frames(cfg: SiteConfig, n: int, store: AssetStore | None = None) -> dict[str, tuple[str, float, int]]:
    """For ``n`` profiling frames in all, {stream id: (path, sample fps, frames)}.

    Frames are spread evenly over each stream's whole length (a profile should see the whole
    scene, not its first seconds), split equally between streams; a stream shorter than its
    share gives all its frames and the rest goes to the others. Live streams and files that
    cannot be opened are skipped (the daemon profiles live cameras from ingested frames);
    :class:`NoProfileFiles` when nothing is left.
    """
    info: dict[str, tuple[str, float, int]] = {}
    skipped: list[str] = []
    for s in cfg.streams:
        if is_live(s.url):
            skipped.append(f"{s.id} (live)")
            continue
        try:
            path = resolve_url(s.url, store)
            cap = open_capture(path)
        except (FrameSourceError, AssetError) as exc:
            log.warning("profiling: stream %s skipped: %s", s.id, exc)
            skipped.append(f"{s.id} ({exc})")
            continue
        try:
            fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        finally:
            cap.release()
        if count <= 0:
            skipped.append(f"{s.id} (length unknown)")
            continue
        info[s.id] = (path, fps, count)
    if not info:
        raise NoProfileFiles(
            f"site {cfg.site}: no video file to profile from; skipped: {', '.join(skipped) or 'no streams'}"
        )
    share = {sid: 0 for sid in info}
    left = n
    while left > 0:
        room = [sid for sid in info if share[sid] < info[sid][2]]
        if not room:
            break
        each = max(1, left // len(room))
        for sid in room:
            take = min(each, info[sid][2] - share[sid], left)
            share[sid] += take
            left -= take
            if left == 0:
                break
    plan = {}
    for sid, (path, fps, count) in info.items():
        if share[sid]:
            duration = count / fps
            plan[sid] = (path, min(fps, share[sid] / duration * (1 + 1e-6)), share[sid])
    return plan


class SiteFrames:
    """The frames of a :func:`plan_stream_frames` plan, decoded again on every iteration."""

    def __init__(self, plan: Mapping[str, tuple[str, float, int]]) -> None:
        self.plan = dict(plan)

    def __len__(self) -> int:
        return sum(k for _, _, k in self.plan.values())

    def __iter__(self) -> Iterator[ProfileFrame]:
        for sid, (path, fps, k) in self.plan.items():
            for f in read_frames(path, sample_fps=fps, max_frames=k):
                yield ProfileFrame(sid, f.timestamp, f.image)


def site_frames(plan: Mapping[str, tuple[str, float, int]]) -> SiteFrames:
    """The profiling frames of ``plan`` ({stream id: (path, sample fps, frames)})."""
    return SiteFrames(plan)


def profile_site(
    cfg: SiteConfig, frames: int, store: AssetStore | None = None, progress: bool = True, batch_size: int = 8
) -> TupleSet:
    """Profile every served output of a site on ``frames`` frames of its streams."""
    plan = plan_stream_frames(cfg, frames, store)
    total = sum(k for _, _, k in plan.values())
    return profile(site_frames(plan), site_served(cfg), loader(cfg, store), batch_size, progress, total_frames=total)


def stored_profile(cfg: SiteConfig, home: Path) -> tuple[TupleSet | None, Path | None, str | None]:
    """The site's latest stored profile when it holds exactly the config's outputs: (tuples,
    path, None); otherwise (None, its path or None, why it does not serve)."""
    path = latest_profile(home, cfg.site)
    if path is None:
        return None, None, "no stored profile"
    tuples = TupleSet.load(path)
    if set(tuples.specs) != set(cfg.nodes()):
        return None, path, f"profile {path} has other outputs than the config"
    return tuples, path, None


def site_profile(
    cfg: SiteConfig,
    store: AssetStore,
    frames: int | None = None,
    *,
    min_frames: int = 0,
    home: Path | None = None,
    progress: bool = True,
) -> tuple[TupleSet, Path, str | None]:
    """The site's latest stored profile, when it holds the config's outputs and at least
    ``min_frames`` tuples and no fresh profile of ``frames`` was asked for; otherwise a new
    profile of ``frames`` (else ``min_frames``, else ``links.profile_frames``) frames, stored as
    the latest. Returns (tuples, where they are stored, why it profiled afresh or None)."""
    home = home if home is not None else store.home
    if frames is None:
        stored, path, why = stored_profile(cfg, home)
        if stored is not None and path is not None and len(stored) >= min_frames:
            return stored, path, None
        if stored is not None:
            why = f"profile {path} has {len(stored)} tuples, fewer than {min_frames}"
    else:
        why = "no stored profile" if latest_profile(home, cfg.site) is None else f"{frames} frames asked for"
    tuples = profile_site(cfg, frames or min_frames or cfg.links.profile_frames, store, progress=progress)
    return tuples, save_profile(tuples, home, cfg.site), why
