"""`pip install .` must ship every module of every folder under its mlink.<folder> name, and its
metadata must let an environment hold exactly one ONNX Runtime (cpu or gpu extra)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("server", "scheduler", "links", "models", "bench", "configs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    return next(out.glob("mlink-*.whl"))


def test_wheel_holds_every_module_and_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(
        ["git", "ls-files", *FOLDERS], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    expected = {f"mlink/{p}" for p in tracked if p.endswith((".py", ".yaml", ".html", ".js", ".css"))}
    assert expected, "no tracked files found"
    assert expected <= names, sorted(expected - names)
    assert not any(n.startswith(("models/", "server/")) for n in names), "a top-level package would shadow others"


def _requirements(wheel: Path) -> list[tuple[str, str]]:
    """(distribution name, marker) of every Requires-Dist in the wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            spec, _, marker = line.removeprefix("Requires-Dist:").partition(";")
            name = re.match(r"\s*([A-Za-z0-9._-]+)", spec)
            assert name, line
            out.append((name.group(1).lower().replace("_", "-"), marker.strip()))
    return out


def test_onnxruntime_comes_from_exactly_one_extra(wheel: Path) -> None:
    """onnxruntime and onnxruntime-gpu install the same module: the base install must pull
    neither (pip cannot drop a base dependency for an extra), cpu the first, gpu the second."""
    reqs = _requirements(wheel)
    ort = {(name, marker.replace("'", '"')) for name, marker in reqs if name.startswith("onnxruntime")}
    assert ort == {("onnxruntime", 'extra == "cpu"'), ("onnxruntime-gpu", 'extra == "gpu"')}, ort
    assert ("torch", "") in reqs  # the base install still carries the rest
    for extra in ("cpu", "gpu", "dev"):
        pulled = {n for n, m in reqs if m.replace("'", '"') == f'extra == "{extra}"' and n.startswith("onnxruntime")}
        assert len(pulled) <= 1, (extra, pulled)
