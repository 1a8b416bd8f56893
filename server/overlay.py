"""A camera's result drawn on its frame: what the snapshot route and the dashboard show.

An operator must tell at a glance what ran and what did not: every model gets its own colour
(stable: chosen from its name, and distinct among the models of one result), boxes of an
``executed`` output are solid, boxes of a ``predicted`` output dashed (those reused from
another frame by a hybrid plan, ``temporal``, dotted), and a legend in the top-left corner
lists each output with its provenance, its value (count, class, how many boxes) and its
expected accuracy, under a header naming the camera, frame, plan and revision (a revised
result: a rotating model ran on it since it was first served).

:func:`draw` is pure: it reads a stored result (``FrameResult.to_json()``, the JSON the cache
holds) and returns a new image; nothing here knows the daemon.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import cv2
import numpy as np

from mlink.configs.nodes import node_model

BGR = tuple[int, int, int]

# Distinct, saturated colours that read on video (BGR): Okabe-Ito and Tableau hues.
PALETTE: tuple[BGR, ...] = (
    (0, 159, 230),  # orange
    (233, 180, 86),  # sky blue
    (115, 158, 0),  # green
    (66, 228, 240),  # yellow
    (178, 114, 0),  # blue
    (0, 94, 213),  # vermilion
    (167, 121, 204),  # pink
    (40, 39, 214),  # red
    (189, 103, 148),  # purple
    (75, 86, 140),  # brown
    (207, 190, 23),  # cyan
    (34, 189, 188),  # olive
)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def model_colours(models: Iterable[str]) -> dict[str, BGR]:
    """A colour per model: the palette entry its name hashes to, or the next free one, so two
    models of one site never share a colour (up to the palette's size) and a model keeps its
    colour from frame to frame (its colour depends only on the set of names)."""
    colours: dict[str, BGR] = {}
    used: set[int] = set()
    for name in sorted(set(models)):
        i = zlib.crc32(name.encode()) % len(PALETTE)
        for step in range(len(PALETTE)):
            if (i + step) % len(PALETTE) not in used:
                i = (i + step) % len(PALETTE)
                break
        used.add(i)
        colours[name] = PALETTE[i]
    return colours


def hex_colour(bgr: BGR) -> str:
    """``#rrggbb`` for a colour of :func:`model_colours` (what a page's legend uses)."""
    b, g, r = bgr
    return f"#{r:02x}{g:02x}{b:02x}"


def dashed_rectangle(
    image: np.ndarray,
    p1: tuple[int, int],
    p2: tuple[int, int],
    colour: BGR,
    thickness: int = 1,
    dash: int = 8,
    gap: int = 6,
) -> None:
    """A rectangle from ``p1`` to ``p2`` drawn as dashes of ``dash`` pixels ``gap`` apart (in place)."""
    (x1, y1), (x2, y2) = p1, p2
    for a, b in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        dashed_line(image, a, b, colour, thickness, dash, gap)


def dashed_line(
    image: np.ndarray, a: tuple[int, int], b: tuple[int, int], colour: BGR, thickness: int, dash: int, gap: int
) -> None:
    length = float(np.hypot(b[0] - a[0], b[1] - a[1]))
    if length < 1:
        return
    ux, uy = (b[0] - a[0]) / length, (b[1] - a[1]) / length
    start = 0.0
    while start < length:
        end = min(start + dash, length)
        p = (round(a[0] + ux * start), round(a[1] + uy * start))
        q = (round(a[0] + ux * end), round(a[1] + uy * end))
        cv2.line(image, p, q, colour, thickness, cv2.LINE_AA)
        start = end + gap


def style(out: dict[str, Any]) -> str:
    """How an output's boxes are drawn: ``solid`` (executed), ``dotted`` (reused from another
    frame), ``dashed`` (predicted by links)."""
    if out.get("provenance") == "executed":
        return "solid"
    return "dotted" if out.get("temporal") else "dashed"


def provenance_text(out: dict[str, Any]) -> str:
    """The provenance as the legend says it: executed, predicted from which models, reused."""
    prov = str(out.get("provenance", "?"))
    if prov != "predicted":
        return prov
    sources = [str(s) for s in out.get("sources") or ()]
    if out.get("temporal"):
        return "reused " + ",".join(s.removeprefix("temporal:") for s in sources)
    return "predicted" + (" from " + ",".join(sources) if sources else " (no source)")


def value_text(value: Any) -> str:
    """A stored output's value in a few words: a count, a class, or how many boxes."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return f"{len(value)} box" + ("" if len(value) == 1 else "es")
    if isinstance(value, dict) and "count" in value:
        return f"count {value['count']}"
    if isinstance(value, dict) and "label" in value:
        return f"{value['label']} {float(value.get('score', 0.0)):.2f}"
    return str(value)[:24]


def legend_lines(result: dict[str, Any]) -> list[tuple[str, str | None]]:
    """The legend's lines, each with the model whose colour it carries (None: the header)."""
    head = f"{result.get('camera', '?')}  frame {result.get('frame_index', '?')}  plan {result.get('plan_id', '?')}"
    if result.get("revision"):
        head += f"  revised x{result['revision']}"
    lines: list[tuple[str, str | None]] = [(head, None)]
    for node, out in sorted((result.get("outputs") or {}).items()):
        acc = out.get("expected_accuracy")
        acc_text = "acc ?" if acc is None else f"acc {float(acc):.2f}"
        text = f"{node}: {value_text(out.get('value'))}  {provenance_text(out)}  {acc_text}"
        lines.append((text, node_model(node)))
    for model, why in sorted((result.get("missing") or {}).items()):
        lines.append((f"{model}: missing ({str(why)[:40]})", model))
    return lines


def draw(image: np.ndarray, result: dict[str, Any] | None) -> np.ndarray:
    """``image`` (HxWx3 BGR, left as it is) with ``result``'s boxes and legend drawn on a copy."""
    out = np.ascontiguousarray(image).copy()
    if not result:
        return out
    h, w = out.shape[:2]
    outputs: dict[str, dict[str, Any]] = result.get("outputs") or {}
    colours = model_colours([node_model(n) for n in outputs] + list(result.get("missing") or {}))
    thick = max(1, round(w / 480))
    # executed boxes last, so they stay on top where both coincide
    for node, o in sorted(outputs.items(), key=lambda kv: kv[1].get("provenance") == "executed"):
        if isinstance(o.get("value"), list):
            _boxes(out, o["value"], colours[node_model(node)], style(o), thick)
    _legend(out, legend_lines(result), colours, scale=max(0.35, min(w, 2 * h) / 1600), thick=max(1, thick // 2))
    return out


def _boxes(image: np.ndarray, boxes: Sequence[dict[str, Any]], colour: BGR, how: str, thick: int) -> None:
    h, w = image.shape[:2]
    for b in boxes:
        try:
            x1, y1, x2, y2 = (float(v) for v in b["box"])
        except (KeyError, TypeError, ValueError):
            continue  # not a box: nothing to draw
        p1 = (round(min(max(x1, 0.0), 1.0) * (w - 1)), round(min(max(y1, 0.0), 1.0) * (h - 1)))
        p2 = (round(min(max(x2, 0.0), 1.0) * (w - 1)), round(min(max(y2, 0.0), 1.0) * (h - 1)))
        if how == "solid":
            cv2.rectangle(image, p1, p2, colour, thick, cv2.LINE_AA)
        else:
            dash, gap = (3 * thick, 3 * thick) if how == "dotted" else (6 * thick + 4, 4 * thick + 2)
            dashed_rectangle(image, p1, p2, colour, thick, dash, gap)


def _legend(
    image: np.ndarray, lines: list[tuple[str, str | None]], colours: dict[str, BGR], scale: float, thick: int
) -> None:
    """The lines in a dimmed block at the top left, each model's with a swatch of its colour."""
    (_, th), base = cv2.getTextSize("Ag", FONT, scale, thick)
    step = th + base + 4
    swatch = th
    width = max(cv2.getTextSize(t, FONT, scale, thick)[0][0] for t, _ in lines) + swatch + 16
    h, w = image.shape[:2]
    bw, bh = min(width, w), min(step * len(lines) + 6, h)
    block = image[:bh, :bw]
    block[:] = (block.astype(np.uint16) * 2 // 5).astype(np.uint8)  # dimmed, still see-through
    for k, (text, model) in enumerate(lines):
        y = 4 + k * step + th
        x = 6
        if model is not None:
            cv2.rectangle(image, (x, y - th), (x + swatch, y), colours.get(model, (255, 255, 255)), -1)
            x += swatch + 6
        cv2.putText(image, text, (x, y), FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)
