"""Writing a shared file safely: one writer at a time, readers only ever see a finished file.

Why: several cameras (threads) and several daemons or CLI runs (processes) open the same asset
at the same moment. A fixed temporary name let one writer truncate or rename away another's
half-written copy, and a reader hash a file still being written. Here:

- ``held(lock_file)`` serialises writers of one file across threads (an in-process lock per lock
  file) and across processes (``flock`` on the lock file, released by the kernel if a holder
  dies, so a crash never leaves it stuck);
- ``staged(target, fill)`` writes into a temporary file of a unique name in the target's folder
  (so the final ``os.replace`` is an atomic rename on one file system), hashing the bytes as they
  are written; the caller renames it into place only after checking the digest;
- ``remove_stale(target)`` deletes temporaries a crashed writer left behind (call it holding the
  lock, when no other writer of that target can be running).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

if sys.platform != "win32":
    import fcntl

TEMP_SUFFIX = ".tmp"
# A temporary untouched this long belongs to a writer that died: no source is that slow.
STALE_AFTER_S = 3600.0
_POLL_S = 0.05
log = logging.getLogger(__name__)

_guard = threading.Lock()
_thread_locks: dict[str, threading.Lock] = {}


def _forget_thread_locks() -> None:
    """A forked child starts with no other threads; locks they held must not stay held there."""
    global _guard, _thread_locks  # noqa: PLW0603 - reset in the child only
    _guard = threading.Lock()
    _thread_locks = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_thread_locks)


def _thread_lock(lock_file: Path) -> threading.Lock:
    key = os.path.realpath(lock_file)
    with _guard:
        return _thread_locks.setdefault(key, threading.Lock())


@contextmanager
def held(lock_file: Path, timeout: float) -> Iterator[None]:
    """Hold the lock named by ``lock_file`` against other threads and processes.

    Raises TimeoutError naming the lock file when it is not had within ``timeout`` seconds
    (a hung writer elsewhere), rather than waiting forever.
    """
    deadline = time.monotonic() + timeout
    lock = _thread_lock(lock_file)
    if not lock.acquire(timeout=timeout):
        raise TimeoutError(f"another thread held {lock_file} for over {timeout:.0f} s")
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_file, "ab") as f:  # "a": created when missing, never truncated
            _flock(f, lock_file, deadline, timeout)
            yield  # closing the file releases the flock
    finally:
        lock.release()


def _flock(f: BinaryIO, lock_file: Path, deadline: float, timeout: float) -> None:
    """Take the process-wide part of the lock; polled, so that waiting has a deadline."""
    if sys.platform == "win32":
        return
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"another process held {lock_file} for over {timeout:.0f} s") from None
            time.sleep(_POLL_S)
        except OSError as exc:  # a file system without locks: threads stay safe, processes may race
            log.warning("no file lock on %s (%s); other processes are not kept out", lock_file, exc)
            return


class Sink(Protocol):
    """Where a source's bytes go (a file, or the hashing writer in front of one)."""

    def write(self, data: bytes, /) -> object: ...


class _HashingWriter:
    """Writes through to ``out`` and hashes what passes, so a copy is read once, not twice."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.out.write(data)


@dataclass(frozen=True)
class Staged:
    path: Path
    sha256: str


@contextmanager
def staged(target: Path, fill: Callable[[Sink], None]) -> Iterator[Staged]:
    """A finished, flushed temporary copy beside ``target``, written by ``fill``.

    The caller moves it into place with ``os.replace(staged.path, target)``; whatever is left
    (a rejected copy, a failed write) is deleted on exit.
    """
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the asset is public, as a copy is
            writer = _HashingWriter(out)
            fill(writer)
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename makes it visible
        yield Staged(tmp, writer.hash.hexdigest())
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale(target: Path, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete temporaries of ``target`` left by writers that died; call it holding its lock.

    Only those untouched for ``older_than_s``: should the lock not keep another process out (a
    file system without locks, an older mlink), a live writer's copy is never pulled away.
    """
    cutoff = time.time() - older_than_s
    stale = []
    for p in target.parent.glob(glob.escape(f".{target.name}.") + "*" + TEMP_SUFFIX):
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
                stale.append(p)
        except FileNotFoundError:
            pass
    return stale
