"""Memory budgets and sizes as a site config writes them, parsed at the bottom floor.

A budget is a size in bytes (``4e9``, ``"4GiB"``, ``"500MB"``), a share of the device's memory
(``0.8``, ``"80%"``) or a share of the site's models' measured cost added up (``"0.5x"``).
:func:`parse_budget` is the one parser (the site config validates with it);
:func:`resolve_site_budget` is the one resolver: it turns a spec into bytes from the device's
memory and the models' measured costs (the memory meter and the pool measure those, above), and
says when it cannot know yet. :func:`resolve_budget` is its arithmetic.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Literal

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_bytes(spec: int | float | str) -> int:
    """Bytes from ``1500000000``, ``"1.5GB"``, ``"512MiB"``, ``"2 g"`` (decimal k/M/G, binary KiB/MiB/GiB)."""
    if isinstance(spec, bool):
        raise ValueError(f"not a size: {spec!r}")
    if isinstance(spec, (int, float)):
        if spec < 0:
            raise ValueError(f"a size cannot be negative: {spec!r}")
        return int(spec)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", spec)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {spec!r} (use bytes, or e.g. 512MiB, 1.5GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


BudgetKind = Literal["bytes", "device", "models"]


def _parse_budget_text(spec: str) -> tuple[BudgetKind, float] | float:
    """A budget spec written as text: (kind, amount) for ``"80%"``, ``"0.5x"`` or a size
    (``"4GiB"``), else the plain number it spells (which :func:`parse_budget` reads on)."""
    s = spec.strip().lower()
    try:
        if s.endswith("%"):
            frac = float(s[:-1]) / 100.0
            if not 0.0 < frac <= 1.0:
                raise ValueError(f"a budget percentage must be in (0, 100]: {spec!r}")
            return "device", frac
        if s.endswith("x"):
            share = float(s[:-1])
            if share <= 0:
                raise ValueError(f"budget {spec!r}: the share of the models' cost must be > 0")
            return "models", share
        return float(s)
    except ValueError as exc:
        if "budget" in str(exc):
            raise
    try:
        amount = parse_bytes(s)
    except ValueError:
        raise ValueError(
            f"budget {spec!r}: expected bytes (4GiB, 500MB), a device share (0.8, 80%) or a share of the models' cost (0.5x)"
        ) from None
    if amount < 1:
        raise ValueError(f"budget {spec!r} is under one byte")
    return "bytes", float(amount)


def _finite(spec: int | float | str, amount: float) -> None:
    """``nan``, ``inf``, ``nanx`` or ``infx`` mean no budget at all: refused where they are written."""
    if not math.isfinite(amount):
        raise ValueError(f"budget {spec!r} is not a finite amount")


def parse_budget(spec: int | float | str) -> tuple[BudgetKind, float]:
    """The one parser of budget specs (the site config validates with it): (kind, amount).

    - a number in (0, 1], ``"0.8"`` or ``"80%"``: that share of the device's memory
      (``"device"``; GPU memory, or system memory on a CPU); ``1`` is the whole device;
    - ``"0.5x"``: that share of the site's models' measured costs added up (``"models"``),
      which gives a demo on a big machine a budget that cannot hold every model;
    - anything else is a size in bytes (``4e9``, ``"4GiB"``, ``"500MB"``, see :func:`parse_bytes`).
    """
    if isinstance(spec, bool):
        raise ValueError(f"not a budget: {spec!r}")
    if isinstance(spec, str):
        parsed = _parse_budget_text(spec)
        if isinstance(parsed, tuple):
            _finite(spec, parsed[1])
            return parsed
        spec = parsed
    _finite(spec, float(spec))
    if float(spec) <= 0:
        raise ValueError(f"a budget must be > 0, got {spec!r}")
    if float(spec) <= 1.0:
        return "device", float(spec)
    return "bytes", float(parse_bytes(spec))


def resolve_budget(spec: int | float | str, total: int, models_cost: int | None = None) -> int:
    """A budget in bytes: ``total`` is the device's memory, ``models_cost`` every model's cost added up."""
    kind, amount = parse_budget(spec)
    base = 1
    if kind == "device":
        base = total
    elif kind == "models":
        if models_cost is None:
            raise ValueError(f"budget {spec!r} is a share of the models' cost, and no cost was given")
        base = models_cost
    out = int(amount * base)
    if out < 1:  # e.g. a device share of 1e-300: every output would be "predicted" from nothing
        raise ValueError(f"budget {spec!r} comes to {out} bytes: nothing fits")
    if total > 0 and out > total:  # e.g. 1000TiB or 1000x: a budget that bounds nothing
        raise ValueError(
            f"budget {spec!r} ({_human(out)}) is more than the device's memory ({_human(total)}): "
            "write at most the device's memory, or a share of it (0.8, 80%)"
        )
    return out


def _human(n: float) -> str:
    """``n`` bytes as the budget messages write them (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns


def check_holds_a_model(budget: int, costs: Mapping[str, int], spec: int | float | str = "") -> None:
    """Refuse a budget under the smallest measured model cost: no model could ever load, and every
    output would be "predicted" from no source at all. Checked at plan time, when costs are known."""
    if not costs:
        return
    name, smallest = min(costs.items(), key=lambda kv: kv[1])
    if budget < smallest:
        shown = f"{spec!r} = " if spec != "" else ""
        raise ValueError(
            f"budget {shown}{_human(budget)} cannot hold any model: the smallest, {name}, needs {_human(smallest)}"
        )


def budget_is_relative(spec: int | float | str) -> bool:
    """True when the budget is a share of the models' measured cost (``"0.5x"``)."""
    return parse_budget(spec)[0] == "models"


def resolve_site_budget(
    spec: int | float | str, total: int, costs: Mapping[str, int] | None = None, models: Iterable[str] | None = None
) -> int | None:
    """The budget in bytes: the one place a site's budget spec is resolved.

    ``total`` is the device's memory (``MemoryMeter.total()``). A share of the models' cost
    (``"0.5x"``) adds up ``costs`` of ``models`` (default: every model in ``costs``, e.g. those
    that could be measured) and is None while one of ``models`` has no cost yet (measure them
    first). Whatever the kind, a budget beyond the device's memory or under the smallest known
    model cost is refused with the reason (a ValueError): it would bound nothing, or hold nothing.
    """
    names = list(costs or ()) if models is None else list(models)
    known = {n: int(costs[n]) for n in names if n in costs} if costs else {}
    if not budget_is_relative(spec):
        out = resolve_budget(spec, total)
    elif costs is None or any(n not in costs for n in names):
        return None  # a share of costs not all measured yet
    else:
        out = resolve_budget(spec, total, sum(int(costs[n]) for n in names))
    check_holds_a_model(out, known, spec)
    return out
