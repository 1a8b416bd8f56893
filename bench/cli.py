"""``mlink bench table4``: the paper's Table 4 on one of our sites (see ``bench/table4.py``).

The ``mlink`` program (``server/cli.py``) lives a floor below and does not import this: the
group is registered as the ``bench`` entry point of ``mlink.commands`` (pyproject.toml), which
``server.cli.main`` adds; ``bench.table4`` is imported only when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mlink.server.cli_common import ConfigOpt, SiteOpt, config_path, resolve_config, run_guarded

bench_app = typer.Typer(help="Benchmarks: the paper's evaluation on our sites.", no_args_is_help=True)


@bench_app.command("table4")
def table4_cmd(
    site: str | None = SiteOpt,
    config: Path | None = ConfigOpt,
    frames: int | None = typer.Option(
        None,
        "--frames",
        min=20,
        help="oracle frames (default: the site's latest profile; profiled first when missing or shorter)",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="print every method's figures at every budget as one JSON object"
    ),
    out: Path | None = typer.Option(None, "--out", help="output folder (default: $MLINK_HOME/bench/SITE)"),
    home: Path | None = typer.Option(
        None, "--home", help="where profiles live (default: the asset store's home, $MLINK_HOME)"
    ),
    periods: int | None = typer.Option(
        None, "--periods", min=1, help="periods over the evaluation stream (default 10)"
    ),
    train_share: float | None = typer.Option(
        None, "--train-share", help="share of the frames (first, in time order) everything trains on (default 0.1)"
    ),
    profile_share: float | None = typer.Option(
        None,
        "--profile-share",
        help="share of each period MLink profiles through all models (default 0.01, at least 2 frames)",
    ),
    sweep: int | None = typer.Option(None, "--sweep", min=0, help="budgets in the sweep for the curve (default 8)"),
    epochs: int | None = typer.Option(
        None, "--epochs", min=1, help="link training epochs (default 100, early-stopped)"
    ),
    mtl_epochs: int | None = typer.Option(None, "--mtl-epochs", min=1, help="MTL head training epochs (default 300)"),
    dqn_steps: int | None = typer.Option(
        None, "--dqn-steps", min=1, help="DRLS DQN training steps per budget (default 4000)"
    ),
    latency_frames: int | None = typer.Option(
        None, "--latency-frames", min=1, help="frames per model for the latency median (default 20)"
    ),
    cost_repeats: int | None = typer.Option(
        None, "--cost-repeats", min=1, help="loads per model for the memory cost (largest kept; default 2)"
    ),
    buffer_frames: int | None = typer.Option(
        None,
        "--buffer-frames",
        min=1,
        help="consecutive evaluation frames a time-shared method buffers between model swaps (default 20)",
    ),
    hybrid_share: float | None = typer.Option(
        None,
        "--hybrid-share",
        min=0.01,
        max=1.0,
        help="MLink (hybrid)'s GPU time per frame as a share of every model on every frame "
        "(default: Reducto's measured time at the same budget)",
    ),
    remeasure: bool = typer.Option(False, "--remeasure", help="measure costs again instead of using the cached table"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Run Standalone, MTL, DRLS, Reducto, MLink (both selectors) and MLink (hybrid) under the same budgets."""
    options = {
        "periods": periods,
        "train_share": train_share,
        "profile_share": profile_share,
        "sweep": sweep,
        "epochs": epochs,
        "mtl_epochs": mtl_epochs,
        "dqn_steps": dqn_steps,
        "latency_frames": latency_frames,
        "cost_repeats": cost_repeats,
        "buffer_frames": buffer_frames,
        "hybrid_share": hybrid_share,
    }
    run_guarded(
        lambda: _table4(site, config, frames, out, home, options, remeasure=remeasure, quiet=quiet, as_json=as_json)
    )


def _table4(
    site: str | None,
    config: Path | None,
    frames: int | None,
    out: Path | None,
    home: Path | None,
    options: dict[str, Any],
    *,
    remeasure: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    from mlink.bench.table4 import markdown, run_table4
    from mlink.models.assets import default_store

    cfg = resolve_config(site, config)
    store = default_store()
    h = Path(home) if home else store.home
    out_dir = Path(out) if out else h / "bench" / cfg.site
    report = run_table4(
        cfg,
        store=store,
        home=h,
        out_dir=out_dir,
        config_path=config_path(site, config),
        frames=frames,
        options=options,
        remeasure=remeasure,
        progress=not quiet,
    )
    if as_json:
        typer.echo(Path(report["outputs"]["json"]).read_text())
        return
    typer.echo(markdown(report))
    typer.echo(f"written: {report['outputs']['markdown']}, {report['outputs']['json']}, {report['outputs']['png']}")


__all__ = ["bench_app"]
