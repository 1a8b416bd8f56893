"""Profiling: run every model of a site over the same frames and keep the aligned output tuples.

Links learn from these tuples, and the scheduler re-measures link accuracy on them each period.
The models run one after another over the same frames (load one, run it over all frames,
release it, next), so profiling never needs more memory than the largest single model: that is
how profiling keeps the budget, which the MLink papers leave open. The CLI's ``mlink profile``
and the planner's periodic re-profiling both call :func:`profile`; they differ only in where
frames come from and in who loads the models (a plain :func:`loader` there, the scheduler's
pool here).

Frames come from the caller, never from a stream opened here: any iterable of
:class:`Frame` (a :class:`ProfileFrame`, or ingest's :class:`~mlink.scheduler.frame.FrameRecord`). Each model iterates the frames again, so a re-iterable source (a list of
buffered frames, or :class:`mlink.server.profiling.SiteFrames`, which decodes the site's videos
again on each pass so a thousand frames need not sit in memory) is used as it is; a one-shot
iterator is read into a list first.

Stored profiles live under ``$MLINK_HOME/profiles/SITE`` (:func:`save_profile`,
:func:`latest_profile`); a site's links under :func:`link_store_dir`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from mlink.configs.schema import SiteConfig
from mlink.links.tuples import TupleSet, node_key
from mlink.models.assets import AssetStore
from mlink.models.base import BlackBoxModel, batched
from mlink.models.catalog import model_info
from mlink.scheduler.site import model_factory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileFrame:
    stream: str
    timestamp: float
    image: np.ndarray


class Frame(Protocol):
    """What profiling reads of a frame: :class:`ProfileFrame` and ingest's ``FrameRecord`` have it."""

    @property
    def stream(self) -> str: ...
    @property
    def timestamp(self) -> float: ...
    @property
    def image(self) -> np.ndarray: ...


ModelUser = Callable[[str], AbstractContextManager[BlackBoxModel]]


class Head:
    """The first ``n`` frames of a re-iterable source, itself re-iterable (nothing is read ahead)."""

    def __init__(self, frames: Iterable[Frame], n: int) -> None:
        self.frames = frames
        self.n = n

    def __iter__(self) -> Iterator[Frame]:
        return itertools.islice(iter(self.frames), self.n)


def head(frames: Iterable[Frame], n: int) -> Iterable[Frame]:
    """The first ``n`` of ``frames``: a list for a sequence or an iterator, else a :class:`Head`."""
    if isinstance(frames, Sequence):
        return list(frames[:n])
    if iter(frames) is frames:  # one-shot: read what is needed now
        return list(itertools.islice(frames, n))
    return Head(frames, n)


def profile(
    frames: Iterable[Frame],
    served: Mapping[str, Sequence[str]],
    use_model: ModelUser,
    batch_size: int = 8,
    progress: bool = True,
    total_frames: int | None = None,
) -> TupleSet:
    """Run each model in ``served`` ({model: outputs}) over ``frames``; return their tuples.

    ``frames``: see the module docstring (each model iterates them again). ``use_model(name)``
    is a context manager giving a loaded model and releasing it afterwards.
    """
    if iter(frames) is frames:  # a one-shot iterator cannot be read once per model
        frames = list(frames)
    n = total_frames if total_frames is not None else (len(frames) if isinstance(frames, Sequence) else None)
    per_model: dict[str, list[dict[str, np.ndarray]]] = {}
    index: list[tuple[str, float]] | None = None
    bar = tqdm(total=(n * len(served)) if n else None, desc="profiling", unit="inference", disable=not progress)
    try:
        for name, outputs in served.items():
            seen: list[tuple[str, float]] = []
            results: list[dict[str, np.ndarray]] = []
            bar.set_postfix_str(name)
            with use_model(name) as model:
                for batch in batched(frames, batch_size):
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


def loader(cfg: SiteConfig, store: AssetStore | None = None) -> ModelUser:
    """Load a site model for the duration of a ``with`` block, then unload it."""
    make = model_factory(cfg, store)

    @contextlib.contextmanager
    def use(name: str) -> Iterator[BlackBoxModel]:
        model = make(name)
        model.load(cfg.device)
        try:
            yield model
        finally:
            model.unload()

    return use


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
