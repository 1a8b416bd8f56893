"""Node keys: one served output of one model is the link-graph node ``"model:output"``.

The config is the lowest floor that names nodes (``SiteConfig.nodes``), so the key is built
and split here, for every floor above.
"""

from __future__ import annotations


def node_key(model: str, output: str) -> str:
    """The key of one served output of one model: ``"model:output"``."""
    if ":" in model:
        raise ValueError(f"model name {model!r} must not contain ':'")
    return f"{model}:{output}"


def node_model(key: str) -> str:
    """The model a node belongs to (the part before the first ``:``)."""
    return key.split(":", 1)[0]
