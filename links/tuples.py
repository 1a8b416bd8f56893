"""Output tuples: the outputs of every model of a site on the same frames, and their storage.

A *node* is one served output of one model, keyed ``"model:output"`` (``"yolox_nano:boxes"``,
``"mobilenet_v2:probs"``). A :class:`TupleSet` holds, for every frame, one array per node (as
the node's :class:`OutputSpec` describes it), the stream the frame came from and its timestamp.
Links learn from these tuples alone: no labels, no features, nothing from inside a model.

On disk a tuple set is a folder with two files:

- ``tuples.npz``: per node ``n<i>`` either a ``(N, dim)`` array (vector outputs) or the rows of
  all frames concatenated ``(sum L, dim)`` with ``n<i>_len`` the ``(N,)`` lengths (sequences);
- ``meta.json``: format, node order, serialised specs (labels included), stream ids,
  timestamps, creation time, the sha256 of ``tuples.npz`` and the *version*: a sha256 over the
  content (specs, arrays, streams, timestamps; not the creation time), so equal data always has
  the same version whoever saved it and whenever.

Loading checks both hashes; anything missing, truncated or altered raises :class:`DatasetError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlink.configs.nodes import node_key, node_model
from mlink.links.errors import DatasetError
from mlink.models.assets import sha256_of
from mlink.models.spec import OutputSpec, Task

FORMAT = "mlink-tuples/1"
DATA_FILE = "tuples.npz"
META_FILE = "meta.json"


# -- nodes (keys built and split by mlink.configs.nodes, re-exported here) ---------------------
def node_models(keys: Iterable[str]) -> list[str]:
    """The models these nodes belong to, sorted, each once."""
    return sorted({node_model(k) for k in keys})


def read_format_json(path: Path, fmt: str, error: type[Exception], what: str) -> dict:
    """A JSON object file whose ``"format"`` must be ``fmt``; ``error`` says why not, naming ``what``."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{what}: {path.name} is unreadable ({exc})") from exc
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise error(f"{what}: unknown format {got!r}, expected {fmt!r}")
    return obj


# -- spec (de)serialisation -------------------------------------------------------------------
def spec_to_dict(spec: OutputSpec) -> dict:
    return {
        "name": spec.name,
        "kind": spec.kind,
        "dim": spec.dim,
        "task": spec.task.value,
        "description": spec.description,
        "max_len": spec.max_len,
        "labels": list(spec.labels),
    }


def spec_from_dict(data: Mapping) -> OutputSpec:
    return OutputSpec(
        name=str(data["name"]),
        kind=data["kind"],
        dim=int(data["dim"]),
        task=Task(data["task"]),
        description=str(data.get("description", "")),
        max_len=None if data.get("max_len") is None else int(data["max_len"]),
        labels=tuple(str(x) for x in data.get("labels", ())),
    )


def specs_equal(a: OutputSpec, b: OutputSpec) -> bool:
    """Same output contract (name, kind, dim, task, max_len, labels); descriptions may differ."""
    return (a.name, a.kind, a.dim, a.task, a.max_len, tuple(a.labels)) == (
        b.name,
        b.kind,
        b.dim,
        b.task,
        b.max_len,
        tuple(b.labels),
    )


# -- the tuple set ----------------------------------------------------------------------------
@dataclass
class TupleSet:
    """Aligned outputs of all nodes on the same frames (one entry per frame in every list)."""

    specs: dict[str, OutputSpec]
    values: dict[str, list[np.ndarray]] = field(default_factory=dict)
    streams: list[str] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in self.specs:
            if ":" not in key:
                raise ValueError(f"node key {key!r} must be 'model:output'")
            self.values.setdefault(key, [])
        extra = set(self.values) - set(self.specs)
        if extra:
            raise ValueError(f"values for nodes without a spec: {sorted(extra)}")
        n = len(self.streams)
        if len(self.timestamps) != n or any(len(v) != n for v in self.values.values()):
            raise ValueError("streams, timestamps and every node's values must have one entry per frame")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def for_models(cls, outputs: Mapping[str, Iterable[OutputSpec]]) -> TupleSet:
        """An empty set over every output of the given models (``{model: specs}``)."""
        specs = {node_key(m, s.name): s for m, ss in outputs.items() for s in ss}
        return cls(specs=specs)

    def append(self, stream: str, timestamp: float, outputs: Mapping[str, np.ndarray]) -> None:
        """Add one frame: ``outputs`` maps every node key to its array (checked against the spec)."""
        missing = set(self.specs) - set(outputs)
        extra = set(outputs) - set(self.specs)
        if missing or extra:
            raise ValueError(f"tuple nodes differ from the set's: missing {sorted(missing)}, extra {sorted(extra)}")
        checked = {k: self.specs[k].check(outputs[k]) for k in self.specs}
        for k, v in checked.items():
            self.values[k].append(v)
        self.streams.append(str(stream))
        self.timestamps.append(float(timestamp))

    def append_models(self, stream: str, timestamp: float, outputs: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Add one frame from per-model outputs ``{model: {output: array}}``, as models return them."""
        flat = {node_key(m, o): v for m, out in outputs.items() for o, v in out.items()}
        # Outputs the set does not track (a model's unserved outputs) are dropped; missing ones raise.
        self.append(stream, timestamp, {k: flat[k] for k in self.specs if k in flat})

    # -- views --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.streams)

    @property
    def nodes(self) -> list[str]:
        return list(self.specs)

    @property
    def models(self) -> list[str]:
        return node_models(self.specs)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TupleSet:
        idx = [int(i) for i in indices]
        n = len(self)
        for i in idx:
            if not -n <= i < n:
                raise IndexError(f"tuple index {i} out of range for {n} tuples")
        return TupleSet(
            specs=dict(self.specs),
            values={k: [v[i] for i in idx] for k, v in self.values.items()},
            streams=[self.streams[i] for i in idx],
            timestamps=[self.timestamps[i] for i in idx],
        )

    def select(self, nodes: Iterable[str]) -> TupleSet:
        """The same frames restricted to ``nodes`` (e.g. the outputs a site serves)."""
        keep = list(nodes)
        missing = [k for k in keep if k not in self.specs]
        if missing:
            raise KeyError(f"nodes {missing} are not in this tuple set (it has {self.nodes})")
        return TupleSet(
            specs={k: self.specs[k] for k in keep},
            values={k: list(self.values[k]) for k in keep},
            streams=list(self.streams),
            timestamps=list(self.timestamps),
        )

    def restrict(self, nodes: Iterable[str]) -> TupleSet:
        """The same frames restricted to those of ``nodes`` this set has (the others are skipped,
        where :meth:`select` raises)."""
        return self.select([k for k in nodes if k in self.specs])

    def copy(self) -> TupleSet:
        """A copy whose lists can be extended without touching this set's."""
        return self.select(self.specs)

    def head(self, n: int) -> TupleSet:
        return self.subset(range(min(max(n, 0), len(self))))

    def tail(self, n: int) -> TupleSet:
        """The last ``n`` tuples (all of them when there are fewer)."""
        n = min(max(n, 0), len(self))
        return self.subset(range(len(self) - n, len(self)))

    def split(self, val_share: float = 0.2, seed: int = 0) -> tuple[TupleSet, TupleSet]:
        """A random (seeded) split into ``(train, val)``; val gets ``round(N * val_share)`` >= 1 tuples."""
        if not 0.0 < val_share < 1.0:
            raise ValueError(f"val_share must be in (0, 1), got {val_share}")
        n = len(self)
        if n < 2:
            raise ValueError(f"need at least 2 tuples to split, have {n}")
        n_val = min(max(1, round(n * val_share)), n - 1)
        perm = np.random.default_rng(seed).permutation(n)
        return self.subset(np.sort(perm[n_val:])), self.subset(np.sort(perm[:n_val]))

    def folds(self, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """A seeded K-fold partition: ``k`` pairs of sorted (other folds', held-out fold's)
        indices; every tuple is held out exactly once."""
        n = len(self)
        if not 2 <= k <= n // 2:
            raise ValueError(f"{k} folds need 2 <= k <= {n // 2} (half the {n} tuples)")
        parts = np.array_split(np.random.default_rng(seed).permutation(n), k)
        return [(np.sort(np.concatenate(parts[:j] + parts[j + 1 :])), np.sort(held)) for j, held in enumerate(parts)]

    @classmethod
    def merge(cls, parts: Iterable[TupleSet]) -> TupleSet:
        """One set over the same frames from several with their own nodes (one per model, as
        profiling gives them); ValueError when they saw different frames."""
        items = list(parts)
        if not items:
            raise ValueError("nothing to merge")
        first = items[0]
        specs: dict[str, OutputSpec] = {}
        values: dict[str, list[np.ndarray]] = {}
        for ts in items:
            if ts.streams != first.streams or ts.timestamps != first.timestamps:
                raise ValueError("the tuple sets to merge saw different frames")
            specs.update(ts.specs)
            values.update(ts.values)
        return cls(
            specs=specs,
            values={k: list(v) for k, v in values.items()},
            streams=list(first.streams),
            timestamps=list(first.timestamps),
        )

    def extend(self, other: TupleSet) -> None:
        if set(other.specs) != set(self.specs) or any(
            not specs_equal(self.specs[k], other.specs[k]) for k in self.specs
        ):
            raise ValueError("cannot extend a tuple set with one over different nodes or specs")
        for k in self.specs:
            self.values[k].extend(other.values[k])
        self.streams.extend(other.streams)
        self.timestamps.extend(other.timestamps)

    # -- content ------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for i, (k, spec) in enumerate(self.specs.items()):
            vals = self.values[k]
            if spec.kind == "vector":
                arr = np.stack(vals).astype(np.float32) if vals else np.zeros((0, spec.dim), np.float32)
                arrays[f"n{i}"] = np.ascontiguousarray(arr)
            else:
                lengths = np.array([len(v) for v in vals], dtype=np.int64)
                rows = np.concatenate(vals).astype(np.float32) if vals else np.zeros((0, spec.dim), np.float32)
                arrays[f"n{i}"] = np.ascontiguousarray(rows.reshape(-1, spec.dim))
                arrays[f"n{i}_len"] = lengths
        return arrays

    def _meta_core(self) -> dict:
        return {
            "format": FORMAT,
            "nodes": list(self.specs),
            "specs": {k: spec_to_dict(s) for k, s in self.specs.items()},
            "streams": list(self.streams),
            "timestamps": [float(t) for t in self.timestamps],
        }

    @staticmethod
    def _content_hash(core: dict, arrays: Mapping[str, np.ndarray]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(core, sort_keys=True, separators=(",", ":")).encode())
        for name in sorted(arrays):
            arr = np.ascontiguousarray(arrays[name])
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            h.update(arr.tobytes())
        return h.hexdigest()

    def version(self) -> str:
        """The content sha256 (what :meth:`save` returns and stores as the dataset version)."""
        return self._content_hash(self._meta_core(), self._arrays())

    # -- storage ------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> str:
        """Write the set into ``directory`` (created if needed, replaced atomically); return its version."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        arrays = self._arrays()
        core = self._meta_core()
        version = self._content_hash(core, arrays)
        tmp_data = path / (DATA_FILE + ".tmp")
        with open(tmp_data, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub lets **arrays land on allow_pickle
        meta = dict(core)
        meta.update(
            {
                "version": version,
                "n": len(self),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": {DATA_FILE: sha256_of(tmp_data)},
            }
        )
        tmp_meta = path / (META_FILE + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_data, path / DATA_FILE)
        os.replace(tmp_meta, path / META_FILE)
        return version

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TupleSet:
        """Read a set written by :meth:`save`; raise :class:`DatasetError` if anything is off."""
        path = Path(directory)
        meta_path, data_path = path / META_FILE, path / DATA_FILE
        if not meta_path.is_file() or not data_path.is_file():
            raise DatasetError(f"no tuple dataset at {path}: expected {META_FILE} and {DATA_FILE}")
        meta = read_format_json(meta_path, FORMAT, DatasetError, f"tuple dataset {path}")
        expected_sha = (meta.get("files") or {}).get(DATA_FILE)
        actual_sha = sha256_of(data_path)
        if expected_sha != actual_sha:
            raise DatasetError(
                f"tuple dataset {path}: {DATA_FILE} is corrupt or truncated "
                f"(sha256 {actual_sha[:12]}..., meta.json records {str(expected_sha)[:12]}...)"
            )
        try:
            nodes = list(meta["nodes"])
            specs = {k: spec_from_dict(meta["specs"][k]) for k in nodes}
            streams = [str(s) for s in meta["streams"]]
            timestamps = [float(t) for t in meta["timestamps"]]
            n = int(meta["n"])
            with np.load(data_path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except DatasetError:
            raise
        except Exception as exc:  # KeyError, ValueError, zipfile.BadZipFile, EOFError, ...
            raise DatasetError(f"tuple dataset {path}: cannot be read ({type(exc).__name__}: {exc})") from exc
        if len(streams) != n or len(timestamps) != n:
            raise DatasetError(
                f"tuple dataset {path}: {n} tuples but {len(streams)} streams, {len(timestamps)} timestamps"
            )
        values: dict[str, list[np.ndarray]] = {}
        for i, k in enumerate(nodes):
            spec = specs[k]
            arr = arrays.get(f"n{i}")
            if arr is None or arr.ndim != 2 or arr.shape[1] != spec.dim or arr.dtype != np.float32:
                raise DatasetError(f"tuple dataset {path}: array of node {k} is missing or malformed")
            if spec.kind == "vector":
                if arr.shape[0] != n:
                    raise DatasetError(f"tuple dataset {path}: node {k} has {arr.shape[0]} rows for {n} tuples")
                values[k] = [arr[j].copy() for j in range(n)]
            else:
                lengths = arrays.get(f"n{i}_len")
                if (
                    lengths is None
                    or lengths.shape != (n,)
                    or np.any(lengths < 0)
                    or int(lengths.sum()) != arr.shape[0]
                ):
                    raise DatasetError(f"tuple dataset {path}: lengths of node {k} are missing or inconsistent")
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                values[k] = [arr[offsets[j] : offsets[j + 1]].copy() for j in range(n)]
        ts = cls(specs=specs, values=values, streams=streams, timestamps=timestamps)
        if ts.version() != meta.get("version"):
            raise DatasetError(f"tuple dataset {path}: content does not match its recorded version")
        return ts
