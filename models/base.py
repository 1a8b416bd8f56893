"""The black-box model interface and the zoo registry.

A zoo model is a small adapter around one backend (torch/torchvision, ONNX Runtime, OpenCV),
in the manner of Frigate's detector plugins: each adapter declares its name, task, backend,
output specs and assets, and registers itself; the rest of mlink creates models by name and
sees nothing but ``load``/``unload``/``infer`` and the output arrays. Nothing outside
``models/`` may reach inside a model (no features, no weights): that is what makes them black
boxes, and what keeps links honest.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Sequence, TypeVar

import numpy as np

from mlink.models.assets import AssetStore, default_store
from mlink.models.spec import OutputSpec

# One model output for one frame: output name -> array that matches that output's spec.
ModelOutput = dict[str, np.ndarray]


class ModelError(RuntimeError):
    """A model could not be created, loaded or run; the message says which and why."""


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

    def output(self, name: str) -> OutputSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(f"model {self.name} has no output {name!r}; it has {[s.name for s in self.outputs]}")


class BlackBoxModel(abc.ABC):
    """Base class of every zoo adapter.

    Subclasses set the class attributes, implement ``_load``, ``_unload`` and ``_infer``, and
    decorate themselves with :func:`register`. ``infer`` takes a batch of BGR uint8 frames
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

    def __init__(self, store: AssetStore | None = None, **params: Any) -> None:
        # Assets are resolved at load time, not here, so listing or configuring a model never
        # touches the disk or the network.
        self.store = store if store is not None else default_store()
        self.params = dict(params)
        self.device = "cpu"
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
        try:
            self._load(device)
        except ModelError:
            raise
        except Exception as exc:  # backends raise many kinds; callers need one
            raise ModelError(f"model {self.name}: load on {device} failed: {exc}") from exc
        self._loaded = True

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


_REGISTRY: dict[str, type[BlackBoxModel]] = {}
M = TypeVar("M", bound=type[BlackBoxModel])


def register(cls: M) -> M:
    """Class decorator: add a zoo adapter under its ``name``."""
    for attr in ("name", "task", "backend", "outputs", "primary"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} must define {attr}")
    if cls.primary not in {s.name for s in cls.outputs}:
        raise TypeError(f"{cls.__name__}: primary output {cls.primary!r} is not declared")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"zoo name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _ensure_zoo() -> None:
    # Importing the zoo package registers every adapter; done lazily so `mlink.models.spec`
    # stays light for links and the scheduler.
    import mlink.models.zoo  # noqa: F401


def zoo() -> Mapping[str, type[BlackBoxModel]]:
    _ensure_zoo()
    return dict(sorted(_REGISTRY.items()))


def model_info(name: str) -> ModelInfo:
    return _lookup(name).info()


def create_model(name: str, **params: Any) -> BlackBoxModel:
    return _lookup(name)(**params)


def _lookup(name: str) -> type[BlackBoxModel]:
    _ensure_zoo()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown zoo model {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def batched(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch

