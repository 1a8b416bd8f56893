"""Temporary folders a killed daemon leaves are swept at the next start (server/temp_dirs.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from mlink.server.temp_dirs import OWNER, private_dir, sweep_stale


def _marked(base: Path, name: str, owner: str | None) -> Path:
    d = base / name
    d.mkdir(mode=0o700)
    (d / "redis.sock").write_text("")
    if owner is not None:
        (d / OWNER).write_text(owner)
    return d


def test_a_killed_owners_folder_is_swept_and_a_live_ones_kept(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from mlink.server.temp_dirs import private_dir as p; print(p('mlink-api-'), flush=True); input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    left = Path(child.stdout.readline().strip())
    mine = private_dir("mlink-rs-")
    try:
        assert left.is_dir() and (left / OWNER).read_text().split()[0] == str(child.pid)
        assert oct(left.stat().st_mode & 0o777) == "0o700"
        assert left not in sweep_stale()  # its owner still runs
        os.kill(child.pid, signal.SIGKILL)  # what a clean stop would remove stays ...
        child.wait(10)
        assert left.is_dir()
        removed = sweep_stale()  # ... until the next start sweeps it
        assert left in removed and not left.exists()
        assert mine.is_dir() and mine not in removed  # this process's own folder is kept
    finally:
        child.kill()
        child.wait(10)
        for d in (left, mine):
            if d.exists():
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()


def test_only_marked_folders_of_gone_owners_are_swept(tmp_path: Path) -> None:
    reused = _marked(tmp_path, "mlink-api-reused", f"{os.getpid()} 1")  # this pid, another start time
    dead = _marked(tmp_path, "mlink-redis-dead", "999999999 5")  # no such process
    alive = _marked(tmp_path, "mlink-rs-alive", f"{os.getpid()} -")  # no start time known: trusted
    unmarked = _marked(tmp_path, "mlink-api-unmarked", None)  # not made by private_dir: never ours
    garbled = _marked(tmp_path, "mlink-api-garbled", "not a pid")
    other = _marked(tmp_path, "other-dead", "999999999 5")  # not an mlink prefix
    (tmp_path / "mlink-api-link").symlink_to(dead)
    removed = set(sweep_stale(str(tmp_path)))
    assert removed == {reused, dead}
    assert all(d.is_dir() for d in (alive, unmarked, garbled, other))
