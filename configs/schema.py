"""The site config schema: one YAML file describes a site, validated by pydantic.

One file describes a site: the device and memory budget, the zoo models it needs and which of
their outputs it serves (and the adapters' params), and its camera streams. Validation reports
every error with its path in the file (``models.1.outputs.0: ...``) so an operator can fix a
file in one pass; a file that fails validation is never half-applied.

This is the bottom floor: it imports nothing from the rest of mlink. What the schema cannot know
by itself (which zoo models exist, the outputs each declares, the params each takes) comes from
a :class:`ModelCatalog` passed in the validation context (``{"catalog": ...}``); the models floor
provides the zoo's (``mlink.models.catalog.zoo_catalog``). Validating a site without a catalog
is an error, so no caller can skip the zoo checks by accident; ``mlink.configs.load`` takes the
catalog as a required argument.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from mlink.configs.budget import parse_budget
from mlink.configs.nodes import node_key

CATALOG = "catalog"  # the validation-context key of the ModelCatalog


@dataclass(frozen=True)
class CatalogEntry:
    """What a site config needs to know about one zoo model."""

    outputs: tuple[str, ...]  # the outputs the model declares
    primary: str  # the output served when an entry names none
    params: type[BaseModel]  # the adapter's params (a pydantic model that forbids unknown keys)


class ModelCatalog(Protocol):
    """The zoo as the config sees it (the models floor implements it)."""

    def entry(self, name: str) -> CatalogEntry:
        """The zoo model ``name``; a LookupError whose message names the known models if none."""
        ...


def _catalog(info: ValidationInfo) -> ModelCatalog:
    catalog = (info.context or {}).get(CATALOG)
    if catalog is None:
        raise ValueError(
            "no model catalog to check zoo entries against "
            "(validate with context={'catalog': ...}, e.g. mlink.configs.load.load_config(path, catalog=...))"
        )
    return catalog


def _entry(info: ValidationInfo, name: str) -> CatalogEntry:
    try:
        return _catalog(info).entry(name)
    except LookupError as exc:
        raise ValueError(exc.args[0] if exc.args else str(exc)) from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    """A zoo model the site needs, the outputs of it the site serves, and its adapter's params."""

    name: str = Field(description="zoo entry, see `mlink models list`")
    outputs: list[str] | None = Field(default=None, description="outputs served; default: the model's primary output")
    params: dict[str, Any] = Field(
        default_factory=dict, description="adapter parameters, e.g. score_threshold; each adapter declares its own"
    )
    _primary: str | None = PrivateAttr(default=None)

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # An unknown model is reported once, by _known, with the entry's path.
        name = info.data.get("name")
        if name is None:
            return v
        try:
            entry = _entry(info, name)
        except ValueError:
            return v
        # A ValidationError raised here keeps its locations under this field's path
        # (models.N.params.KEY), which is what `mlink config validate` prints.
        entry.params.model_validate(v)
        return v

    @model_validator(mode="after")
    def _known(self, info: ValidationInfo) -> ModelEntry:
        entry = _entry(info, self.name)
        declared = list(entry.outputs)
        for out in self.outputs or []:
            if out not in declared:
                raise ValueError(f"model {self.name} has no output {out!r}; it has {declared}")
        if self.outputs is not None and not self.outputs:
            raise ValueError("outputs must name at least one output (or be left out)")
        self._primary = entry.primary
        return self

    @property
    def served(self) -> list[str]:
        if self.outputs:
            return list(self.outputs)
        if self._primary is None:
            raise ValueError(f"model entry {self.name} was not validated against a model catalog")
        return [self._primary]


class StreamEntry(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="camera id used in the API")
    url: str = Field(
        max_length=4096,
        description="file path, rtsp/rtsps/http(s) URL, file:// URL, device index, or asset://NAME for a sample "
        "video; local files must lie in ingest.allowed_dirs",
    )
    fps: float = Field(default=1.0, gt=0, le=60, description="frames sampled per second")
    loop: bool = Field(default=False, description="replay a file from the start when it ends (demos)")
    accuracy_target: float | None = Field(default=None, ge=0, le=1)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        check_stream_url(v)
        return v


STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https", "file", "asset")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
ASSET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def check_stream_url(url: str) -> None:
    """Refuse a stream URL outside the allowed kinds: a scheme other than :data:`STREAM_SCHEMES`
    (OpenCV and FFmpeg open many more, e.g. ``concat:`` or ``subfile,``), an ``asset://`` name
    that is not a plain name (``asset://../..``), control characters. Whether a local file lies in
    an allowed folder needs the config's folder: :func:`mlink.configs.load.check_local_files`."""
    if not url.strip() or any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("a stream URL must be non-empty, without control characters")
    if url.isdigit():
        return  # a device index
    m = _SCHEME.match(url)
    if m is None or (len(m.group(1)) == 1 and url[1:3] in (":\\", ":/")):  # a path (or a Windows drive)
        return
    scheme = m.group(1).lower()
    if scheme not in STREAM_SCHEMES or not url[m.end() :].startswith("//"):
        raise ValueError(
            f"stream URL scheme {scheme!r} is not allowed: use one of {', '.join(STREAM_SCHEMES)}, a path or a device index"
        )
    if scheme == "asset" and not ASSET_NAME.fullmatch(url[len("asset://") :]):
        raise ValueError("asset://NAME takes a sample video's name from the manifest (letters, digits, _ . -)")


class LinksConfig(_Strict):
    store: str | None = Field(default=None, description="link store folder; default: $MLINK_HOME/links/SITE")
    profile_frames: int = Field(
        default=1000, ge=20, description="frames profiled through every model for the first training"
    )
    fine_tune: bool = Field(default=True, description="fine-tune links on each period's profiling tuples")


class HybridConfig(_Strict):
    """Hybrid plans (resident, rotating and predicted models; scheduler/rotation.py)."""

    enabled: bool = Field(
        default=False,
        description="resident models stay loaded; rotating models load one at a time into what they leave, "
        "run on chosen buffered frames, and their outputs revise results already served",
    )
    max_delay_s: float = Field(
        default=2.0,
        gt=0,
        allow_inf_nan=False,
        description="how late a rotating model's output may arrive: each camera's frames are buffered this long "
        "before the rotation over them is planned and run",
    )
    gpu_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="share of GPU time per frame, relative to running every model on every frame, "
        "that resident and rotating executions (and rotating loads) may use",
    )


class SchedulerConfig(_Strict):
    selector: Literal["paper", "objective"] = "objective"
    period_s: float = Field(
        default=3600.0, gt=0, description="re-profile and re-select once per period (paper: 1 hour)"
    )
    profile_share: float = Field(
        default=0.01, gt=0, le=1, description="share of a period's frames run through all models (paper: 1%)"
    )
    min_residency_s: float = Field(default=0.0, ge=0, description="a loaded model stays at least this long")
    switch_margin: float = Field(
        default=0.01, ge=0, le=1, description="a new plan must beat the current one by this much accuracy"
    )
    batch_size: int = Field(default=4, ge=1, le=64, description="frames served together (across cameras)")
    batch_wait_ms: float = Field(
        default=20.0,
        ge=0,
        le=1000,
        description="how long a batch that is not full waits for more cameras' frames: fuller batches for the "
        "models at this much added latency (0: serve what is queued at once)",
    )
    period_worker: bool = Field(
        default=True,
        description="re-profile, fine-tune and re-measure beside serving in a worker thread (false: inline, serving waits)",
    )
    hybrid: HybridConfig = Field(
        default_factory=HybridConfig, description="hybrid plans: rotating models over short frame buffers"
    )


class CacheConfig(_Strict):
    redis_url: str | None = Field(
        default=None, description="redis://host:port/db; unset: an embedded redis-server on a private socket"
    )
    history: int = Field(default=10000, ge=1, description="results kept per camera")
    buffer: int = Field(default=10000, ge=1, description="results held in memory while Redis is unreachable")
    stream_length: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="results kept in each camera's Redis stream (XADD MAXLEN ~, so a few more may stay), which "
        "other services and /api/v1/cameras/ID/events read (resuming from a stream id); the all-cameras stream "
        "keeps this many per camera",
    )
    fsync: Literal["always", "everysec"] = Field(
        default="always",
        description="durability of the embedded Redis (its appendfsync): always, every write is on disk before "
        "Redis acknowledges it (a crash loses nothing stored); everysec, fsync once a second (a crash may lose "
        "the last ~2 s of results, for a higher write rate: see bench/daemon.py). Not applied to an external "
        "redis_url, whose operator sets it",
    )


class IngestConfig(_Strict):
    """How camera readers queue frames and reconnect (server/ingest.py)."""

    queue: int = Field(
        default=4, ge=1, le=1000, description="frames held per camera; when full the oldest is dropped and counted"
    )
    backoff_base_s: float = Field(default=0.5, gt=0, description="first reconnect delay; doubles per failed try")
    backoff_max_s: float = Field(
        default=2.0,
        gt=0,
        description=(
            "longest reconnect delay: a camera back from a restart is served again within this (plus"
            " the open) -- a refused open costs one connect, so short is cheap; raise it for fleets of"
            " cameras that stay down"
        ),
    )
    backoff_jitter: float = Field(
        default=0.2, ge=0, le=1, description="each delay is scaled by a random factor in [1-j, 1+j]"
    )
    open_timeout_s: float = Field(default=10.0, gt=0, description="RTSP/HTTP open timeout")
    read_timeout_s: float = Field(
        default=10.0, gt=0, description="RTSP/HTTP read timeout; a stream silent this long is reopened"
    )
    realtime: bool = Field(default=True, description="pace files at their sampled rate (false: as fast as they decode)")
    processes: Literal["auto"] | int = Field(
        default="auto",
        description="where cameras decode: 'auto' = a capture process per camera, N = cameras spread over N "
        "capture processes, 0 = reader threads inside the serving process (tests, tiny sites)",
    )
    hw_decode: Literal["auto", "off"] = Field(
        default="auto", description="ask OpenCV for hardware decoding (falls back to software silently)"
    )
    ring_slots: int = Field(
        default=3, ge=2, le=64, description="shared-memory frame slots per camera (capture processes only)"
    )
    allowed_dirs: list[str] | None = Field(
        default=None,
        max_length=64,
        description="folders local stream files (paths, file:// URLs) may lie in; default: the config file's "
        "folder and the asset store. A config sent in a reload request may narrow them, never widen them",
    )
    capture_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="CPU priority of capture processes below the daemon's (nice increment): when decoding and "
        "serving compete for the cores, serving wins and decoding gets what is left",
    )

    @field_validator("processes")
    @classmethod
    def _processes_range(cls, v: str | int) -> str | int:
        if isinstance(v, int) and not 0 <= v <= 256:
            raise ValueError("processes must be 'auto' or an integer from 0 to 256")
        return v


class ApiConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    token: str | None = Field(
        default=None, description="bearer token for operator actions (reload); unset: they are refused"
    )
    read_workers: int = Field(
        default=1,
        ge=0,
        le=64,
        description="processes that answer the read routes (results, cameras, models, schedule, links) from Redis "
        "and the published snapshot, so API load does not compete with the pipeline for the daemon's interpreter; "
        "0: the daemon's process answers everything (as before). One is enough for thousands of GET/s of the "
        "latest results on one core; more only help on hosts with cores to spare",
    )


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
    def _unique(self) -> SiteConfig:
        for what, ids in (("model", [m.name for m in self.models]), ("stream id", [s.id for s in self.streams])):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            if dupes:
                raise ValueError(f"duplicate {what}: {', '.join(dupes)}")
        return self

    def nodes(self) -> list[str]:
        """The served outputs as link-graph nodes, ``model:output``, in config order."""
        return [node_key(m.name, out) for m in self.models for out in m.served]

    def model(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)
