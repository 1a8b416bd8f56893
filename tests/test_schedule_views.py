"""The plan history and the measured accuracy the snapshot publishes (server/schedule_views.py),
and their way to the reader processes (Redis hash fields read back as the reader reads them).

Pure bookkeeping over the scheduler's real :class:`LinkAudit` and :class:`Plan`: the daemon-level
behaviour (rotation really auditing, the routes answering) is in tests/test_daemon_hybrid.py.
"""

from __future__ import annotations

from dataclasses import replace

from mlink.scheduler.hybrid import LinkAudit
from mlink.scheduler.plans import Plan
from mlink.server.reader_state import PublishedSnapshot
from mlink.server.schedule_views import MeasuredAccuracy, PlanHistory, ScheduleViews
from mlink.server.snapshot import Snapshot
from mlink.server.snapshot_publish import SnapshotPublisher

NODES = ("hog_people:person_count", "yolox_nano:boxes", "yolox_nano:object_count")


def _plan(pid: int, reason: str = "initial", active: frozenset[str] = frozenset({"hog_people"})) -> Plan:
    return Plan(
        id=pid,
        active=active,
        served={"hog_people": ("person_count",), "yolox_nano": ("boxes", "object_count")},
        expected={"hog_people": 1.0, "yolox_nano": 0.7},
        expected_nodes={NODES[0]: 1.0, NODES[1]: 0.6, NODES[2]: 0.8},
        sources={NODES[1]: ("hog_people",), NODES[2]: ("hog_people",)},
        objective=0.85,
        budget=100,
        cost=60.0,
        selector="greedy",
        created_at=1000.0 + pid,
        next_reselect_at=5000.0,
        reason=reason,
        period=pid - 1,
    )


def test_nodes_never_audited_say_so_and_audited_ones_carry_their_means() -> None:
    clock = iter([10.0, 11.0, 12.0, 13.0]).__next__
    measured = MeasuredAccuracy(clock=clock)
    none = measured.update(None, NODES)
    assert none["source"] is None and none["audits"] == 0 and none["correction"] is None
    assert all(r["n"] == 0 and r["measured"] is None and r["expected"] is None for r in none["nodes"].values())
    audit = LinkAudit()
    view = measured.update(audit, NODES)
    assert view["source"] == "rotation" and view["series"] == {} and view["nodes"][NODES[1]]["n"] == 0
    audit.record(NODES[1], {"hog_people"}, 0.6, 0.4)
    audit.record(NODES[1], {"hog_people"}, 0.8, 0.6)
    audit.record(NODES[1], {"hog_people", "other"}, 0.7, 0.9)  # another active set: the same node
    view = measured.update(audit, NODES)
    row = view["nodes"][NODES[1]]
    assert row == {"model": "yolox_nano", "n": 3, "expected": 0.7, "measured": 0.633333, "drift": -0.066667}
    assert view["nodes"][NODES[2]]["n"] == 0 and view["nodes"][NODES[2]]["measured"] is None
    assert view["audits"] == 3 and 0 < view["correction"] <= 1.0
    assert view["series"] == {NODES[1]: [[12.0, 3, 0.7, 0.633333]]}
    assert measured.update(audit, NODES) is view  # nothing new: the same object (not re-encoded)
    audit.record(NODES[1], {"hog_people"}, 0.5, 1.0)
    later = measured.update(audit, NODES)
    # the series holds each interval's means, not the running mean
    assert later["series"][NODES[1]][-1] == [13.0, 1, 0.5, 1.0] and later["nodes"][NODES[1]]["n"] == 4


def test_a_new_rotation_starts_from_zero_and_the_series_is_bounded() -> None:
    measured = MeasuredAccuracy(keep=3)
    for _ in range(2):  # a new audit (a new planner's rotation): deltas from its own zero
        audit = LinkAudit()
        for i in range(5):
            audit.record(NODES[2], {"hog_people"}, 0.5, 0.25)
            view = measured.update(audit, NODES)
            assert view["nodes"][NODES[2]]["n"] == i + 1
    points = view["series"][NODES[2]]
    assert len(points) == 3 and all(p[1:] == [1, 0.5, 0.25] for p in points)


def test_the_history_keeps_the_last_plans_with_their_reasons() -> None:
    history = PlanHistory(keep=3)
    assert history.note(None, None) == ()
    for pid, reason in ((1, "initial"), (2, "period"), (3, "failure"), (4, "period")):
        p = _plan(pid, reason)
        rows = history.note(p, p.to_json())
    assert [(r["plan_id"], r["reason"]) for r in rows] == [(2, "period"), (3, "failure"), (4, "period")]
    assert rows[-1]["active"] == ["hog_people"] and rows[-1]["predicted"] == ["yolox_nano"]
    assert rows[-1]["objective"] == 0.85 and rows[-1]["budget_used"] == 0.6 and rows[-1]["created_at"] == 1004.0
    same = history.note(p, p.to_json())
    assert same is rows  # the same plan again: nothing new
    swapped = replace(p, active=frozenset({"hog_people", "yolox_nano"}))  # re-chosen under the same id
    rows = history.note(swapped, swapped.to_json())
    assert [r["plan_id"] for r in rows] == [2, 3, 4] and rows[-1]["predicted"] == []


def test_history_and_measured_travel_to_the_readers() -> None:
    views = ScheduleViews()
    audit = LinkAudit()
    audit.record(NODES[1], {"hog_people"}, 0.6, 0.5)

    class _Rotation:  # what ScheduleViews reads of a rotation: its audit and its JSON
        def __init__(self) -> None:
            self.audit = audit

        def to_json(self) -> dict:
            return {"modes": None}

    published = views.of(_plan(1), _Rotation())  # type: ignore[arg-type]
    assert published["plan_json"]["hybrid"] == {"modes": None}
    snap = Snapshot(version=3, published_at=1.0, reason="plan", cameras=("a",), models=(), **published)
    publisher = SnapshotPublisher(None, "redis://127.0.0.1:1", "mlink:t")  # type: ignore[arg-type]
    fields = {k.encode(): v.encode() for k, v in publisher.views(snap).items()}
    read = PublishedSnapshot.from_hash(fields)
    assert list(read.history) == [dict(r) for r in snap.history] and read.history[0]["reason"] == "initial"
    assert read.measured == snap.measured and read.measured["nodes"][NODES[1]]["n"] == 1
    older = {k: v for k, v in fields.items() if k not in (b"history", b"measured")}  # a daemon before these
    assert PublishedSnapshot.from_hash(older).measured is None
