"""Training one link: the paper's defaults, early stopping, determinism.

Defaults (MLink): RMSprop, lr 0.01, batch 32, up to 100 epochs. Additions:

- early stopping on the validation loss (patience 10 epochs) for links into vectors; the
  weights of the best epoch are kept, an epoch counting as better only when it lowers the loss
  by 0.1%. Links into sequences (box decoders) do not early-stop: they train the configured
  epochs on all their tuples. Their teacher-forced validation loss turns up long before the
  F1 of their greedy decodes stops improving: on the building site's tuples, three box links
  early-stopped (patience 8 of 100 epochs) reached F1 0.16-0.28 on held-out frames, and the
  same links trained 100 epochs on the tuples that had been split off for stopping 0.22-0.51.
  The order-free box-set link (``BoxSet``) does early-stop: its loss is that of its actual
  predictions under the matching, not a teacher-forced one (``Link.early_stops``);
- recurrent links (any link with a sequence end) train at lr 0.003: at 0.01 RMSprop makes
  the GRUs diverge or oscillate on real box sequences; gradients of every link are clipped
  to norm 1.0. ``BoxSet`` has no GRU but trains at 0.003 too (at 0.01 its free slots emitted
  junk boxes: F1 0.58 against 0.93 on a synthetic shift-and-drop mapping); ``BoxCount`` trains
  at the paper's lr (``Link.uses_seq_lr``);
- fine-tuning (a few new tuples per period) uses Adam at 3% of the training lr: a fresh
  RMSprop's first steps are ~10x its lr (its squared-gradient average starts at zero), and on
  real tuples fine-tuning with RMSprop at 10% of the lr on 20 new frames cost one ensemble 18
  points of accuracy on the frames around them; Adam (bias-corrected) at 3% never lost more
  than 1 point there and gained ~1.5 points on average. That gentle update cannot follow a
  changed scene, though (links trained on the walkway clip, fine-tuned on 24 frames of the
  room clip: 2% -> 4% accuracy on other room frames), so a link whose loss on the new tuples
  exceeds ``drift_ratio`` x its training validation loss *adapts* instead: 50 epochs of Adam
  at the full lr (2% -> 36% there);
- determinism: every link is trained from ``torch.manual_seed(seed)`` with its own seeded
  shuffling generator; the same data, seed, thread count, torch build and CPU give the same
  weights bit for bit. Across machines (another SIMD path, BLAS or torch build) the weights
  differ in the last bits, and so can the tuples themselves (the models' outputs); what is
  chosen from them is built to be right whichever way such noise falls (see
  :mod:`mlink.links.ensemble`);
- threads: by default training runs single-threaded (``TrainConfig.threads = 1``) and
  restores the caller's setting afterwards. Links are tiny (batches of 32, widths <= 256):
  intra-op parallelism buys nothing, and on a shared 2-core machine OpenMP workers spin
  against other processes; one Vec2Seq epoch on 800 tuples took 0.19 s with 1 thread and
  8.5 s with 2 while other jobs ran. ``threads=None`` keeps whatever
  ``torch.get_num_threads()`` the caller set; any other value runs ``min(threads, 2)``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from mlink.links.arch import Link
from mlink.links.encode import SEQ_CAP, Batch

Progress = Callable[[int, int, str], None]
# Early stopping counts an epoch as better only when its validation loss is lower by this share:
# with an absolute 1e-6, float differences between machines (or thread counts) changed which
# epoch's weights were kept.
MIN_IMPROVEMENT = 1e-3


@dataclass
class TrainConfig:
    lr: float = 0.01  # vector -> vector links (the paper's RMSprop learning rate)
    seq_lr: float = 0.003  # links with a sequence source or target (see module docstring)
    batch_size: int = 32
    epochs: int = 100
    patience: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    cap: int = SEQ_CAP  # most sequence elements read from a source / produced for a target
    min_hidden: int = 16
    max_hidden: int = 256
    threads: int | None = 1  # None: the caller's torch.get_num_threads(); else min(threads, 2)
    # ensembles: the share of tuples held out (never trained or stopped on) to choose what
    # each ensemble serves (LinkSet.train)
    select_share: float = 0.25
    # candidate architectures (links.candidates): train the order-free box-set links beside the
    # paper's and keep the better on the selection tuples; False: the paper's links alone
    arch_choice: bool = True
    combiner_steps: int = 300
    combiner_lr: float = 0.05
    # fine-tuning (periodic updates with a few new tuples): Adam at a small share of the lr
    fine_tune_epochs: int = 5
    fine_tune_lr_scale: float = 0.03
    drift_ratio: float = 2.0  # new-tuple loss / training val loss above which a link adapts
    adapt_epochs: int = 50
    adapt_lr_scale: float = 1.0
    extra: dict = field(default_factory=dict)

    def link_hparams(self) -> dict:
        return {"cap": self.cap, "min_hidden": self.min_hidden, "max_hidden": self.max_hidden}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    epochs: int  # epochs run
    best_epoch: int  # 1-based epoch whose weights were kept (0: the initial weights)
    train_loss: float
    val_loss: float | None
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``min(threads, 2)`` torch threads (if given), restoring the setting afterwards."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(int(threads), 2)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def link_lr(link: Link, config: TrainConfig) -> float:
    """The training lr of ``link``: ``seq_lr`` for links with a sequence end, else ``lr``."""
    return config.seq_lr if link.uses_seq_lr else config.lr


@torch.no_grad()
def eval_loss(link: Link, src: Batch, tgt: Batch, batch_size: int = 256) -> float:
    link.eval()
    total, n = 0.0, len(src)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        total += float(link.loss(src.index(idx), tgt.index(idx))) * len(idx)
    return total / max(n, 1)


def fit_link(
    link: Link,
    src: Batch,
    tgt: Batch,
    val_src: Batch | None,
    val_tgt: Batch | None,
    config: TrainConfig,
    *,
    seed: int | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    optimizer: str = "rmsprop",
    on_epoch: Callable[[int, float, float | None], None] | None = None,
) -> FitResult:
    """Train ``link`` in place on (src, tgt); early-stop on (val_src, val_tgt) when given."""
    t0 = time.perf_counter()
    seed = config.seed if seed is None else seed
    epochs = config.epochs if epochs is None else epochs
    if lr is None:
        lr = link_lr(link, config)
    n = len(src)
    if n == 0:
        raise ValueError("cannot train a link on 0 tuples")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}[optimizer](link.parameters(), lr=lr)
    has_val = val_src is not None and val_tgt is not None and len(val_src) > 0
    best_val = eval_loss(link, val_src, val_tgt) if has_val else None  # type: ignore[arg-type]
    best_state = copy.deepcopy(link.state_dict()) if has_val else None
    best_epoch, since_best, train_loss, ran = 0, 0, float("nan"), 0
    for epoch in range(1, epochs + 1):
        link.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, config.batch_size):
            idx = perm[start : start + config.batch_size]
            loss = link.loss(src.index(idx), tgt.index(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(link.parameters(), config.grad_clip)
            opt.step()
            total += float(loss.detach()) * len(idx)
        train_loss = total / n
        ran = epoch
        val = eval_loss(link, val_src, val_tgt) if has_val else None  # type: ignore[arg-type]
        if on_epoch is not None:
            on_epoch(epoch, train_loss, val)
        if val is not None:
            assert best_val is not None  # has_val: measured before the first epoch
            if val < best_val - MIN_IMPROVEMENT * abs(best_val) or not torch.isfinite(torch.tensor(best_val)):
                best_val, best_epoch, since_best = val, epoch, 0
                best_state = copy.deepcopy(link.state_dict())
            else:
                since_best += 1
                if since_best >= config.patience:
                    break
        elif not torch.isfinite(torch.tensor(train_loss)):
            break
    if best_state is not None:
        link.load_state_dict(best_state)
    else:
        best_epoch = ran
    link.compile()
    return FitResult(ran, best_epoch, train_loss, best_val, time.perf_counter() - t0)
