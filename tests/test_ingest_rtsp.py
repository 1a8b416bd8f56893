"""Ingest against a real RTSP server (issue 14 item 10): GStreamer's rtsp-server serves
market-street.mp4 as H.264 behind basic authentication, the camera URL carries the credentials
(the password holds ``/`` and ``@``, percent-encoded as RTSP URLs need), and the server is killed
and started again on the same port.

What is checked is what an operator relies on: frames arrive decoded at the clip's size through
the default capture path (a capture process) with the default reconnect settings; the
credentials appear in no status, error or log line (the capture process's stderr included,
where FFmpeg writes); after the server comes back, frames resume within 5 s.

The server runs under the system Python (PyGObject is a Debian package, not a wheel);
``.ci/run`` installs it when missing. Where it cannot be installed the test is skipped, saying so.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import wait_for  # tests/waiting.py

from mlink.configs.schema import IngestConfig, StreamEntry
from mlink.server.frames import resolve_url
from mlink.server.ingest import CameraReader

USER, PASSWORD = "admin", "r7/s@cret"  # what the server checks
URL_PASSWORD = "r7%2Fs%40cret"  # the same in the URL's userinfo
SECRETS = (PASSWORD, URL_PASSWORD, "r7/s", "s@cret", "cret")
SERVER = Path(__file__).with_name("rtsp_server.py")
RESUME_S = 5.0  # the bound the issue sets, from the server listening again to the first new frame


def _gst_python() -> str:
    """A Python that can run the GStreamer RTSP server, or skip with the reason."""
    exe = shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")
    probe = 'import gi; gi.require_version("GstRtspServer", "1.0"); from gi.repository import GstRtspServer'
    if exe is None or subprocess.run([exe, "-c", probe], check=False, capture_output=True, timeout=30).returncode != 0:
        pytest.skip(
            "GStreamer's RTSP server is not installed (Debian: python3-gi gir1.2-gst-rtsp-server-1.0 "
            "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad; .ci/run installs them where it may)"
        )
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RtspServer:
    def __init__(self, python: str, port: int, clip: str) -> None:
        self.args = [python, str(SERVER), str(port), "/live", clip, USER, PASSWORD]
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> float:
        """Start and wait until it listens; returns that moment (monotonic)."""
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until 'ready' or the process ends
        assert line.strip() == "ready", f"the RTSP server did not start: {line!r}"
        return time.monotonic()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def rtsp(store) -> Iterator[tuple[RtspServer, int]]:
    port = _free_port()
    server = RtspServer(_gst_python(), port, resolve_url("asset://market_street", store))
    server.start()
    try:
        yield server, port
    finally:
        server.kill()


def test_rtsp_camera_with_credentials_streams_hides_them_and_resumes_after_a_server_restart(
    rtsp: tuple[RtspServer, int], capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    server, port = rtsp
    caplog.set_level(logging.DEBUG)
    url = f"rtsp://{USER}:{URL_PASSWORD}@127.0.0.1:{port}/live?channel=1"
    settings = IngestConfig()  # the defaults an operator gets: a capture process, default backoff
    assert settings.processes != 0
    reader = CameraReader(StreamEntry(id="door", url=url, fps=5), settings).start()
    seen: list[str] = []  # every status a client of the API could be shown
    try:
        assert wait_for(lambda: reader.status().state == "connected", 30, "the RTSP camera to connect")
        first = [reader.get(timeout=10) for _ in range(5)]
        assert all(f is not None and f.image.shape == (360, 640, 3) for f in first)
        st = reader.status()
        seen.append(repr(st.to_dict()))
        assert st.live and st.capture == "process"
        assert st.url == f"rtsp://***@127.0.0.1:{port}/live?channel=1"

        server.kill()  # the camera's server goes away ...
        assert wait_for(lambda: reader.status().state == "retrying", 15, "the camera to show retrying")
        time.sleep(8)  # ... long enough that the backoff has grown past its first steps
        st = reader.status()
        seen.append(repr(st.to_dict()))
        assert st.last_error and st.reconnects >= 1
        while reader.get_nowait() is not None:
            pass  # frames from before the restart
        listening = server.start()  # ... and comes back on the same port
        frame = reader.get(timeout=RESUME_S + 5)
        resumed = time.monotonic() - listening
        assert frame is not None and frame.image.shape == (360, 640, 3)
        assert resumed < RESUME_S, f"frames resumed {resumed:.2f}s after the server came back"
        assert wait_for(lambda: reader.status().state == "connected", 10, "connected again")
        seen.append(repr(reader.status().to_dict()))
    finally:
        reader.stop()
    out, err = capfd.readouterr()  # this process's and the capture process's stdout/stderr
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in SECRETS:
        assert not [s for s in seen if secret in s], f"{secret!r} in a camera status"
        assert secret not in out + err, f"{secret!r} written to stdout/stderr"
        assert secret not in logged, f"{secret!r} in the log"
    print(f"rtsp: frames resumed {resumed:.2f}s after the server listened again")  # the figure, with -rP
