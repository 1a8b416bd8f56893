"""``mlink schedule plan``: which models a site would load under a budget, and what it expects.

Registered in ``server/cli.py`` as ``app.add_typer(schedule_app, name="schedule")``.

What it does, in order:

1. **Tuples**: the site's latest stored profile (``$MLINK_HOME/profiles/SITE/latest``, see
   ``mlink profile``); with ``--frames N`` or without a stored profile, N frames
   (default ``links.profile_frames``) are profiled first and stored.
2. **Held-out split and links**: the profile is split as ``mlink links train`` splits it
   (``links.matrix.heldout_split``): links train on the first part, accuracies are measured on
   the held-out part. The stored links (``links.store`` or ``$MLINK_HOME/links/SITE``) are used
   when they were trained on exactly that training split (their ``data_version``); otherwise
   links are trained on it now (with a progress bar; ``--epochs`` to shorten) and stored there,
   as ``mlink links train`` would.
3. **Costs**: each model is loaded once, alone, through a :class:`ModelPool` (load + warm-up at
   the serving batch, measured by the pool's meter: NVML on a GPU, anonymous RSS on the CPU),
   then unloaded. The figures are saved to ``$MLINK_HOME/costs/SITE-DEVICE.json``;
   ``--saved-costs`` reuses that table instead of loading anything (the daemon can seed its pool
   from it too). A model that fails to load is reported and can only be predicted.
4. **Selection**: both selectors run (``"paper"``: the activation-probability greedy;
   ``"objective"``: Eq. 1 with measured ensemble accuracies) with the planner's cost margin;
   the one asked for (``--selector``, default the config's) is the plan, the other is printed
   for comparison.

``--json`` prints one JSON object with everything (costs, budget, both selections, the model
accuracy table for every subset).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import typer

from mlink.server.cli_common import ConfigOpt, SiteOpt, resolve_config, run_guarded, site_tuples

schedule_app = typer.Typer(help="The scheduler: which models to load under a memory budget.", no_args_is_help=True)

MiB = 1 << 20


def _mib(n: float | None) -> str:
    return "-" if n is None or not math.isfinite(n) else f"{n / MiB:.1f} MiB"


def cost_table_path(home: Path, site: str, device: str) -> Path:
    return home / "costs" / f"{site}-{device.replace(':', '_')}.json"


def save_cost_table(path: Path, costs: dict[str, int], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**meta, "costs": costs}, indent=1))
    tmp.replace(path)


def load_cost_table(path: Path) -> dict[str, int] | None:
    try:
        data = json.loads(path.read_text())
        return {str(k): int(v) for k, v in data["costs"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measure_costs(
    cfg: Any, store: Any, progress: bool = True
) -> tuple[dict[str, int], dict[str, str], dict[str, float], str]:
    """Load each model once, alone, through a pool; (costs, failures, load seconds, meter source)."""
    from mlink.scheduler.memory import MemoryMeter
    from mlink.scheduler.pool import ModelPool
    from mlink.scheduler.site import model_factory

    meter = MemoryMeter(cfg.device)
    names = [m.name for m in cfg.models]
    pool = ModelPool(
        meter.total(),
        cfg.device,
        meter=meter,
        factory=model_factory(cfg, store),
        warmup_batch=cfg.scheduler.batch_size,
        models=names,
    )
    seconds: dict[str, float] = {}
    for name in names:
        if progress:
            typer.echo(f"measuring {name} ...", err=True)
        if pool.load(name):
            seconds[name] = pool.load_seconds.get(name, [float("nan")])[-1]
            pool.unload(name, reason="measure")
    failures = pool.unavailable()
    return {n: c for n, c in pool.costs().items() if n not in failures}, failures, seconds, meter.source


def _links(cfg: Any, store: Any, train: Any, epochs: int | None, quiet: bool):
    from mlink.links import LinkSet, LinkStoreError, TrainConfig
    from mlink.scheduler.profiler import link_store_dir

    path = link_store_dir(cfg, store.home)
    why = None
    try:
        links = LinkSet.load(path, expect_specs=train.specs)
        if links.data_version == train.version():
            return links, path, None
        why = "the stored links were trained on other data than this profile's training split"
    except LinkStoreError as exc:  # missing, corrupt or incompatible: train
        why = str(exc).splitlines()[0]
    if not quiet:
        typer.echo(f"training links ({why})", err=True)
    config = TrainConfig() if epochs is None else TrainConfig(epochs=epochs)
    links = LinkSet.train(train, config=config, progress=not quiet)
    links.save(path)
    return links, path, why


def _site_costs(
    cfg: Any, store: Any, names: list[str], saved_costs: bool, quiet: bool
) -> tuple[dict[str, int], dict[str, str], dict[str, float], str]:
    """Each model's memory cost: the saved table when asked for and complete, else measured now
    and saved. Returns the costs, the models that failed to load, load seconds and where the
    costs come from."""
    table_path = cost_table_path(store.home, cfg.site, cfg.device)
    costs = load_cost_table(table_path) if saved_costs else None
    failures: dict[str, str] = {}
    seconds: dict[str, float] = {}
    cost_source = f"saved table {table_path}"
    if costs is None or not set(names) <= set(costs):
        if saved_costs and not quiet:
            typer.echo(f"no complete saved cost table at {table_path}; measuring", err=True)
        costs, failures, seconds, source = measure_costs(cfg, store, progress=not quiet)
        save_cost_table(
            table_path, costs, {"site": cfg.site, "device": cfg.device, "meter": source, "measured_at": time.time()}
        )
        cost_source = f"measured now ({source}), saved to {table_path}"
    return costs, failures, seconds, cost_source


def _run_selectors(
    costs: dict[str, int], acc: Any, budget_bytes: int, names: list[str], failures: dict[str, str], margin: float
) -> tuple[dict[str, Any], dict[str, float]]:
    """Both selectors (``paper`` and ``objective``) on the same inputs, and how long each took."""
    from mlink.scheduler.selector import select_models

    selections = {}
    timing = {}
    for sel_name in ("paper", "objective"):
        t0 = time.perf_counter()
        selections[sel_name] = select_models(
            sel_name, costs, acc, budget_bytes, models=names, exclude=set(failures), cost_margin=margin
        )
        timing[sel_name] = time.perf_counter() - t0
    return selections, timing


def plan_site(
    cfg: Any,
    *,
    budget: str | None = None,
    selector: str | None = None,
    frames: int | None = None,
    saved_costs: bool = False,
    epochs: int | None = None,
    margin: float = 0.1,
    quiet: bool = False,
) -> dict[str, Any]:
    """Everything ``mlink schedule plan`` prints, as one dict."""
    from mlink.configs.budget import resolve_site_budget
    from mlink.links.matrix import heldout_split
    from mlink.models.assets import default_store
    from mlink.scheduler.accuracy import LinkAccuracy
    from mlink.scheduler.memory import MemoryMeter
    from mlink.scheduler.site import site_served

    store = default_store()
    served = site_served(cfg)
    names = list(served)
    tuples, profile_path = site_tuples(cfg, store, frames, progress=not quiet)
    train, test = heldout_split(tuples)
    links, links_path, retrained = _links(cfg, store, train, epochs, quiet)
    costs, failures, seconds, cost_source = _site_costs(cfg, store, names, saved_costs, quiet)
    total = MemoryMeter(cfg.device).total()
    spec = cfg.budget if budget is None else budget
    budget_bytes = resolve_site_budget(spec, total, {n: costs[n] for n in names if n in costs})
    assert budget_bytes is not None  # never None when the costs are given

    acc = LinkAccuracy(links, test, served)
    chosen = selector or cfg.scheduler.selector
    selections, timing = _run_selectors(costs, acc, budget_bytes, names, failures, margin)
    sel = selections[chosen]
    active = frozenset(sel.active)
    return {
        "site": cfg.site,
        "device": cfg.device,
        "profile": str(profile_path),
        "tuples": len(tuples),
        "held_out": len(test),
        "links": str(links_path),
        "links_retrained": retrained,
        "costs": {n: costs.get(n) for n in names},
        "load_seconds": seconds,
        "cost_source": cost_source,
        "failed": failures,
        "budget_spec": str(spec),
        "budget_bytes": budget_bytes,
        "cost_margin": margin,
        "selector": chosen,
        "active": sorted(active),
        "predicted": sorted(set(names) - active),
        "expected": {m: round(acc(active, m), 6) for m in names},
        "expected_nodes": {k: round(v, 6) for k, v in acc.nodes(active).items()},
        "objective": sel.objective,
        "cost_bytes": sum(costs.get(m, 0) for m in active),
        "charged_bytes": sel.cost,
        "budget_used": sum(costs.get(m, 0) for m in active) / budget_bytes if budget_bytes else None,
        "selections": {k: {**v.to_json(), "seconds": round(timing[k], 4)} for k, v in selections.items()},
        "accuracy_table": acc.table(),
    }


@schedule_app.command("plan")
def plan_cmd(
    site: str | None = SiteOpt,
    config: Path | None = ConfigOpt,
    budget: str | None = typer.Option(
        None,
        "--budget",
        help="bytes (4GiB), a device share (0.8, 80%), or a share of the models' cost (0.5x); default: the config's",
    ),
    selector: str | None = typer.Option(None, "--selector", help="paper | objective (default: the config's)"),
    as_json: bool = typer.Option(False, "--json"),
    frames: int | None = typer.Option(
        None, "--frames", min=4, help="profile this many frames first (default: use the latest profile)"
    ),
    saved_costs: bool = typer.Option(
        False, "--saved-costs", help="reuse the cost table saved by an earlier run instead of loading each model"
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", help="epochs if links must be trained (default: the paper's 100, early-stopped)"
    ),
    margin: float = typer.Option(
        0.1, "--margin", min=0.0, help="charge each measured cost plus this share (measurement variance)"
    ),
) -> None:
    """Print the measured costs, the chosen set, its expected objective and the budget used."""

    def body() -> None:
        if selector is not None and selector not in ("paper", "objective"):
            raise ValueError(f"--selector must be paper or objective, got {selector!r}")
        cfg = resolve_config(site, config)
        out = plan_site(
            cfg,
            budget=budget,
            selector=selector,
            frames=frames,
            saved_costs=saved_costs,
            epochs=epochs,
            margin=margin,
            quiet=as_json,
        )
        if as_json:
            typer.echo(json.dumps(out, default=str))
            return
        typer.echo(
            f"site {out['site']} on {out['device']}: {out['tuples']} profiled frames ({out['profile']}), accuracies on {out['held_out']} held-out"
        )
        typer.echo(f"costs ({out['cost_source']}):")
        for m, c in out["costs"].items():
            extra = f"   load {out['load_seconds'][m]:.2f} s" if m in out["load_seconds"] else ""
            typer.echo(f"  {m:<22} {_mib(c):>12}{extra}")
        for m, why in out["failed"].items():
            typer.echo(f"  {m:<22} FAILED: {why}")
        typer.echo(
            f"budget {out['budget_spec']} = {_mib(out['budget_bytes'])} (costs charged +{out['cost_margin']:.0%})"
        )
        typer.echo(
            f"selector {out['selector']}: load {', '.join(out['active']) or '(nothing)'}; predict {', '.join(out['predicted']) or '(nothing)'}"
        )
        for m, p in out["expected"].items():
            how = "executed" if m in out["active"] else "predicted"
            typer.echo(f"  {m:<22} {how:<9} expected accuracy {p:.3f}")
        used = out["budget_used"]
        typer.echo(
            f"expected objective (Eq. 1) {out['objective']:.4f}; budget used {_mib(out['cost_bytes'])} of {_mib(out['budget_bytes'])}"
            + (f" ({used:.0%})" if used is not None else "")
        )
        other = "paper" if out["selector"] == "objective" else "objective"
        o = out["selections"][other]
        typer.echo(f"({other} selector: {', '.join(o['active']) or '(nothing)'}, objective {o['objective']:.4f})")

    run_guarded(body)
