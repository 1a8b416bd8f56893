"""Latency distributions of the pipeline, for ``/metrics``: what the per-stage totals cannot show.

:class:`~mlink.server.stages.StageTimes` keeps sums (seconds and counts per stage), which give a
mean; an operator alerting on a slow tail needs the distribution. Every per-item figure the
pipeline thread adds with :meth:`StageTimes.add_each <mlink.server.stages.StageTimes.add_each>`
is also observed here, in a ``prometheus-client`` histogram:

- ``model:<name>`` -> ``mlink_model_inference_seconds{model}``: the model's batch call over the
  frames in it (its share per frame, as the scheduler measures it in ``scheduler/serving.py``);
- ``links`` -> ``mlink_link_prediction_seconds``: link prediction per frame;
- ``end_to_end`` -> ``mlink_frame_latency_seconds``: from the frame's capture (the wall time the
  capture process stamped on it when decoded) to its result written to the cache.

The histograms belong to no registry (tests run several daemons in one process, and a global
registry refuses a second metric of the same name): each app's registry collects them through
this object, a collector.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# Model calls: 1 ms (a GPU batch share) to 10 s (a large model on a CPU).
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Link prediction is a small network per frame: tens of microseconds to a few hundred ms.
LINK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Capture to cache: a batch's wait plus its serving; seconds when the pipeline falls behind.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def without_created(families: Iterable[Metric]) -> Iterator[Metric]:
    """The families without their ``_created`` samples (a timestamp per series that the text
    format shows as an extra gauge, of no use on a dashboard)."""
    for fam in families:
        fam.samples = [s for s in fam.samples if not s.name.endswith("_created")]
        yield fam


class StageHistograms(Collector):
    """The pipeline's histograms (see the module docstring); :meth:`observe` is called by the
    pipeline thread, :meth:`collect` by any scrape (each histogram has its own short lock)."""

    def __init__(self) -> None:
        self.inference = Histogram(
            "mlink_model_inference_seconds",
            "Inference time per frame of each executed model (its batch call over the frames in it).",
            ["model"],
            buckets=INFERENCE_BUCKETS,
            registry=None,
        )
        self.links = Histogram(
            "mlink_link_prediction_seconds",
            "Link prediction time per frame (every predicted output of the frame).",
            buckets=LINK_BUCKETS,
            registry=None,
        )
        self.latency = Histogram(
            "mlink_frame_latency_seconds",
            "A frame's end-to-end latency: from its capture (decode) to its result written to the cache.",
            buckets=LATENCY_BUCKETS,
            registry=None,
        )

    def observe(self, stage: str, seconds: float) -> None:
        """One per-item figure of ``stage``; stages without a histogram are ignored."""
        if stage.startswith("model:"):
            self.inference.labels(model=stage[6:]).observe(seconds)
        elif stage == "links":
            self.links.observe(seconds)
        elif stage == "end_to_end":
            self.latency.observe(seconds)

    def collect(self) -> Iterator[Metric]:
        for h in (self.inference, self.links, self.latency):
            yield from without_created(h.collect())
