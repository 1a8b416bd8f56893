"""The site config: one YAML file, ``${VAR}`` substitution, validated by pydantic.

One file describes a site: the device and memory budget, the zoo models it needs and which of
their outputs it serves, and its camera streams. Validation reports every error with its path
in the file (``models.1.outputs.0: ...``) so an operator can fix a file in one pass; a file
that fails validation is never half-applied.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlink.configs.budget import parse_budget
from mlink.models.base import ModelError
from mlink.models.catalog import model_info

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
ASSET_SCHEME = "asset://"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A config that cannot be used; ``errors`` holds (path, message) pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {path or '<root>'}: {msg}" for path, msg in errors)
        super().__init__(f"invalid config {source}:\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    """A zoo model the site needs, and the outputs of it the site serves."""

    name: str = Field(description="zoo entry, see `mlink models list`")
    outputs: list[str] | None = Field(default=None, description="outputs served; default: the model's primary output")
    params: dict[str, Any] = Field(default_factory=dict, description="adapter parameters, e.g. score_threshold")

    @model_validator(mode="after")
    def _known(self) -> "ModelEntry":
        try:
            info = model_info(self.name)
        except ModelError as exc:
            raise ValueError(str(exc)) from None
        declared = [s.name for s in info.outputs]
        for out in self.outputs or []:
            if out not in declared:
                raise ValueError(f"model {self.name} has no output {out!r}; it has {declared}")
        if self.outputs is not None and not self.outputs:
            raise ValueError("outputs must name at least one output (or be left out)")
        return self

    @property
    def served(self) -> list[str]:
        return list(self.outputs) if self.outputs else [model_info(self.name).primary]


class StreamEntry(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="camera id used in the API")
    url: str = Field(description="file path, rtsp/http(s) URL, device index, or asset://NAME for a sample video")
    fps: float = Field(default=1.0, gt=0, le=60, description="frames sampled per second")
    loop: bool = Field(default=False, description="replay a file from the start when it ends (demos)")
    accuracy_target: float | None = Field(default=None, ge=0, le=1)


class LinksConfig(_Strict):
    store: str | None = Field(default=None, description="link store folder; default: $MLINK_HOME/links/SITE")
    profile_frames: int = Field(default=1000, ge=20, description="frames profiled through every model for the first training")
    fine_tune: bool = Field(default=True, description="fine-tune links on each period's profiling tuples")


class SchedulerConfig(_Strict):
    selector: Literal["paper", "objective"] = "objective"
    period_s: float = Field(default=3600.0, gt=0, description="re-profile and re-select once per period (paper: 1 hour)")
    profile_share: float = Field(default=0.01, gt=0, le=1, description="share of a period's frames run through all models (paper: 1%)")
    min_residency_s: float = Field(default=0.0, ge=0, description="a loaded model stays at least this long")
    switch_margin: float = Field(default=0.01, ge=0, le=1, description="a new plan must beat the current one by this much accuracy")
    batch_size: int = Field(default=4, ge=1, le=64)


class CacheConfig(_Strict):
    redis_url: str | None = Field(default=None, description="redis://host:port/db; unset: an embedded redis-server on a private socket")
    history: int = Field(default=10000, ge=1, description="results kept per camera")
    buffer: int = Field(default=10000, ge=1, description="results held in memory while Redis is unreachable")


class IngestConfig(_Strict):
    """How camera readers queue frames and reconnect (server/ingest.py)."""

    queue: int = Field(default=4, ge=1, le=1000, description="frames held per camera; when full the oldest is dropped and counted")
    backoff_base_s: float = Field(default=0.5, gt=0, description="first reconnect delay; doubles per failed try")
    backoff_max_s: float = Field(default=30.0, gt=0, description="longest reconnect delay")
    backoff_jitter: float = Field(default=0.2, ge=0, le=1, description="each delay is scaled by a random factor in [1-j, 1+j]")
    open_timeout_s: float = Field(default=10.0, gt=0, description="RTSP/HTTP open timeout")
    read_timeout_s: float = Field(default=10.0, gt=0, description="RTSP/HTTP read timeout; a stream silent this long is reopened")
    realtime: bool = Field(default=True, description="pace files at their sampled rate (false: as fast as they decode)")


class ApiConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    token: str | None = Field(default=None, description="bearer token for operator actions (reload); unset: they are refused")


class SiteConfig(_Strict):
    site: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    device: str = Field(default="cpu", description='"cpu", "cuda" or "cuda:N"')
    budget: float | str = Field(
        default="0.8x",
        description="memory budget: bytes ('3GiB', 4e9), a share of the device's memory (0.8), or a share of the site's models' measured cost ('0.5x')",
    )
    models: list[ModelEntry] = Field(min_length=1)
    streams: list[StreamEntry] = Field(default_factory=list)
    links: LinksConfig = Field(default_factory=LinksConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", v):
            raise ValueError(f'device must be "cpu", "cuda" or "cuda:N", got {v!r}')
        return v

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: float | str) -> float | str:
        parse_budget(v)
        return v

    @model_validator(mode="after")
    def _unique(self) -> "SiteConfig":
        for what, ids in (("model", [m.name for m in self.models]), ("stream id", [s.id for s in self.streams])):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            if dupes:
                raise ValueError(f"duplicate {what}: {', '.join(dupes)}")
        return self

    def nodes(self) -> list[str]:
        """The served outputs as link-graph nodes, ``model:output``, in config order."""
        return [f"{m.name}:{out}" for m in self.models for out in m.served]

    def model(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


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


def _substitute_values(data: Any, path: str = "") -> tuple[Any, list[tuple[str, str]]]:
    """``${VAR}`` substitution in the string values of parsed YAML (never in comments or keys)."""
    if isinstance(data, dict):
        out, errors = {}, []
        for k, v in data.items():
            out[k], errs = _substitute_values(v, f"{path}.{k}" if path else str(k))
            errors += errs
        return out, errors
    if isinstance(data, list):
        items = [_substitute_values(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(data)]
        return [v for v, _ in items], [e for _, errs in items for e in errs]
    if isinstance(data, str) and "${" in data:
        try:
            return substitute_env(data), []
        except ConfigError as exc:
            return data, [(path, msg) for _, msg in exc.errors]
    return data, []


def parse_config(text: str, source: str = "<string>") -> SiteConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "the file must hold a mapping at the top level")])
    data, env_errors = _substitute_values(data)
    if env_errors:
        raise ConfigError(source, env_errors)
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as exc:
        errors = [(".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
        raise ConfigError(source, errors) from None


def load_config(path: str | Path) -> SiteConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(str(p), [("", f"cannot read: {exc.strerror or exc}")]) from None
    return parse_config(text, str(p))


def site_config_path(site: str) -> Path:
    """``--site NAME`` means ``configs/NAME.yaml``."""
    # configs/ sits beside server/ both in a checkout and in an installed wheel (mlink/configs).
    path = CONFIG_DIR / f"{site}.yaml"
    if path.is_file():
        return path
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"site {site}", [("", f"no configs/{site}.yaml; known sites: {', '.join(known) or 'none'}")])
