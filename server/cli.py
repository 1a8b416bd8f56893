"""The ``mlink`` command line: assets, models, configs, and the one-shot demo.

Every command exits non-zero with a one-line reason on bad input (missing asset, unreadable
video, invalid config) instead of a traceback; ``--json`` output is one JSON value per line so
it can be piped into ``jq``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from mlink.configs.load import ConfigError, load_config
from mlink.configs.schema import SiteConfig
from mlink.links.tuples import node_key
from mlink.models.assets import MANIFEST, AssetError, default_store
from mlink.models.catalog import create_model, model_info, zoo, zoo_catalog
from mlink.server.cli_common import ConfigOpt, SiteOpt, config_path, fail, resolve_config, run_guarded, site_tuples
from mlink.server.cli_schedule import schedule_app
from mlink.server.frames import read_frames, resolve_url

app = typer.Typer(
    help="mlink: serve many vision models under a memory budget, predicting the ones not loaded.", no_args_is_help=True
)
assets_app = typer.Typer(help="Model weights and sample videos: list, fetch, verify.", no_args_is_help=True)
models_app = typer.Typer(help="The model zoo: list entries, run one on a video.", no_args_is_help=True)
config_app = typer.Typer(help="Site config files.", no_args_is_help=True)
app.add_typer(assets_app, name="assets")
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
app.add_typer(schedule_app, name="schedule")
# Command groups of the floors above this one (``mlink bench``) register themselves under the
# ``mlink.commands`` entry points (pyproject.toml); main() adds them, so importing this module
# imports none of them.
COMMAND_GROUPS = "mlink.commands"


# -- assets ---------------------------------------------------------------------------------
@assets_app.command("list")
def assets_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every manifest entry and whether its verified copy is in the cache."""
    store = default_store()
    rows = []
    for name, asset in MANIFEST.items():
        cached = store.cached_path(name).exists()
        rows.append(
            {
                "name": name,
                "file": asset.file,
                "kind": asset.kind,
                "cached": cached,
                "available_offline": store.present(name),
                "sha256": asset.sha256 or f"{asset.sha256_prefix}...",
                "size": asset.size,
                "license": asset.license,
                "upstream": list(asset.urls)
                + ([f"pypi:{asset.pypi.distribution}=={asset.pypi.version}/{asset.pypi.path}"] if asset.pypi else []),
            }
        )
    if as_json:
        typer.echo(json.dumps({"cache": str(store.cache_dir), "mirror": str(store.mirror or ""), "assets": rows}))
        return
    typer.echo(f"cache: {store.cache_dir}   mirror: {store.mirror or '(MLINK_ASSET_MIRROR not set)'}")
    for r in rows:
        state = "cached" if r["cached"] else ("offline-ok" if r["available_offline"] else "missing")
        typer.echo(f"  {r['name']:<40} {r['kind']:<6} {state:<10} {r['file']}")


@assets_app.command("fetch")
def assets_fetch(
    names: list[str] = typer.Argument(None, help="assets to fetch (default: those of the config, or all)"),
    site: str | None = SiteOpt,
    config: Path | None = ConfigOpt,
    force: bool = typer.Option(False, help="fetch again even when a verified copy is cached"),
) -> None:
    """Fetch and verify assets (sha256) into the cache."""

    def body() -> None:
        wanted = list(names or [])
        if not wanted:
            wanted = config_assets(resolve_config(site, config)) if (site or config) else list(MANIFEST)
        store = default_store()
        failed = []
        for name in wanted:
            try:
                path = store.fetch(name, force=force)
                typer.echo(f"ok      {name:<40} {path}")
            except AssetError as exc:
                failed.append(name)
                typer.echo(f"FAILED  {name}: {exc}", err=True)
        if failed:
            fail(f"{len(failed)} asset(s) not fetched: {', '.join(failed)}")

    run_guarded(body)


@assets_app.command("verify")
def assets_verify() -> None:
    """Check every cached file against its sha256; exit 1 if any is corrupt."""
    store = default_store()
    bad = 0
    for name in MANIFEST:
        st = store.status(name)
        bad += st.state == "corrupt"
        typer.echo(f"{st.state:<8} {name:<40} {st.detail if st.state == 'corrupt' else st.path}")
    if bad:
        fail(f"{bad} corrupt file(s); `mlink assets fetch --force NAME` replaces them", code=1)


def config_assets(cfg: SiteConfig) -> list[str]:
    """Assets a site needs: its models' weights and its asset:// streams."""
    names = [a for m in cfg.models for a in model_info(m.name).assets]
    names += [s.url.removeprefix("asset://") for s in cfg.streams if s.url.startswith("asset://")]
    return list(dict.fromkeys(names))


# -- models ---------------------------------------------------------------------------------
@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Zoo entries: name, task, output specs, backend, whether their assets are available."""
    store = default_store()
    rows: list[dict[str, Any]] = []
    for name, cls in zoo().items():
        info = cls.info()
        rows.append(
            {
                "name": name,
                "task": info.task,
                "backend": info.backend,
                "outputs": [o.describe() for o in info.outputs],
                "primary": info.primary,
                "assets": {a: store.present(a) for a in info.assets},
                "note": info.pretrained_note,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for r in rows:
        assets = ", ".join(f"{a}:{'yes' if ok else 'MISSING'}" for a, ok in r["assets"].items()) or "none needed"
        typer.echo(f"{r['name']}  [{r['backend']}, {r['task']}]  assets: {assets}")
        for o in r["outputs"]:
            typer.echo(f"    {o}{'  (primary)' if o.startswith(r['primary'] + ':') else ''}")
        if r["note"]:
            typer.echo(f"    note: {r['note']}")


@models_app.command("run")
def models_run(
    name: str = typer.Argument(..., help="zoo model name"),
    video: str = typer.Option(..., "--video", help="video file, URL, or asset://NAME"),
    frames: int = typer.Option(10, "--frames", min=1),
    fps: float | None = typer.Option(None, "--fps", help="sample rate (default: every frame)"),
    device: str = typer.Option("cpu", "--device"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per frame"),
) -> None:
    """Run one zoo model on a video and print its output per frame."""

    def body() -> None:
        model = create_model(name)
        model.load(device)
        try:
            for frame in read_frames(resolve_url(video), sample_fps=fps, max_frames=frames):
                out = model.infer([frame.image])[0]
                record: dict[str, Any] = {
                    "frame": frame.index,
                    "timestamp": frame.timestamp,
                    "model": name,
                    "output": model.derived(out),
                }
                if as_json:
                    typer.echo(json.dumps(record))
                else:
                    typer.echo(f"frame {frame.index:>5} t={frame.timestamp:>8.2f}s  {_summary(record['output'])}")
        finally:
            model.unload()

    run_guarded(body)


def _summary(derived: dict[str, Any]) -> str:
    parts = []
    for key, value in derived.items():
        if isinstance(value, dict) and "count" in value:
            parts.append(f"{key}={value['count']}")
        elif isinstance(value, dict) and "label" in value:
            parts.append(f"{key}={value['label']} ({value['score']:.2f})")
        elif isinstance(value, list):
            parts.append(f"{key}=[{len(value)} boxes]")
    return "  ".join(parts)


# -- config ---------------------------------------------------------------------------------
@config_app.command("validate")
def config_validate(path: Path = typer.Argument(..., help="config file")) -> None:
    """Validate a config file; print every error with its path in the file."""
    try:
        cfg = load_config(path, catalog=zoo_catalog())
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"ok: site {cfg.site}: {len(cfg.models)} models ({', '.join(cfg.nodes())}), {len(cfg.streams)} streams")


# -- profiling ------------------------------------------------------------------------------
@app.command("profile")
def profile_cmd(
    site: str | None = SiteOpt,
    config: Path | None = ConfigOpt,
    frames: int = typer.Option(1000, "--frames", min=2, help="profiling frames, spread over the site's streams"),
    out: Path | None = typer.Option(None, "--out", help="dataset folder (default: $MLINK_HOME/profiles/SITE/VERSION)"),
) -> None:
    """Run every model of a site on sampled frames and store the aligned output tuples."""

    def body() -> None:
        from mlink.scheduler.profiler import save_profile
        from mlink.server.profiling import profile_site

        cfg = resolve_config(site, config)
        store = default_store()
        tuples = profile_site(cfg, frames, store)
        if out:
            tuples.save(out)
            path = out
        else:
            path = save_profile(tuples, store.home, cfg.site)
        typer.echo(f"profiled {len(tuples)} frames x {len(tuples.specs)} outputs of site {cfg.site} -> {path}")

    run_guarded(body)


# -- links ----------------------------------------------------------------------------------
links_app = typer.Typer(help="Model links: train, evaluate and show a site's links.", no_args_is_help=True)
app.add_typer(links_app, name="links")


def _site_tuples(cfg: SiteConfig, frames: int | None):
    """The site's latest profile, or a fresh one of ``frames`` (default links.profile_frames)."""
    tuples, path = site_tuples(cfg, default_store(), frames)
    typer.echo(f"profile: {path} ({len(tuples)} tuples)", err=True)
    return tuples


def _report_matrix(cfg: SiteConfig, matrix, png: Path | None, as_json: bool) -> None:
    from mlink.scheduler.profiler import link_store_dir

    png = png or link_store_dir(cfg, default_store().home) / "matrix.png"
    how = f"{matrix.n} held-out frames" + (f", {matrix.folds}-fold CV" if matrix.folds > 1 else "")
    matrix.plot_heatmap(png, title=f"link accuracy, site {cfg.site} ({how})")
    if as_json:
        typer.echo(json.dumps({"site": cfg.site, "heatmap": str(png), **matrix.to_json()}))
        return
    typer.echo(matrix.table())
    losers = [f"{s} -> {t}" for (s, t), ok in matrix.beats_trivial().items() if not ok]
    if losers:
        typer.echo(f"links not beating their target's trivial predictor: {', '.join(losers)}")
    typer.echo(f"heatmap: {png}")


@links_app.command("train")
def links_train(
    site: str | None = SiteOpt,
    config: Path | None = ConfigOpt,
    frames: int | None = typer.Option(
        None, "--frames", help="profile this many frames first (default: use the latest profile)"
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", help="training epochs (default: the paper's 100, early-stopped)"
    ),
    png: Path | None = typer.Option(None, "--png", help="heatmap path (default: in the link store)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train every link and ensemble of a site, store them, print the accuracy matrix."""

    def body() -> None:
        from mlink.links import LinkSet, TrainConfig
        from mlink.links.matrix import heldout_split
        from mlink.scheduler.profiler import link_store_dir

        cfg = resolve_config(site, config)
        tuples = _site_tuples(cfg, frames)
        train, test = heldout_split(tuples)
        tc = TrainConfig() if epochs is None else TrainConfig(epochs=epochs)
        links = LinkSet.train(train, config=tc, progress=not as_json)
        out = link_store_dir(cfg, default_store().home)
        links.save(out)
        typer.echo(f"links: {out}", err=True)
        _report_matrix(cfg, links.matrix(test), png, as_json)

    run_guarded(body)


@links_app.command("eval")
def links_eval(
    site: str | None = SiteOpt,
    config: Path | None = ConfigOpt,
    png: Path | None = typer.Option(None, "--png"),
    as_json: bool = typer.Option(False, "--json"),
    folds: int = typer.Option(
        1,
        "--folds",
        min=1,
        help="K >= 2: K-fold cross-validation over the whole latest profile (trains K link sets, stores none; "
        "every frame is held out once); 1: the stored links on the held-out share",
    ),
) -> None:
    """Measure the links on held-out frames of the latest profile (stored links, or K-fold CV)."""

    def body() -> None:
        from mlink.links import LinkSet
        from mlink.links.crossval import cross_validate
        from mlink.links.matrix import heldout_split
        from mlink.scheduler.profiler import link_store_dir

        cfg = resolve_config(site, config)
        tuples = _site_tuples(cfg, None)
        if folds > 1:
            t0 = time.perf_counter()

            def said(k: int, n: int) -> None:
                typer.echo(f"cross-validation: fold {k}/{n} done ({time.perf_counter() - t0:.0f} s)", err=True)

            matrix = cross_validate(tuples, folds, progress=said)
            _report_matrix(
                cfg, matrix, png or link_store_dir(cfg, default_store().home) / f"matrix-cv{folds}.png", as_json
            )
            return
        _, test = heldout_split(tuples)
        links = LinkSet.load(link_store_dir(cfg, default_store().home), expect_specs=tuples.specs)
        _report_matrix(cfg, links.matrix(test), png, as_json)

    run_guarded(body)


@links_app.command("show")
def links_show(
    site: str | None = SiteOpt, config: Path | None = ConfigOpt, as_json: bool = typer.Option(False, "--json")
) -> None:
    """What is stored for a site: links, their training data version and metrics."""

    def body() -> None:
        from mlink.links import LinkSet
        from mlink.scheduler.profiler import link_store_dir

        cfg = resolve_config(site, config)
        path = link_store_dir(cfg, default_store().home)
        links = LinkSet.load(path)
        info: dict[str, Any] = {
            "site": cfg.site,
            "path": str(path),
            "created_at": links.created_at,
            "data_version": links.data_version,
            "links": [f"{s} -> {t} ({type(link).__name__})" for (s, t), link in links.links.items()],
            "metrics": links.metrics,
        }
        if as_json:
            typer.echo(json.dumps(info, default=str))
            return
        typer.echo(f"site {cfg.site}: {path}\ncreated {links.created_at}, training data {links.data_version}")
        for line in info["links"]:
            typer.echo(f"  {line}")

    run_guarded(body)


# -- the daemon -----------------------------------------------------------------------------
@app.command("serve")
def serve_cmd(
    site: str | None = SiteOpt,
    config: Path | None = ConfigOpt,
    host: str | None = typer.Option(None, "--host", help="bind address (default: api.host of the config, 127.0.0.1)"),
    port: int | None = typer.Option(None, "--port", help="port (default: api.port of the config, 8000)"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Run the daemon: ingest the cameras, schedule, serve results over HTTP (SIGHUP reloads)."""
    import logging
    import signal
    import threading

    import uvicorn

    from mlink.server.api import create_app
    from mlink.server.daemon import Daemon
    from mlink.server.redact import redact
    from mlink.server.serve_lifecycle import StopRequested, begin_serving, serve_until_stopped

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = run_guarded(lambda: resolve_config(site, config))
    signals = begin_serving()  # stale temp folders swept; SIGTERM/SIGINT: the daemon's stop below, exit 0
    daemon = Daemon(cfg, config_path(site, config))
    readers = None
    died: str | None = None
    try:
        try:
            daemon.start()
        except Exception as exc:
            fail(f"cannot start: {redact(str(exc))}")

        def on_hup(*_: object) -> None:
            def work() -> None:
                result = daemon.reload_file()
                logging.getLogger("mlink.daemon").info("SIGHUP reload: %s", result.to_json())

            threading.Thread(target=work, name="mlink-reload", daemon=True).start()

        signal.signal(signal.SIGHUP, on_hup)
        bind_host, bind_port = host or cfg.api.host, port if port is not None else cfg.api.port
        typer.echo(
            f"mlink: site {cfg.site}, {len(cfg.streams)} cameras, API on http://{bind_host}:{bind_port} (docs at /docs)"
            f", {cfg.api.read_workers} reader process(es)",
            err=True,
        )
        if cfg.api.read_workers:
            from mlink.server.readers import ReaderPool

            # Reads are answered by reader processes on the public port; the daemon's own app
            # (health, /metrics, reload, docs) serves them on a private unix socket.
            try:
                pool = ReaderPool(daemon, cfg.api.read_workers, bind_host, bind_port, log_level=log_level.lower())
                readers = pool.start()
            except OSError as exc:
                fail(f"cannot listen on {bind_host}:{bind_port}: {exc}")
            where: dict[str, Any] = {"uds": readers.upstream}
        else:
            where = {"host": bind_host, "port": bind_port}
        uv = uvicorn.Config(create_app(daemon, readers=readers), log_level=log_level.lower(), **where)
        died = serve_until_stopped(uvicorn.Server(uv), daemon)
    except StopRequested:
        pass  # the stop below is the whole answer to SIGTERM/SIGINT
    finally:
        signals.stopping()
        if readers is not None:
            readers.close()
        daemon.stop()
    if died is not None:
        fail(f"{redact(died)}; exiting so that a supervisor restarts the daemon", code=1)


# -- demo -----------------------------------------------------------------------------------
@app.command("demo")
def demo(
    site: str | None = SiteOpt,
    config: Path | None = ConfigOpt,
    frames: int = typer.Option(5, "--frames", min=1, help="frames per stream"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """One-shot demo: play each stream of a site through every one of its models, print results.

    Every model runs on every frame here (nothing is predicted): this shows the zoo on the
    site's cameras, not the scheduler.
    """

    def body() -> None:
        cfg = resolve_config(site, config)
        models = {m.name: create_model(m.name, **m.params) for m in cfg.models}
        for m in models.values():
            m.load(cfg.device)
        for stream in cfg.streams:
            for frame in read_frames(resolve_url(stream.url), sample_fps=stream.fps, max_frames=frames):
                result: dict[str, Any] = {
                    "camera": stream.id,
                    "frame": frame.index,
                    "timestamp": frame.timestamp,
                    "outputs": {},
                }
                for entry in cfg.models:
                    derived = models[entry.name].derived(models[entry.name].infer([frame.image])[0])
                    for out in entry.served:
                        result["outputs"][node_key(entry.name, out)] = {"provenance": "executed", "value": derived[out]}
                if as_json:
                    typer.echo(json.dumps(result))
                else:
                    flat = {k: v["value"] for k, v in result["outputs"].items()}
                    typer.echo(f"[{stream.id}] frame {frame.index:>5} t={frame.timestamp:>7.2f}s  {_summary(flat)}")

    run_guarded(body)


def add_command_groups() -> None:
    """Add the command groups registered under the ``mlink.commands`` entry points (once)."""
    from importlib.metadata import entry_points

    have = {group.name for group in app.registered_groups}
    for ep in entry_points(group=COMMAND_GROUPS):
        if ep.name not in have:
            app.add_typer(ep.load(), name=ep.name)


def main() -> None:
    add_command_groups()
    app()


if __name__ == "__main__":
    main()
