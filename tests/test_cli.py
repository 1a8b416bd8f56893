"""The mlink command line, run in-process on real assets and real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mlink.models.assets as assets_mod
from mlink.models.assets import AssetStore
from mlink.server.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _use_test_store(store: AssetStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets_mod, "_default_store", store)


def test_models_list_shows_every_zoo_entry_with_specs() -> None:
    res = runner.invoke(app, ["models", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    for name in (
        "yolox_nano",
        "hog_people",
        "mobilenet_v2",
        "efficientnet_lite0",
        "centerface",
        "keypointrcnn_resnet50_fpn",
    ):
        assert name in rows
    assert rows["yolox_nano"]["backend"] == "onnxruntime"
    assert any(o.startswith("boxes: sequence") for o in rows["yolox_nano"]["outputs"])
    assert rows["yolox_nano"]["assets"] == {"yolox_nano": True}
    assert rows["keypointrcnn_resnet50_fpn"]["assets"] == {"keypointrcnn_resnet50_fpn": False}


def test_models_run_prints_one_json_object_per_frame() -> None:
    res = runner.invoke(
        app, ["models", "run", "yolox_nano", "--video", "asset://vtest", "--frames", "3", "--fps", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.output.strip().splitlines()]
    assert [r["frame"] for r in lines] == [0, 5, 10]
    assert [r["timestamp"] for r in lines] == [0.0, 0.5, 1.0]
    for r in lines:
        assert 3 <= r["output"]["person_count"]["count"] <= 12
        assert len(r["output"]["boxes"]) == r["output"]["object_count"]["count"]


def test_models_run_errors_are_one_clear_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["models", "run", "yolox_nano", "--video", str(tmp_path / "gone.mp4"), "--frames", "1"])
    assert res.exit_code == 2 and "no such file" in res.output
    res = runner.invoke(app, ["models", "run", "no_such_model", "--video", "asset://vtest"])
    assert res.exit_code == 2 and "unknown zoo model 'no_such_model'" in res.output


def test_config_validate_reports_paths(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "site: s\nmodels:\n  - name: yolox_nano\n    outputs: [wat]\nstreams:\n  - {id: a, url: x, fps: 0}\n"
    )
    res = runner.invoke(app, ["config", "validate", str(bad)])
    assert res.exit_code == 1
    assert "models.0" in res.output and "streams.0.fps" in res.output
    res = runner.invoke(app, ["config", "validate", "configs/city.yaml"])
    assert res.exit_code == 0 and "yolox_nano:vehicle_count" in res.output


def test_assets_verify_and_list(store: AssetStore) -> None:
    store.path("megamind")
    res = runner.invoke(app, ["assets", "verify"])
    assert res.exit_code == 0 and "ok       megamind" in res.output
    store.cached_path("megamind").write_bytes(b"truncated")
    res = runner.invoke(app, ["assets", "verify"])
    assert res.exit_code == 1 and "corrupt  megamind" in res.output
    res = runner.invoke(app, ["assets", "fetch", "megamind"])
    assert res.exit_code == 0 and store.status("megamind").state == "ok"


def test_bench_group_comes_from_its_entry_point_not_a_server_import() -> None:
    # The program lives in server/; bench/ is a floor above: importing the CLI must not import
    # it, and main() adds `mlink bench` from the mlink.commands entry point.
    import subprocess
    import sys

    code = (
        "import json, sys, mlink.server.cli as cli\n"
        "assert not [m for m in sys.modules if m.startswith('mlink.bench')], 'server imported bench'\n"
        "cli.add_command_groups(); cli.add_command_groups()\n"
        "print(json.dumps([g.name for g in cli.app.registered_groups]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    groups = json.loads(out)
    assert groups.count("bench") == 1 and "schedule" in groups and "links" in groups
