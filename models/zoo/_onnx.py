"""Shared helpers for the ONNX Runtime zoo adapters (yolox_nano, centerface); not a zoo entry itself.

- :class:`OnnxParams`: the params every ONNX adapter takes (``threads``);
- :func:`onnx_session`: an ONNX Runtime session on the CPU or a CUDA device.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from mlink.models.base import AdapterParams, ModelError

log = logging.getLogger(__name__)


class OnnxParams(AdapterParams):
    threads: int = Field(default=0, ge=0, description="ONNX Runtime intra-op threads; 0 lets ORT decide")


def onnx_session(model_source: str | bytes, device: str, threads: int, name: str) -> Any:
    """An ONNX Runtime session on ``device``: CPU, or CUDA when asked for and available.

    ``model_source`` is a file path or serialized model bytes. A CUDA device without the CUDA
    execution provider falls back to the CPU with a logged warning rather than failing: the
    answers are the same, only slower.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # these exports list BN counters as graph inputs; ORT warns per tensor
    if threads:
        opts.intra_op_num_threads = threads
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            device_id = int(device.split(":", 1)[1]) if ":" in device else 0
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        else:
            log.warning(
                "model %s: %s asked for but ONNX Runtime has no CUDA provider here; running on CPU", name, device
            )
    elif device != "cpu":
        raise ModelError(f"model {name}: unknown device {device!r} (use cpu, cuda or cuda:N)")
    return ort.InferenceSession(model_source, sess_options=opts, providers=providers)
