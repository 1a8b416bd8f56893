"""Where the ONNX models run: the provider choice (pure, no GPU needed), and a CUDA site on this
CPU host reporting its fallback in the model, /api/v1/models rows and /metrics.

The real CUDA path (yolox_nano's session on CUDAExecutionProvider, its NVML-measured cost above
zero) is checked on a GPU host by ``python -m mlink.bench.gpu_check`` (its ONNX step,
:mod:`mlink.bench.gpu_check_onnx`).
"""

from __future__ import annotations

import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from mlink.configs.load import parse_config
from mlink.models.assets import AssetStore
from mlink.models.base import ModelError
from mlink.models.catalog import create_model, zoo_catalog
from mlink.models.placement import Placement, forget_placements, latest_placement
from mlink.models.zoo._onnx import CPU_EP, CUDA_EP, ProviderChoice, choose_providers, started_fallback
from mlink.scheduler.pool import ModelPool
from mlink.server.metrics import placement_metrics
from mlink.server.snapshot import model_rows

BOTH = [CUDA_EP, CPU_EP]
ARENA = {"arena_extend_strategy": "kSameAsRequested"}
CUDA_HERE = CUDA_EP in ort.get_available_providers()


# -- the choice, as a pure function -----------------------------------------------------------
@pytest.mark.parametrize(
    "device, available, limit, providers, executes_on",
    [
        ("cpu", BOTH, 0, [CPU_EP], "cpu"),
        ("cpu", [CPU_EP], 0, [CPU_EP], "cpu"),
        ("cuda", BOTH, 0, [(CUDA_EP, {"device_id": 0, **ARENA}), CPU_EP], "cuda"),
        ("cuda:0", BOTH, 0, [(CUDA_EP, {"device_id": 0, **ARENA}), CPU_EP], "cuda:0"),
        ("cuda:3", BOTH, 1 << 30, [(CUDA_EP, {"device_id": 3, **ARENA, "gpu_mem_limit": 1 << 30}), CPU_EP], "cuda:3"),
        ("cuda:1", ["TensorrtExecutionProvider", *BOTH], 0, [(CUDA_EP, {"device_id": 1, **ARENA}), CPU_EP], "cuda:1"),
    ],
)
def test_providers_asked_for(device, available, limit, providers, executes_on):
    choice = choose_providers(device, available, gpu_mem_limit=limit)
    assert choice == ProviderChoice(providers, executes_on, None)
    assert choice.wants_cuda == device.startswith("cuda")


@pytest.mark.parametrize(
    "packages, reason",
    [
        (["onnxruntime"], "CPU-only build"),
        ([], "CPU-only build"),
        (["onnxruntime", "onnxruntime-gpu"], "both onnxruntime and onnxruntime-gpu are installed"),
        (["onnxruntime-gpu"], "offers no CUDAExecutionProvider (providers: CPUExecutionProvider)"),
    ],
)
def test_no_cuda_provider_falls_back_with_the_fix(packages, reason):
    choice = choose_providers("cuda:1", [CPU_EP], packages=packages)
    assert choice.providers == [CPU_EP] and choice.executes_on == "cpu" and not choice.wants_cuda
    assert reason in (choice.fallback or "")
    if "onnxruntime-gpu" not in packages or "onnxruntime" in packages:
        assert "mlink[gpu]" in (choice.fallback or "")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:-1", "cuda:", "CUDA", "gpu:0", ""])
def test_unknown_devices_are_refused(device):
    with pytest.raises(ModelError, match="unknown device"):
        choose_providers(device, BOTH, name="yolox_nano")


def render(families: list) -> str:
    """The text exposition of ``families``, as a scrape writes it."""

    class Families(Collector):
        def collect(self) -> list:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())
    return generate_latest(registry).decode()


def test_a_cuda_provider_that_did_not_start_is_a_fallback():
    """ORT drops the CUDA provider when it cannot load the CUDA/cuDNN libraries: the session's
    providers tell, not the list of providers the build offers."""
    asked = choose_providers("cuda", BOTH)
    assert started_fallback(asked, [CUDA_EP, CPU_EP]) is None
    reason = started_fallback(asked, [CPU_EP])
    assert reason is not None and "could not start" in reason and "CPUExecutionProvider" in reason
    cpu = choose_providers("cpu", BOTH)
    assert started_fallback(cpu, [CPU_EP]) is None
    none = choose_providers("cuda", [CPU_EP])
    assert started_fallback(none, [CPU_EP]) == none.fallback


# -- a CUDA site on this host: the fallback in rows and metrics -------------------------------
def _site(device: str):
    text = f"site: s\ndevice: {device}\nmodels: [{{name: yolox_nano}}, {{name: hog_people}}]\nstreams: []\n"
    return parse_config(text, "t.yaml", catalog=zoo_catalog())


@pytest.mark.skipif(CUDA_HERE, reason="this ONNX Runtime has a CUDA provider: no fallback to see")
def test_cuda_site_without_provider_reports_the_fallback(store: AssetStore):
    forget_placements()
    cfg = _site("cuda")
    pool = ModelPool(8 << 30, "cuda", factory=lambda n: create_model(n, store=store), models=["yolox_nano"])
    try:
        before = {r["name"]: r for r in model_rows(cfg.models, None, pool)}
        assert before["yolox_nano"]["executes_on"] is None  # never loaded: nothing known yet
        assert pool.load("yolox_nano")
        rows = {r["name"]: r for r in model_rows(cfg.models, None, pool)}
        yolox = rows["yolox_nano"]
        assert yolox["loaded"] and yolox["executes_on"] == "cpu"
        assert "CPU-only build" in yolox["fallback"] and "mlink[gpu]" in yolox["fallback"]
        assert rows["hog_people"]["executes_on"] is None and rows["hog_people"]["fallback"] is None
        text = render(placement_metrics(rows.values()))
        assert 'mlink_model_fallback{model="yolox_nano"} 1' in text
        assert 'mlink_model_device{device="cpu",model="yolox_nano"} 1' in text
        assert "hog_people" not in text  # not loaded yet: no claim about it

        pool.unload("yolox_nano")
        after = {r["name"]: r for r in model_rows(cfg.models, None, pool)}
        assert not after["yolox_nano"]["loaded"]
        assert after["yolox_nano"]["fallback"] == yolox["fallback"]  # still said while predicted
    finally:
        pool.close()


def test_cpu_site_runs_where_it_asked(store: AssetStore):
    forget_placements()
    cfg = _site("cpu")
    pool = ModelPool(8 << 30, "cpu", factory=lambda n: create_model(n, store=store), models=["yolox_nano"])
    try:
        assert pool.load("yolox_nano") and pool.load("hog_people")
        rows = model_rows(cfg.models, None, pool)
        assert [(r["executes_on"], r["fallback"]) for r in rows] == [("cpu", None), ("cpu", None)]
        text = render(placement_metrics(rows))
        assert 'mlink_model_fallback{model="yolox_nano"} 0' in text
        assert 'mlink_model_fallback{model="hog_people"} 0' in text
        assert latest_placement("yolox_nano", "cpu") == Placement("cpu", "cpu", None)
    finally:
        pool.close()


# -- the GPU check's ONNX step, dry run on the CPU meter ---------------------------------------
def test_gpu_check_onnx_step_dry_run_on_cpu(store: AssetStore, vtest_frames):
    """The step the GPU host runs (two measured loads, placement, time per frame), here on the
    CPU meter: the model must execute on the CPU asked for, with a cost above zero at both loads."""
    import argparse

    from mlink.bench.gpu_check_onnx import onnx_models, run_onnx
    from mlink.scheduler.memory import MemoryMeter

    names, left_out = onnx_models(store)
    assert set(names) | set(left_out) == {"yolox_nano", "centerface"}
    args = argparse.Namespace(device="cpu", batch=2, onnx_models="")  # a dry run: yolox_nano alone
    out = run_onnx(args, store, MemoryMeter("cpu"), vtest_frames[:2])
    assert out["ok"], out
    assert out["left_out"] == {"centerface": "not in --onnx-models"}
    (row,) = out["models"]
    assert (row["model"], row["executes_on"], row["fallback"]) == ("yolox_nano", "cpu", None)
    assert row["providers"] == ["CPUExecutionProvider"]
    assert len(row["loads"]) == 2 and all(x["cost"] > 0 for x in row["loads"]) and row["ms_per_frame"] > 0
