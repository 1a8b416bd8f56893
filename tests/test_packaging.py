"""`pip install .` must ship every module of every folder under its mlink.<folder> name."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("server", "scheduler", "links", "models", "bench", "configs")


def test_wheel_holds_every_module_and_config(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("mlink-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(
        ["git", "ls-files", *FOLDERS], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    expected = {f"mlink/{p}" for p in tracked if p.endswith((".py", ".yaml"))}
    assert expected, "no tracked files found"
    assert expected <= names, sorted(expected - names)
    assert not any(n.startswith(("models/", "server/")) for n in names), "a top-level package would shadow others"
