"""A site's whole set of links and ensembles: training, prediction, evaluation, persistence."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlink.links.arch import Link
from mlink.links.candidates import choose, frame_scores
from mlink.links.encode import Batch, encode_one, encode_source, encode_target
from mlink.links.ensemble import Ensemble
from mlink.links.errors import LinkError, LinkStoreError
from mlink.links.fitting import fit_ensembles, link_seed
from mlink.links.infer import EncoderBank
from mlink.links.matrix import LinkMatrix, compute_matrix, encode_sources, ensemble_accuracy
from mlink.links.store import StoredLinks, load_linkset, save_linkset
from mlink.links.train import TrainConfig, eval_loss, fit_link, link_lr, torch_threads
from mlink.links.tuples import TupleSet, node_model, node_models, specs_equal
from mlink.models.spec import OutputSpec

ProgressArg = Callable[[int, int, str], None] | bool | str | None


class _Progress:
    """``progress``: None/False (silent), True/"tqdm" (a tqdm bar), or ``callback(done, total, what)``."""

    def __init__(self, progress: ProgressArg, total: int, desc: str) -> None:
        self.total, self.done, self.bar, self.cb = total, 0, None, None
        if progress is True or progress == "tqdm":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="link")
        elif callable(progress):
            self.cb = progress

    def update(self, what: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)
        if self.cb is not None:
            self.cb(self.done, self.total, what)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


SELECT_SEED = 7919  # offsets the seed of the selection split from the early-stopping split's


def _select(ens: Ensemble, enc: Mapping[str, Batch], exact: Sequence[np.ndarray]) -> None:
    """Choose ``ens``'s plans on held-out tuples (encoded sources ``enc``, the target's own
    outputs ``exact``) that its links never trained or stopped on, and its mix never saw."""
    ens.select(lambda plan: ens.frame_scores(plan, enc, exact))
    ens.invalidate()


def _fine_tune_mode(
    cfg: TrainConfig, before: float, ref: float | None, epochs: int | None, lr_scale: float | None
) -> tuple[str, int, float]:
    """How :meth:`LinkSet.fine_tune` updates one link: (mode, epochs, lr scale). ``"fixed"`` when
    ``epochs`` or ``lr_scale`` is given; ``"adapt"`` when the loss ``before`` on the new tuples
    exceeds ``drift_ratio`` times the link's reference loss ``ref``; else ``"gentle"``."""
    if epochs is not None or lr_scale is not None:
        n_epochs = cfg.fine_tune_epochs if epochs is None else epochs
        return "fixed", n_epochs, cfg.fine_tune_lr_scale if lr_scale is None else lr_scale
    if ref is not None and before > cfg.drift_ratio * max(float(ref), 1e-6):
        return "adapt", cfg.adapt_epochs, cfg.adapt_lr_scale
    return "gentle", cfg.fine_tune_epochs, cfg.fine_tune_lr_scale


def _fine_tune_link(
    link: Link,
    src: Batch,
    y: Batch,
    cfg: TrainConfig,
    ref: float | None,
    epochs: int | None,
    lr_scale: float | None,
    seed: int,
) -> dict[str, Any]:
    """One link of :meth:`LinkSet.fine_tune`: its mode, losses before and after, and the fit."""
    before = eval_loss(link, src, y)
    mode, n_epochs, scale = _fine_tune_mode(cfg, before, ref, epochs, lr_scale)
    lr = link_lr(link, cfg) * scale
    fit = fit_link(link, src, y, None, None, cfg, epochs=n_epochs, lr=lr, optimizer="adam", seed=seed)
    return {
        "mode": mode,
        "loss_before": before,
        "loss_after": eval_loss(link, src, y),
        "reference_val_loss": ref,
        "fit": fit.to_dict(),
    }


class LinkSet:
    """All links and ensembles of one site.

    ``ensembles[target]`` is h_{.,target}; its ``links`` are the single links g_{source,target}
    from every node of every other model. Build one with :meth:`train` or :meth:`load`.
    """

    def __init__(
        self,
        specs: Mapping[str, OutputSpec],
        ensembles: Mapping[str, Ensemble],
        config: TrainConfig,
        *,
        data_version: str | None = None,
        metrics: dict | None = None,
        created_at: str | None = None,
        history: list | None = None,
    ) -> None:
        self.specs = dict(specs)
        self.ensembles = dict(ensembles)
        self.config = config
        self.data_version = data_version
        self.metrics = metrics or {}
        self.created_at = created_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.history = history or []
        self._encoder_banks: dict[tuple, tuple[list, Any]] = {}  # (source, readers) -> (their encoders, EncoderBank)

    # -- description ------------------------------------------------------------------------
    @property
    def nodes(self) -> list[str]:
        return list(self.specs)

    @property
    def models(self) -> list[str]:
        return node_models(self.specs)

    @property
    def targets(self) -> list[str]:
        return list(self.ensembles)

    @property
    def links(self) -> dict[tuple[str, str], Link]:
        """Every single link, keyed (source node, target node)."""
        return {(s, t): ens.by_index[i] for t, ens in self.ensembles.items() for i, s in enumerate(ens.sources)}

    def link(self, source: str, target: str) -> Link:
        return self.ensembles[target].link(source)

    @property
    def choices(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Per link with several candidate architectures, the record of the choice (see
        :mod:`mlink.links.candidates`): chosen and paper's architecture, every candidate's
        accuracy on the selection tuples, the rival's paired gain over the paper's link and its SE."""
        out = {}
        for (s, t), _ in self.links.items():
            record = self.metrics.get("links", {}).get(f"{s}->{t}", {}).get("choice")
            if record:
                out[(s, t)] = record
        return out

    # -- training ---------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        tuples: TupleSet,
        val_share: float = 0.2,
        *,
        config: TrainConfig | None = None,
        targets: Iterable[str] | None = None,
        sources: Iterable[str] | None = None,
        progress: ProgressArg = None,
    ) -> LinkSet:
        """Train every link (source node -> target node of another model) and one ensemble per
        target on ``tuples``, and choose what each ensemble serves for every subset of active
        models (see :mod:`mlink.links.ensemble`).

        ``config.select_share`` of the tuples is held out for that choice: the links never
        train or early-stop on it. The links train on the rest (links into vectors
        early-stopped on a ``val_share`` split of it). Where a pair has candidate
        architectures besides the paper's (box sets, :mod:`mlink.links.candidates`), each is
        trained and the held-out tuples choose one (``config.arch_choice``; recorded in
        :attr:`choices`). ``targets``/``sources`` restrict the nodes (default: every node is both).
        """
        config = config or TrainConfig()
        t0 = time.perf_counter()
        specs = dict(tuples.specs)
        targets = list(targets) if targets is not None else list(specs)
        sources = list(sources) if sources is not None else list(specs)
        for k in targets + sources:
            if k not in specs:
                raise LinkError(f"node {k} is not in the tuples (nodes: {sorted(specs)})")
        pairs = [(s, t) for t in targets for s in sources if node_model(s) != node_model(t)]
        targets = [t for t in targets if any(tt == t for _, tt in pairs)]
        if not pairs:
            raise LinkError("no links to train: links need nodes of at least two models")
        fit, held = tuples.split(config.select_share, config.seed + SELECT_SEED)
        bar = _Progress(progress, len(pairs) + len(targets), "training links")
        with torch_threads(config.threads):
            try:
                enc = {s: encode_source(specs[s], held.values[s], config.cap) for s in sorted({s for s, _ in pairs})}

                def judge(s: str, t: str, candidates: list[Link]) -> tuple[int, dict[str, Any]]:
                    scores = [frame_scores(link, enc[s], held.values[t]) for link in candidates]
                    return choose([link.arch for link in candidates], scores)

                ensembles, link_metrics, (n_train, n_val) = fit_ensembles(
                    fit, pairs, val_share, config, bar.update, judge
                )
                for t, ens in ensembles.items():
                    _select(ens, enc, held.values[t])
                    for s in ens.sources:
                        link_metrics[f"{s}->{t}"]["val_accuracy"] = ens.link_val_accuracy.get(s)
                    bar.update(f"ensemble {t}")
            finally:
                bar.close()
        metrics = {
            "n_train": n_train,
            "n_val": n_val,
            "n_selection": len(held),
            "train_seconds": time.perf_counter() - t0,
            "torch_threads": torch.get_num_threads(),
            "links": link_metrics,
        }
        return cls(specs, ensembles, config, data_version=tuples.version(), metrics=metrics)

    def fine_tune(
        self,
        new_tuples: TupleSet,
        *,
        epochs: int | None = None,
        lr_scale: float | None = None,
        progress: ProgressArg = None,
        partial: bool = False,
    ) -> dict[str, dict]:
        """Update every link with a few new tuples (the scheduler's periodic re-profiling).

        ``partial``: the tuples may hold only some nodes (a rotating model's real outputs beside
        the resident models'): only the links between nodes they hold are updated, so every
        real execution teaches the links it can, not only a full profile.

        Drift-aware by default: a link whose loss on the new tuples is within
        ``config.drift_ratio`` times the validation loss it had when trained sees the same scene,
        and gets a gentle update (``fine_tune_epochs`` of Adam at ``fine_tune_lr_scale`` of its
        training lr), which cannot undo what it knows. A link whose loss grew beyond that sees
        a changed scene, and adapts (``adapt_epochs`` at ``adapt_lr_scale``). Explicit
        ``epochs``/``lr_scale`` apply to every link instead. Ensemble weights and selections are
        kept (a few new tuples are too few to refit them); re-measure with :meth:`matrix`.

        Returns, per link ``"source->target"``: mode ("gentle", "adapt" or "fixed"), the loss
        on the new tuples before and after, and the fit result.
        """
        cfg = self.config
        if len(new_tuples) == 0:
            return {}
        missing = [
            k
            for k, spec in self.specs.items()
            if (k not in new_tuples.specs and not partial)
            or (k in new_tuples.specs and not specs_equal(new_tuples.specs[k], spec))
        ]
        if missing:
            raise LinkError(f"fine-tuning: node {missing[0]} is missing from the new tuples or has another spec")
        results: dict[str, dict] = {}
        bar = _Progress(progress, len(self.links), "fine-tuning links")
        enc: dict[str, Batch] = {}
        link_metrics = self.metrics.setdefault("links", {})
        with torch_threads(cfg.threads):
            try:
                for t, ens in self.ensembles.items():
                    if t not in new_tuples.specs:
                        continue
                    y = encode_target(self.specs[t], new_tuples.values[t], cfg.cap)
                    for s, link in zip(ens.sources, ens.by_index):
                        key = f"{s}->{t}"
                        if s not in new_tuples.specs:
                            continue
                        if s not in enc:
                            enc[s] = encode_source(self.specs[s], new_tuples.values[s], cfg.cap)
                        fitted = link_metrics.get(key, {}).get("fit") or {}
                        ref = fitted.get("val_loss") or fitted.get("train_loss")  # into sequences: no early stop
                        seed = link_seed(cfg.seed + len(self.history) + 1, s, t)
                        results[key] = _fine_tune_link(link, enc[s], y, cfg, ref, epochs, lr_scale, seed)
                        bar.update(f"{s} -> {t} ({results[key]['mode']})")
                    ens.invalidate()
            finally:
                bar.close()
        self.history.append(
            {
                "fine_tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "data_version": new_tuples.version(),
                "n": len(new_tuples),
                "modes": {k: r["mode"] for k, r in results.items()},
            }
        )
        return results

    # -- prediction -------------------------------------------------------------------------
    def predict(
        self,
        active_models: Iterable[str],
        source_outputs: Mapping[str, np.ndarray],
        targets: Iterable[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Predict, for one frame, every target node whose model is not active.

        ``source_outputs`` maps node keys ("model:output") of the active models to their arrays.
        Returns node key -> array in the target's spec format. Targets none of whose source
        models is active get their trivial output.
        """
        return self.predict_batch(active_models, [source_outputs], targets)[0]

    def predict_batch(
        self,
        active_models: Iterable[str],
        frames: Sequence[Mapping[str, np.ndarray]],
        targets: Iterable[str] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """:meth:`predict` for several frames with the same active models, in one pass.

        A frame's prediction is a few hundred tiny numpy operations whose cost is mostly call
        overhead; run over a batch (the serving step's chunk of frames) each operation serves
        every frame, so the cost per frame falls with the batch.
        """
        active = frozenset(active_models)
        wanted = self.ensembles if targets is None else {t: self.ensembles[t] for t in targets}
        plans = {t: ens.plan(active) for t, ens in wanted.items() if node_model(t) not in active}
        enc: dict[str, Batch] = {}
        for t, plan in plans.items():
            ens = self.ensembles[t]
            for i, _ in plan:
                s = ens.sources[i]
                if s in enc:
                    continue
                if any(s not in f for f in frames):
                    raise LinkError(f"predicting {t}: active model {node_model(s)} gave no output {s}")
                spec, cap = ens.by_index[i].source, ens.by_index[i].hparams["cap"]
                enc[s] = (
                    encode_one(spec, frames[0][s], cap)
                    if len(frames) == 1
                    else encode_source(spec, [f[s] for f in frames], cap)
                )
        encoded = self._shared_encodings(plans, enc)
        out: list[dict[str, np.ndarray]] = [{} for _ in frames]
        for t, plan in plans.items():
            preds = self.ensembles[t].predict_encoded(plan, enc, encoded.get(t)) if plan else [None] * len(frames)
            for row, value in zip(out, preds):
                row[t] = self.ensembles[t].trivial.copy() if value is None else value
        return out

    def _shared_encodings(
        self, plans: Mapping[str, list[tuple[int, float]]], enc: Mapping[str, Batch]
    ) -> dict[str, dict[int, Any]]:
        """Run, per sequence source node, the encoders of every planned link that reads it as
        one :class:`EncoderBank`: {target: {link index: encoder states}}."""
        readers: dict[str, list[tuple[str, int]]] = {}
        for t, plan in plans.items():
            for i, _ in plan:
                if self.ensembles[t].by_index[i].np_encoder() is not None:  # a GRU over a sequence source
                    readers.setdefault(self.ensembles[t].sources[i], []).append((t, i))
        encoded: dict[str, dict[int, Any]] = {}
        for s, members in readers.items():
            if len(members) < 2:
                continue  # a lone reader runs its own encoder
            encoders = [self.ensembles[t].by_index[i].np_encoder() for t, i in members]
            key = (s, tuple(members))
            cached = self._encoder_banks.get(key)
            if cached is None or any(a is not b for a, b in zip(cached[0], encoders)):  # weights recompiled since
                try:
                    bank = EncoderBank(encoders)  # type: ignore[arg-type]
                except ValueError:  # links of other sizes (hand-built sets): each runs its own encoder
                    continue
                cached = self._encoder_banks[key] = (encoders, bank)
            batch = enc[s]
            states, last, mask = cached[1](batch.x.numpy(), batch.lengths.numpy())  # type: ignore[union-attr]
            for k, (t, i) in enumerate(members):
                encoded.setdefault(t, {})[i] = (states[k], last[k], mask)
        return encoded

    def predict_tuples(self, active_models: Iterable[str], tuples: TupleSet) -> dict[str, list[np.ndarray]]:
        """Batched :meth:`predict` over a tuple set (for evaluation)."""
        active = frozenset(active_models)
        enc = encode_sources(self, tuples)
        out = {}
        for t, ens in self.ensembles.items():
            if node_model(t) in active:
                continue
            plan = ens.plan(active)
            out[t] = ens.predict_encoded(plan, enc) if plan else [ens.trivial.copy() for _ in range(len(tuples))]
        return out

    # -- evaluation -------------------------------------------------------------------------
    def matrix(self, test_tuples: TupleSet, subsets: bool = False) -> LinkMatrix:
        """The link accuracy matrix on held-out tuples (see :mod:`mlink.links.matrix`)."""
        return compute_matrix(self, test_tuples, subsets=subsets)

    def ensemble_accuracy(self, test_tuples: TupleSet, target: str, active_models: Iterable[str]) -> float:
        return ensemble_accuracy(self, test_tuples, target, active_models)

    # -- persistence ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> dict:
        """Write the link set (weights + manifest with checksum) into ``directory``; return the manifest."""
        stored = StoredLinks(
            self.specs,
            self.ensembles,
            self.config,
            data_version=self.data_version,
            metrics=self.metrics,
            created_at=self.created_at,
            history=self.history,
        )
        return save_linkset(stored, directory)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        expect_specs: Mapping[str, OutputSpec] | None = None,
        expect_data_version: str | None = None,
    ) -> LinkSet:
        """Load a saved link set; raise :class:`LinkStoreError` (corrupt) or
        :class:`IncompatibleLinksError` (other specs / data version) instead of using it."""
        s = load_linkset(directory, expect_specs=expect_specs, expect_data_version=expect_data_version)
        return cls(
            s.specs,
            s.ensembles,
            s.config,
            data_version=s.data_version,
            metrics=s.metrics,
            created_at=s.created_at,
            history=s.history,
        )

    @classmethod
    def load_or_train(
        cls,
        directory: str | Path,
        tuples: TupleSet,
        *,
        expect_specs: Mapping[str, OutputSpec] | None = None,
        require_same_data: bool = False,
        **train_kw: Any,
    ) -> tuple[LinkSet, str | None]:
        """Load the link set at ``directory``; if it is missing, corrupt or incompatible, train a
        new one on ``tuples`` and save it there. Returns (link set, why it was retrained or None)."""
        try:
            loaded = cls.load(
                directory,
                expect_specs=expect_specs if expect_specs is not None else tuples.specs,
                expect_data_version=tuples.version() if require_same_data else None,
            )
            return loaded, None
        except LinkStoreError as exc:
            reason = str(exc)
        fresh = cls.train(tuples, **train_kw)
        fresh.save(directory)
        return fresh, reason
