"""The four link architectures of MLink, chosen by (source kind, target kind).

==========  ========================================================================================
Vec2Vec     MLP ``Linear(in, h) -> Dropout(p) -> ReLU -> Linear(h, out)`` -> task activation.
            ``p`` is the paper's 0.5 for class targets and 0.1 for counts (and in the sequence
            links): a count must come out within 0.5 of the exact one, and 0.5 dropout on 16
            hidden units keeps it from getting there (a count -> count+1 link reached 65%
            exact counts with 0.5, 100% with 0.1 or less).
            The paper's hidden width is ``h = 2 * out``; we clamp it to ``[16, 256]``
            (``min_hidden``/``max_hidden``): a count target (out = 1) would otherwise get 2 hidden
            units, which cannot express a count from 1000 class probabilities, and a 1000-class
            target would get 2000, i.e. 2-4M weights per link, 8-16 MB read per prediction,
            while one camera only ever shows a few dozen classes.
Seq2Vec     each element embedded (``Linear(d, 32) -> ReLU``), a learned start element prepended
            (so empty sequences encode too), GRU(64) over the packed sequence; the final state
            plus ``log1p(length)`` goes through the same MLP head as Vec2Vec.
Vec2Seq     MLP encoder into 4 memory slots of 64; decoder below.
Seq2Seq     the Seq2Vec encoder; its per-element states are the decoder's memory (padding
            masked), its final state the decoder's initial state.
==========  ========================================================================================

Decoder (Vec2Seq, Seq2Seq): the previous element is embedded (a learned start element at step
0), a GRU(64) steps over it, additive (Bahdanau) attention over the memory gives a context,
and ``Linear([state, context]) -> (d element logits, 1 end-of-sequence logit)``. The attention
query is the GRU's current state (Luong's placement of Bahdanau's additive score), so with
teacher forcing the whole target sequence runs through the GRU in one call instead of a Python
loop per step; inference decodes greedily, one step at a time, until the end logit is positive
or ``cap`` elements have been produced.

Task activation and loss follow the target's :class:`Task`:

- CLASS: logits -> softmax; soft-label cross-entropy against the target's probabilities;
- COUNT: the link predicts the count standardised by the training mean and std, MSE loss;
  the output is ``max(z * std + mean, 0)``;
- BOXES: sigmoid on the 5 element values, L1 on valid elements (padded positions masked) plus
  BCE on the end marker at every step up to and including the end.

Every link exposes its *pre-activation* output (``preact`` for vectors, ``start``/``step`` for
sequences), which is what ensembles combine.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mlink.links.encode import SEQ_CAP, Batch, present
from mlink.links.infer import DecoderBank, NpDecoder, NpMLP, NpSeqEncoder, greedy_decode_np
from mlink.models.spec import OutputSpec, Task

Encoded = tuple[np.ndarray, np.ndarray, np.ndarray]  # a sequence encoder's states, last state, mask

ELEM_WEIGHT = 5.0  # weight of the element L1 against the end-marker BCE in sequence losses
COUNT_STD_FLOOR = 0.25


def hidden_width(out_dim: int, min_hidden: int = 16, max_hidden: int = 256) -> int:
    """The paper's ``2 * out``, clamped to ``[min_hidden, max_hidden]``."""
    return int(min(max(2 * out_dim, min_hidden), max_hidden))


def default_dropout(target: OutputSpec) -> float:
    """0.5 (the paper's) for class targets; 0.1 for counts and sequences, which need precise values."""
    return 0.5 if target.task is Task.CLASS else 0.1


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float = 0.5) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Dropout(dropout), nn.ReLU(), nn.Linear(hidden, out_dim))


# -- heads ------------------------------------------------------------------------------------
class VectorHead(nn.Module):
    """Activation, loss and target scaling of a vector target (count or class)."""

    mean: torch.Tensor  # buffers (registered in __init__)
    std: torch.Tensor

    def __init__(self, spec: OutputSpec) -> None:
        super().__init__()
        self.task = spec.task
        self.register_buffer("mean", torch.zeros(spec.dim))
        self.register_buffer("std", torch.ones(spec.dim))
        self._np: tuple[np.ndarray, np.ndarray] | None = None

    def fit(self, y: torch.Tensor) -> None:
        """Set count scaling from raw training targets (no-op for classes)."""
        if self.task is Task.COUNT and len(y):
            self.mean.copy_(y.mean(0))
            self.std.copy_(y.std(0, unbiased=False).clamp_min(COUNT_STD_FLOOR))
        self._np = None

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)
        self._np = None

    def scale(self, y: torch.Tensor) -> torch.Tensor:
        """Raw targets -> what the pre-activation output is trained towards."""
        return (y - self.mean) / self.std if self.task is Task.COUNT else y

    def loss(self, z: torch.Tensor, y_scaled: torch.Tensor) -> torch.Tensor:
        if self.task is Task.COUNT:
            return F.mse_loss(z, y_scaled)
        return -(y_scaled * F.log_softmax(z, dim=-1)).sum(-1).mean()

    def activate(self, z: np.ndarray) -> np.ndarray:
        """Pre-activation (..., d) -> output in the target's format (numpy, float32)."""
        if self.task is Task.COUNT:
            if self._np is None:
                self._np = (self.mean.numpy().copy(), self.std.numpy().copy())
            mean, std = self._np
            return np.maximum(z * std + mean, 0.0).astype(np.float32)
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def seq_loss(elem: torch.Tensor, stop: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Teacher-forced sequence loss: ``elem`` (N, T, d) and ``stop`` (N, T) logits, T = y's L + 1."""
    steps = torch.arange(stop.shape[1])[None, :]
    stop_mask = steps <= lengths[:, None]
    stop_target = (steps == lengths[:, None]).to(stop.dtype)
    loss = F.binary_cross_entropy_with_logits(stop[stop_mask], stop_target[stop_mask])
    elem_mask = steps[:, :-1] < lengths[:, None]
    if bool(elem_mask.any()):
        err = (torch.sigmoid(elem[:, :-1]) - y).abs().mean(-1)
        loss = loss + ELEM_WEIGHT * err[elem_mask].mean()
    return loss


# -- building blocks --------------------------------------------------------------------------
class SeqEncoder(nn.Module):
    """Embedded elements behind a learned start element, through a GRU (packed, so padding is ignored)."""

    def __init__(self, dim: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, embed)
        self.start = nn.Parameter(torch.randn(embed) * 0.1)
        self.gru = nn.GRU(embed, hidden, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> per-step states (N, L+1, H), final state (N, H), mask of real steps (N, L+1)."""
        n = x.shape[0]
        e = torch.cat([self.start.expand(n, 1, -1), torch.relu(self.embed(x))], dim=1)
        lens = lengths + 1
        if n == 1:  # one frame: no padding to skip, no packing overhead
            steps = int(lens[0])
            out, h = self.gru(e[:, :steps])
            return out, h[0], torch.ones((1, steps), dtype=torch.bool)
        packed = pack_padded_sequence(e, lens.cpu(), batch_first=True, enforce_sorted=False)
        out, h = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=e.shape[1])
        mask = torch.arange(e.shape[1])[None, :] < lens[:, None]
        return out, h[0], mask


class AttnDecoder(nn.Module):
    """GRU decoder with additive attention; emits element logits and an end-of-sequence logit."""

    def __init__(self, dim: int, mem_dim: int, embed: int, hidden: int, attn: int = 64) -> None:
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(dim, embed)
        self.start = nn.Parameter(torch.randn(embed) * 0.1)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.query = nn.Linear(hidden, attn)
        self.key = nn.Linear(mem_dim, attn, bias=False)
        self.score = nn.Linear(attn, 1, bias=False)
        self.out = nn.Linear(hidden + mem_dim, dim + 1)

    def _attend(self, h: torch.Tensor, mem: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = self.score(torch.tanh(self.query(h)[:, :, None, :] + keys[:, None, :, :])).squeeze(-1)  # N, T, M
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
        return torch.softmax(s, dim=-1) @ mem  # N, T, mem_dim

    def _emit(self, out: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.out(torch.cat([out, ctx], dim=-1))
        return o[..., : self.dim], o[..., self.dim]

    def teacher(
        self, mem: torch.Tensor, mask: torch.Tensor, h0: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: inputs are the start element then ``y``; (N, L+1, d), (N, L+1) logits."""
        n = y.shape[0]
        inp = torch.cat([self.start.expand(n, 1, -1), torch.relu(self.embed(y))], dim=1)
        out, _ = self.gru(inp, h0[None].contiguous())
        return self._emit(out, self._attend(out, mem, self.key(mem), mask))

    def begin(self, mem: torch.Tensor, mask: torch.Tensor, h0: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mem": mem, "mask": mask, "keys": self.key(mem), "h": h0[None].contiguous()}

    def step(
        self, state: dict[str, torch.Tensor], prev: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One greedy step from the previous emitted element (None at the start): (N, d), (N,) logits."""
        n = state["mem"].shape[0]
        inp = self.start.expand(n, 1, -1) if prev is None else torch.relu(self.embed(prev))[:, None, :]
        out, h = self.gru(inp, state["h"])
        elem, stop = self._emit(out, self._attend(out, state["mem"], state["keys"], state["mask"]))
        return elem[:, 0], stop[:, 0], {**state, "h": h}


# -- links ------------------------------------------------------------------------------------
class Link(nn.Module):
    """A learned map from one source node's output to one target node's output."""

    arch: ClassVar[str]
    decoder: AttnDecoder  # the links into sequence targets set it
    # False: the link has no decoder or pre-activation an ensemble can mix; it serves alone
    mixable: ClassVar[bool] = True
    restarts: ClassVar[int] = 1  # >1: trained from that many seeds, the lowest validation loss kept

    @property
    def uses_seq_lr(self) -> bool:
        """Whether it trains at ``TrainConfig.seq_lr`` (see train): links with a sequence end."""
        return self.source.kind == "sequence" or self.target.kind == "sequence"

    def early_stops(self) -> bool:
        """Whether its validation loss can stop training: not a decoder's teacher-forced one (see train)."""
        return self.target.kind == "vector"

    def __init__(
        self,
        source: OutputSpec,
        target: OutputSpec,
        *,
        cap: int = SEQ_CAP,
        embed: int = 32,
        hidden: int = 64,
        slots: int = 4,
        min_hidden: int = 16,
        max_hidden: int = 256,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.target = target
        self.hparams: dict[str, Any] = {
            "cap": cap,
            "embed": embed,
            "hidden": hidden,
            "slots": slots,
            "min_hidden": min_hidden,
            "max_hidden": max_hidden,
            "dropout": default_dropout(target) if dropout is None else float(dropout),
        }
        self.cap = int(min(cap, target.max_len)) if target.max_len else int(cap)
        self.head = VectorHead(target) if target.kind == "vector" else None
        self._np: SimpleNamespace | None = None

    # torch forward (training, fitting ensemble weights) ------------------------------------
    def preact(self, src: Batch) -> torch.Tensor:
        """Vector targets: the pre-activation output (N, d)."""
        raise NotImplementedError

    def memory(self, src: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sequence targets: decoder memory (N, M, D), its mask (N, M), initial state (N, H)."""
        raise NotImplementedError

    def teacher(self, src: Batch, y: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mem, mask, h0 = self.memory(src)
        return self.decoder.teacher(mem, mask, h0, y.x)

    def begin(self, src: Batch) -> dict[str, torch.Tensor]:
        return self.decoder.begin(*self.memory(src))

    def step(self, state: dict[str, torch.Tensor], prev: torch.Tensor | None):
        return self.decoder.step(state, prev)

    def loss(self, src: Batch, tgt: Batch) -> torch.Tensor:
        """Training loss on raw targets ``tgt`` (as :func:`encode_target` gives them)."""
        if self.head is not None:
            return self.head.loss(self.preact(src), self.head.scale(tgt.x))
        elem, stop = self.teacher(src, tgt)
        return seq_loss(elem, stop, tgt.x, tgt.seq_lengths)

    # numpy inference (see links/infer.py) ---------------------------------------------------
    def compile(self) -> None:
        """Set eval mode and rebuild the numpy inference weights; call after changing weights
        (training and loading do)."""
        self.eval()
        if self.head is not None:
            self.head._np = None
        self._np = self._compile_np()

    def _compile_np(self) -> SimpleNamespace:
        raise NotImplementedError

    def _compiled(self) -> SimpleNamespace:
        if self._np is None:
            self.compile()
        return self._np  # type: ignore[return-value]

    def preact_np(self, src: Batch, encoded: Encoded | None = None) -> np.ndarray:
        """Vector targets: the pre-activation output (N, d) in numpy.

        ``encoded``: for a sequence source, this link's encoder states over ``src`` when they
        were computed already (an :class:`EncoderBank` ran the encoders of every link that
        reads the same source at once); otherwise the link runs its own encoder."""
        raise NotImplementedError

    def _memory_np(
        self, c: SimpleNamespace, src: Batch, encoded: Encoded | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def memory_np(self, src: Batch, encoded: Encoded | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sequence targets: the decoder's memory, its mask and initial state, in numpy
        (``encoded`` as for :meth:`preact_np`)."""
        return self._memory_np(self._compiled(), src, encoded)

    def np_encoder(self) -> NpSeqEncoder | None:
        """The numpy sequence encoder of a sequence-source link (None for vector sources)."""
        return getattr(self._compiled(), "encoder", None) if self.source.kind == "sequence" else None

    def predict(self, src: Batch) -> list[np.ndarray]:
        """Outputs in the target's spec format, one per frame."""
        if self.head is not None:
            return list(self.head.activate(self.preact_np(src)))
        c = self._compiled()
        out = greedy_decode_np(c.bank, np.ones(1, np.float32), [self.memory_np(src)], self.cap)
        return [present(self.target, v) for v in out]


class Vec2Vec(Link):
    arch = "Vec2Vec"

    def __init__(self, source: OutputSpec, target: OutputSpec, **hp: Any) -> None:
        super().__init__(source, target, **hp)
        width = hidden_width(target.dim, self.hparams["min_hidden"], self.hparams["max_hidden"])
        self.mlp = mlp(source.dim, width, target.dim, self.hparams["dropout"])

    def preact(self, src: Batch) -> torch.Tensor:
        return self.mlp(src.x)

    def _compile_np(self) -> SimpleNamespace:
        return SimpleNamespace(mlp=NpMLP(self.mlp))

    def preact_np(self, src: Batch, encoded: Encoded | None = None) -> np.ndarray:
        return self._compiled().mlp(src.x.numpy())


class Seq2Vec(Link):
    arch = "Seq2Vec"

    def __init__(self, source: OutputSpec, target: OutputSpec, **hp: Any) -> None:
        super().__init__(source, target, **hp)
        hidden = self.hparams["hidden"]
        self.encoder = SeqEncoder(source.dim, self.hparams["embed"], hidden)
        width = hidden_width(target.dim, self.hparams["min_hidden"], self.hparams["max_hidden"])
        self.mlp = mlp(hidden + 1, width, target.dim, self.hparams["dropout"])

    def preact(self, src: Batch) -> torch.Tensor:
        _, final, _ = self.encoder(src.x, src.seq_lengths)
        feat = torch.cat([final, torch.log1p(src.seq_lengths.to(final.dtype))[:, None]], dim=1)
        return self.mlp(feat)

    def _compile_np(self) -> SimpleNamespace:
        return SimpleNamespace(encoder=NpSeqEncoder(self.encoder), mlp=NpMLP(self.mlp))

    def preact_np(self, src: Batch, encoded: Encoded | None = None) -> np.ndarray:
        c = self._compiled()
        lengths = src.seq_lengths.numpy()
        _, final, _ = encoded if encoded is not None else c.encoder(src.x.numpy(), lengths)
        feat = np.concatenate([final, np.log1p(lengths.astype(np.float32))[:, None]], axis=1)
        return c.mlp(feat)


class Vec2Seq(Link):
    arch = "Vec2Seq"

    def __init__(self, source: OutputSpec, target: OutputSpec, **hp: Any) -> None:
        super().__init__(source, target, **hp)
        hidden, slots = self.hparams["hidden"], self.hparams["slots"]
        self.encoder = nn.Sequential(
            nn.Linear(source.dim, 2 * hidden),
            nn.Dropout(self.hparams["dropout"]),
            nn.ReLU(),
            nn.Linear(2 * hidden, slots * hidden),
            nn.Tanh(),
        )
        self.decoder = AttnDecoder(target.dim, hidden, self.hparams["embed"], hidden)

    def memory(self, src: Batch):
        n = src.x.shape[0]
        mem = self.encoder(src.x).view(n, self.hparams["slots"], self.hparams["hidden"])
        return mem, torch.ones(mem.shape[:2], dtype=torch.bool), mem.mean(1)

    def _compile_np(self) -> SimpleNamespace:
        dec = NpDecoder(self.decoder)
        return SimpleNamespace(encoder=NpMLP(self.encoder[:4]), decoder=dec, bank=DecoderBank([dec]))

    def _memory_np(self, c: SimpleNamespace, src: Batch, encoded: Encoded | None):
        x = src.x.numpy()
        mem = np.tanh(c.encoder(x)).reshape(x.shape[0], self.hparams["slots"], self.hparams["hidden"])
        return mem, np.ones(mem.shape[:2], dtype=bool), mem.mean(axis=1)


class Seq2Seq(Link):
    """Memory = per-element encoder states *and* the elements themselves (as logits, zero for the
    start step): the decoder can then copy a source element through attention and one linear
    map, which is what box-to-box links mostly need."""

    arch = "Seq2Seq"

    def __init__(self, source: OutputSpec, target: OutputSpec, **hp: Any) -> None:
        super().__init__(source, target, **hp)
        hidden = self.hparams["hidden"]
        self.encoder = SeqEncoder(source.dim, self.hparams["embed"], hidden)
        self.decoder = AttnDecoder(target.dim, hidden + source.dim, self.hparams["embed"], hidden)

    def memory(self, src: Batch):
        out, final, mask = self.encoder(src.x, src.lengths)
        raw = torch.logit(src.x[:, : out.shape[1] - 1].clamp(1e-3, 1 - 1e-3))
        raw = torch.cat([raw.new_zeros((raw.shape[0], 1, raw.shape[2])), raw], dim=1)
        return torch.cat([out, raw], dim=-1), mask, final

    def _compile_np(self) -> SimpleNamespace:
        dec = NpDecoder(self.decoder)
        return SimpleNamespace(encoder=NpSeqEncoder(self.encoder), decoder=dec, bank=DecoderBank([dec]))

    def _memory_np(self, c: SimpleNamespace, src: Batch, encoded: Encoded | None):
        x = src.x.numpy()
        out, final, mask = encoded if encoded is not None else c.encoder(x, src.seq_lengths.numpy())
        p = np.clip(x[:, : out.shape[1] - 1], 1e-3, 1 - 1e-3)
        raw = np.log(p / (1 - p))
        raw = np.concatenate([np.zeros((raw.shape[0], 1, raw.shape[2]), np.float32), raw], axis=1).astype(np.float32)
        return np.concatenate([out, raw], axis=-1), mask, final


ARCHS: dict[tuple[str, str], type[Link]] = {
    ("vector", "vector"): Vec2Vec,
    ("sequence", "vector"): Seq2Vec,
    ("vector", "sequence"): Vec2Seq,
    ("sequence", "sequence"): Seq2Seq,
}
ARCH_BY_NAME: dict[str, type[Link]] = {cls.arch: cls for cls in ARCHS.values()}


def link_class(source: OutputSpec, target: OutputSpec) -> type[Link]:
    return ARCHS[(source.kind, target.kind)]


def make_link(source: OutputSpec, target: OutputSpec, seed: int | None = None, **hp: Any) -> Link:
    """The link architecture for (source kind, target kind), untrained; initialised from
    ``torch.manual_seed(seed)`` when a seed is given (else from torch's global generator)."""
    if seed is not None:
        torch.manual_seed(seed)
    return link_class(source, target)(source, target, **hp)


@torch.inference_mode()
def greedy_decode(parts: list[tuple[Link, float]], srcs: list[Batch], cap: int, dim: int) -> list[np.ndarray]:
    """Greedy decoding (torch reference; predictions use ``infer.greedy_decode_np``) of one
    sequence per frame from weighted sequence links run in lockstep.

    Each step sums ``weight * logits`` over the links (one link with weight 1.0 is that link
    alone, exactly), stops a frame when the combined end logit is positive, and feeds the
    combined element back to every link as its next input.
    """
    states = [link.begin(src) for (link, _), src in zip(parts, srcs)]
    n = len(srcs[0])
    out = torch.zeros((n, cap, dim))
    lengths = torch.full((n,), cap, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    prev: torch.Tensor | None = None
    for t in range(cap + 1):
        elem: torch.Tensor | float = 0.0
        stop: torch.Tensor | float = 0.0
        for i, ((link, w), state) in enumerate(zip(parts, states)):
            e, s, states[i] = link.step(state, prev)
            elem = elem + w * e
            stop = stop + w * s
        ends = (stop > 0) & ~done
        lengths[ends] = t
        done |= ends
        if t == cap or bool(done.all()):
            break
        prev = torch.sigmoid(elem)  # type: ignore[arg-type]
        out[:, t] = prev
    return [out[i, : int(lengths[i])].numpy().copy() for i in range(n)]
