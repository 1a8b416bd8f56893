"""Priming backends: pay a process's one-time costs before the first model is measured.

The first inference of a backend in a process allocates things no model owns: on CUDA the
context (hundreds of MB) and, for torch, the cuDNN and cuBLAS handles and workspaces (about
200 MiB on an H100); on the CPU torch's intra-op thread pool and oneDNN buffers (about 30 MB
that never comes back) and ONNX Runtime's kernel registries (about 9 MB). Without priming, the
first model of each backend is charged for them, 10-40% over its later loads.
:func:`prime_backends` runs a small model of each backend on the device; the ONNX one is
written by hand (:func:`tiny_onnx_model`) so priming needs no ``onnx`` package.
:func:`synthetic_frame` is the frame the pool warms each model up with.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

import numpy as np

from mlink.models.protobuf import field

log = logging.getLogger(__name__)


def tiny_onnx_model() -> bytes:
    """A serialised ONNX model ``y = Relu(x)``, x: float[4] (opset 13), written without ``onnx``."""
    shape = field(1, field(1, 4))  # TensorShapeProto.dim { dim_value: 4 }
    typ = field(1, field(1, 1) + field(2, shape))  # TypeProto.tensor_type float
    vi_in = field(1, b"x") + field(2, typ)
    vi_out = field(1, b"y") + field(2, typ)
    node = field(1, b"x") + field(2, b"y") + field(4, b"Relu")
    graph = field(1, node) + field(2, b"prime") + field(11, vi_in) + field(12, vi_out)
    opset = field(1, b"") + field(2, 13)
    return field(1, 8) + field(8, opset) + field(7, graph)


def prime_onnxruntime(device: str = "cpu") -> None:
    """One session of :func:`tiny_onnx_model` on the CPU, or on ``cuda:N`` through ONNX Runtime's
    CUDA provider (its library and CUDA libraries loaded, a first kernel run: the process's
    one-time costs, not the first ONNX model's), run once. A CUDA device the provider cannot
    serve primes nothing: the ONNX models then run on the CPU and report it."""
    import numpy as np
    import onnxruntime as ort

    from mlink.models.zoo._onnx import choose_providers

    choice = choose_providers(device, ort.get_available_providers())
    if device != "cpu" and not choice.wants_cuda:
        return
    session = ort.InferenceSession(tiny_onnx_model(), providers=choice.providers)
    session.run(None, {"x": np.array([-1.0, 1.0, -2.0, 2.0], dtype=np.float32)})


def prime_torch(device: str = "cpu") -> None:
    """Run a small convnet at a real input size (224x224, batch 1 and 4) on ``device``.

    The first real-size inference of a process allocates torch's intra-op thread pool, per-thread
    malloc arenas and oneDNN scratch buffers; a 64x64 toy input left part of that to be charged to
    the first real model (mobilenet_v2 measured 20% above its later loads). On CUDA the first
    convolution and matmul create the cuDNN and cuBLAS handles and workspaces: on an H100 the
    first torch model of a process was charged about 200 MiB for them, which then stayed
    resident after its unload (reported as sticky).
    """
    import torch

    net = (
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, stride=2, padding=1),
            torch.nn.BatchNorm2d(32),
            torch.nn.ReLU6(),
            torch.nn.Conv2d(32, 32, 3, padding=1, groups=32),
            torch.nn.Conv2d(32, 64, 1),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(64, 10),
        )
        .eval()
        .to(device)
    )
    for batch in (1, 4):
        with torch.inference_mode():
            net(torch.zeros(batch, 3, 224, 224, device=device)).softmax(1)
        with torch.no_grad():
            net(torch.zeros(batch, 3, 224, 224, device=device))
    if device != "cpu":
        torch.cuda.synchronize(device)


def prime_backends(device: str, backends: Iterable[str] | None = None) -> None:
    """Pay the one-time costs of ``backends`` (zoo backend names such as ``"torch"``,
    ``"onnxruntime"``; default: those already imported) on ``device``; never raises.

    On CUDA: create the CUDA context and, when torch is among the backends, run the small
    convnet there; when onnxruntime is, a tiny session on its CUDA provider. On the CPU: a tiny ONNX Runtime session and the small torch convnet, per
    backend. A backend that is missing or broken is logged and skipped (its first model pays).
    """
    wanted = set(backends) if backends is not None else {b for b in ("torch", "onnxruntime") if b in sys.modules}
    if device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                torch.empty(1, device=device)
                torch.cuda.synchronize(device)
                if "torch" in wanted:
                    prime_torch(device)
        except Exception as exc:  # no torch, or no CUDA in this torch
            log.info("memory meter: could not create a CUDA context on %s: %s", device, exc)
        if "onnxruntime" in wanted:
            try:
                prime_onnxruntime(device)
            except Exception as exc:  # no ONNX Runtime, or its CUDA provider failed: the first model pays
                log.info("memory meter: could not prime onnxruntime on %s: %s", device, exc)
        return
    for backend, prime in (("onnxruntime", prime_onnxruntime), ("torch", prime_torch)):
        if backend in wanted:
            try:
                prime()
            except Exception as exc:  # not installed, or broken: the first model pays
                log.info("memory meter: could not prime %s: %s", backend, exc)


def synthetic_frame(width: int = 320, height: int = 240, seed: int = 0) -> np.ndarray:
    """A deterministic textured BGR frame for warm-up inference (noise over gradients)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            (x * 255 // max(width - 1, 1)),
            (y * 255 // max(height - 1, 1)),
            ((x + y) * 127 // max(width + height - 2, 1)),
        ],
        axis=-1,
    )
    noise = rng.integers(0, 64, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)
