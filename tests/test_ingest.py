"""Camera ingestion on real sample videos and a real HTTP MJPEG stream on loopback: sampling,
looping, pacing, drop-oldest, reconnects with redacted errors, apply() as a diff, round-robin."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest
from waiting import wait_for  # tests/waiting.py

from mlink.configs.schema import IngestConfig, StreamEntry
from mlink.scheduler.frame import FrameRecord
from mlink.server.backoff import Backoff
from mlink.server.frames import read_frames, resolve_url
from mlink.server.ingest import CameraReader, Ingest, is_live, redact

FAST = IngestConfig(
    processes=0,
    realtime=False,
    queue=4,
    backoff_base_s=0.05,
    backoff_max_s=0.2,
    backoff_jitter=0.1,
    open_timeout_s=2,
    read_timeout_s=2,
)


def drain(reader: CameraReader) -> list:
    out = []
    while (f := reader.get_nowait()) is not None:
        out.append(f)
    return out


@pytest.fixture(params=[0, 1], ids=["threads", "processes"])
def fast(request: pytest.FixtureRequest) -> IngestConfig:
    """FAST with cameras decoded by reader threads here (0) or by capture processes (1)."""
    return FAST.model_copy(update={"processes": request.param})


@pytest.fixture(scope="module")
def megamind(store) -> str:
    return resolve_url("asset://megamind", store)  # 270 frames at 23.976 fps (11.3 s)


# -- pure helpers ----------------------------------------------------------------------------


def test_redact_hides_credentials() -> None:
    assert redact("rtsp://admin:hunter2@10.0.0.5:554/s1") == "rtsp://***@10.0.0.5:554/s1"
    assert (
        redact("error opening http://bob@cam.local/video.mjpg now")
        == "error opening http://***@cam.local/video.mjpg now"
    )
    assert redact("https://h/x.mjpg?user=a&password=p4ss&token=abc") == "https://h/x.mjpg?user=a&password=***&token=***"
    assert redact("rtsp://u:p@ss@cam:554/s?x=1") == "rtsp://***@cam:554/s?x=1"  # unencoded @ in a password
    assert redact("a rtsp://u:pw@h1/s and http://v:pw2@h2/m") == "a rtsp://***@h1/s and http://***@h2/m"
    assert redact("/videos/a.mp4") == "/videos/a.mp4" and redact("rtsp://host/s") == "rtsp://host/s"
    assert redact("http://h/p?mail=a@b.c") == "http://h/p?mail=a@b.c"
    # unencoded "/" (and "/" with "@") in a password, and a password-only userinfo (Redis)
    assert redact("rtsp://u:pa/ss@cam:554/s") == "rtsp://***@cam:554/s"
    assert redact("cannot open rtsp://u:p@s/s@cam/x now") == "cannot open rtsp://***@cam/x now"
    assert redact("redis://:se/cr@t@db:6379/0") == "redis://***@db:6379/0"
    assert redact("https://medium.com/@user") == "https://medium.com/@user"
    assert is_live("rtsp://h/s") and is_live("HTTPS://h/v.mjpg") and is_live("0")
    assert not is_live("/v/a.mp4") and not is_live("asset://vtest")


def test_backoff_doubles_caps_and_resets() -> None:
    b = Backoff(0.5, 4.0, jitter=0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5
    j = Backoff(1.0, 8.0, jitter=0.2, rng=random.Random(7))
    delays = [j.next() for _ in range(5)]
    for d, nominal in zip(delays, [1, 2, 4, 8, 8]):
        assert 0.8 * nominal <= d <= 1.2 * nominal
    assert len(set(delays[3:])) == 2  # jittered, not in lock-step


# -- files -----------------------------------------------------------------------------------


def test_file_is_sampled_by_video_time(fast: IngestConfig, megamind: str) -> None:
    settings = fast.model_copy(update={"queue": 1000})
    r = CameraReader(StreamEntry(id="m", url=megamind, fps=2), settings).start()
    assert wait_for(lambda: r.status().state == "ended")
    frames = drain(r)
    expected = list(read_frames(megamind, sample_fps=2))
    assert [(f.index, f.video_time) for f in frames] == [(e.index, e.timestamp) for e in expected]
    assert len(frames) == 23  # 0.0, 0.5, ... 11.0 s
    assert np.array_equal(frames[5].image, expected[5].image)
    assert [f.seq for f in frames] == list(range(23))
    # one record type from ingest on: camera, index, video time and the wall time of capture
    assert all(isinstance(f, FrameRecord) and f.camera == "m" for f in frames)
    walls = [f.wall_time for f in frames]
    assert walls == sorted(walls) and time.time() - 120 < walls[0] <= walls[-1] <= time.time()
    st = r.status()
    assert (st.frames_in, st.drops, st.loops, st.reconnects, st.live, st.last_error) == (23, 0, 0, 0, False, None)
    assert not st.healthy  # an ended file that does not loop is neither open nor retrying (/readyz)
    r.stop()
    assert r.status().state == "stopped" and not r.alive


def test_looped_file_restarts_from_the_start(fast: IngestConfig, megamind: str) -> None:
    settings = fast.model_copy(update={"queue": 1000})
    r = CameraReader(StreamEntry(id="m", url=megamind, fps=1, loop=True), settings).start()
    assert wait_for(lambda: r.status().frames_in >= 25)  # two passes of 12 frames, and one more
    r.stop()
    frames = drain(r)
    firsts = [f for f in frames if f.video_time == 0.0]
    assert [f.loop for f in firsts][:3] == [0, 1, 2]
    pass0 = [f.video_time for f in frames if f.loop == 0]
    assert pass0 == pytest.approx([float(s) for s in range(12)], abs=0.05)  # one pass: t = 0..11 s
    assert r.status().reconnects == 0 and r.status().state == "stopped"


def test_realtime_paces_a_file_at_its_sampled_rate(fast: IngestConfig, megamind: str) -> None:
    # Paced, a file's sampled frame at video time t is queued no earlier than t after its first
    # frame was decoded, which is after start(): so on any machine the consumer gets frame k no
    # earlier than pts_k after start(). Unpaced, the reader hands out these six frames (1 s of
    # video) as fast as it decodes them (frame 1 within 0.01 s here). How late frames come
    # depends on the machine and is not claimed (the timeouts are only a safety net).
    settings = fast.model_copy(update={"realtime": True, "queue": 100})
    started = time.monotonic()
    r = CameraReader(StreamEntry(id="m", url=megamind, fps=5), settings).start()
    try:
        got, received = [], []
        for _ in range(6):
            f = r.get(timeout=10)
            assert f is not None
            got.append(f)
            received.append(time.monotonic() - started)
        assert [round(f.video_time, 1) for f in got] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
        for f, at in zip(got, received):
            assert at >= f.video_time - 1e-3, (f.video_time, at)  # never ahead of the video's own clock
        assert r.status().drops == 0
    finally:
        r.stop()


def test_slow_consumer_gets_the_newest_frames_and_drops_are_counted(fast: IngestConfig, store) -> None:
    settings = fast.model_copy(update={"queue": 3})
    r = CameraReader(StreamEntry(id="v", url="asset://vtest", fps=5, loop=True), settings, store=store).start()
    consumed = []
    try:
        for _ in range(5):
            # A consumer slower than decoding, on any machine: it takes a frame only after the
            # full queue dropped one since its last take.
            seen = r.status().drops
            wait_for(lambda seen=seen: r.status().drops > seen, 10, "the full queue to drop a frame")
            f = r.get(timeout=5)
            assert f is not None
            consumed.append(f)
            r.mark_processed()
        assert wait_for(lambda: r.status().fps_processed > 0, 5, "fps_processed")
        wait_for(lambda: r.status().queued == 3, 10, "the queue to fill up again")
    finally:
        r.stop()
    left = drain(r)
    st = r.status()
    assert st.drops >= 5  # at least one per take
    # Drop-oldest: a drop since the last take removed the frame after it, so every take skips.
    assert consumed[0].seq >= 1 and all(b.seq >= a.seq + 2 for a, b in itertools.pairwise(consumed))
    assert st.frames_in == len(consumed) + len(left) + st.drops  # every frame accounted for
    assert [f.seq for f in left] == list(range(st.frames_in - 3, st.frames_in))  # the newest 3
    assert st.frames_processed == 5 and st.queued == 0


# -- failures --------------------------------------------------------------------------------


def test_bad_url_reports_a_redacted_error_and_retries_while_another_camera_flows(
    fast: IngestConfig, store, megamind: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level("INFO", logger="mlink.ingest")
    settings = fast.model_copy(update={"realtime": True})
    with Ingest(settings, store=store) as ing:
        ing.apply(
            [
                StreamEntry(id="bad", url="rtsp://admin:hunter2@127.0.0.1:9/live", fps=5),
                StreamEntry(id="good", url=megamind, fps=10, loop=True),
            ]
        )
        # Served until the good camera has delivered 8 frames after the bad one failed and the
        # bad one has retried 3 times: frames keep flowing while a dead camera retries. (The
        # rate they flow at depends on the machine; the deadline is only a safety net.)
        got, after_failure = [], 0
        deadline = time.monotonic() + 30
        while after_failure < 8 or ing.status()["bad"].reconnects < 3:
            assert time.monotonic() < deadline, (got, ing.status())
            f = ing.next_frame(timeout=0.5)
            if f is not None:
                got.append(f.camera)
                ing.mark_processed(f.camera)
                if f.camera == "good" and ing.status()["bad"].last_error is not None:
                    after_failure += 1
        bad, good = ing.status()["bad"], ing.status()["good"]
    assert got.count("good") >= 8 and "bad" not in got
    assert good.state == "connected" and good.frames_processed == got.count("good")
    assert bad.state == "retrying" and bad.healthy and bad.live
    assert bad.reconnects >= 3 and bad.frames_in == 0
    assert bad.url == "rtsp://***@127.0.0.1:9/live"
    assert "rtsp://***@127.0.0.1:9/live" in bad.last_error and "cannot open" in bad.last_error
    assert bad.retry_at is not None and bad.last_error_at is not None
    out, err = capfd.readouterr()
    everything = json.dumps(bad.to_dict()) + caplog.text + out + err
    assert "hunter2" not in everything and "admin" not in everything
    assert "camera bad (rtsp://***@127.0.0.1:9/live)" in caplog.text


def test_missing_file_unknown_asset_and_absent_device_retry(fast: IngestConfig, store) -> None:
    with Ingest(fast, store=store) as ing:
        ing.apply(
            [
                StreamEntry(id="nofile", url="/nonexistent/cam.mp4"),
                StreamEntry(id="noasset", url="asset://no_such_video"),
                StreamEntry(id="nodev", url="57"),
            ]
        )
        assert wait_for(lambda: all(s.reconnects >= 2 for s in ing.status().values()))
        st = ing.status()
    assert "no such file" in st["nofile"].last_error
    assert "no_such_video" in st["noasset"].last_error
    assert st["nodev"].live and st["nodev"].last_error
    assert all(s.state == "retrying" for s in st.values())


class _MJPEG:
    """A real multipart/x-mixed-replace MJPEG server on 127.0.0.1 (no auth check).

    With ``burst_at``, each client gets frame ``burst_at`` after a stall of ``stall_s`` and the
    ``burst`` frames from it on all at once (as after a network hiccup), then 25 fps again.
    Frames before the burst are dark (grey 40), those of the burst mid-grey (120), those after
    it light (200)."""

    def __init__(
        self, port: int = 0, fps: float = 25.0, burst_at: int | None = None, stall_s: float = 0.6, burst: int = 15
    ) -> None:
        self.stopping = threading.Event()
        dark, mid, light = (
            cv2.imencode(".jpg", np.full((96, 128, 3), g, np.uint8))[1].tobytes() for g in (40, 120, 200)
        )
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                try:
                    while not owner.stopping.is_set():
                        in_burst = burst_at is not None and burst_at <= i < burst_at + burst
                        if i == burst_at and owner.stopping.wait(stall_s):
                            break
                        j = mid if in_burst else light if burst_at is not None and i >= burst_at else dark
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(j) + j + b"\r\n"
                        )
                        i += 1
                        if not (in_burst and i < burst_at + burst):
                            time.sleep(1.0 / fps)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def test_http_mjpeg_stream_sampled_by_wall_clock_and_reconnected(fast: IngestConfig) -> None:
    srv = _MJPEG(burst_at=10)  # 0.4 s of 25 fps, a 0.6 s stall, then 15 frames at once
    port = srv.port
    url = f"http://viewer:pa55w0rd@127.0.0.1:{port}/video.mjpg"
    r = CameraReader(StreamEntry(id="mj", url=url, fps=5), fast.model_copy(update={"queue": 100})).start()
    try:
        assert wait_for(lambda: r.status().state == "connected", 10)
        frames: list = []
        while not frames or frames[-1].image.mean() < 160:  # until a frame from after the burst
            assert len(frames) < 50, [f.video_time for f in frames]  # a safety net
            f = r.get(timeout=5)
            assert f is not None
            frames.append(f)
        assert frames[0].image.shape == (96, 128, 3) and frames[0].image.mean() < 80  # before the stall
        assert [f.seq for f in frames] == list(range(len(frames)))
        # pts is monotonic time since the connect, taken when a frame is sampled, so these hold
        # on any machine: sample k is taken no earlier than k periods (0.2 s) after the connect
        # (at most 5 fps on average, not the stream's 25) ...
        pts = np.array([f.video_time for f in frames])
        assert np.all(pts >= 0.2 * np.arange(len(pts)) - 1e-3), pts
        # ... and never two closer than half a period: the burst after the stall (which arrives
        # when the next sample is long due) is not passed on.
        assert np.diff(pts).min() >= 0.1 - 1e-3, pts
        st = r.status()
        assert st.reconnects == 0
        assert st.live and st.url == f"http://***@127.0.0.1:{port}/video.mjpg"
        srv.close()  # the camera goes away
        assert wait_for(lambda: r.status().reconnects >= 2, 10)
        st = r.status()
        assert st.state == "retrying" and "pa55w0rd" not in (st.last_error or "") and st.last_error
        srv = _MJPEG(port)  # ... and comes back on the same address
        assert wait_for(lambda: r.status().state == "connected", 10)
        drain(r)
        assert r.get(timeout=5) is not None
    finally:
        r.stop()
        srv.close()


# -- the manager -----------------------------------------------------------------------------


def test_apply_is_a_diff(fast: IngestConfig, store, megamind: str) -> None:
    settings = fast.model_copy(update={"realtime": True})
    a = StreamEntry(id="a", url=megamind, fps=2, loop=True)
    b = StreamEntry(id="b", url="asset://vtest", fps=1, loop=True)
    with Ingest(settings, store=store) as ing:
        res = ing.apply([a, b])
        assert (res.added, res.removed, res.restarted, res.unchanged) == (["a", "b"], [], [], [])
        ra, rb = ing.reader("a"), ing.reader("b")
        thread_a = ra.thread
        assert wait_for(lambda: ra.status().frames_in >= 2 and rb.status().frames_in >= 1)
        before = ra.status().frames_in

        c = StreamEntry(id="c", url=megamind, fps=1, loop=True)
        res = ing.apply([a.model_copy(update={"accuracy_target": 0.9}), b.model_copy(update={"fps": 2.0}), c])
        assert (res.added, res.removed, res.restarted, res.unchanged) == (["c"], [], ["b"], ["a"])
        assert ing.reader("a") is ra and ra.thread is thread_a and thread_a.is_alive()
        assert ra.stream.accuracy_target == 0.9  # the new entry, without a restart
        assert ing.reader("b") is not rb and not rb.alive and rb.status().state == "stopped"
        assert ing.reader("b").stream.fps == 2.0 and ing.reader("b").alive
        assert ing.cameras == ["a", "b", "c"]
        assert wait_for(lambda: ra.status().frames_in > before)  # a kept running, counters kept
        assert ra.status().reconnects == 0

        rb2, rc = ing.reader("b"), ing.reader("c")
        res = ing.apply([a])
        assert (res.added, res.removed, res.restarted, res.unchanged) == ([], ["b", "c"], [], ["a"])
        assert not rb2.alive and not rc.alive and ing.cameras == ["a"]
        assert ing.reader("a") is ra and thread_a.is_alive()

        res = ing.apply([a], settings.model_copy(update={"queue": 8}))  # new ingest settings
        assert res.restarted == ["a"] and ing.reader("a") is not ra and not thread_a.is_alive()
        assert ing.reader("a").settings.queue == 8
        with pytest.raises(ValueError):
            ing.apply([a, a])
        last = ing.reader("a")
    assert not last.alive and last.status().state == "stopped"


def test_round_robin_serves_cameras_in_turn(fast: IngestConfig, megamind: str) -> None:
    settings = fast.model_copy(update={"queue": 4})
    with Ingest(settings) as ing:
        ing.apply([StreamEntry(id="x", url=megamind, fps=1), StreamEntry(id="y", url=megamind, fps=1)])
        assert wait_for(lambda: all(s.state == "ended" for s in ing.status().values()))
        stop = threading.Event()
        order = []
        for f in ing.frames(stop):
            order.append(f)
            if len(order) == 8:
                stop.set()
        assert [f.camera for f in order] == ["x", "y"] * 4  # neither starves the other
        assert [f.video_time for f in order[::2]] == pytest.approx([8.0, 9.0, 10.0, 11.0], abs=0.05)  # the newest 4
        assert ing.next_frame(timeout=0.1) is None
        st = ing.status()["x"]
        assert (st.frames_in, st.drops) == (12, 8)
        assert ing.get("x", timeout=0.05) is None


# -- capture processes -----------------------------------------------------------------------


def _our_segments() -> set[str]:
    """Shared-memory rings this test process's capture processes made (named mlk<our pid>_...)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"mlk{os.getpid()}_")}


def _gone(pid: int) -> bool:
    """Not running: no such process, or a zombie its (re)parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_killed_capture_process_is_restarted_and_the_camera_serves_again(store) -> None:
    settings = FAST.model_copy(update={"processes": "auto", "queue": 2})
    with Ingest(settings, store=store) as ing:
        ing.apply([StreamEntry(id="v", url="asset://vtest", fps=5, loop=True)])
        assert ing.next_frame(timeout=30) is not None
        reader = ing.reader("v")
        st = ing.status()["v"]
        assert (st.capture, st.state) == ("process", "connected")
        assert st.hw_decode in ("software", "vaapi", "d3d11", "mfx", "any")  # hw_decode auto: asked, fell back here
        first = wait_for(lambda: reader.pid, 10, "the capture process's pid")
        assert first != os.getpid()
        # decoding runs below serving: capture_nice (default 10) under this process's priority
        assert os.getpriority(os.PRIO_PROCESS, first) == min(os.getpriority(os.PRIO_PROCESS, 0) + 10, 19)
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: ing.status()["v"].state == "retrying", 10, "the camera to show retrying")
        st = ing.status()["v"]
        assert st.last_error is not None and "capture process died" in st.last_error and "-9" in st.last_error
        assert wait_for(lambda: reader.pid not in (None, first), 20, "a new capture process")
        niced = min(os.getpriority(os.PRIO_PROCESS, 0) + 10, 19)
        assert wait_for(lambda: os.getpriority(os.PRIO_PROCESS, reader.pid) == niced, 10, "the new process niced")
        assert _gone(first)  # reaped, not left a zombie
        killed_at = time.time()
        while (f := ing.next_frame(timeout=30)) is not None and f.wall_time < killed_at:
            pass  # frames queued before the kill
        assert f is not None and f.camera == "v" and f.image.shape == (576, 768, 3)
        st = ing.status()["v"]
        assert st.state == "connected" and st.reconnects >= 1
        assert ing.reader("v") is reader  # the same camera, not a new one
        assert len(_our_segments()) == 1  # the dead process's ring was removed, the new one is in use
    assert _our_segments() == set()


def test_close_leaves_no_process_and_no_shared_memory(store, megamind: str) -> None:
    # three cameras over two shared capture processes, unpaced, with frames taken and not
    settings = FAST.model_copy(update={"processes": 2, "queue": 2})
    streams = [
        StreamEntry(id="a", url="asset://vtest", fps=5, loop=True),
        StreamEntry(id="b", url=megamind, fps=5, loop=True),
        StreamEntry(id="c", url="asset://vtest", fps=2, loop=True),
    ]
    ing = Ingest(settings, store=store)
    try:
        ing.apply(streams)
        for _ in range(9):
            assert ing.next_frame(timeout=30) is not None
        assert wait_for(lambda: all(s.frames_in >= 2 for s in ing.status().values()), 30, "frames of every camera")
        pids = {ing.reader(c).pid for c in "abc"}
        assert None not in pids and len(pids) == 2  # N=2: three cameras on two processes
        assert len(_our_segments()) == 3  # a ring per camera
        assert all(s.capture == "process" and s.decode_ms > 0 for s in ing.status().values())
        ing.apply(streams[:1])  # the process left without cameras goes
        assert wait_for(lambda: sum(not _gone(p) for p in pids) == 1, 10, "the idle process to be reaped")
        assert len(_our_segments()) == 1
    finally:
        ing.close()
    assert all(_gone(p) for p in pids)
    assert [p for p in __import__("multiprocessing").active_children() if p.name.startswith("mlink-capture")] == []
    assert _our_segments() == set()


_ORPHAN = """
import sys, time
from mlink.configs.schema import IngestConfig, StreamEntry
from mlink.server.ingest import Ingest
ing = Ingest(IngestConfig(realtime=False, processes="auto"))
ing.apply([StreamEntry(id="v", url=sys.argv[1], fps=5, loop=True)])
assert ing.next_frame(timeout=60) is not None
print(ing.reader("v").pid, flush=True)
time.sleep(120)
"""


def test_capture_processes_exit_when_the_serving_process_dies(megamind: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN, megamind], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert not _gone(child)
        proc.kill()  # SIGKILL: no cleanup code of the serving process runs
        proc.wait(10)
        assert wait_for(lambda: _gone(child), 15, "the orphaned capture process to exit")
        # its ring is removed by the resource tracker shared with the dead process
        assert wait_for(
            lambda: not [n for n in os.listdir("/dev/shm") if n.startswith(f"mlk{proc.pid}_")], 15, "its ring"
        )
    finally:
        proc.kill()
        proc.wait(10)


def test_ingest_processes_setting_is_checked() -> None:
    assert IngestConfig().processes == "auto" and IngestConfig(processes=4).processes == 4
    for bad in (-1, 257, "many"):
        with pytest.raises(ValueError, match="processes"):
            IngestConfig(processes=bad)
