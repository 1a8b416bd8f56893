"""``age_s`` and ``stale`` on the latest result (server/freshness.py): pure, no daemon."""

from __future__ import annotations

import json

import pytest

from mlink.server.cache_layout import Record, response_body
from mlink.server.freshness import STALE_MIN_S, freshness, latest_body, stale_after_s


def test_stale_after_is_ten_periods_but_never_under_the_floor() -> None:
    assert stale_after_s(0.5) == 20.0
    assert stale_after_s(25) == STALE_MIN_S
    assert stale_after_s(None) == STALE_MIN_S and stale_after_s(0) == STALE_MIN_S


@pytest.mark.parametrize(
    ("state", "age", "stale"),
    [
        ("connected", 1.0, False),
        ("connected", 19.0, False),  # 0.5 fps: stale after max(5, 10 / 0.5) = 20 s
        ("connecting", 3.0, False),
        ("retrying", 0.1, True),  # a camera that is not delivering: stale at once
        ("ended", 0.1, True),
        ("stopped", 0.1, True),
        (None, 0.1, True),  # unknown camera status
    ],
)
def test_freshness_by_state_and_age(state: str | None, age: float, stale: bool) -> None:
    status = None if state is None else {"state": state, "fps_target": 0.5}
    got_age, got_stale = freshness(1000.0, 1000.0 + age, status)
    assert got_age == pytest.approx(age) and got_stale is stale


def test_an_old_result_of_a_delivering_camera_is_stale() -> None:
    status = {"state": "connected", "fps_target": 1.0}
    assert freshness(1000.0, 1009.9, status)[1] is False
    assert freshness(1000.0, 1010.1, status)[1] is True
    assert freshness(1000.0, 990.0, status) == (0.0, False)  # clocks a little apart: never negative


def test_latest_body_appends_to_the_stored_bytes() -> None:
    rec = Record("gate", 1000.0, {"n": 3, "é": "ü"})
    body = latest_body(response_body(rec), rec.ts, 1002.5, {"state": "connected", "fps_target": 5})
    assert json.loads(body) == {
        "camera": "gate",
        "ts": 1000.0,
        "result": {"n": 3, "é": "ü"},
        "age_s": 2.5,
        "stale": False,
    }
    assert body.startswith(response_body(rec)[:-1])
    with pytest.raises(ValueError, match="not a JSON object"):
        latest_body(b"[]", 0.0, 0.0, None)
