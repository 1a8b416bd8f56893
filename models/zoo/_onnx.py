"""Shared helpers for the ONNX Runtime zoo adapters (yolox_nano, centerface); not a zoo entry itself.

- :class:`OnnxParams`: the params every ONNX adapter takes (``threads``, ``gpu_mem_limit``);
- :func:`choose_providers`: which execution providers to ask for, given the device and what this
  ONNX Runtime offers (a pure function, tested without a GPU);
- :func:`onnx_session`: an ONNX Runtime session on the CPU or a CUDA device, with the model told
  when it falls back to the CPU (:meth:`~mlink.models.base.BlackBoxModel.fall_back`);
- :func:`warm_up`: one inference inside the load;
- :class:`OnnxModel`: the adapters' base: one session, dropped at unload, and the providers it runs on.

Packaging: ``onnxruntime`` (CPU only) and ``onnxruntime-gpu`` (CPU and CUDA providers) install the
same ``onnxruntime`` module, so one environment must hold exactly one of them: mlink's ``cpu``
extra pulls the first, the ``gpu`` extra the second, and the base install neither (a model then
fails to load and says which extra to install). With both installed the files of whichever came
last win; the fallback reason says so.

GPU memory: the CUDA arena grows by exactly what is requested (``kSameAsRequested``, not ORT's
default of the next power of two), so what NVML shows for the process is what the model holds,
and the adapters run one inference inside ``load`` so the arena, the cuDNN workspaces and the
per-session handles are allocated while the pool's meter measures the load, not lazily at the
first served frame.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from pydantic import Field

from mlink.models.base import AdapterParams, BlackBoxModel, ModelError

log = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
ORT_PACKAGES = ("onnxruntime", "onnxruntime-gpu")
INSTALL_HINT = "install mlink[gpu] (onnxruntime-gpu) in place of mlink[cpu] (onnxruntime)"


class OnnxParams(AdapterParams):
    threads: int = Field(default=0, ge=0, description="ONNX Runtime intra-op threads; 0 lets ORT decide")
    gpu_mem_limit: int = Field(
        default=0,
        ge=0,
        description="bytes ONNX Runtime's CUDA arena may hold (0: no limit); a model that needs more fails to load",
    )


@dataclass(frozen=True)
class ProviderChoice:
    """What to ask ONNX Runtime for: ``providers`` in priority order (a name, or (name, options)),
    the device the session will execute on, and why that is not the device asked for."""

    providers: list[Any] = field(default_factory=list)
    executes_on: str = "cpu"
    fallback: str | None = None

    @property
    def wants_cuda(self) -> bool:
        return any((p[0] if isinstance(p, tuple) else p) == CUDA_EP for p in self.providers)


def cuda_index(device: str, name: str) -> int | None:
    """None for ``cpu``; N for ``cuda`` (0) or ``cuda:N``; a :class:`ModelError` for anything else."""
    if device == "cpu":
        return None
    head, sep, index = device.partition(":")
    if head == "cuda" and not sep:
        return 0
    if head == "cuda" and index.isascii() and index.isdigit():
        return int(index)
    raise ModelError(f"model {name}: unknown device {device!r} (use cpu, cuda or cuda:N)")


def choose_providers(
    device: str,
    available: Sequence[str],
    *,
    gpu_mem_limit: int = 0,
    packages: Sequence[str] = (),
    name: str = "model",
) -> ProviderChoice:
    """The providers to ask for on ``device`` given ONNX Runtime's ``available`` providers.

    On ``cuda:N`` with the CUDA provider available: CUDA on device N (arena grown by what is
    requested, capped at ``gpu_mem_limit`` bytes when set), then the CPU for any operator CUDA
    lacks. Without it: the CPU, with the reason, naming the fix from the installed ONNX Runtime
    ``packages`` (distribution names).
    """
    index = cuda_index(device, name)
    if index is None:
        return ProviderChoice([CPU_EP], "cpu")
    if CUDA_EP in available:
        options: dict[str, Any] = {"device_id": index, "arena_extend_strategy": "kSameAsRequested"}
        if gpu_mem_limit:
            options["gpu_mem_limit"] = int(gpu_mem_limit)
        return ProviderChoice([(CUDA_EP, options), CPU_EP], device)
    if set(ORT_PACKAGES) <= set(packages):
        why = (
            "both onnxruntime and onnxruntime-gpu are installed and the CPU-only one's files won; "
            "run pip uninstall -y onnxruntime onnxruntime-gpu, then install mlink[gpu]"
        )
    elif "onnxruntime-gpu" not in packages:
        why = f"ONNX Runtime here is the CPU-only build (no {CUDA_EP}); {INSTALL_HINT}"
    else:
        why = f"this ONNX Runtime offers no {CUDA_EP} (providers: {', '.join(available) or 'none'})"
    return ProviderChoice([CPU_EP], "cpu", why)


def started_fallback(choice: ProviderChoice, session_providers: Sequence[str]) -> str | None:
    """The fallback reason once the session exists: ONNX Runtime drops the CUDA provider (with an
    error in its own log) when the CUDA or cuDNN libraries it was built for cannot be loaded."""
    if choice.fallback is not None or not choice.wants_cuda:
        return choice.fallback
    if session_providers and session_providers[0] == CUDA_EP:
        return None
    return (
        f"ONNX Runtime could not start its {CUDA_EP} (CUDA or cuDNN libraries missing or of another version; "
        f"its log says which); session providers: {list(session_providers)}"
    )


def installed_ort_packages() -> list[str]:
    """The ONNX Runtime distributions installed here (both is a broken environment)."""
    found = []
    for dist in ORT_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            metadata.version(dist)
            found.append(dist)
    return found


def _preload_cuda_libraries(ort: Any) -> None:
    """Load the CUDA and cuDNN libraries the CUDA provider dlopens by soname, before the session.

    torch (a dependency) loads the ones its CUDA build ships on import, which serves an
    onnxruntime-gpu built for the same CUDA major; ``preload_dlls`` (ORT 1.21+) also looks in the
    nvidia-* pip packages. It prints what it could not load; that goes to the debug log, and a
    provider that then fails to start is reported as the model's fallback.
    """
    with contextlib.suppress(Exception):
        import torch  # noqa: F401
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            preload()
    except Exception as exc:  # a missing directory, an unparsable version: the session decides
        log.debug("onnxruntime.preload_dlls failed: %s", exc)
    if out.getvalue().strip():
        log.debug("onnxruntime.preload_dlls: %s", out.getvalue().strip())


def _import_ort(name: str) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError(
            f"model {name}: ONNX Runtime is not installed ({exc}); install mlink[cpu], or mlink[gpu] on a CUDA host"
        ) from exc
    return ort


def onnx_session(model_source: str | bytes, device: str, params: OnnxParams, model: BlackBoxModel) -> Any:
    """An ONNX Runtime session for ``model`` on ``device``: CPU, or CUDA when asked for and available.

    ``model_source`` is a file path or serialized model bytes. A CUDA device that ONNX Runtime
    cannot serve falls back to the CPU rather than failing (the answers are the same, only
    slower), and the model is told why (``model.fall_back``), which /api/v1/models and /metrics
    report and the log warns about once.
    """
    ort = _import_ort(model.name)
    choice = choose_providers(
        device,
        ort.get_available_providers(),
        gpu_mem_limit=params.gpu_mem_limit,
        packages=installed_ort_packages(),
        name=model.name,
    )
    if choice.wants_cuda:
        _preload_cuda_libraries(ort)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # these exports list BN counters as graph inputs; ORT warns per tensor
    if params.threads:
        opts.intra_op_num_threads = params.threads
    session = ort.InferenceSession(model_source, sess_options=opts, providers=choice.providers)
    fallback = started_fallback(choice, session.get_providers())
    if fallback is not None:
        model.fall_back(fallback)
    return session


def warm_up(session: Any, feeds: Mapping[str, Any], outputs: Sequence[str] | None = None) -> None:
    """One inference, inside the load: the allocations of a first run (the CUDA arena, cuDNN's
    algorithm search and workspaces) then count in the load's measured cost."""
    session.run(list(outputs) if outputs is not None else None, dict(feeds))


class OnnxModel(BlackBoxModel):
    """What the ONNX adapters share: the session their ``_load`` sets, dropped at unload."""

    def __init__(self, store: Any = None, **params: Any) -> None:
        super().__init__(store, **params)
        self._session: Any = None

    @property
    def providers(self) -> list[str]:
        """The ONNX Runtime execution providers the loaded session runs on (none when unloaded)."""
        return list(self._session.get_providers()) if self._session is not None else []

    def _unload(self) -> None:
        self._session = None
