"""What a planner is told to do: its options, built from the site config.

:class:`PlannerOptions` gathers every number and switch the planner reads, with the config
section each comes from, so an operator can see at a glance how a site is planned. Build one
with :meth:`PlannerOptions.from_site` (``cfg.budget``, ``cfg.scheduler``, ``cfg.links`` and the
streams' frame rates), overriding what a benchmark or test needs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from mlink.configs.budget import parse_budget
from mlink.configs.schema import SiteConfig
from mlink.links import TrainConfig
from mlink.links.matrix import HELDOUT_SHARE

SELECTORS = ("paper", "objective")


@dataclass(frozen=True)
class PlannerOptions:
    """The planner's options (see the module docstring); values are checked on creation."""

    # from the site config
    budget: int | float | str  # budget: bytes, a device share, or a share of the models' cost ("0.5x")
    selector: str = "objective"  # scheduler.selector: "paper" | "objective"
    period_s: float = 3600.0  # scheduler.period_s: re-profile and re-select once per period
    profile_share: float = 0.01  # scheduler.profile_share: share of a period's frames profiled
    min_residency_s: float = 0.0  # scheduler.min_residency_s: hysteresis, a plan stays this long
    switch_margin: float = 0.01  # scheduler.switch_margin: hysteresis, a new plan must beat the old by this
    batch_size: int = 4  # scheduler.batch_size: profiling (and the serving convenience) batch
    profile_frames: int = 1000  # links.profile_frames: frames profiled when there are no links
    fine_tune: bool = True  # links.fine_tune: fine-tune the links on each period's tuples
    frame_rate: float | None = None  # frames per second over all streams (their fps added up)
    period_worker: bool = True  # scheduler.period_worker: periods beside serving (the daemon's PeriodWorker)
    # the planner's own
    cost_margin: float = 0.1  # each measured cost is charged plus this share (or its spread)
    heldout_share: float = HELDOUT_SHARE  # share of the first profile held out for accuracies (as `mlink links train`)
    train_config: TrainConfig | None = None  # how the first links are trained (None: defaults)
    fine_tune_epochs: int | None = None  # None: the links' own setting
    min_profile_frames: int = 2  # a period profiles at least this many frames
    max_profile_frames: int = 2000  # ... and at most this many
    eval_window: int | None = None  # held-out tuples kept for accuracies (None: max(held-out set, 50))
    seed: int = 0  # splits of profiled tuples
    progress: bool = False  # progress bars while training links
    history: int = 100  # period reports kept

    def __post_init__(self) -> None:
        parse_budget(self.budget)
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be paper or objective, got {self.selector!r}")
        low = max(1, int(self.min_profile_frames))
        set_ = object.__setattr__  # normalised in place: the dataclass is frozen
        set_(self, "min_profile_frames", low)
        set_(self, "max_profile_frames", max(low, int(self.max_profile_frames)))
        set_(self, "cost_margin", max(0.0, float(self.cost_margin)))
        set_(self, "frame_rate", float(self.frame_rate) if self.frame_rate else None)

    @classmethod
    def from_site(cls, cfg: SiteConfig, **overrides: Any) -> PlannerOptions:
        """Options from ``cfg``; ``overrides`` replace any field (None for ``budget``,
        ``selector`` or ``frame_rate`` keeps the config's)."""
        s = cfg.scheduler
        base = cls(
            budget=cfg.budget,
            selector=s.selector,
            period_s=s.period_s,
            profile_share=s.profile_share,
            min_residency_s=s.min_residency_s,
            switch_margin=s.switch_margin,
            batch_size=s.batch_size,
            profile_frames=cfg.links.profile_frames,
            fine_tune=cfg.links.fine_tune,
            frame_rate=sum(st.fps for st in cfg.streams),
            period_worker=s.period_worker,
        )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown planner options: {', '.join(unknown)}")
        keep_config = ("budget", "selector", "frame_rate")
        return replace(base, **{k: v for k, v in overrides.items() if not (k in keep_config and v is None)})
