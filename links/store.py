"""Saving and loading a site's link set: weights, manifest, checksum.

A saved link set is a folder with:

- ``links.pt``: ``torch.save`` of ``{target node: ensemble state dict}`` (plain tensors; loaded
  with ``weights_only=True``, so a tampered file cannot run code);
- ``manifest.json``: format, creation time, torch/numpy versions, the training-data version,
  the training config, every node's output spec, per target its links (source, architecture,
  hyper-parameters, training metrics and, where candidate architectures were tried, the choice
  among them with every candidate's held-out accuracy), what each ensemble serves for every subset of active
  models with its accuracy on the held-out selection tuples, the trivial output,
  the fine-tuning history, the sha256 of ``links.pt`` and a sha256 over the manifest itself.

:func:`load_linkset` refuses, with :class:`LinkStoreError`, a folder whose files are missing,
unreadable, of another format, or whose checksums do not match; and with
:class:`IncompatibleLinksError` one whose specs differ from ``expect_specs`` or whose training
data is not ``expect_data_version``. It never hands back a link set it could not fully verify.
Weights and the rebuilt modules are bit-identical, so predictions after a round trip are too.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlink.links.candidates import ARCH_BY_NAME
from mlink.links.ensemble import Ensemble
from mlink.links.errors import IncompatibleLinksError, LinkStoreError
from mlink.links.train import TrainConfig
from mlink.links.tuples import read_format_json, spec_from_dict, spec_to_dict, specs_equal
from mlink.models.assets import sha256_of
from mlink.models.spec import OutputSpec

# 3: links of the candidate architectures (BoxSet, BoxCount), each with the record of its choice
# 2: per-subset selections chosen on held-out tuples (1 had routes)
FORMAT = "mlink-links/3"
WEIGHTS_FILE = "links.pt"
MANIFEST_FILE = "manifest.json"


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class StoredLinks:
    """What a saved link set holds: ``LinkSet.save`` hands one to :func:`save_linkset`, and
    ``LinkSet.load`` builds the link set from the one :func:`load_linkset` returns."""

    specs: dict[str, OutputSpec]
    ensembles: dict[str, Ensemble]
    config: TrainConfig
    data_version: str | None = None
    metrics: dict = field(default_factory=dict)
    created_at: str | None = None
    history: list = field(default_factory=list)


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers, keys as strings, NaN/inf as None (JSON-safe)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def save_linkset(linkset: StoredLinks, directory: str | os.PathLike) -> dict:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {t: {k: v.detach().clone() for k, v in ens.state_dict().items()} for t, ens in linkset.ensembles.items()}
    tmp_weights = path / (WEIGHTS_FILE + ".tmp")
    torch.save(state, tmp_weights)
    targets = {}
    for t, ens in linkset.ensembles.items():
        targets[t] = {
            "links": [
                {
                    "source": s,
                    "arch": link.arch,
                    "hparams": dict(link.hparams),
                    "metrics": linkset.metrics.get("links", {}).get(f"{s}->{t}", {}),
                }
                for s, link in zip(ens.sources, ens.by_index)
            ],
            "selection": [
                {
                    "models": sorted(a),
                    "plan": [[s, w] for s, w in plan],
                    "accuracy": ens.val_accuracy.get(a),
                    "noise": ens.val_noise.get(a),
                }
                for a, plan in sorted(ens.selection.items(), key=lambda kv: sorted(kv[0]))
            ],
            "trivial": [float(x) for x in np.asarray(ens.trivial, dtype=np.float32).reshape(-1)],
            "trivial_shape": list(np.asarray(ens.trivial).shape),
            "link_val_accuracy": dict(ens.link_val_accuracy),
        }
    manifest = {
        "format": FORMAT,
        "created_at": linkset.created_at,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "data_version": linkset.data_version,
        "config": linkset.config.to_dict(),
        "specs": {k: spec_to_dict(s) for k, s in linkset.specs.items()},
        "targets": targets,
        "metrics": {k: v for k, v in linkset.metrics.items() if k != "links"},
        "history": list(linkset.history),
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_of(tmp_weights), "bytes": tmp_weights.stat().st_size},
    }
    manifest = jsonable(manifest)
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    tmp_manifest = path / (MANIFEST_FILE + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_weights, path / WEIGHTS_FILE)
    os.replace(tmp_manifest, path / MANIFEST_FILE)
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    """The verified manifest of a saved link set (checks format and the manifest's own digest)."""
    path = Path(directory)
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise LinkStoreError(f"no saved link set at {path}: {MANIFEST_FILE} is missing")
    manifest = read_format_json(mpath, FORMAT, LinkStoreError, f"link set {path}")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise LinkStoreError(f"link set {path}: {MANIFEST_FILE} was altered (its digest does not match)")
    return manifest


def _check_compatible(
    path: Path,
    manifest: Mapping[str, Any],
    specs: Mapping[str, OutputSpec],
    expect_specs: Mapping[str, OutputSpec] | None,
    expect_data_version: str | None,
) -> None:
    """IncompatibleLinksError when the saved links serve other outputs or came from other data."""
    if expect_specs is not None:
        problems = []
        for k in sorted(set(specs) | set(expect_specs)):
            if k not in expect_specs:
                problems.append(f"{k} is linked but not expected")
            elif k not in specs:
                problems.append(f"{k} is expected but has no links")
            elif not specs_equal(specs[k], expect_specs[k]):
                problems.append(f"{k}: saved {specs[k].describe()}, expected {expect_specs[k].describe()}")
        if problems:
            raise IncompatibleLinksError(f"link set {path} does not fit the expected outputs: " + "; ".join(problems))
    if expect_data_version is not None and manifest.get("data_version") != expect_data_version:
        raise IncompatibleLinksError(
            f"link set {path} was trained on data {str(manifest.get('data_version'))[:12]}..., "
            f"expected {expect_data_version[:12]}..."
        )


def _read_weights(path: Path, manifest: Mapping[str, Any]) -> Any:
    """The weights file's state dicts, after checking its digest against the manifest's."""
    wpath = path / WEIGHTS_FILE
    if not wpath.is_file():
        raise LinkStoreError(f"link set {path}: {WEIGHTS_FILE} is missing")
    sha = sha256_of(wpath)
    if sha != manifest.get("weights", {}).get("sha256"):
        raise LinkStoreError(
            f"link set {path}: {WEIGHTS_FILE} is corrupt (sha256 {sha[:12]}... does not match the manifest's "
            f"{str(manifest.get('weights', {}).get('sha256'))[:12]}...)"
        )
    try:
        return torch.load(wpath, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LinkStoreError(f"link set {path}: {WEIGHTS_FILE} cannot be read ({type(exc).__name__}: {exc})") from exc


def _ensemble(t: str, entry: Mapping[str, Any], specs: Mapping[str, OutputSpec], state: Any) -> Ensemble:
    """Target ``t``'s ensemble rebuilt from its manifest entry and loaded with its weights."""
    links = {}
    for le in entry["links"]:
        cls = ARCH_BY_NAME[le["arch"]]
        links[le["source"]] = cls(specs[le["source"]], specs[t], **le["hparams"])
    ens = Ensemble(t, specs[t], links)
    ens.load_state_dict(state, strict=True)
    chosen = entry["selection"]
    ens.selection = {frozenset(c["models"]): [(str(s), float(w)) for s, w in c["plan"]] for c in chosen}
    ens.trivial = np.array(entry["trivial"], dtype=np.float32).reshape(entry["trivial_shape"])
    ens.link_val_accuracy = dict(entry.get("link_val_accuracy", {}))
    ens.val_accuracy = {frozenset(c["models"]): c["accuracy"] for c in chosen if c.get("accuracy") is not None}
    ens.val_noise = {frozenset(c["models"]): c["noise"] for c in chosen if c.get("noise") is not None}
    ens.invalidate()
    return ens


def load_linkset(
    directory: str | os.PathLike,
    expect_specs: Mapping[str, OutputSpec] | None = None,
    expect_data_version: str | None = None,
) -> StoredLinks:
    path = Path(directory)
    manifest = read_manifest(path)
    try:
        specs = {k: spec_from_dict(d) for k, d in manifest["specs"].items()}
    except Exception as exc:
        raise LinkStoreError(f"link set {path}: bad output specs in the manifest ({exc})") from exc

    _check_compatible(path, manifest, specs, expect_specs, expect_data_version)
    state = _read_weights(path, manifest)
    try:
        known = {f.name for f in fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in manifest.get("config", {}).items() if k in known})
        ensembles = {t: _ensemble(t, entry, specs, state[t]) for t, entry in manifest["targets"].items()}
        link_metrics = {
            f"{le['source']}->{t}": le.get("metrics", {}) for t, e in manifest["targets"].items() for le in e["links"]
        }
    except LinkStoreError:
        raise
    except Exception as exc:  # missing keys, shape mismatches, unknown architectures
        raise LinkStoreError(f"link set {path}: weights do not fit the manifest ({type(exc).__name__}: {exc})") from exc
    return StoredLinks(
        specs,
        ensembles,
        config,
        data_version=manifest.get("data_version"),
        metrics={**manifest.get("metrics", {}), "links": link_metrics},
        created_at=manifest.get("created_at"),
        history=manifest.get("history", []),
    )
