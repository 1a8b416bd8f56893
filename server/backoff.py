"""Reconnect delays: one policy for every remote the daemon keeps reopening (cameras in
``server/ingest.py``, Redis in ``server/cache.py``)."""

from __future__ import annotations

import random


class Backoff:
    """Delays base, 2*base, 4*base ... capped at ``maximum``, each scaled by 1 +- jitter (so
    many readers, or many daemons, do not retry in step); :meth:`reset` after a success."""

    def __init__(self, base: float, maximum: float, jitter: float = 0.2, rng: random.Random | None = None) -> None:
        self.base, self.maximum, self.jitter = base, max(base, maximum), jitter
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        d = min(self.maximum, self.base * (2 ** min(self.attempt, 40)))
        self.attempt += 1
        if self.jitter:
            d *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        return d

    def reset(self) -> None:
        self.attempt = 0
