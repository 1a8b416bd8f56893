"""How the pipeline thread fills a batch from the cameras' queues."""

from __future__ import annotations

import time

from mlink.configs.schema import SchedulerConfig
from mlink.scheduler.frame import FrameRecord
from mlink.server.ingest import Ingest


def take_batch(ingest: Ingest, sched: SchedulerConfig, poll_s: float) -> list[FrameRecord]:
    """Up to ``sched.batch_size`` records: the first within ``poll_s`` (none: an empty batch),
    then, across cameras, what is queued within ``batch_wait_ms`` after it, so a GPU gets fuller
    batches at a bounded added latency."""
    batch: list[FrameRecord] = []
    first = ingest.next_frame(timeout=poll_s)
    if first is None:
        return batch
    batch.append(first)
    deadline = time.monotonic() + sched.batch_wait_ms / 1000.0
    while len(batch) < sched.batch_size:
        more = ingest.next_frame(timeout=max(deadline - time.monotonic(), 0.0))
        if more is None:
            break
        batch.append(more)
    return batch
