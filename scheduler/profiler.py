"""Profiling: run every model of a site over the same frames and keep the aligned output tuples.

Links learn from these tuples, and the scheduler re-measures link accuracy on them each period.
The models run one after another over the same frames (load one, run it over all frames,
release it, next), so profiling never needs more memory than the largest single model: that is
how profiling keeps the budget, which the MLink papers leave open. The CLI's ``mlink profile``
and the planner's periodic re-profiling both call :func:`profile`; they differ only in where
frames come from (re-decoded video here, buffered frames in the daemon) and in who loads the
models (a plain loader here, the scheduler's pool there).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from mlink.configs.schema import SiteConfig
from mlink.links.tuples import TupleSet, node_key
from mlink.models.assets import AssetError, AssetStore
from mlink.models.base import BlackBoxModel, batched
from mlink.models.catalog import create_model, model_info
from mlink.server.frames import FrameSourceError, is_live, open_capture, read_frames, resolve_url


log = logging.getLogger(__name__)


class NoProfileFiles(ValueError):
    """None of a site's streams is a readable video file to profile from."""


@dataclass(frozen=True)
class ProfileFrame:
    stream: str
    timestamp: float
    image: np.ndarray


FrameSource = Callable[[], Iterable[ProfileFrame]]
ModelUser = Callable[[str], ContextManager[BlackBoxModel]]


def profile(
    frames: FrameSource | Sequence[ProfileFrame],
    served: Mapping[str, Sequence[str]],
    use_model: ModelUser,
    batch_size: int = 8,
    progress: bool = True,
    total_frames: int | None = None,
) -> TupleSet:
    """Run each model in ``served`` ({model: outputs}) over ``frames``; return their tuples.

    ``frames`` is a sequence (buffered frames) or a callable giving a fresh iterator each time
    (re-decoding video, so a thousand frames need not sit in memory). ``use_model(name)`` is a
    context manager giving a loaded model and releasing it afterwards.
    """
    get_frames: FrameSource = (lambda: frames) if not callable(frames) else frames  # type: ignore[assignment]
    n = total_frames if total_frames is not None else (len(frames) if not callable(frames) else None)
    per_model: dict[str, list[dict[str, np.ndarray]]] = {}
    index: list[tuple[str, float]] | None = None
    bar = tqdm(total=(n * len(served)) if n else None, desc="profiling", unit="inference", disable=not progress)
    try:
        for name, outputs in served.items():
            seen: list[tuple[str, float]] = []
            results: list[dict[str, np.ndarray]] = []
            bar.set_postfix_str(name)
            with use_model(name) as model:
                for batch in batched(get_frames(), batch_size):
                    outs = model.infer([f.image for f in batch])
                    results.extend({o: out[o] for o in outputs} for out in outs)
                    seen.extend((f.stream, f.timestamp) for f in batch)
                    bar.update(len(batch))
            if index is None:
                index = seen
            elif seen != index:
                raise RuntimeError(f"profiling: model {name} saw different frames than the models before it")
            per_model[name] = results
    finally:
        bar.close()
    specs = {node_key(m, o): model_info(m).output(o) for m, outs in served.items() for o in outs}
    tuples = TupleSet(specs=specs)
    for i, (stream, ts) in enumerate(index or []):
        tuples.append(stream, ts, {node_key(m, o): per_model[m][i][o] for m, outs in served.items() for o in outs})
    return tuples


def site_served(cfg: SiteConfig) -> dict[str, list[str]]:
    return {m.name: m.served for m in cfg.models}


def loader(cfg: SiteConfig, store: AssetStore | None = None) -> ModelUser:
    """Load a site model for the duration of a ``with`` block, then unload it."""

    @contextlib.contextmanager
    def use(name: str) -> Iterator[BlackBoxModel]:
        model = create_model(name, store=store, **cfg.model(name).params)
        model.load(cfg.device)
        try:
            yield model
        finally:
            model.unload()

    return use


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
        raise NoProfileFiles(f"site {cfg.site}: no video file to profile from; skipped: {', '.join(skipped) or 'no streams'}")
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


def site_frames(plan: Mapping[str, tuple[str, float, int]]) -> FrameSource:
    def gen() -> Iterator[ProfileFrame]:
        for sid, (path, fps, k) in plan.items():
            for f in read_frames(path, sample_fps=fps, max_frames=k):
                yield ProfileFrame(sid, f.timestamp, f.image)

    return gen


def profile_site(
    cfg: SiteConfig, frames: int, store: AssetStore | None = None, progress: bool = True, batch_size: int = 8
) -> TupleSet:
    """Profile every served output of a site on ``frames`` frames of its streams."""
    plan = plan_stream_frames(cfg, frames, store)
    total = sum(k for _, _, k in plan.values())
    return profile(site_frames(plan), site_served(cfg), loader(cfg, store), batch_size, progress, total_frames=total)


def profile_dir(home: Path, site: str) -> Path:
    return home / "profiles" / site


def link_store_dir(cfg: SiteConfig, home: Path) -> Path:
    """Where a site's trained links live: ``links.store`` of the config, else ``HOME/links/SITE``."""
    return Path(cfg.links.store).expanduser() if cfg.links.store else home / "links" / cfg.site


def save_profile(tuples: TupleSet, home: Path, site: str) -> Path:
    """Save under ``profiles/SITE/VERSION`` and point ``profiles/SITE/latest`` at it."""
    root = profile_dir(home, site)
    version = tuples.version()
    target = root / version[:16]
    tuples.save(target)
    (root / "latest").write_text(version[:16] + "\n")
    return target


def latest_profile(home: Path, site: str) -> Path | None:
    pointer = profile_dir(home, site) / "latest"
    if not pointer.is_file():
        return None
    path = profile_dir(home, site) / pointer.read_text().strip()
    return path if path.is_dir() else None


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
    path = latest_profile(home, cfg.site)
    why = "no stored profile" if path is None else f"{frames} frames asked for"
    if path is not None and frames is None:
        tuples = TupleSet.load(path)
        if set(tuples.specs) != set(cfg.nodes()):
            why = f"profile {path} has other outputs than the config"
        elif len(tuples) < min_frames:
            why = f"profile {path} has {len(tuples)} tuples, fewer than {min_frames}"
        else:
            return tuples, path, None
    tuples = profile_site(cfg, frames or min_frames or cfg.links.profile_frames, store, progress=progress)
    return tuples, save_profile(tuples, home, cfg.site), why
