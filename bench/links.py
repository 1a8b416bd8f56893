"""Link benchmark: how long a site's links take to train, and to predict, against its models.

    python -m mlink.bench.links --site building [--tuples 1000] [--threads 2] [--batches 1,4,16]
                                [--folds 5] [--json]

1. Trains every link and ensemble of the site on ``--tuples`` tuples of its latest profile
   (profiled first when there is none) with ``--threads`` torch threads, and prints the seconds.
2. Prediction time of *all* ensembles for one frame: for every target, its ensemble with every
   other model of the site active (each target's largest plan), over the profile's frames that
   training did not use. Timed per batch of frames (one frame, the serving step's chunk, a
   larger one) through :meth:`LinkSet.predict_batch`, which the serving step calls once per
   chunk; reported per frame, with the vector targets alone beside all of them.
3. The site's cheapest model: each model's median per-frame inference over real frames of the
   site's streams, one frame per call (``bench.measure.latency_ms``), and the prediction time as
   a share of the cheapest (the issue's goal: under 2%).
4. What serving actually pays: for every plan (set of active models), the time to predict every
   output of the models not active from the active ones, at batch 1 and the serving batch.
5. Which architecture each link with candidates kept (``links.candidates``: the paper's
   Seq2Seq/Seq2Vec or the order-free BoxSet/BoxCount), with both accuracies on the selection
   tuples and the paired gain over the paper's link. With ``--folds K``, first the link
   accuracy matrix by K-fold cross-validation over the same tuples (``links.crossval``), and
   the choices over the K link sets: how often each architecture won, and the mean gain.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

Job = tuple[frozenset, list]  # (active models, targets predicted from them)


def all_ensembles_jobs(links: Any, vector_only: bool = False) -> list[Job]:
    """Every target with every other model active (each target's largest plan), grouped by the
    target's model: the issue's "all ensembles for one frame"."""
    from mlink.links import node_model

    groups: dict[str, list[str]] = {}
    for t in links.targets:
        if not (vector_only and links.specs[t].kind != "vector"):
            groups.setdefault(node_model(t), []).append(t)
    return [(frozenset(m for m in links.models if m != tm), ts) for tm, ts in groups.items()]


def plan_jobs(links: Any, active: frozenset) -> list[Job]:
    """What the serving step predicts under a plan: every output of the models not in ``active``."""
    from mlink.links import node_model

    return [(active, [t for t in links.targets if node_model(t) not in active])]


def prediction_ms(
    links: Any, frames: list[dict[str, np.ndarray]], batch: int, jobs: list[Job], rounds: int = 3
) -> float:
    """Time per frame to run ``jobs`` for a batch of ``batch`` frames: the median over batches,
    the lowest of ``rounds`` passes (this is a shared 2-core machine; a pass right after
    training ran up to 1.7x slower)."""
    from mlink.links import node_model

    chunks = [frames[i : i + batch] for i in range(0, len(frames) - batch + 1, batch)]
    for active, ts in jobs:  # warm the plan and decoder-bank caches
        links.predict_batch(active, [{k: v for k, v in f.items() if node_model(k) in active} for f in chunks[0]], ts)
    medians = []
    for _ in range(max(1, rounds)):
        per_frame = []
        for chunk in chunks:
            seen = [[{k: v for k, v in f.items() if node_model(k) in active} for f in chunk] for active, _ in jobs]
            t0 = time.perf_counter()
            for (active, ts), fr in zip(jobs, seen):
                links.predict_batch(active, fr, ts)
            per_frame.append((time.perf_counter() - t0) / len(chunk))
        medians.append(statistics.median(per_frame))
    return 1000 * min(medians)


def model_latencies(cfg: Any, store: Any, n: int) -> dict[str, float]:
    """Median ms per frame of each site model on ``n`` real frames of the site's streams."""
    from mlink.bench.measure import latency_ms
    from mlink.models.catalog import create_model
    from mlink.server.profiling import plan_stream_frames, site_frames

    images = [f.image for f in site_frames(plan_stream_frames(cfg, n, store))]
    out = {}
    for m in cfg.models:
        model = create_model(m.name, store=store, **m.params)
        model.load(cfg.device)
        try:
            model.infer(images[:1])
            out[m.name] = statistics.median(latency_ms(lambda img, model=model: model.infer([img]), images))
        finally:
            model.unload()
    return out


def choice_rows(linksets: list[Any]) -> list[dict]:
    """Per link with candidate architectures, its choices over ``linksets`` (one, or a
    cross-validation's K): wins per architecture, mean accuracies on the selection tuples, the
    mean paired gain of the rival over the paper's link and the SE of that mean."""
    pairs: dict[tuple[str, str], list[dict]] = {}
    for ls in linksets:
        for key, rec in ls.choices.items():
            pairs.setdefault(key, []).append(rec)
    rows = []
    for (s, t), recs in sorted(pairs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        archs = list(recs[0]["accuracy"])
        rows.append(
            {
                "source": s,
                "target": t,
                "wins": {a: sum(r["chosen"] == a for r in recs) for a in archs},
                "accuracy": {a: float(np.mean([r["accuracy"][a] for r in recs])) for a in archs},
                "rival": recs[0]["rival"],
                "gain": float(np.mean([r["gain"] for r in recs])),
                "se": float(np.sqrt(sum(r["paired_se"] ** 2 for r in recs)) / len(recs)),
                "link_sets": len(recs),
            }
        )
    return rows


def print_choices(rows: list[dict], how: str) -> None:
    print(f"architecture choices ({how}; accuracy on the selection tuples, gain = candidate - paper's):")
    for r in rows:
        wins = ", ".join(f"{a} {n}/{r['link_sets']}" for a, n in r["wins"].items())
        accs = " vs ".join(f"{a} {v:.3f}" for a, v in r["accuracy"].items())
        print(
            f"  {r['source']} -> {r['target']}: won {wins}; {accs}; "
            f"gain {100 * r['gain']:+.1f} points (SE {100 * r['se']:.1f})"
        )


def cross_validation(tuples: Any, folds: int, threads: int) -> dict:
    """The K-fold link matrix over ``tuples`` and the choices of its K link sets."""
    from mlink.links import TrainConfig
    from mlink.links.crossval import cross_validated_scores
    from mlink.links.matrix import matrix_from_scores

    t0 = time.perf_counter()

    def said(k: int, n: int) -> None:
        print(f"cross-validation: fold {k}/{n} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    scores, linksets = cross_validated_scores(tuples, folds, progress=said, config=TrainConfig(threads=threads))
    matrix = matrix_from_scores(scores, list(linksets[0].ensembles), tuples.version(), folds)
    return {"matrix": matrix.to_json(), "table": matrix.table(), "choices": choice_rows(linksets)}


def run(
    site: str | None,
    config: str | None,
    tuples_n: int,
    threads: int,
    batches: list[int],
    latency_frames: int,
    progress: bool,
    folds: int = 0,
) -> dict:
    import torch

    from mlink.configs.load import load_config, site_config_path
    from mlink.links import LinkSet, TrainConfig
    from mlink.models.assets import default_store
    from mlink.models.catalog import zoo_catalog
    from mlink.server.profiling import site_profile

    cfg = load_config(config if config else site_config_path(site or "default"), catalog=zoo_catalog())
    store = default_store()
    tuples, _, why = site_profile(cfg, store, min_frames=tuples_n + 100)
    if why is not None:
        print(f"profiled {len(tuples)} frames of site {cfg.site} first ({why})", file=sys.stderr)
    order = np.random.default_rng(0).permutation(len(tuples))
    train = tuples.subset(np.sort(order[:tuples_n]))
    held = tuples.subset(np.sort(order[tuples_n:]))
    cv = cross_validation(train, folds, threads) if folds > 1 else None
    t0 = time.perf_counter()
    links = LinkSet.train(train, config=TrainConfig(threads=threads), progress=progress)
    train_s = time.perf_counter() - t0
    torch.set_num_threads(1)  # prediction is numpy; keep BLAS to one thread as the serving step does
    frames = [{k: held.values[k][i] for k in held.specs} for i in range(len(held))]
    batches = [b for b in batches if b <= len(frames)]
    pred = {
        b: {
            "all_ms": prediction_ms(links, frames, b, all_ensembles_jobs(links)),
            "vector_ms": prediction_ms(links, frames, b, all_ensembles_jobs(links, vector_only=True)),
        }
        for b in batches
    }
    serving_batch = cfg.scheduler.batch_size
    plans = [frozenset(c) for r in range(1, len(links.models)) for c in itertools.combinations(links.models, r)]
    per_plan = {
        ",".join(sorted(a)): {
            str(b): prediction_ms(links, frames, b, plan_jobs(links, a)) for b in sorted({1, serving_batch})
        }
        for a in plans
    }
    lat = model_latencies(cfg, store, latency_frames)
    cheapest = min(lat, key=lat.get)  # type: ignore[arg-type]
    return {
        "plans": per_plan,
        "serving_batch": serving_batch,
        "site": cfg.site,
        "train": {
            "tuples": len(train),
            "threads": threads,
            "seconds": train_s,
            "links": len(links.links),
            "ensembles": len(links.ensembles),
        },
        "prediction": {str(b): {**v, "share_of_cheapest": v["all_ms"] / lat[cheapest]} for b, v in pred.items()},
        "held_out_frames": len(frames),
        "model_ms": lat,
        "cheapest": cheapest,
        "choices": choice_rows([links]),
        "cross_validation": cv,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("--tuples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--latency-frames", type=int, default=20)
    ap.add_argument("--folds", type=int, default=0, help="K >= 2: also the K-fold link matrix and choices")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = run(
        args.site,
        args.config,
        args.tuples,
        args.threads,
        [int(b) for b in args.batches.split(",")],
        args.latency_frames,
        not args.json,
        args.folds,
    )
    if args.json:
        print(json.dumps(r))
        return 0
    t = r["train"]
    print(
        f"\nlinks of site {r['site']}: {t['links']} links + {t['ensembles']} ensembles trained on {t['tuples']} tuples, "
        f"{t['threads']} threads: {t['seconds']:.1f} s"
    )
    lat = r["model_ms"]
    print(
        "models, median ms per frame: "
        + ", ".join(f"{m} {v:.1f}" for m, v in sorted(lat.items(), key=lambda kv: kv[1]))
    )
    print(f"prediction of all ensembles (each with every other model active), {r['held_out_frames']} held-out frames:")
    print(f"{'batch':>6} {'all ms/frame':>13} {'vector ms/frame':>16} {'% of ' + r['cheapest']:>22}")
    for b, v in r["prediction"].items():
        print(f"{b:>6} {v['all_ms']:>13.3f} {v['vector_ms']:>16.3f} {100 * v['share_of_cheapest']:>21.1f}%")
    sb = str(r["serving_batch"])
    cheap = lat[r["cheapest"]]
    print("what the serving step predicts under each plan (every output of the models not active), ms per frame:")
    print(
        f"{'active models':<48} {'batch 1':>9} {'batch ' + sb:>9} {'% of ' + r['cheapest'] + ' (batch ' + sb + ')':>30}"
    )
    for active, v in r["plans"].items():
        print(f"{active:<48} {v['1']:>9.3f} {v[sb]:>9.3f} {100 * v[sb] / cheap:>29.1f}%")
    print_choices(r["choices"], f"the link set above, trained on {t['tuples']} tuples")
    cv = r["cross_validation"]
    if cv is not None:
        print(f"\nlink accuracy by {args.folds}-fold cross-validation over the {t['tuples']} tuples:")
        print(cv["table"])
        print_choices(cv["choices"], f"over the {args.folds} link sets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
