"""What a config reload asks for and what it answers: parsing, the diff, the reply.

The daemon applies a reload (server/daemon.py: a plan change goes to the pipeline thread, a
stream change to the ingest); this module holds the parts that need no running daemon, so they
read and test on their own: the reply an operator gets (:class:`ReloadResult`), a config parsed
from a file or a request body (``${VAR}`` refused in bodies, see ``parse_config``), and which
sections changed and what that implies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlink.configs.load import ConfigError, load_config, parse_config, stream_roots
from mlink.configs.schema import SiteConfig
from mlink.models.catalog import zoo_catalog

PLAN_FIELDS = ("device", "budget", "models", "scheduler", "links")  # a change re-plans
RESTART_FIELDS = ("api", "cache")  # a change is kept for the next start


@dataclass
class ReloadResult:
    ok: bool
    changed: list[str] = field(default_factory=list)
    cameras: dict[str, list[str]] = field(default_factory=dict)
    replanned: bool = False
    restart_needed: list[str] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "changed": self.changed,
            "cameras": self.cameras,
            "replanned": self.replanned,
            "restart_needed": self.restart_needed,
            "errors": self.errors,
            "message": self.message,
        }


def rejected(exc: ConfigError) -> ReloadResult:
    return ReloadResult(
        False,
        errors=[{"path": p, "message": m} for p, m in exc.errors],
        message=f"invalid config {exc.source}: the running config is unchanged",
    )


def config_from_file(path: Path) -> SiteConfig | ReloadResult:
    """The config in ``path`` (``${VAR}`` expanded: the operator's own file), or the rejection."""
    try:
        return load_config(path, catalog=zoo_catalog())
    except ConfigError as exc:
        return rejected(exc)


def config_from_text(
    text: str, source: str = "request body", running: SiteConfig | None = None, config_path: Path | None = None
) -> SiteConfig | ReloadResult:
    """A config sent in a request (``${VAR}`` refused), or the rejection. Its local stream files
    must lie in the folders the ``running`` config (read from ``config_path``) allows."""
    base = config_path.resolve().parent if config_path is not None else None
    roots = stream_roots(running, base) if running is not None else None
    try:
        return parse_config(text, source, catalog=zoo_catalog(), environment=False, base_dir=base, allowed_dirs=roots)
    except ConfigError as exc:
        return rejected(exc)


def diff(old: SiteConfig, new: SiteConfig) -> ReloadResult:
    """The reply's start: what changed, and whether it can be applied to this daemon at all."""
    if new.site != old.site:
        return ReloadResult(
            False, message=f"site name changed ({old.site} -> {new.site}): start a new daemon for another site"
        )
    changed = [k for k in SiteConfig.model_fields if getattr(old, k) != getattr(new, k)]
    return ReloadResult(True, changed=changed, restart_needed=[k for k in RESTART_FIELDS if k in changed])


def replans(result: ReloadResult) -> bool:
    return any(k in result.changed for k in PLAN_FIELDS)
