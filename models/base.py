"""The black-box model interface.

A zoo model is a small adapter around one backend (torch/torchvision, ONNX Runtime, OpenCV),
in the manner of Frigate's detector plugins: each adapter declares its name, task, backend,
output specs, assets and params (a pydantic model that forbids unknown keys), and registers
itself (``mlink.models.registry``); the rest of mlink creates models by name
(``mlink.models.catalog``) and sees nothing but ``load``/``unload``/``infer`` and the output
arrays. Nothing outside ``models/`` may reach inside a model (no features, no weights): that is
what makes them black boxes, and what keeps links honest.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from mlink.models.assets import AssetStore, default_store
from mlink.models.placement import Placement, record_placement
from mlink.models.spec import OutputSpec

# One model output for one frame: output name -> array that matches that output's spec.
ModelOutput = dict[str, np.ndarray]


class ModelError(RuntimeError):
    """A model could not be created, loaded or run; the message says which and why."""


class AdapterParams(BaseModel):
    """Base of every adapter's params: typed fields with defaults and bounds, unknown keys refused.

    A site config's ``models[].params`` is validated against the adapter's params model (so
    ``mlink config validate`` reports a typo with its path), and :class:`BlackBoxModel`
    validates the keyword params it is created with against the same model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


def params_error(name: str, params: type[BaseModel], exc: ValidationError) -> str:
    """One line naming every bad param of model ``name`` (unknown keys together, with the known ones)."""
    errors = exc.errors()
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and e["loc"])
    parts = [f"unknown params {unknown}; known: {sorted(params.model_fields)}"] if unknown else []
    for e in errors:
        if e["type"] == "extra_forbidden" and e["loc"]:
            continue
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"param {loc}: {msg}, got {e['input']!r}" if loc else msg)
    return f"model {name}: " + "; ".join(parts)


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a zoo entry without loading it."""

    name: str
    task: str
    backend: str
    outputs: tuple[OutputSpec, ...]
    primary: str
    assets: tuple[str, ...]
    description: str
    pretrained_note: str = ""
    params: type[AdapterParams] = AdapterParams  # the adapter's params model

    def output(self, name: str) -> OutputSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(f"model {self.name} has no output {name!r}; it has {[s.name for s in self.outputs]}")


class BlackBoxModel(abc.ABC):
    """Base class of every zoo adapter.

    Subclasses set the class attributes (``Params``: their :class:`AdapterParams` model, none by
    default), implement ``_load``, ``_unload`` and ``_infer``, and decorate themselves with
    :func:`mlink.models.registry.register`. Params are validated on creation (a
    :class:`ModelError` names every bad one) and read from ``self.params``. ``infer`` takes a batch of BGR uint8 frames
    (OpenCV's layout, as the frame source yields them) and returns one :data:`ModelOutput` per
    frame, validated against the output specs so a broken adapter fails loudly here and not
    in a link far away.
    """

    name: ClassVar[str]
    task: ClassVar[str]
    backend: ClassVar[str]
    outputs: ClassVar[tuple[OutputSpec, ...]]
    primary: ClassVar[str]  # the output a site serves when it names none
    assets: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    Params: ClassVar[type[AdapterParams]] = AdapterParams

    def __init__(self, store: AssetStore | None = None, **params: Any) -> None:
        # Assets are resolved at load time, not here, so listing or configuring a model never
        # touches the disk or the network.
        self.store = store if store is not None else default_store()
        try:
            self.params: AdapterParams = self.Params.model_validate(params)
        except ValidationError as exc:
            raise ModelError(params_error(self.name, self.Params, exc)) from None
        self.device = "cpu"
        # Where the model really computes, and why not on ``device`` (see mlink.models.placement).
        self.executes_on = "cpu"
        self.fallback: str | None = None
        self._loaded = False

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self, device: str = "cpu") -> None:
        """Load weights onto ``device`` ("cpu", "cuda", "cuda:N"); idempotent."""
        if self._loaded:
            return
        self.device = device
        self.executes_on, self.fallback = device, None  # an adapter that cannot honour it says so
        try:
            self._load(device)
        except ModelError:
            raise
        except Exception as exc:  # backends raise many kinds; callers need one
            raise ModelError(f"model {self.name}: load on {device} failed: {exc}") from exc
        self._loaded = True
        record_placement(self.name, self.placement)

    @property
    def placement(self) -> Placement:
        """The device asked for at the last load, the one the model executes on, and why they differ."""
        return Placement(self.device, self.executes_on, self.fallback)

    def fall_back(self, reason: str, executes_on: str = "cpu") -> None:
        """For ``_load``: the asked device cannot be honoured, the model runs on ``executes_on``
        because of ``reason`` (reported in /api/v1/models and /metrics, logged once)."""
        self.executes_on, self.fallback = executes_on, reason

    def unload(self) -> None:
        """Drop every reference to weights and sessions so their memory can be reclaimed."""
        if not self._loaded:
            return
        self._unload()
        self._loaded = False

    def infer(self, frames: Sequence[np.ndarray]) -> list[ModelOutput]:
        if not self._loaded:
            raise ModelError(f"model {self.name}: infer called before load")
        for frame in frames:
            if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                got = getattr(frame, "shape", type(frame).__name__)
                raise ModelError(f"model {self.name}: frames must be HxWx3 uint8 BGR arrays, got {got}")
        results = self._infer(list(frames))
        if len(results) != len(frames):
            raise ModelError(f"model {self.name}: {len(results)} outputs for {len(frames)} frames")
        specs = {s.name: s for s in self.outputs}
        checked = []
        for out in results:
            if set(out) != set(specs):
                raise ModelError(f"model {self.name}: outputs {sorted(out)} != declared {sorted(specs)}")
            checked.append({k: specs[k].check(v) for k, v in out.items()})
        return checked

    # -- describing outputs ------------------------------------------------------------------
    @classmethod
    def info(cls) -> ModelInfo:
        return ModelInfo(
            name=cls.name,
            task=cls.task,
            backend=cls.backend,
            outputs=tuple(cls.outputs),
            primary=cls.primary,
            assets=tuple(cls.assets),
            description=cls.description,
            pretrained_note=cls.pretrained_note(),
            params=cls.Params,
        )

    @classmethod
    def pretrained_note(cls) -> str:
        """Empty for real pretrained weights; otherwise says what the weights are."""
        return ""

    def derived(self, output: ModelOutput) -> dict[str, Any]:
        """JSON-friendly values a person reads (counts, labels, boxes) for one frame's output."""
        return {s.name: s.to_json(output[s.name]) for s in self.outputs}

    # -- backend hooks -----------------------------------------------------------------------
    @abc.abstractmethod
    def _load(self, device: str) -> None: ...

    @abc.abstractmethod
    def _unload(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, frames: list[np.ndarray]) -> list[ModelOutput]: ...


def batched(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
