"""Profiling on real frames of a site: aligned tuples, one model in memory at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mlink.configs.load import CONFIG_DIR, load_config
from mlink.links.tuples import TupleSet
from mlink.models.assets import AssetStore
from mlink.models.base import BlackBoxModel
from mlink.models.catalog import zoo_catalog
from mlink.scheduler.profiler import latest_profile, loader, profile, save_profile
from mlink.scheduler.site import site_served
from mlink.server.profiling import plan_stream_frames, site_frames


def test_profile_site_slice_runs_models_one_at_a_time(store: AssetStore, tmp_path) -> None:
    cfg = load_config(CONFIG_DIR / "building.yaml", catalog=zoo_catalog())
    plan = plan_stream_frames(cfg, 6, store)
    assert {sid: k for sid, (_, _, k) in plan.items()} == {"walkway": 3, "room": 3}
    base = loader(cfg, store)
    loaded_now: list[str] = []
    peak = 0

    @contextlib.contextmanager
    def use(name: str) -> Iterator[BlackBoxModel]:
        nonlocal peak
        with base(name) as model:
            loaded_now.append(name)
            peak = max(peak, len(loaded_now))
            yield model
            loaded_now.remove(name)

    tuples = profile(site_frames(plan), site_served(cfg), use, batch_size=4, progress=False)
    assert peak == 1
    assert len(tuples) == 6
    assert tuples.streams == ["walkway"] * 3 + ["room"] * 3
    # frames spread over the whole clip, not its first seconds (vtest lasts 79.5 s)
    assert tuples.timestamps[2] > 40
    assert set(tuples.specs) == set(cfg.nodes())
    counts = [v[0] for v in tuples.values["hog_people:person_count"]]
    assert all(c >= 0 for c in counts) and max(counts) >= 1
    assert all(v.shape == (1000,) for v in tuples.values["mobilenet_v2:probs"])

    saved = save_profile(tuples, tmp_path, cfg.site)
    assert latest_profile(tmp_path, cfg.site) == saved
    again = TupleSet.load(saved)
    assert again.version() == tuples.version()


def test_short_stream_gives_its_share_to_the_others(store: AssetStore) -> None:
    cfg = load_config(CONFIG_DIR / "city.yaml", catalog=zoo_catalog())
    plan = plan_stream_frames(cfg, 1000, store)
    shares = {sid: k for sid, (_, _, k) in plan.items()}
    assert shares["parking-lane"] == 377  # car-detection.mp4 has 377 frames in all
    assert sum(shares.values()) == 1000
