"""Zoo lookups by name, and the zoo as the site config's model catalog.

The one place that imports the zoo package (:mod:`mlink.models.zoo`, whose adapter modules
register themselves in :mod:`mlink.models.registry`), lazily on the first lookup, so importing
this module stays light for links and the scheduler.

:func:`zoo_catalog` is the :class:`~mlink.configs.schema.ModelCatalog` that site configs are
validated against: ``mlink.configs.load.load_config(path, catalog=zoo_catalog())``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlink.configs.schema import CatalogEntry
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


class ZooCatalog:
    """The zoo as a :class:`~mlink.configs.schema.ModelCatalog`: outputs, primary output, params model."""

    def entry(self, name: str) -> CatalogEntry:
        try:
            info = model_info(name)
        except ModelError as exc:
            raise LookupError(str(exc)) from None
        return CatalogEntry(outputs=tuple(s.name for s in info.outputs), primary=info.primary, params=info.params)


def zoo_catalog() -> ZooCatalog:
    """The catalog site configs are validated against (see :mod:`mlink.configs.load`)."""
    return ZooCatalog()
