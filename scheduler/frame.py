"""The frame record: one immutable record per camera frame, from ingest to the stored result.

A camera reader (:mod:`mlink.server.ingest`) makes a :class:`FrameRecord` when it samples a
frame; the same object goes through the reader's queue, the planner (which may buffer it to
profile) and the serving step (:func:`mlink.scheduler.serving.serve`), and the
:class:`~mlink.scheduler.serving.FrameResult` made from it carries it, so the stored result
names the frame exactly as ingest saw it: nothing converts or re-zips it on the way.

Two clocks, each with one meaning:

- ``video_time``: seconds into the source. For a file the frame index over its nominal fps (it
  restarts at 0 on each pass of a looped file); for a live source, seconds since the (re)connect.
- ``wall_time``: unix seconds when the frame was captured (the reader took it from the source,
  after any real-time pacing of a file). This is the clock results are stored and queried by:
  the result cache's score, the ``ts`` of every stored result and its ``wall_time`` field, and
  what ``results?since=&until=`` select on.

It lives in the scheduler (the lowest floor that handles frames) so that both the serving step
and the server can use it. ``stream`` and ``timestamp`` are the names the profiler and
:class:`~mlink.links.TupleSet` use (camera and video time), so a record is a profiling frame too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)  # eq=False: identity equality and hashing (the image is an array)
class FrameRecord:
    camera: str
    index: int  # index of the decoded frame in the source (within the current pass of a looped file)
    video_time: float  # seconds into the source (see the module docstring)
    wall_time: float  # unix seconds at capture: the clock results are stored and queried by
    image: np.ndarray  # HxWx3 uint8 BGR
    seq: int = 0  # n-th frame its reader queued (from 0)
    loop: int = 0  # how many times a looped file restarted before this frame

    @property
    def stream(self) -> str:
        """The camera id, under the name the profiler and tuple sets use."""
        return self.camera

    @property
    def timestamp(self) -> float:
        """The video time, under the name the profiler and tuple sets use."""
        return self.video_time
