"""A site's models as the scheduler builds them: what each serves, how to create one, a pool.

The site config says which models run, with which params and outputs, on which device and
under which budget; these helpers turn that into what the scheduler's parts take:
``{model: outputs}`` (:func:`site_served`), a factory creating a model by name
(:func:`model_factory`) and a :class:`~mlink.scheduler.pool.ModelPool` for all of them
(:func:`build_pool`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mlink.configs.budget import resolve_site_budget
from mlink.configs.schema import SiteConfig
from mlink.scheduler.memory import MemoryMeter
from mlink.scheduler.pool import ModelPool


def site_served(cfg: SiteConfig) -> dict[str, tuple[str, ...]]:
    """``{model: served outputs}`` in config order: the universe F and its nodes."""
    return {m.name: tuple(m.served) for m in cfg.models}


class SiteModelFactory:
    """Creates a site's models by name with their config params and ``store``.

    A class rather than a closure so that it pickles: the pool measures a model's cost in a
    child process with the same factory (:mod:`mlink.scheduler.isolated`).
    """

    def __init__(self, params: Mapping[str, Mapping[str, Any]], store: Any = None) -> None:
        self.params = {name: dict(p) for name, p in params.items()}
        self.store = store

    def __call__(self, name: str) -> Any:
        from mlink.models.catalog import create_model

        params = self.params.get(name, {})
        return (
            create_model(name, store=self.store, **params) if self.store is not None else create_model(name, **params)
        )


def model_factory(cfg: SiteConfig, store: Any = None) -> Callable[[str], Any]:
    """A factory creating the site's models with their config params and ``store``."""
    return SiteModelFactory({m.name: m.params for m in cfg.models}, store)


def build_pool(
    cfg: SiteConfig,
    *,
    store: Any = None,
    factory: Callable[[str], Any] | None = None,
    budget: int | float | str | None = None,
    costs: Mapping[str, int] | None = None,
    **kw: Any,
) -> ModelPool:
    """A pool for a site: its device, its models' factory, the serving batch as warm-up batch.

    ``budget`` overrides ``cfg.budget``. The budget is resolved when it can be (bytes, a device
    share, or a share of ``costs`` when every model's cost is given); a budget relative to
    unknown costs starts at the device's whole memory and :meth:`Planner.initial` sets it once
    the costs are measured. ``kw`` goes to :class:`ModelPool` (``meter``, ``on_failure``...).
    """
    spec = cfg.budget if budget is None else budget
    meter = kw.pop("meter", None) or MemoryMeter(cfg.device)
    names = [m.name for m in cfg.models]
    total = meter.total()
    resolved = resolve_site_budget(spec, total, costs, names)
    return ModelPool(
        total if resolved is None else resolved,
        cfg.device,
        meter=meter,
        factory=factory or model_factory(cfg, store),
        costs=costs,
        warmup_batch=cfg.scheduler.batch_size,
        models=names,
        **kw,
    )
