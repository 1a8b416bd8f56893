"""Site configs: the shipped ones validate, errors carry their path, env vars substitute,
adapter params are typed, and the schema sits on the bottom floor with the zoo checks injected."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from mlink.configs.budget import parse_budget
from mlink.configs.load import CONFIG_DIR, ConfigError, site_config_path, substitute_env
from mlink.configs.load import load_config as _load_config
from mlink.configs.load import parse_config as _parse_config
from mlink.configs.schema import CatalogEntry, SiteConfig
from mlink.models.base import AdapterParams, ModelError
from mlink.models.catalog import create_model, zoo, zoo_catalog

load_config = partial(_load_config, catalog=zoo_catalog())
parse_config = partial(_parse_config, catalog=zoo_catalog())


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
    cfg = parse_config(text.replace('  - {id: b, url: "rtsp://${NOT_SET_ANYWHERE}/s"}\n', ""), "t.yaml")
    assert cfg.streams[0].url == "rtsp://admin:s3cret@10.0.0.2/s"
    assert parse_budget(cfg.budget) == ("device", 0.7)


def test_a_config_from_a_request_gets_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A config sent in a request body (environment=False) must not read the daemon's
    environment: a variable in it is refused with its path, set or not, default or not."""
    monkeypatch.setenv("MLINK_TEST_SECRET", "s3cret-value")
    text = """
site: s
budget: 0.7
models: [{name: hog_people}]
streams:
  - {id: a, url: "rtsp://admin:${MLINK_TEST_SECRET}@127.0.0.1/s", fps: 1}
  - {id: b, url: "rtsp://${UNSET_ANYWHERE:-127.0.0.1}/s"}
"""
    assert parse_config(text, "file").streams[0].url == "rtsp://admin:s3cret-value@127.0.0.1/s"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "request body", environment=False)
    assert [p for p, _ in err.value.errors] == ["streams.0.url", "streams.1.url"]
    assert "request" in err.value.errors[0][1]
    assert "s3cret-value" not in str(err.value)
    # without a variable, the same text is accepted as it is
    plain = parse_config(
        text.replace("${MLINK_TEST_SECRET}", "pw").replace("${UNSET_ANYWHERE:-127.0.0.1}", "h"),
        "body",
        environment=False,
    )
    assert [s.url for s in plain.streams] == ["rtsp://admin:pw@127.0.0.1/s", "rtsp://h/s"]


def test_env_substitution_and_unset_variables() -> None:
    assert substitute_env("a ${X} ${Y:-dflt}", {"X": "1"}) == "a 1 dflt"
    with pytest.raises(ConfigError, match=r"\$\{NOPE\}"):
        substitute_env("${NOPE}", {})


def test_budgets_that_mean_nothing_are_refused() -> None:
    """Issue 14 item 7 (in part): nan and inf in any form are refused when parsed, so a config
    holding one never validates; a budget that comes to 0 bytes is refused when resolved."""
    from mlink.configs.budget import resolve_budget

    for bad in ("nanx", "infx", "nan", "inf", "-infx", float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"finite|> 0|expected"):
            parse_budget(bad)
    with pytest.raises(ConfigError, match="budget"):
        parse_config("site: s\nbudget: nanx\nmodels: [{name: hog_people}]\nstreams: []\n", "t.yaml")
    with pytest.raises(ValueError, match="0 bytes"):
        resolve_budget(1e-300, 16 * 2**30)
    assert resolve_budget(1e-9, 16 * 2**30) == 17  # tiny, but a real budget (a model's cost refuses it later)


def test_budgets_beyond_the_device_or_under_every_model_are_refused_with_the_reason() -> None:
    """Issue 14 item 7: ``1000TiB`` was silent; a budget no model fits in predicted from nothing."""
    from mlink.configs.budget import resolve_budget, resolve_site_budget

    with pytest.raises(ValueError, match=r"more than the device's memory \(16.0 GiB\)"):
        resolve_budget("1000TiB", 16 * 2**30)
    assert resolve_budget("8GiB", 16 * 2**30) == 8 * 2**30
    with pytest.raises(ValueError, match="more than the device's memory"):
        resolve_budget("1000x", 16 * 2**30, 2**30)
    costs = {"hog_people": 40_000_000, "yolox_nano": 90_000_000}
    with pytest.raises(ValueError, match=r"cannot hold any model: the smallest, hog_people, needs 38\.1 MiB"):
        resolve_site_budget("30MB", 16 * 2**30, costs)
    with pytest.raises(ValueError, match="cannot hold any model"):
        resolve_site_budget("0.2x", 16 * 2**30, costs)  # 26 MB of 130 MB
    assert resolve_site_budget("50MB", 16 * 2**30, costs) == 50_000_000
    assert resolve_site_budget("30MB", 16 * 2**30) == 30_000_000  # no cost known yet: checked at plan time


SITE = "site: s\nmodels: [{name: hog_people}]\n"


def test_config_text_is_bounded_before_it_is_parsed() -> None:
    """Issue 14 item 6: a 2.6M-item list parsed for minutes; an alias bomb grows tenfold per level."""
    cases = {
        "larger than 256 KiB": SITE + "streams: [" + "1," * 200_000 + "1]\n",
        "more than 50000 values": SITE + "x: [" + "1," * 60_000 + "1]\n",
        "deeper than 32 levels": SITE + "x: " + "[" * 40 + "]" * 40 + "\n",
        "more than 256 aliases": SITE + "a: &a 1\nx: [" + ", ".join(["*a"] * 300) + "]\n",
    }
    lol = ["a0: &a0 [" + ", ".join(["lol"] * 10) + "]"]
    lol += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    cases["more than 50000 values (aliases expanded)"] = SITE + "\n".join(lol) + "\n"
    for reason, text in cases.items():
        with pytest.raises(ConfigError) as err:
            parse_config(text, "body")
        assert reason in str(err.value), (reason, str(err.value)[:300])
    anchors = SITE + "x: &x {a: 1}\ny: *x\n"  # a modest alias is fine (then refused as an unknown key)
    with pytest.raises(ConfigError, match="Extra inputs"):
        parse_config(anchors, "body")


@pytest.mark.parametrize(
    "url",
    ["concat:/etc/passwd|a.mp4", "ftp://h/x.mp4", "gopher://h/", "asset://../../etc/passwd", "asset://a/b", "x\x00y"],
)
def test_stream_urls_outside_the_allowed_kinds_are_refused(url: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(SITE + f"streams: [{{id: a, url: {json.dumps(url)}}}]\n", "t.yaml")
    assert [p for p, _ in err.value.errors] == ["streams.0.url"]


def test_stream_urls_of_the_allowed_kinds_pass() -> None:
    for url in ("rtsp://u:p@h/s", "rtsps://h/s", "http://h/x.mjpg", "https://h/x", "asset://vtest", "0", "v.mp4"):
        assert parse_config(SITE + f"streams: [{{id: a, url: {url!r}}}]\n", "t.yaml").streams[0].url == url


def test_local_stream_files_lie_in_the_allowed_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decided on the path alone (the same answer whether the file exists: no existence oracle)."""
    site_dir = tmp_path / "site"
    (site_dir / "videos").mkdir(parents=True)
    monkeypatch.chdir(site_dir)  # a relative path is opened from the working directory
    other = tmp_path / "other"
    other.mkdir()
    (other / "real.mp4").write_bytes(b"x")

    def load(url: str, extra: str = "") -> SiteConfig:
        path = site_dir / "site.yaml"
        path.write_text(SITE + f"streams: [{{id: a, url: {url!r}}}]\n" + extra)
        return load_config(path)

    assert load("videos/a.mp4").streams[0].url == "videos/a.mp4"
    assert load(f"file://{site_dir}/videos/a.mp4")
    messages = []
    for url in (str(other / "real.mp4"), str(other / "missing.mp4"), "../other/real.mp4", "file:///etc/shadow"):
        with pytest.raises(ConfigError) as err:
            load(url)
        messages.append(err.value.errors)
    assert all(m == messages[0] for m in messages) and "allowed folders" in messages[0][0][1]
    assert load(str(other / "real.mp4"), f"ingest: {{allowed_dirs: [{str(other)!r}]}}\n")
    assert load("0").streams[0].url == "0"  # a device index is no file


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


def test_site_names_map_to_the_configs_package() -> None:
    assert site_config_path("city") == CONFIG_DIR / "city.yaml"
    assert (CONFIG_DIR / "__init__.py").is_file()  # the YAML files ship as mlink.configs package data
    with pytest.raises(ConfigError, match="known sites: building, city, default"):
        site_config_path("atlantis")


# -- the bottom floor ------------------------------------------------------------------------
def test_the_config_floor_imports_nothing_else_from_mlink() -> None:
    code = (
        "import sys, mlink.configs.load, mlink.configs.schema, mlink.configs.budget\n"
        "print(sorted(m for m in sys.modules if m.startswith('mlink.') and not m.startswith('mlink.configs')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_site_cannot_be_validated_without_a_catalog() -> None:
    data = {"site": "s", "models": [{"name": "yolox_nano"}]}
    with pytest.raises(ValidationError, match="no model catalog"):
        SiteConfig.model_validate(data)
    with pytest.raises(TypeError):
        _parse_config("site: s\nmodels: [{name: yolox_nano}]\n", "t.yaml")  # type: ignore[call-arg]


def test_the_catalog_is_injected() -> None:
    class TinyParams(AdapterParams):
        gain: float = 1.0

    class Tiny:
        def entry(self, name: str) -> CatalogEntry:
            if name != "tiny":
                raise LookupError(f"unknown model {name!r}; known: tiny")
            return CatalogEntry(outputs=("count", "boxes"), primary="count", params=TinyParams)

    cfg = _parse_config("site: s\nmodels: [{name: tiny, params: {gain: 2}}]\n", "t.yaml", catalog=Tiny())
    assert cfg.nodes() == ["tiny:count"] and cfg.models[0].params == {"gain": 2}
    with pytest.raises(ConfigError) as err:
        _parse_config(
            "site: s\nmodels: [{name: yolox_nano}, {name: tiny, params: {gian: 2}}]\n", "t.yaml", catalog=Tiny()
        )
    assert [p for p, _ in err.value.errors] == ["models.0", "models.1.params.gian"]


# -- typed adapter params --------------------------------------------------------------------
def _param_errors(model: str, params: str) -> list[tuple[str, str]]:
    text = f"site: s\nmodels:\n  - name: {model}\n    params: {params}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "t.yaml")
    return err.value.errors


@pytest.mark.parametrize(
    "model, params, path",
    [
        # a typo
        ("yolox_nano", "{score_treshold: 0.3}", "models.0.params.score_treshold"),
        ("hog_people", "{upscal: 1.5}", "models.0.params.upscal"),
        ("centerface", "{thread: 2}", "models.0.params.thread"),
        ("mobilenet_v2", "{batchsize: 4}", "models.0.params.batchsize"),
        ("fasterrcnn_mobilenet_v3_large_320_fpn", "{score_thresh: 0.3}", "models.0.params.score_thresh"),
        # a wrong type
        ("yolox_nano", "{nms_threshold: high}", "models.0.params.nms_threshold"),
        ("hog_people", "{win_stride: fast}", "models.0.params.win_stride"),
        ("centerface", "{input_size: large}", "models.0.params.input_size"),
        ("ssdlite320_mobilenet_v3_large", "{max_detections: many}", "models.0.params.max_detections"),
        # a value out of range
        ("yolox_nano", "{score_threshold: 1.5}", "models.0.params.score_threshold"),
        ("yolox_nano", "{threads: -1}", "models.0.params.threads"),
        ("hog_people", "{max_width: 10}", "models.0.params.max_width"),
        ("centerface", "{input_size: 8}", "models.0.params.input_size"),
        ("efficientnet_lite0", "{batch_size: 0}", "models.0.params.batch_size"),
        ("keypointrcnn_resnet50_fpn", "{max_detections: 1000}", "models.0.params.max_detections"),
    ],
)
def test_bad_params_are_reported_with_their_path(model: str, params: str, path: str) -> None:
    errors = _param_errors(model, params)
    assert [p for p, _ in errors] == [path], errors


def test_param_messages_say_what_is_wrong() -> None:
    assert _param_errors("yolox_nano", "{score_treshold: 0.3}") == [
        ("models.0.params.score_treshold", "Extra inputs are not permitted")
    ]
    ((_, msg),) = _param_errors("yolox_nano", "{score_threshold: 1.5}")
    assert "less than or equal to 1" in msg
    ((_, msg),) = _param_errors("ssdlite320_mobilenet_v3_large", "{min_size: 256}")
    assert "fixed input size" in msg


def test_params_errors_sit_beside_the_other_errors() -> None:
    text = """
site: s
device: tpu
models:
  - name: yolox_nano
    params: {score_treshold: 0.3, nms_threshold: 2}
  - name: hog_people
    outputs: [nonsense]
  - name: centerface
    params: {input_size: [640, 480], threads: 1}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, "t.yaml")
    paths = [p for p, _ in err.value.errors]
    assert paths == ["device", "models.0.params.nms_threshold", "models.0.params.score_treshold", "models.1"], (
        err.value.errors
    )


def test_valid_params_reach_the_model() -> None:
    text = "site: s\nmodels:\n  - name: yolox_nano\n    params: {score_threshold: '${MLINK_TEST_SCORE:-0.4}', threads: 1}\n"
    cfg = parse_config(text, "t.yaml")
    entry = cfg.models[0]
    assert entry.params == {"score_threshold": "0.4", "threads": 1}  # as written; the adapter types it
    model = create_model(entry.name, **entry.params)
    assert model.params.score_threshold == 0.4 and model.params.threads == 1


def test_every_zoo_adapter_declares_strict_params() -> None:
    for name, cls in zoo().items():
        assert issubclass(cls.Params, AdapterParams) and cls.Params.model_config.get("extra") == "forbid", name
        with pytest.raises(ModelError, match="unknown params"):
            create_model(name, no_such_param=1)


def test_config_validate_prints_a_param_typo_with_its_path(tmp_path: Path) -> None:
    from mlink.server.cli import app

    bad = tmp_path / "typo.yaml"
    bad.write_text("site: s\nmodels:\n  - name: yolox_nano\n    params: {score_treshold: 0.3}\n")
    res = CliRunner().invoke(app, ["config", "validate", str(bad)])
    assert res.exit_code == 1
    assert "models.0.params.score_treshold: Extra inputs are not permitted" in res.output
