"""What every ``mlink`` command shares: the site options, loading the config, the site's
profile, and turning the errors users cause into a one-line message and exit code 2.

``server/cli.py`` (the program), ``server/cli_schedule.py`` and ``bench/cli.py`` build on this;
it imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from mlink.configs.load import ConfigError, load_config, site_config_path
from mlink.configs.schema import SiteConfig
from mlink.links.errors import LinkError
from mlink.models.assets import AssetError
from mlink.models.base import ModelError
from mlink.models.catalog import zoo_catalog
from mlink.server.frames import FrameSourceError

if TYPE_CHECKING:
    from mlink.links.tuples import TupleSet
    from mlink.models.assets import AssetStore

_EXPECTED: tuple[type[BaseException], ...] = (
    AssetError,
    ModelError,
    ConfigError,
    FrameSourceError,
    LinkError,
    ValueError,
)

SiteOpt = typer.Option(None, "--site", help="site name: configs/NAME.yaml")
ConfigOpt = typer.Option(None, "--config", help="path of a site config file")


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Run a command body, turning the errors users cause into a message and exit code 2."""
    try:
        return fn()
    except _EXPECTED as exc:
        fail(str(exc))


def config_path(site: str | None, config: Path | None) -> Path:
    """The file ``--site NAME`` (configs/NAME.yaml) or ``--config FILE`` names (default: the default site)."""
    return Path(config) if config else site_config_path(site or "default")


def resolve_config(site: str | None, config: Path | None) -> SiteConfig:
    """``--site NAME`` means configs/NAME.yaml; ``--config FILE`` takes any file."""
    if site and config:
        raise ConfigError("command line", [("", "give --site or --config, not both")])
    return load_config(config_path(site, config), catalog=zoo_catalog())


def site_tuples(
    cfg: SiteConfig, store: AssetStore, frames: int | None, *, progress: bool = True
) -> tuple[TupleSet, Path]:
    """The site's latest stored profile, or a fresh one of ``frames`` (default
    links.profile_frames), saying on stderr when a stored one no longer fits the config."""
    from mlink.server.profiling import site_profile

    tuples, path, why = site_profile(cfg, store, frames, progress=progress)
    if why is not None and why.endswith("other outputs than the config"):
        typer.echo(f"{why}; profiled again", err=True)
    return tuples, path
