"""Private temporary folders that a killed daemon does not leave behind for good.

The daemon makes short-lived private folders under ``/tmp`` (unix sockets need short paths):
the readers' upstream socket and histogram folder (``mlink-api-*``), the embedded Redis's
socket when its data folder's path is too long (``mlink-rs-*``), a throw-away Redis folder
(``mlink-redis-*``). A clean stop removes its own; ``kill -9`` cannot. So each folder records
its owner (pid and the process's start time, which tells a reused pid from the owner) and every
start sweeps the folders of owners that are gone: at most one crash's worth is ever left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("mlink.tmp")

PREFIXES = ("mlink-api-", "mlink-rs-", "mlink-redis-")
OWNER = ".mlink-owner"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or None
    when no such process runs (or this system has no /proc: then nothing is ever swept)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _base() -> str | None:
    return "/tmp" if os.path.isdir("/tmp") else None


def private_dir(prefix: str) -> Path:
    """A new 0700 folder under /tmp named ``prefix``..., marked as this process's."""
    if prefix not in PREFIXES:
        raise ValueError(f"unknown temporary folder prefix {prefix!r}")
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=_base()))
    (path / OWNER).write_text(f"{os.getpid()} {_start_time(os.getpid()) or '-'}\n")
    return path


def _owner_alive(folder: Path) -> bool:
    try:
        pid_s, started = (folder / OWNER).read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return True  # not marked by us (or being made right now): never ours to remove
    now = _start_time(pid)
    return now is not None and (started == "-" or now == started)


def sweep_stale(base: str | None = None) -> list[Path]:
    """Remove this user's mlink folders whose owner process is gone; returns what was removed."""
    root = Path(base or _base() or tempfile.gettempdir())
    removed: list[Path] = []
    uid = os.getuid()
    for prefix in PREFIXES:
        for folder in root.glob(prefix + "*"):
            with contextlib.suppress(OSError):
                if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != uid:
                    continue
                if not _owner_alive(folder):
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
    if removed:
        log.info("removed %d temporary folder(s) left by daemons that were killed", len(removed))
    return removed
