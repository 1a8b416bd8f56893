"""A fixed ring of frame slots in one shared-memory segment: how a capture process hands
decoded frames to the serving process without pickling images through a pipe.

Layout: a 64-byte header (``released``: how many frames the reader has copied out, written only
by the reader) then ``slots`` frames of one shape (HxWx3 uint8). The writer (the capture
process) puts frame ``n`` in slot ``n % slots`` only once ``n - released < slots``, and sends
the slot index with the frame's metadata over its pipe; the reader (the serving process) copies
the slot out and bumps ``released``. One writer and one reader per ring, so an aligned 8-byte
counter is all the synchronisation needed. Memory: ``slots x H x W x 3`` bytes + 64.

Who creates and who unlinks: the capture process creates a ring when it learns the frame shape
(first frame, or a new shape after a reconnect), under a name the serving process chose the
prefix of (``<prefix>_<generation>``), and announces it; the serving process alone unlinks
rings, including the next generation's name after a capture process died (it may have been
created and not yet announced), so a SIGKILL-ed capture process leaves nothing in /dev/shm.
"""

from __future__ import annotations

import contextlib
import time
from multiprocessing import shared_memory

import numpy as np

HEADER = 64


class RingClosed(Exception):
    """The writer was asked to stop while waiting for a free slot."""


class ShmRing:
    """``slots`` frames of ``shape`` in the shared-memory segment ``name``."""

    def __init__(self, name: str, shape: tuple[int, ...], slots: int, *, create: bool) -> None:
        if slots < 1 or not shape or min(shape) < 1:
            raise ValueError(f"ring {name}: bad shape {shape} or slots {slots}")
        self.name, self.shape, self.slots = name, tuple(shape), slots
        size = self.bytes_for(self.shape, slots) if create else 0
        self.shm = shared_memory.SharedMemory(name=name, create=create, size=size)
        buf = self.shm.buf
        assert buf is not None
        self._released = np.ndarray((1,), np.uint64, buffer=buf, offset=0)
        self._frames = np.ndarray((slots, *self.shape), np.uint8, buffer=buf, offset=HEADER)
        if create:
            self._released[0] = 0
        self.written = 0  # writer side only

    @staticmethod
    def bytes_for(shape: tuple[int, ...], slots: int) -> int:
        return HEADER + slots * int(np.prod(shape))

    # -- writer (capture process) ----------------------------------------------------------
    def put(self, image: np.ndarray, stopped: object = None, poll_s: float = 0.001) -> int:
        """Copy ``image`` into the next free slot and return its index; waits while all slots
        are still unread (the reader copies out on receipt, so only a starved reader makes it
        wait). ``stopped``: something with ``is_set()`` that ends the wait with RingClosed."""
        if image.shape != self.shape:
            raise ValueError(f"ring {self.name}: frame {image.shape} does not fit slots of {self.shape}")
        while self.written - int(self._released[0]) >= self.slots:
            if stopped is not None and stopped.is_set():  # type: ignore[attr-defined]
                raise RingClosed
            time.sleep(poll_s)
        slot = self.written % self.slots
        self._frames[slot][...] = image
        self.written += 1
        return slot

    def drained(self) -> bool:
        return int(self._released[0]) >= self.written

    # -- reader (serving process) ----------------------------------------------------------
    def take(self, slot: int) -> np.ndarray:
        """A copy of ``slot`` (the caller owns it), and the slot handed back to the writer."""
        image = self._frames[slot].copy()
        self._released[0] += 1
        return image

    # -- both ------------------------------------------------------------------------------
    def close(self) -> None:
        # numpy views pin the mmap; drop them before closing
        del self._released, self._frames
        with contextlib.suppress(BufferError, OSError):
            self.shm.close()

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.shm.unlink()


def unlink_name(name: str) -> bool:
    """Remove the segment ``name`` if it exists (True if it did): cleanup after a writer died."""
    try:
        shm = shared_memory.SharedMemory(name=name, create=False)
    except (FileNotFoundError, ValueError):
        return False
    shm.close()
    with contextlib.suppress(FileNotFoundError):
        shm.unlink()
    return True
