"""What the model pool reports: why it refused or gave up, and what each operation did.

:class:`BudgetExceeded` (a load that does not fit), :class:`ModelPinned` (an unload that gave
up waiting for in-flight work) and :class:`ModelNotLoaded` (a pin on a model that is not
there); :class:`LoadRecord` and :class:`UnloadRecord` (the measured figures of one load or
unload) and :class:`ApplyReport` (one :meth:`~mlink.scheduler.pool.ModelPool.apply`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class BudgetExceeded(RuntimeError):
    """A load would exceed the budget; nothing stays loaded."""

    def __init__(self, name: str, cost: int, charged: int, budget: int, measured: bool) -> None:
        how = "measured" if measured else "known"
        super().__init__(
            f"model {name}: {how} cost {cost} B + {charged} B in use = {cost + charged} B "
            f"exceeds the budget of {budget} B"
        )
        self.name = name
        self.cost = cost
        self.charged = charged
        self.budget = budget
        self.measured = measured


class ModelPinned(RuntimeError):
    """An unload gave up because in-flight work still pinned the model after the timeout."""


class ModelNotLoaded(RuntimeError):
    """A pin was asked for a model that is not loaded (or is being unloaded)."""


@dataclass(frozen=True)
class LoadRecord:
    name: str
    cost: int  # peak delta across load + warm-up: what the budget is charged
    delta: int  # end delta, right after the warm-up
    resident: int  # delta after releasing the warm-up's garbage: what an unload should free
    seconds: float
    source: str
    at: float
    in_process: int = -1  # this load's own peak delta (cost may be the isolated or known figure)
    noise: int = 0  # movement of memory seen around the measurement while nothing was loading
    stable: bool = True  # False: the in-process figure was polluted by other activity, not planned on
    isolated: bool = False  # cost was measured in a child process where nothing else ran


@dataclass(frozen=True)
class UnloadRecord:
    name: str
    reason: str
    cost: int  # the model's cost estimate when it was unloaded
    resident: int  # what its load left resident (see LoadRecord)
    freed: int  # measured: usage before the unload minus usage after
    sticky: bool
    at: float

    @property
    def retained(self) -> int:
        """Resident memory the unload did not give back."""
        return self.resident - self.freed


@dataclass
class ApplyReport:
    """What one :meth:`ModelPool.apply` did; ``refused``/``failed``/``pinned`` map names to reasons."""

    target: frozenset[str]
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    pinned: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.refused or self.failed or self.pinned)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = sorted(self.target)
        d["ok"] = self.ok
        return d
