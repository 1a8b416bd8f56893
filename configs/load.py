"""Reading a site config: YAML, ``${VAR}`` substitution in values, validation with every error's path.

The one way in is :func:`parse_config` (text) or :func:`load_config` (a file), and both take the
:class:`~mlink.configs.schema.ModelCatalog` the zoo entries are checked against as a required
argument: above this floor that is ``mlink.models.catalog.zoo_catalog()``, e.g.
``load_config(path, catalog=zoo_catalog())``.

``--site NAME`` means ``configs/NAME.yaml`` (:func:`site_config_path`): the YAML files sit beside
this module, in a checkout and in an installed wheel alike (package data of ``mlink.configs``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mlink.configs.schema import CATALOG, ModelCatalog, SiteConfig

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A config that cannot be used; ``errors`` holds (path, message) pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {path or '<root>'}: {msg}" for path, msg in errors)
        super().__init__(f"invalid config {source}:\n{lines}")


def substitute_env(text: str, env: dict[str, str] | None = None) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; an unset variable without default is an error."""
    env = dict(os.environ) if env is None else env
    missing: list[str] = []

    def repl(m: re.Match[str]) -> str:
        if m.group(1) in env:
            return env[m.group(1)]
        if m.group(2) is not None:
            return m.group(2)
        missing.append(m.group(1))
        return ""

    out = _ENV.sub(repl, text)
    if missing:
        raise ConfigError("<env>", [("", f"environment variable ${{{v}}} is not set") for v in sorted(set(missing))])
    return out


NO_ENVIRONMENT = "variables like ${VAR} are substituted only in config files, not in a config sent in a request"


def _substitute_values(data: Any, path: str = "", environment: bool = True) -> tuple[Any, list[tuple[str, str]]]:
    """``${VAR}`` substitution in the string values of parsed YAML (never in comments or keys).
    Without ``environment`` every such variable is an error instead (see :func:`parse_config`)."""
    if isinstance(data, dict):
        out, errors = {}, []
        for k, v in data.items():
            out[k], errs = _substitute_values(v, f"{path}.{k}" if path else str(k), environment)
            errors += errs
        return out, errors
    if isinstance(data, list):
        items = [_substitute_values(v, f"{path}.{i}" if path else str(i), environment) for i, v in enumerate(data)]
        return [v for v, _ in items], [e for _, errs in items for e in errs]
    if isinstance(data, str) and _ENV.search(data):
        if not environment:
            return data, [(path, NO_ENVIRONMENT)]
        try:
            return substitute_env(data), []
        except ConfigError as exc:
            return data, [(path, msg) for _, msg in exc.errors]
    return data, []


def parse_config(text: str, source: str = "<string>", *, catalog: ModelCatalog, environment: bool = True) -> SiteConfig:
    """A site config from YAML ``text`` (``source`` names it in errors); zoo entries checked against ``catalog``.

    ``environment``: substitute ``${VAR}`` from the process environment. Only for text the
    operator keeps on disk: a config sent in a request (``environment=False``) that names a
    variable is refused, so whoever holds the API token cannot read the daemon's environment
    (a token, a camera password) back through ``/api/v1/cameras`` or an error message."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "the file must hold a mapping at the top level")])
    data, env_errors = _substitute_values(data, environment=environment)
    if env_errors:
        raise ConfigError(source, env_errors)
    try:
        return SiteConfig.model_validate(data, context={CATALOG: catalog})
    except ValidationError as exc:
        errors = [(".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
        raise ConfigError(source, errors) from None


def load_config(path: str | Path, *, catalog: ModelCatalog) -> SiteConfig:
    """The site config in the file ``path``; zoo entries checked against ``catalog``."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(str(p), [("", f"cannot read: {exc.strerror or exc}")]) from None
    return parse_config(text, str(p), catalog=catalog)


def site_config_path(site: str) -> Path:
    """``--site NAME`` means ``configs/NAME.yaml``."""
    path = CONFIG_DIR / f"{site}.yaml"
    if path.is_file():
        return path
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"site {site}", [("", f"no configs/{site}.yaml; known sites: {', '.join(known) or 'none'}")])
