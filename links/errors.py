"""Errors raised by :mod:`mlink.links`; every one says what was refused and why."""

from __future__ import annotations


class LinkError(RuntimeError):
    """Base class of every error raised by the links package."""


class DatasetError(LinkError):
    """A tuple dataset on disk is missing, corrupt, truncated or of an unknown format."""


class LinkStoreError(LinkError):
    """A saved link set is missing, corrupt (checksum mismatch, unreadable) or of an unknown format."""


class IncompatibleLinksError(LinkStoreError):
    """A saved link set is intact but does not fit what the caller expects (specs, data version)."""
