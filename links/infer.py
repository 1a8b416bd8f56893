"""Inference of trained links in numpy.

Predictions run here, not through the torch modules: one frame's prediction is a few hundred
tiny operations (a GRU step over 64 units, an attention over a dozen boxes), and torch spends
5-10 us of dispatch per operation against ~1 us for numpy, and wakes its thread pool. The maths
is the torch modules' (same weights, eval mode: dropout is the identity), checked against them
in the tests; training, and fitting ensemble weights, stay in torch.

Every kernel takes batches: ``x`` (N, d) for vectors, ``x`` (N, L, d) with ``lengths`` (N,)
for sequences, so the same code serves one live frame (N = 1) and a held-out evaluation.

The kernels read a torch module's weights through the small protocols below, so this module
imports nothing of ``arch``, which builds on it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn


class SeqEncoderWeights(Protocol):
    """What :class:`NpSeqEncoder` reads of a torch sequence encoder (``arch.SeqEncoder``)."""

    @property
    def embed(self) -> nn.Linear: ...
    @property
    def start(self) -> torch.Tensor: ...
    @property
    def gru(self) -> nn.GRU: ...


class AttnDecoderWeights(SeqEncoderWeights, Protocol):
    """What :class:`NpDecoder` reads of a torch attention decoder (``arch.AttnDecoder``)."""

    @property
    def dim(self) -> int: ...
    @property
    def query(self) -> nn.Linear: ...
    @property
    def key(self) -> nn.Linear: ...
    @property
    def score(self) -> nn.Linear: ...
    @property
    def out(self) -> nn.Linear: ...


def _np(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))


def sigmoid(x: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warnings for large |x|, same values as 1 / (1 + exp(-x))
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class NpMLP:
    """``Linear -> Dropout -> ReLU -> Linear`` (dropout is the identity at inference)."""

    def __init__(self, seq: nn.Sequential) -> None:
        first, last = seq[0], seq[3]
        self.w1, self.b1 = _np(first.weight.T), _np(first.bias)
        self.w2, self.b2 = _np(last.weight.T), _np(last.bias)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h = x @ self.w1
        h += self.b1
        np.maximum(h, 0.0, out=h)
        z = h @ self.w2
        z += self.b2
        return z


class StackedGRU:
    """K one-layer GRUs of the same sizes, weights stacked along a leading K axis, stepped as one.

    Gates r, z, n in torch's order. The banks below hold one: every decoder (or encoder) of a
    bank advances with a few batched numpy calls instead of a few per GRU.
    """

    def __init__(self, grus: list[NpGRU]) -> None:
        self.hidden = grus[0].hidden
        self.w_ih = np.stack([g.w_ih for g in grus])  # (K, E, 3H)
        self.b_ih = np.stack([g.b_ih for g in grus])[:, None, :]  # (K, 1, 3H)
        self.w_hh = np.stack([g.w_hh for g in grus])  # (K, H, 3H)
        self.b_hh = np.stack([g.b_hh for g in grus])[:, None, :]

    def step(self, gi: np.ndarray, h: np.ndarray) -> np.ndarray:
        """New states (K, N, H) from input-gate pre-activations ``gi`` (K, N, 3H), biases
        included, and states ``h`` (K, N, H)."""
        H = self.hidden
        gh = h @ self.w_hh
        gh += self.b_hh
        rz = gi[..., : 2 * H] + gh[..., : 2 * H]  # r and z gates in one go
        np.multiply(rz, 0.5, out=rz)
        np.tanh(rz, out=rz)  # sigmoid(x) = (1 + tanh(x / 2)) / 2
        rz += 1.0
        rz *= 0.5
        n = gh[..., 2 * H :] * rz[..., :H]
        n += gi[..., 2 * H :]
        np.tanh(n, out=n)
        return n + rz[..., H:] * (h - n)


class NpGRU:
    """A one-layer ``nn.GRU``'s weights (gates r, z, n as torch orders them)."""

    def __init__(self, gru: nn.GRU) -> None:
        self.w_ih, self.b_ih = _np(gru.weight_ih_l0.T), _np(gru.bias_ih_l0)
        self.w_hh, self.b_hh = _np(gru.weight_hh_l0.T), _np(gru.bias_hh_l0)
        self.hidden = gru.hidden_size


class NpSeqEncoder:
    """One sequence encoder's weights in numpy; runs as an :class:`EncoderBank` of one."""

    def __init__(self, enc: SeqEncoderWeights) -> None:
        self.we, self.be = _np(enc.embed.weight.T), _np(enc.embed.bias)
        self.start = _np(enc.start)
        self.gru = NpGRU(enc.gru)
        self._bank: EncoderBank | None = None

    def __call__(self, x: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> per-step states (N, L+1, H), last states (N, H), mask of real steps (N, L+1)."""
        if self._bank is None:
            self._bank = EncoderBank([self])
        out, h, mask = self._bank(x, lengths)
        return out[0], h[0], mask


class EncoderBank:
    """K sequence encoders over the same source sequences, run as one.

    Several links read the same box sequence (one per target that a detector's boxes predict);
    each would run its own GRU over it, a dozen numpy calls per element. Stacked along a leading
    K axis (one embedding matmul for all, batched recurrent matmuls) they cost about what one
    does. Encoders of one bank share the embedding and hidden sizes (one training config).
    """

    def __init__(self, encoders: list[NpSeqEncoder]) -> None:
        first = encoders[0]
        self.k = len(encoders)
        self.hidden = first.gru.hidden
        self.embed = first.we.shape[1]
        if any(e.gru.hidden != self.hidden or e.we.shape != first.we.shape for e in encoders):
            raise ValueError("encoders of one bank need the same input, embedding and hidden sizes")
        self.we = np.concatenate([e.we for e in encoders], axis=1)  # (d, K*E)
        self.be = np.concatenate([e.be for e in encoders])
        self.start = np.stack([e.start for e in encoders])[:, None, None, :]  # (K, 1, 1, E)
        self.gru = StackedGRU([e.gru for e in encoders])

    def __call__(self, x: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, L, d) inputs with (N,) lengths -> per-step states (K, N, L+1, H) (zero past each
        row's end), last states (K, N, H), mask of real steps (N, L+1)."""
        n = x.shape[0]
        steps = lengths + 1
        if n == 1:
            x = x[:, : int(lengths[0])]
        k, E, H = self.k, self.embed, self.hidden
        L = x.shape[1]
        e = x @ self.we
        e += self.be
        np.maximum(e, 0.0, out=e)
        e = e.reshape(n, L, k, E).transpose(2, 0, 1, 3)  # (K, N, L, E)
        e = np.concatenate([np.broadcast_to(self.start, (k, n, 1, E)), e], axis=2)
        T = L + 1
        gi = (e.reshape(k, n * T, E) @ self.gru.w_ih).reshape(k, n, T, 3 * H)
        gi += self.gru.b_ih[:, :, None, :]
        h = np.zeros((k, n, H), dtype=np.float32)
        out = np.zeros((k, n, T, H), dtype=np.float32)
        if n == 1:
            for t in range(T):
                h = self.gru.step(gi[:, :, t], h)
                out[:, :, t] = h
        else:
            for t in range(int(steps.max()) if n else 0):
                live = (t < steps)[None, :, None]
                h_new = self.gru.step(gi[:, :, t], h)
                h = np.where(live, h_new, h)
                out[:, :, t] = np.where(live, h_new, 0.0)
        mask = np.arange(T)[None, :] < steps[:, None]
        return out, h, mask


class NpDecoder:
    """One attention decoder's weights in numpy (stepped through a :class:`DecoderBank`)."""

    def __init__(self, dec: AttnDecoderWeights) -> None:
        self.dim = dec.dim
        self.we, self.be = _np(dec.embed.weight.T), _np(dec.embed.bias)
        self.start = _np(dec.start)
        self.gru = NpGRU(dec.gru)
        self.wq, self.bq = _np(dec.query.weight.T), _np(dec.query.bias)
        self.wk = _np(dec.key.weight.T)
        self.v = _np(dec.score.weight[0])
        self.wo, self.bo = _np(dec.out.weight.T), _np(dec.out.bias)
        self.mem_dim = self.wk.shape[0]


class DecoderBank:
    """K attention decoders stepped as one, for an ensemble's links decoding in lockstep.

    Their weights are stacked along a leading K axis and every step is a handful of batched
    numpy operations for all K decoders, instead of K times as many small ones: a step of one
    decoder is ~25 numpy calls of a microsecond or two each, so a box ensemble over three links
    paid three times that per emitted box. Decoders of one ensemble share the embedding, hidden
    and attention sizes (one training config); their memories differ in length and width, so
    memories are zero-padded to the widest and longest, with padded slots masked out of the
    attention and zero rows in the output weights for padded memory columns: the result is the
    K decoders' own arithmetic (up to float summation order).
    """

    def __init__(self, decoders: list[NpDecoder]) -> None:
        first = decoders[0]
        self.k = len(decoders)
        self.dim = first.dim
        self.hidden = first.gru.hidden
        self.mem_dim = max(d.mem_dim for d in decoders)
        self.embed = first.we.shape[1]
        if any(
            d.dim != self.dim
            or d.gru.hidden != self.hidden
            or d.we.shape[1] != self.embed
            or d.wq.shape != first.wq.shape
            for d in decoders
        ):
            raise ValueError("decoders of one bank need the same element, embedding, hidden and attention sizes")
        H, D = self.hidden, self.mem_dim
        self.we = np.concatenate([d.we for d in decoders], axis=1)  # (dim, K*E): one matmul embeds for all
        self.be = np.concatenate([d.be for d in decoders])
        self.start = np.stack([d.start for d in decoders])[:, None, :]  # (K, 1, E)
        self.gru = StackedGRU([d.gru for d in decoders])
        self.wq = np.stack([d.wq for d in decoders])  # (K, H, A)
        self.bq = np.stack([d.bq for d in decoders])[:, None, :]
        self.wk = np.zeros((self.k, D, first.wk.shape[1]), np.float32)
        self.wo = np.zeros((self.k, H + D, self.dim + 1), np.float32)
        for i, d in enumerate(decoders):
            self.wk[i, : d.mem_dim] = d.wk
            self.wo[i, :H] = d.wo[:H]
            self.wo[i, H : H + d.mem_dim] = d.wo[H:]
        self.v = np.stack([d.v for d in decoders])[:, None, :, None]  # (K, 1, A, 1)
        self.bounded = bool(np.abs(self.v).sum(axis=2).max() < 60.0)
        self.bo = np.stack([d.bo for d in decoders])[:, None, :]

    def begin(self, memories: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
        """State from each decoder's (memory (N, M_k, D_k), mask (N, M_k), initial state (N, H))."""
        n = memories[0][0].shape[0]
        m_max = max(m.shape[1] for m, _, _ in memories)
        mem = np.zeros((self.k, n, m_max, self.mem_dim), np.float32)
        mask = np.zeros((self.k, n, m_max), bool)
        for i, (m, mk, _) in enumerate(memories):
            mem[i, :, : m.shape[1], : m.shape[2]] = m
            mask[i, :, : m.shape[1]] = mk
        keys = (mem.reshape(self.k, n * m_max, self.mem_dim) @ self.wk).reshape(self.k, n, m_max, -1)
        h = np.stack([h0 for _, _, h0 in memories]).astype(np.float32)  # (K, N, H)
        # Masked slots get -inf added to their scores: exp() makes them exactly 0 in the softmax.
        neg = np.where(mask, np.float32(0.0), np.float32(-np.inf))
        return {"mem": mem, "keys": keys, "neg": neg, "h": h}

    def step(self, state: dict, prev: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One step of all K decoders from the previous element (None at the start): element
        logits (K, N, dim) and end logits (K, N); ``state`` is advanced in place."""
        h = state["h"]
        n = h.shape[1]
        if prev is None:
            x = np.broadcast_to(self.start, (self.k, n, self.embed))
        else:
            x = prev @ self.we
            x += self.be
            np.maximum(x, 0.0, out=x)
            x = x.reshape(n, self.k, self.embed).transpose(1, 0, 2)
        gi = x @ self.gru.w_ih
        gi += self.gru.b_ih
        h = state["h"] = self.gru.step(gi, h)
        q = h @ self.wq
        q += self.bq
        s = (np.tanh(q[:, :, None, :] + state["keys"]) @ self.v)[..., 0]  # (K, N, M)
        s += state["neg"]
        # |score| <= sum |v| (tanh is bounded): below float32's exp range no max is subtracted.
        a = np.exp(s) if self.bounded else np.exp(s - s.max(axis=2, keepdims=True))
        a /= a.sum(axis=2, keepdims=True)
        ctx = (a[:, :, None, :] @ state["mem"])[:, :, 0, :]  # (K, N, D)
        o = np.concatenate([h, ctx], axis=2) @ self.wo
        o += self.bo
        return o[..., : self.dim], o[..., self.dim]


def greedy_decode_np(
    bank: DecoderBank, weights: np.ndarray, memories: list[tuple[np.ndarray, np.ndarray, np.ndarray]], cap: int
) -> list[np.ndarray]:
    """Greedy decoding in numpy of weighted sequence links in lockstep (see ``arch.greedy_decode``):
    ``bank`` holds the links' decoders, ``weights`` (K,) their weights, ``memories`` their
    decoder memories for the same N frames."""
    state = bank.begin(memories)
    n = memories[0][0].shape[0]
    out = np.zeros((n, cap, bank.dim), dtype=np.float32)
    lengths = np.full(n, cap, dtype=np.int64)
    done = np.zeros(n, dtype=bool)
    w = np.asarray(weights, dtype=np.float32)
    single = bank.k == 1 and w[0] == 1.0
    prev: np.ndarray | None = None
    for t in range(cap + 1):
        e, s = bank.step(state, prev)
        if single:  # one link: its own logits, exactly
            elem, stop = e[0], s[0]
        else:
            elem = np.tensordot(w, e, axes=1)
            stop = w @ s
        ends = (stop > 0) & ~done
        lengths[ends] = t
        done |= ends
        if t == cap or done.all():
            break
        prev = sigmoid(elem).astype(np.float32)
        out[:, t] = prev
    return [out[i, : lengths[i]].copy() for i in range(n)]
