"""The throughput benchmark's arithmetic and site (the run itself is `make bench`'s: it needs minutes)."""

from __future__ import annotations

import yaml

from mlink.bench.throughput import DEFAULT_CONFIG, VIDEOS, StepFigures, keeps_up, saturation, site_config
from mlink.configs.load import parse_config
from mlink.models.catalog import zoo_catalog
from mlink.server.stages import StageTimes, per_item_ms


def step(cameras: int, served: float, drop_share: float = 0.0) -> StepFigures:
    s = StepFigures(cameras, cameras * 5.0, served, cameras * 5.0, 0, drop_share, {}, {}, 1.0, None)
    s.keeps_up = keeps_up(served, s.offered_fps, drop_share)
    return s


def test_saturation_is_the_last_count_that_keeps_up_before_the_first_that_does_not() -> None:
    steps = [step(1, 5.0), step(2, 9.8), step(4, 15.0), step(8, 40.0)]  # 8 "recovers": noise after saturation
    assert [s.keeps_up for s in steps] == [True, True, False, True]
    assert saturation(steps) == 2
    assert saturation([step(1, 4.0)]) is None
    assert not keeps_up(5.0, 5.0, drop_share=0.02)  # served all it was given, but the cameras dropped


def test_site_config_keeps_the_models_and_budget_and_validates() -> None:
    base = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg = site_config(base, 6, 5.0, unthrottled=True, device="cpu")
    parsed = parse_config(yaml.safe_dump(cfg), "bench", catalog=zoo_catalog())
    assert [m.name for m in parsed.models] == [m["name"] for m in base["models"]]
    assert [s.url for s in parsed.streams] == [VIDEOS[i % len(VIDEOS)] for i in range(6)]
    assert len({s.id for s in parsed.streams}) == 6
    assert parsed.ingest.realtime is False


def test_stage_times_difference_per_item() -> None:
    st = StageTimes()
    st.add("model:a", 0.5, 5)
    before = st.snapshot()
    st.add("model:a", 0.2, 2)
    st.add("cache", 0.01, 10)
    ms = per_item_ms(before, st.snapshot())
    assert abs(ms["model:a"] - 100.0) < 1e-9
    assert abs(ms["cache"] - 1.0) < 1e-9


def test_stage_times_add_each_counts_one_item_per_pair() -> None:
    st = StageTimes()
    st.add_each([("model:a", 0.1), ("model:b", 0.3), ("model:a", 0.2)])
    snap = st.snapshot()
    assert snap["model:a"]["count"] == 2 and abs(snap["model:a"]["seconds"] - 0.3) < 1e-9
    assert snap["model:b"] == {"seconds": 0.3, "count": 1.0}
