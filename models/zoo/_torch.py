"""Shared helpers for the torch/torchvision zoo adapters (not a zoo entry itself).

- :func:`torch_device` turns the daemon's device string into a ``torch.device`` and fails with
  a :class:`ModelError` (not a CUDA assertion deep in a forward pass) when CUDA is not there;
- :func:`load_state_dict_file` reads a weights file safely (``weights_only``) onto the CPU;
- :func:`release` frees the CUDA caching allocator's blocks after a module is dropped, so that
  an unload shows up in ``nvidia-smi`` and the scheduler's memory figures;
- :class:`TorchImageNetClassifier` is the whole adapter for an ImageNet-1k classifier except
  for building the network: preprocessing on the model's device, batched inference under
  ``torch.inference_mode``, softmax probabilities as the ``probs`` output.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision.transforms.functional as TF
from pydantic import Field
from torchvision.models import MobileNet_V2_Weights

from mlink.models.assets import AssetError
from mlink.models.base import AdapterParams, BlackBoxModel, ModelError, ModelOutput
from mlink.models.spec import OutputSpec, Task

# The 1000 ImageNet-1k class names in index order; torchvision ships them in the weights
# metadata, so reading them needs no weights file and no network.
IMAGENET_CATEGORIES: tuple[str, ...] = tuple(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PROBS = OutputSpec(
    "probs",
    "vector",
    len(IMAGENET_CATEGORIES),
    Task.CLASS,
    "ImageNet-1k class probabilities (softmax)",
    labels=IMAGENET_CATEGORIES,
)


def torch_device(device: str, model: str) -> torch.device:
    """``device`` as a torch device; a ModelError when it names a GPU this process cannot use."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"model {model}: bad device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"model {model}: device {device!r} requested but CUDA is not available to torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(
                f"model {model}: device {device!r} requested but torch sees {torch.cuda.device_count()} GPU(s)"
            )
    elif dev.type != "cpu":
        raise ModelError(f"model {model}: device {device!r} is not supported (use cpu, cuda or cuda:N)")
    return dev


def asset_path(model: BlackBoxModel, asset: str) -> Path:
    """The verified local path of ``asset``; a ModelError naming the asset when it is not available."""
    try:
        return model.store.path(asset)
    except AssetError as exc:
        raise ModelError(f"model {model.name}: weights asset {asset!r} is not available: {exc}") from None


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict read without unpickling arbitrary objects, onto the CPU."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ModelError(f"{path}: not a state dict (got {type(state).__name__})")
    return state


def release(device: torch.device | None) -> None:
    """Collect dropped modules and hand cached CUDA blocks back to the driver."""
    gc.collect()
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        with torch.cuda.device(device):
            torch.cuda.empty_cache()


def frame_tensor(frame: np.ndarray, device: torch.device) -> torch.Tensor:
    """One HxWx3 uint8 BGR frame as a 3xHxW uint8 RGB tensor on ``device``."""
    rgb = np.ascontiguousarray(frame[:, :, ::-1])
    return torch.from_numpy(rgb).to(device, non_blocking=True).permute(2, 0, 1)


def classification_batch(
    frames: list[np.ndarray],
    device: torch.device,
    resize: int,
    crop: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> torch.Tensor:
    """torchvision's ImageNet eval transform on a batch: shorter side to ``resize`` (bilinear,
    antialiased), centre ``crop``, scale to [0, 1], normalise; done on ``device``."""
    crops = []
    for frame in frames:
        t = frame_tensor(frame, device)
        t = TF.resize(t, [resize], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        crops.append(TF.center_crop(t, [crop, crop]))
    x = torch.stack(crops).float().div_(255.0)
    m = torch.tensor(mean, device=device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


class TorchParams(AdapterParams):
    batch_size: int = Field(default=8, ge=1, description="frames per forward pass")


class ClassifierParams(TorchParams):
    batch_size: int = Field(default=32, ge=1, description="frames per forward pass")


class TorchModule(BlackBoxModel):
    """A zoo model backed by one ``torch.nn.Module``: held while loaded, released on unload.

    Params (:class:`TorchParams`): ``batch_size`` bounds how many frames go through one forward pass.
    """

    backend: ClassVar[str] = "torch"
    Params: ClassVar[type[TorchParams]] = TorchParams
    params: TorchParams

    def __init__(self, store: Any = None, **params: Any) -> None:
        super().__init__(store, **params)
        self._module: torch.nn.Module | None = None
        self._dev: torch.device | None = None

    def _place(self, module: torch.nn.Module, dev: torch.device) -> None:
        self._module = module.eval().requires_grad_(False).to(dev)
        self._dev = dev

    def _unload(self) -> None:
        dev = self._dev
        self._module = None
        self._dev = None
        release(dev)

    def _infer(self, frames: list[np.ndarray]) -> list[ModelOutput]:
        assert self._module is not None and self._dev is not None
        results: list[ModelOutput] = []
        with torch.inference_mode():
            size = self.params.batch_size
            for start in range(0, len(frames), size):
                results.extend(self._forward(frames[start : start + size]))
        return results

    def _forward(self, chunk: list[np.ndarray]) -> list[ModelOutput]:
        """Outputs of one forward pass over at most ``batch_size`` frames (in inference mode)."""
        raise NotImplementedError


class TorchImageNetClassifier(TorchModule):
    """An ImageNet-1k classifier: subclasses build the network and load the weights."""

    task: ClassVar[str] = "classification"
    Params: ClassVar[type[TorchParams]] = ClassifierParams
    outputs: ClassVar[tuple[OutputSpec, ...]] = (PROBS,)
    primary: ClassVar[str] = "probs"

    # Preprocessing of the weights' training recipe.
    resize_size: ClassVar[int] = 256
    crop_size: ClassVar[int] = 224
    mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    std: ClassVar[tuple[float, float, float]] = IMAGENET_STD

    def _build(self, weights: Path) -> torch.nn.Module:
        """The network with the weights file loaded strictly (on the CPU)."""
        raise NotImplementedError

    def _load(self, device: str) -> None:
        dev = torch_device(device, self.name)
        path = asset_path(self, self.assets[0])
        self._place(self._build(path), dev)

    def _forward(self, chunk: list[np.ndarray]) -> list[ModelOutput]:
        assert self._module is not None and self._dev is not None  # loaded
        x = classification_batch(chunk, self._dev, self.resize_size, self.crop_size, self.mean, self.std)
        probs = torch.softmax(self._module(x).float(), dim=1).cpu().numpy()
        return [{"probs": p.astype(np.float32)} for p in probs]
