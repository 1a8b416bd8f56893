"""Table 4 harness, rendering: the report as ``table4.md`` (the paper's table, with the expected
accuracy and the load charges beside the measured figures) and ``table4.png`` (accuracy against
budget), for whatever methods the report holds, in its order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MiB = float(1 << 20)


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown(report: Mapping[str, Any]) -> str:
    p = report["protocol"]
    b = report["budgets"]
    lines = [
        f"## Table 4 on site `{report['site']}` ({report['device']})",
        "",
        f"{p['frames']} frames ({report['profile']}): {p['train_frames']} train (first {p['train_share']:.0%} in time order), "
        f"{p['eval_frames']} evaluation frames in {p['periods']} periods ({sum(p['profiled_per_period'])} profiled by MLink), "
        f"accuracy on {p['scored_frames']} frames no method trained on.",
        "",
        "| model | memory (MiB) | latency (ms/frame) | load (s) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for m, c in report["costs"].items():
        label = "MTL (MobileNetV2 backbone + heads)" if m == "mtl" else m
        load = c.get("load_s")
        lines.append(
            f"| {label} | {c['memory_bytes'] / MiB:.1f} | {c['latency_ms']:.1f} | {'-' if load is None else f'{load:.2f}'} |"
        )
    f = report["fits"]
    lines += [
        "",
        f"Budgets: one model fits = {b['one'] / MiB:.1f} MiB (fits alone: {', '.join(f['one']['fits_alone'])}; at most "
        f"{f['one']['max_models_at_once']} at once), two fit = {b['two'] / MiB:.1f} MiB (at most {f['two']['max_models_at_once']} at once).",
        "",
        *_method_table(report["methods"]),
        "",
        "\\* MTL runs none of the site's models; it runs its own backbone on every frame where it fits.",
        "",
        f"ms per frame includes model loads, each charged at its measured load time and spread over the "
        f"{p['eval_frames']} evaluation frames (time-shared methods swap per buffer of "
        f"{report.get('options', {}).get('buffer_frames', '?')} frames); expected % is the method's own prediction "
        "of its accuracy, where it makes one.",
        "",
        "Notes:",
        *_method_notes(report["methods"]),
    ]
    t = report.get("trivial")
    if t:
        nodes = ", ".join(f"{k} {_pct(v)}%" for k, v in t["by_node"].items())
        lines.append(
            f"- Reference, no model at all: constant outputs fitted on the training share score {_pct(t['accuracy'])}% ({nodes})."
        )
    lines.append("")
    return "\n".join(lines)


def _pair(one: Mapping[str, Any], two: Mapping[str, Any], key: str, fmt: Any) -> str:
    return f"{fmt(one.get(key))} / {fmt(two.get(key))}"


def _ms(x: Any) -> str:
    return "-" if x is None else f"{x:.1f}"


def _mib(x: Any) -> str:
    return "-" if x is None else f"{x / MiB:.1f}"


def _count(x: Any) -> str:
    return "-" if x is None else str(x)


def _method_table(methods: Mapping[str, Any]) -> list[str]:
    """The paper's table: one row per method in the report, whatever methods it holds."""
    lines = [
        "| method | accuracy % (one / two) | expected % (one / two) | ms per frame (one / two) | "
        "of which loads ms (one / two) | loads (one / two) | executions saved % (one / two) | "
        "memory held MiB (one / two) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, r in methods.items():
        one, two = r["one"], r["two"]
        mark = " *" if m == "MTL" else ""
        lines.append(
            f"| {m} | {_pair(one, two, 'accuracy', _pct)} | {_pair(one, two, 'expected_accuracy', _pct)} | "
            f"{_pair(one, two, 'ms_per_frame', _ms)} | {_pair(one, two, 'load_ms_per_frame', _ms)} | "
            f"{_pair(one, two, 'loads', _count)} | {_pair(one, two, 'executions_saved', _pct)}{mark} | "
            f"{_pair(one, two, 'memory_bytes', _mib)} |"
        )
    return lines


def _method_notes(methods: Mapping[str, Any]) -> list[str]:
    """Every result's notes, then what each period-based method (MLink rows) chose."""
    lines = []
    for m, r in methods.items():
        for which in ("one", "two"):
            for n in r[which].get("notes", ()):
                lines.append(f"- {m} ({which}): {n}")
    for m, r in methods.items():
        for which in ("one", "two"):
            row = r[which]
            if "active_sets" not in row:
                continue
            sets = ", ".join(f"{k} x{v}" for k, v in row["active_sets"].items())
            hb = row.get("hindsight_best")
            best = (
                f"; best fixed set in hindsight: {'+'.join(hb['active']) or '(none)'} at {_pct(hb['accuracy'])}%"
                if hb
                else ""
            )
            obj = row.get("expected_objective")
            exp = f"; expected objective {obj:.3f}" if obj is not None else ""
            lines.append(f"- {m} ({which}): active sets over the periods: {sets}{exp}{best}")
    return lines


def plot(report: Mapping[str, Any], path: Path) -> Path:
    """Accuracy against budget, one step line per method (a method's accuracy holds from one
    budget of the sweep up to the next), with the one-fits and two-fit budgets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.8))
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<"]
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1)), (0, (5, 3, 1, 3))]
    colors = [plt.get_cmap("tab10")(i) for i in range(10)]
    for i, (m, r) in enumerate(report["methods"].items()):
        xs = [c["budget_bytes"] / MiB for c in r["curve"]]
        ys = [100 * c["accuracy"] for c in r["curve"]]
        ax.plot(
            xs,
            ys,
            marker=markers[i % len(markers)],
            linestyle=styles[i % len(styles)],
            color=colors[i % len(colors)],
            drawstyle="steps-post",
            label=m,
            linewidth=1.6,
            markersize=4 + (i % 2) * 2,
            alpha=0.9,
        )
    for name, b in (("one fits", report["budgets"]["one"]), ("two fit", report["budgets"]["two"])):
        ax.axvline(b / MiB, color="grey", linestyle="--", linewidth=0.8)
        ax.text(b / MiB, 101, name, ha="center", va="bottom", color="grey", fontsize=8)
    ax.set_xlabel(f"memory budget (MiB, measured on {report['device']})")
    ax.set_ylabel("output accuracy vs. the models' own outputs (%)")
    ax.set_ylim(0, 108)
    ax.set_title(f"Table 4 methods on site {report['site']}: accuracy against budget", pad=14)
    ax.grid(alpha=0.3)
    ncol = 4
    rows = math.ceil(len(report["methods"]) / ncol)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.035 * rows, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    from mlink.links.store import jsonable

    paths = {"json": out_dir / "table4.json", "markdown": out_dir / "table4.md", "png": out_dir / "table4.png"}
    report["outputs"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(jsonable(report), indent=1))
    paths["markdown"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths
