"""A real headless Chromium driven over the Chrome DevTools Protocol, for tests (imported as ``browser``).

No driver package and no network: Chromium's ``--remote-debugging-pipe`` reads protocol
messages (JSON, each ending in a NUL byte) on its fd 3 and writes its answers on fd 4, so two
OS pipes and the standard library are the whole client. The browser is Debian's package
(``.ci/debian-packages`` installs it when missing); :func:`find_chromium` says where it is, or
None so that a test can skip with the reason.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def find_chromium() -> str | None:
    env = os.environ.get("MLINK_CHROMIUM")
    for path in (env, *CANDIDATES, shutil.which("chromium")):
        if path and os.access(path, os.X_OK):
            return path
    return None


def _above(fd: int, lowest: int) -> int:
    """``fd`` moved to a descriptor number >= ``lowest`` (the old one closed)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, lowest)
    os.close(fd)
    return moved


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless browser with one page: :meth:`goto`, :meth:`js`, :meth:`screenshot`."""

    def __init__(self, executable: str, width: int = 1400, height: int = 1000, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="mlink-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the browser's ends at 10 or above, so the moves to fd 3 and 4 below never overwrite one
        # of them (a process with few open files gets pipes at 3 and 4 themselves)
        to_browser_r, from_browser_w = (_above(fd, 10) for fd in (to_browser_r, from_browser_w))
        args = [
            executable,
            "--headless",
            "--no-sandbox",  # tests run as root in CI, where the sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--remote-debugging-pipe",
            f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        # fd 3 and 4 in the browser: bash (dash takes one-digit fds only) moves the pipe ends there, then becomes the browser
        script = f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", script, "bash", *args],
            pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next = 0
        self._buffer = b""
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.session = ""
        try:
            self.session = self._attach()
        except BaseException:
            self.close()
            raise

    # -- the protocol

    def _read_message(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if not select.select([self._from_browser], [], [], self.timeout)[0]:
                raise BrowserError(f"chromium sent nothing for {self.timeout} s")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise BrowserError(f"chromium closed the protocol pipe (exit code {self.proc.poll()})")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None) -> dict[str, Any]:
        """Call ``method`` and return its result (events that arrive meanwhile are kept)."""
        with self._lock:
            self._next += 1
            ident = self._next
            message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
            sid = self.session if session is None else session
            if sid:
                message["sessionId"] = sid
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
            while True:
                answer = self._read_message()
                if answer.get("id") == ident:
                    break
                self._events.append(answer)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def _attach(self) -> str:
        targets = self.send("Target.getTargets", session="")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        session: str = self.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True}, session="")[
            "sessionId"
        ]
        self.send("Page.enable", session=session)
        self.send("Runtime.enable", session=session)
        return session

    # -- what tests use

    def goto(self, url: str) -> None:
        answer = self.send("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise BrowserError(f"{url}: {answer['errorText']}")

    def js(self, expression: str) -> Any:
        """The value of ``expression`` in the page (awaited when a promise), as JSON."""
        answer = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression[:80]}: {answer['exceptionDetails'].get('exception', answer)}")
        return answer["result"].get("value")

    def console_errors(self) -> list[str]:
        """Exceptions the page threw and errors it logged, since the start."""
        out = []
        for ev in self._events:
            if ev.get("method") == "Runtime.exceptionThrown":
                out.append(str(ev["params"]["exceptionDetails"].get("exception", {}).get("description")))
            elif ev.get("method") == "Runtime.consoleAPICalled" and ev["params"].get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in ev["params"]["args"]))
        return out

    def screenshot(self, path: Path) -> Path:
        """The whole page as PNG at ``path``."""
        answer = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(answer["data"]))
        return path

    def close(self) -> None:
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
