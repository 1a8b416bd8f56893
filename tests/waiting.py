"""Polling for tests that watch threads, servers and sockets settle (imported as ``waiting``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, what: str | None = None, every: float = 0.02) -> Any:
    """Call ``pred`` until it returns something truthy or ``timeout`` seconds pass; return its
    last value. With ``what``, a timeout raises an AssertionError that names what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    value = pred()
    if not value and what is not None:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
    return value
