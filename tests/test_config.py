"""Site configs: the shipped ones validate, errors carry their path, env vars substitute."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlink.configs.budget import parse_budget
from mlink.server.config import CONFIG_DIR, ConfigError, load_config, parse_config, substitute_env


@pytest.mark.parametrize("name", ["default", "building", "city"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.streams and cfg.models
    assert all(":" in n for n in cfg.nodes())


def test_sites_mirror_the_papers_deployments() -> None:
    building = load_config(CONFIG_DIR / "building.yaml")
    city = load_config(CONFIG_DIR / "city.yaml")
    assert "hog_people:person_count" in building.nodes() and "yolox_nano:object_count" in building.nodes()
    assert "hog_people:person_count" in city.nodes() and "yolox_nano:vehicle_count" in city.nodes()
    assert any(n.endswith(":boxes") for n in building.nodes())  # a sequence output is served
    assert "asset://vtest" in [s.url for s in building.streams]
    assert "asset://market_street" in [s.url for s in city.streams]


def test_every_error_is_reported_with_its_path() -> None:
    text = """
site: x
device: tpu
models:
  - name: yolox_nano
    outputs: [person_count, nonsense]
  - name: not_a_model
streams:
  - {id: "bad id", url: asset://vtest, fps: -1}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, "t.yaml")
    paths = [p for p, _ in err.value.errors]
    assert "device" in paths
    assert "models.0" in paths and "models.1" in paths
    assert "streams.0.id" in paths and "streams.0.fps" in paths
    assert "nonsense" in str(err.value) and "not_a_model" in str(err.value)


def test_env_substitution_in_values_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAM_PASS", "s3cret")
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    text = """
# a comment may mention ${NOT_SET_ANYWHERE} freely
site: s
budget: ${MLINK_TEST_BUDGET:-0.7}
models: [{name: hog_people}]
streams:
  - {id: a, url: "rtsp://admin:${CAM_PASS}@10.0.0.2/s", fps: 1}
  - {id: b, url: "rtsp://${NOT_SET_ANYWHERE}/s"}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, "t.yaml")
    assert [p for p, _ in err.value.errors] == ["streams.1.url"]
    cfg = parse_config(text.replace("  - {id: b, url: \"rtsp://${NOT_SET_ANYWHERE}/s\"}\n", ""), "t.yaml")
    assert cfg.streams[0].url == "rtsp://admin:s3cret@10.0.0.2/s"
    assert parse_budget(cfg.budget) == ("device", 0.7)


def test_env_substitution_and_unset_variables() -> None:
    assert substitute_env("a ${X} ${Y:-dflt}", {"X": "1"}) == "a 1 dflt"
    with pytest.raises(ConfigError, match=r"\$\{NOPE\}"):
        substitute_env("${NOPE}", {})


def test_budget_forms() -> None:
    assert parse_budget("4GiB") == ("bytes", 4 * 2**30)
    assert parse_budget(0.8) == ("device", 0.8)
    assert parse_budget("0.5x") == ("models", 0.5)
    assert parse_budget("80%") == ("device", 0.8)
    assert parse_budget("500MB") == ("bytes", 500e6)
    for bad in ("lots", -3, "0x"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
