"""The zoo registry: every adapter module registers its classes here when it is imported.

This module imports no adapter: :mod:`mlink.models.catalog` is the one place that imports the
zoo package (lazily, on the first lookup), and the adapters import only this module and
:mod:`mlink.models.base`, so no import runs back from the registry to the zoo.
"""

from __future__ import annotations

from typing import TypeVar

from mlink.models.base import AdapterParams, BlackBoxModel

_REGISTRY: dict[str, type[BlackBoxModel]] = {}
M = TypeVar("M", bound=type[BlackBoxModel])


def register(cls: M) -> M:
    """Class decorator: add a zoo adapter under its ``name``."""
    for attr in ("name", "task", "backend", "outputs", "primary"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} must define {attr}")
    if cls.primary not in {s.name for s in cls.outputs}:
        raise TypeError(f"{cls.__name__}: primary output {cls.primary!r} is not declared")
    if (
        not (isinstance(cls.Params, type) and issubclass(cls.Params, AdapterParams))
        or cls.Params.model_config.get("extra") != "forbid"
    ):
        raise TypeError(f"{cls.__name__}: Params must be an AdapterParams model that forbids unknown keys")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"zoo name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[BlackBoxModel]]:
    """The adapters registered so far, by name (the zoo package registers them all on import)."""
    return dict(_REGISTRY)
