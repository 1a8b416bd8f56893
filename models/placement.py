"""Where a model really computes, and why that is not the device it was loaded for.

A site asks for ``cuda`` and gets the GPU for its torch models, but an adapter may not be able
to honour it: ONNX Runtime without its CUDA execution provider (the CPU-only ``onnxruntime``
package, or CUDA libraries it cannot load), OpenCV's HOG (the pip wheels have no CUDA). Such a
model still answers, on the CPU, and its GPU cost is near zero; the operator must be told, or a
site that "runs on the GPU" quietly spends its CPU and a budget that counts nothing for it.

:class:`Placement` is what one load found: the device asked for, the device the model executes
on, and the fallback reason. :func:`record_placement` keeps the latest placement per (model, device asked)
for the process, so readers (``/api/v1/models``, ``/metrics``) can show it whether or not the
model is loaded right now (a fallback is a property of the host, the same at every reload), and
logs a fallback as a warning once per (model, device, reason), not at every re-profiling load.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """One load's placement: ``asked`` (``cpu``, ``cuda``, ``cuda:N``), ``executes_on`` (the device
    it really runs on) and ``fallback`` (why they differ; None when the device was honoured)."""

    asked: str
    executes_on: str
    fallback: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"asked": self.asked, "executes_on": self.executes_on, "fallback": self.fallback}


_lock = threading.Lock()
_latest: dict[tuple[str, str], Placement] = {}
_warned: set[tuple[str, str, str]] = set()


def record_placement(model: str, placement: Placement) -> None:
    """Remember ``model``'s placement for its device; warn the first time a fallback is seen."""
    key = (model, placement.asked)
    with _lock:
        _latest[key] = placement
        first = placement.fallback is not None and (model, placement.asked, placement.fallback) not in _warned
        if first and placement.fallback is not None:
            _warned.add((model, placement.asked, placement.fallback))
    if first:
        log.warning(
            "model %s: %s asked for, runs on %s: %s", model, placement.asked, placement.executes_on, placement.fallback
        )


def latest_placement(model: str, device: str) -> Placement | None:
    """The placement of ``model``'s latest load for ``device`` in this process (None: never loaded)."""
    with _lock:
        return _latest.get((model, device))


def forget_placements() -> None:
    """Drop every remembered placement and warning (tests that check the warning start here)."""
    with _lock:
        _latest.clear()
        _warned.clear()
