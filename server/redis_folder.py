"""Where the embedded Redis keeps its data, and the lock that gives one daemon one folder.

The daemon's embedded redis-server writes its AOF under ``$MLINK_HOME/redis/SITE/`` so that the
next start reloads it (before, each start used a fresh temporary folder and every stored result
was gone after a restart). Two daemons writing one AOF would corrupt it, so the folder is locked
(``flock`` on ``mlink.lock``, released by the kernel when the holder dies, so a crash leaves no
stale lock). A unix socket path is limited to ~107 bytes: when ``FOLDER/redis.sock`` is longer,
the socket goes in a short private 0700 folder under /tmp, removed on close.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from pathlib import Path

from mlink.server.temp_dirs import private_dir

SOCKET_MAX = 100  # bytes; sun_path holds 108 with its NUL, keep a margin
LOCK_NAME = "mlink.lock"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class FolderInUse(RuntimeError):
    """Another live process holds this Redis folder."""


def site_folder(home: str | Path, site: str) -> Path:
    """``HOME/redis/SITE``; characters other than ``[A-Za-z0-9_.-]`` in SITE become ``_``."""
    name = _UNSAFE.sub("_", site) or "default"
    if name in (".", ".."):
        name = "_"
    return Path(home) / "redis" / name


def site_of_prefix(prefix: str) -> str:
    """The site of a cache prefix: ``mlink:SITE`` -> ``SITE``; any other prefix is its own name."""
    head, sep, rest = prefix.partition(":")
    return rest if sep and head == "mlink" and rest else prefix


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``FOLDER/mlink.lock`` holding the owner's pid."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUse(
                f"the Redis data folder {self.path.parent} is in use by another mlink daemon (pid {owner}); "
                "two daemons cannot share one: give each its own site or $MLINK_HOME"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the only descriptor releases the flock


def socket_dir(folder: Path) -> tuple[Path, bool]:
    """Where the socket goes: FOLDER when its path fits, else a new private temp folder (True: ours
    to delete)."""
    if len(os.fsencode(str(folder / "redis.sock"))) <= SOCKET_MAX:
        return folder, False
    short = private_dir("mlink-rs-")  # 0700
    if len(os.fsencode(str(short / "redis.sock"))) > SOCKET_MAX:
        shutil.rmtree(short, ignore_errors=True)
        raise ValueError(f"no short enough folder for a unix socket (tried {short})")
    return short, True
