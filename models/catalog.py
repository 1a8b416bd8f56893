"""Zoo lookups by name.

The one place that imports the zoo package (:mod:`mlink.models.zoo`, whose adapter modules
register themselves in :mod:`mlink.models.registry`), lazily on the first lookup, so importing
this module stays light for links and the scheduler.
"""

from __future__ import annotations

from typing import Any, Mapping

from mlink.models.base import BlackBoxModel, ModelError, ModelInfo
from mlink.models.registry import registered


def _registry() -> dict[str, type[BlackBoxModel]]:
    import mlink.models.zoo  # noqa: F401  (registers every adapter)

    return registered()


def zoo() -> Mapping[str, type[BlackBoxModel]]:
    return dict(sorted(_registry().items()))


def model_info(name: str) -> ModelInfo:
    return _lookup(name).info()


def create_model(name: str, **params: Any) -> BlackBoxModel:
    return _lookup(name)(**params)


def _lookup(name: str) -> type[BlackBoxModel]:
    known = _registry()
    try:
        return known[name]
    except KeyError:
        raise ModelError(f"unknown zoo model {name!r}; known: {', '.join(sorted(known))}") from None

