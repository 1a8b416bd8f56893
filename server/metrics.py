"""Prometheus text exposition (format 0.0.4) for ``/metrics``, without a client library.

The figures come from what the daemon publishes (its :class:`~mlink.server.snapshot.Snapshot`
of plan, pool and links, and the counts as of the last batch) and from the counters the camera
readers and the cache copy out under their own short locks (``mlink.server.api.collect_metrics``);
this module only renders them, so a scrape never waits for the pipeline nor computes on its
state. Names follow the conventions page: ``mlink_`` prefix, ``_total`` for counters,
``_bytes``/``_seconds`` units.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

MetricType = Literal["counter", "gauge"]


@dataclass
class Metric:
    name: str
    help: str
    type: MetricType
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Metric:
        self.samples.append((labels, float(value)))
        return self


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(value)


def render(metrics: Iterable[Metric]) -> str:
    lines: list[str] = []
    for m in metrics:
        lines.append(f"# HELP {m.name} {m.help}")
        lines.append(f"# TYPE {m.name} {m.type}")
        for labels, value in m.samples:
            label_text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
            lines.append(f"{m.name}{{{label_text}}} {_number(value)}" if label_text else f"{m.name} {_number(value)}")
    return "\n".join(lines) + "\n"


def per_label(name: str, help: str, type: MetricType, label: str, values: Mapping[str, float]) -> Metric:
    metric = Metric(name, help, type)
    for key, value in values.items():
        metric.add(value, **{label: key})
    return metric


def placement_metrics(rows: Iterable[Mapping[str, Any]]) -> list[Metric]:
    """Where each model executes, from the /api/v1/models rows (``executes_on``, ``fallback``):
    ``mlink_model_device{model,device} 1`` and ``mlink_model_fallback{model}`` (1 when the model
    runs somewhere other than the site's device, e.g. on the CPU of a CUDA site). Models not
    loaded yet have neither."""
    device = Metric("mlink_model_device", "1 on the device the model executes on (at its latest load).", "gauge")
    fallback = Metric(
        "mlink_model_fallback",
        "1 when the model cannot run on the site's device and executes elsewhere (reason in /api/v1/models).",
        "gauge",
    )
    for row in rows:
        if row.get("executes_on") is None:
            continue
        device.add(1, model=str(row["name"]), device=str(row["executes_on"]))
        fallback.add(float(row.get("fallback") is not None), model=str(row["name"]))
    return [device, fallback]
