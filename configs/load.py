"""Reading a site config: YAML, ``${VAR}`` substitution in values, validation with every error's path.

The one way in is :func:`parse_config` (text) or :func:`load_config` (a file), and both take the
:class:`~mlink.configs.schema.ModelCatalog` the zoo entries are checked against as a required
argument: above this floor that is ``mlink.models.catalog.zoo_catalog()``, e.g.
``load_config(path, catalog=zoo_catalog())``.

Text is bounded before it is parsed (:data:`MAX_CONFIG_BYTES`, :class:`YamlLimits`: node count,
nesting depth, aliases and what they expand to), because a reload body is text from the network:
a 10 MB list once parsed for minutes, and an alias bomb grows tenfold per level. Local stream
files must lie in allowed folders (:func:`check_local_files`).

``--site NAME`` means ``configs/NAME.yaml`` (:func:`site_config_path`): the YAML files sit beside
this module, in a checkout and in an installed wheel alike (package data of ``mlink.configs``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import ValidationError

from mlink.configs.schema import CATALOG, ModelCatalog, SiteConfig

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
CONFIG_DIR = Path(__file__).resolve().parent
MAX_CONFIG_BYTES = 256 * 1024  # a site with thousands of cameras fits in a tenth of this


@dataclass(frozen=True)
class YamlLimits:
    """How much structure a config may hold, counted on the parser's events before any object is
    built: ``nodes`` counts what aliases expand to, so an alias bomb is refused at its first levels."""

    nodes: int = 50_000
    depth: int = 32
    aliases: int = 256


class _Counter:
    """Counts a YAML event stream as it goes: nodes (aliases expanded), depth, aliases."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}  # anchor -> nodes under it, aliases expanded
        self.stack: list[tuple[str | None, int]] = []  # open collections: (anchor, nodes when opened)
        self.nodes = self.aliases = 0

    def add(self, ev: yaml.Event) -> None:
        if isinstance(ev, yaml.AliasEvent):
            self.aliases += 1
            self.nodes += self.sizes.get(ev.anchor or "", 1)
        elif isinstance(ev, yaml.ScalarEvent):
            self.nodes += 1
            if ev.anchor:
                self.sizes[ev.anchor] = 1
        elif isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            self.nodes += 1
            self.stack.append((ev.anchor, self.nodes))
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)) and self.stack:
            anchor, start = self.stack.pop()
            if anchor:
                self.sizes[anchor] = self.nodes - start + 1

    def over(self, limits: YamlLimits) -> str | None:
        if len(self.stack) > limits.depth:
            return f"the config nests deeper than {limits.depth} levels"
        if self.aliases > limits.aliases:
            return f"the config uses more than {limits.aliases} aliases"
        if self.nodes > limits.nodes:
            return f"the config holds more than {limits.nodes} values (aliases expanded)"
        return None


def check_yaml_limits(text: str, limits: YamlLimits = YamlLimits()) -> list[tuple[str, str]]:
    """The reasons ``text`` is too big or too complex to parse (empty when it is not); invalid YAML
    is left to the parser's own message. Stops at the first event past a limit."""
    if len(text.encode("utf-8", "replace")) > MAX_CONFIG_BYTES:
        return [("", f"the config is larger than {MAX_CONFIG_BYTES // 1024} KiB")]
    counter = _Counter()
    try:
        for ev in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            counter.add(ev)
            reason = counter.over(limits)
            if reason:
                return [("", reason)]
    except yaml.YAMLError:
        return []  # parse_config reports it with the parser's message
    return []


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


def parse_config(
    text: str,
    source: str = "<string>",
    *,
    catalog: ModelCatalog,
    environment: bool = True,
    base_dir: Path | None = None,
    allowed_dirs: Sequence[Path] | None = None,
) -> SiteConfig:
    """A site config from YAML ``text`` (``source`` names it in errors); zoo entries checked against ``catalog``.

    ``environment``: substitute ``${VAR}`` from the process environment. Only for text the
    operator keeps on disk: a config sent in a request (``environment=False``) that names a
    variable is refused, so whoever holds the API token cannot read the daemon's environment
    (a token, a camera password) back through ``/api/v1/cameras`` or an error message.

    Local stream files are checked (:func:`check_local_files`) against ``allowed_dirs`` when given
    (a request body: the running config's folders, see :func:`stream_roots`), else against the
    config's own ``ingest.allowed_dirs`` and ``base_dir`` (the config file's folder); text with
    neither is not checked (a config built in code)."""
    limit_errors = check_yaml_limits(text)
    if limit_errors:
        raise ConfigError(source, limit_errors)
    try:
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "the file must hold a mapping at the top level")])
    data, env_errors = _substitute_values(data, environment=environment)
    if env_errors:
        raise ConfigError(source, env_errors)
    try:
        cfg = SiteConfig.model_validate(data, context={CATALOG: catalog})
    except ValidationError as exc:
        errors = [(".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
        raise ConfigError(source, errors) from None
    roots = list(allowed_dirs) if allowed_dirs is not None else None
    if roots is None and (base_dir is not None or cfg.ingest.allowed_dirs is not None):
        roots = stream_roots(cfg, base_dir)
    if roots is not None:
        errors = check_local_files(cfg, roots)
        if allowed_dirs is not None:
            errors += _widened(cfg, roots, base_dir)
        if errors:
            raise ConfigError(source, errors)
    return cfg


def _asset_dirs() -> list[Path]:
    """Where ``asset://`` videos lie: the asset cache under ``$MLINK_HOME`` and the mirror
    (``mlink.models.assets`` hands them out; this floor only needs their folders)."""
    dirs = [Path(os.environ[v]) for v in ("MLINK_ASSET_MIRROR",) if os.environ.get(v)]
    if os.environ.get("MLINK_HOME"):
        dirs.append(Path(os.environ["MLINK_HOME"]) / "assets")
    return dirs


def stream_roots(cfg: SiteConfig, base_dir: Path | None) -> list[Path]:
    """The folders local stream files of ``cfg`` may lie in: its ``ingest.allowed_dirs`` (relative
    to ``base_dir``), by default ``base_dir`` and the asset store."""
    base = base_dir or Path.cwd()
    if cfg.ingest.allowed_dirs is not None:
        return [_real(base / d) for d in cfg.ingest.allowed_dirs]
    return [_real(base), *(_real(d) for d in _asset_dirs())]


def _real(p: Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(p)))


def _local_file(url: str) -> str | None:
    """The local path a stream URL names, or None (a network URL, a device index, an asset)."""
    if url.isdigit() or url.startswith("asset://"):
        return None
    if url.lower().startswith("file:"):
        return unquote(urlsplit(url).path)
    return None if "://" in url else url


def _within(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def check_local_files(cfg: SiteConfig, roots: Sequence[Path]) -> list[tuple[str, str]]:
    """(path, reason) for each stream whose local file lies outside ``roots``. Decided on the path
    alone, the same whether the file exists or not: the reply is no file-existence oracle."""
    errors = []
    for i, s in enumerate(cfg.streams):
        local = _local_file(s.url)
        # a relative path is checked where the camera reader opens it: from the working directory
        if local is not None and not _within(_real(Path.cwd() / local), roots):
            errors.append(
                (f"streams.{i}.url", "a local file outside the allowed folders (ingest.allowed_dirs) is not served")
            )
    return errors


def _widened(cfg: SiteConfig, roots: Sequence[Path], base_dir: Path | None) -> list[tuple[str, str]]:
    """A request may narrow ``ingest.allowed_dirs``, never widen them past the running ``roots``."""
    if cfg.ingest.allowed_dirs is None or all(_within(d, roots) for d in stream_roots(cfg, base_dir)):
        return []
    return [("ingest.allowed_dirs", "a config sent in a request cannot add folders to ingest.allowed_dirs")]


def load_config(path: str | Path, *, catalog: ModelCatalog) -> SiteConfig:
    """The site config in the file ``path``; zoo entries checked against ``catalog``."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(str(p), [("", f"cannot read: {exc.strerror or exc}")]) from None
    return parse_config(text, str(p), catalog=catalog, base_dir=p.resolve().parent)


def site_config_path(site: str) -> Path:
    """``--site NAME`` means ``configs/NAME.yaml``."""
    path = CONFIG_DIR / f"{site}.yaml"
    if path.is_file():
        return path
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"site {site}", [("", f"no configs/{site}.yaml; known sites: {', '.join(known) or 'none'}")])
