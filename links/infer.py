"""Inference of trained links in numpy.

Predictions run here, not through the torch modules: one frame's prediction is a few hundred
tiny operations (a GRU step over 64 units, an attention over a dozen boxes), and torch spends
5-10 us of dispatch per operation against ~1 us for numpy, and wakes its thread pool. The maths
is the torch modules' (same weights, eval mode: dropout is the identity), checked against them
in the tests; training, and fitting ensemble weights, stay in torch.

Every kernel takes batches: ``x`` (N, d) for vectors, ``x`` (N, L, d) with ``lengths`` (N,)
for sequences, so the same code serves one live frame (N = 1) and a held-out evaluation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from mlink.links.arch import AttnDecoder, SeqEncoder


def _np(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))


def sigmoid(x: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warnings for large |x|, same values as 1 / (1 + exp(-x))
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


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


class NpGRU:
    """A one-layer ``nn.GRU`` (gates r, z, n as torch orders them)."""

    def __init__(self, gru: nn.GRU) -> None:
        self.w_ih, self.b_ih = _np(gru.weight_ih_l0.T), _np(gru.bias_ih_l0)
        self.w_hh, self.b_hh = _np(gru.weight_hh_l0.T), _np(gru.bias_hh_l0)
        self.hidden = gru.hidden_size

    def input_gates(self, x: np.ndarray) -> np.ndarray:
        gi = x @ self.w_ih
        gi += self.b_ih
        return gi

    def step(self, gi: np.ndarray, h: np.ndarray) -> np.ndarray:
        H = self.hidden
        gh = h @ self.w_hh
        gh += self.b_hh
        rz = gi[:, : 2 * H] + gh[:, : 2 * H]  # r and z gates in one go
        np.multiply(rz, 0.5, out=rz)
        np.tanh(rz, out=rz)
        rz += 1.0
        rz *= 0.5
        n = gh[:, 2 * H :] * rz[:, :H]
        n += gi[:, 2 * H :]
        np.tanh(n, out=n)
        return n + rz[:, H:] * (h - n)

    def run(self, e: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run over (N, T, E) inputs, row i for ``steps[i]`` steps: per-step states (zero past the
        end) and each row's last state."""
        n, t_max, _ = e.shape
        gi = self.input_gates(e)
        h = np.zeros((n, self.hidden), dtype=np.float32)
        out = np.zeros((n, t_max, self.hidden), dtype=np.float32)
        if n == 1:
            for t in range(int(steps[0])):
                h = self.step(gi[:, t], h)
                out[:, t] = h
            return out, h
        for t in range(int(steps.max()) if n else 0):
            live = (t < steps)[:, None]
            h_new = self.step(gi[:, t], h)
            h = np.where(live, h_new, h)
            out[:, t] = np.where(live, h_new, 0.0)
        return out, h


class NpSeqEncoder:
    def __init__(self, enc: "SeqEncoder") -> None:
        self.we, self.be = _np(enc.embed.weight.T), _np(enc.embed.bias)
        self.start = _np(enc.start)
        self.gru = NpGRU(enc.gru)

    def __call__(self, x: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> per-step states (N, L+1, H), last states (N, H), mask of real steps (N, L+1)."""
        n = x.shape[0]
        steps = lengths + 1
        if n == 1:
            x = x[:, : int(lengths[0])]
        e = x @ self.we
        e += self.be
        np.maximum(e, 0.0, out=e)
        e = np.concatenate([np.broadcast_to(self.start, (n, 1, self.start.shape[0])), e], axis=1)
        out, h = self.gru.run(e, steps)
        mask = np.arange(e.shape[1])[None, :] < steps[:, None]
        return out, h, mask


class NpDecoder:
    def __init__(self, dec: "AttnDecoder") -> None:
        self.dim = dec.dim
        self.we, self.be = _np(dec.embed.weight.T), _np(dec.embed.bias)
        self.start = _np(dec.start)
        self.gru = NpGRU(dec.gru)
        self.wq, self.bq = _np(dec.query.weight.T), _np(dec.query.bias)
        self.wk = _np(dec.key.weight.T)
        self.v = _np(dec.score.weight[0])
        self.wo, self.bo = _np(dec.out.weight.T), _np(dec.out.bias)

    def begin(self, mem: np.ndarray, mask: np.ndarray, h0: np.ndarray) -> dict:
        return {"mem": mem, "keys": mem @ self.wk, "mask": mask, "h": h0}

    def step(self, state: dict, prev: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, dict]:
        mem = state["mem"]
        n = mem.shape[0]
        if prev is None:
            x = np.broadcast_to(self.start, (n, self.start.shape[0]))
        else:
            x = prev @ self.we
            x += self.be
            np.maximum(x, 0.0, out=x)
        h = self.gru.step(self.gru.input_gates(x), state["h"])
        q = h @ self.wq
        q += self.bq
        s = np.tanh(q[:, None, :] + state["keys"]) @ self.v  # (N, M)
        s = np.where(state["mask"], s, -np.inf)
        a = softmax(s, axis=1)
        ctx = np.einsum("nm,nmd->nd", a, mem)
        o = np.concatenate([h, ctx], axis=1) @ self.wo
        o += self.bo
        return o[:, : self.dim], o[:, self.dim], {**state, "h": h}


def greedy_decode_np(parts: list[tuple[object, float]], states: list[dict], n: int, cap: int, dim: int) -> list[np.ndarray]:
    """Greedy decoding in numpy of weighted sequence links in lockstep (see ``arch.greedy_decode``).

    ``parts`` are (link, weight) whose ``_np.decoder`` steps ``states``.
    """
    out = np.zeros((n, cap, dim), dtype=np.float32)
    lengths = np.full(n, cap, dtype=np.int64)
    done = np.zeros(n, dtype=bool)
    prev: np.ndarray | None = None
    for t in range(cap + 1):
        elem: np.ndarray | float = 0.0
        stop: np.ndarray | float = 0.0
        for i, (link, w) in enumerate(parts):
            e, s, states[i] = link._np.decoder.step(states[i], prev)  # type: ignore[attr-defined]
            elem = elem + w * e
            stop = stop + w * s
        ends = (stop > 0) & ~done  # type: ignore[operator]
        lengths[ends] = t
        done |= ends
        if t == cap or done.all():
            break
        prev = sigmoid(elem).astype(np.float32)  # type: ignore[arg-type]
        out[:, t] = prev
    return [out[i, : lengths[i]].copy() for i in range(n)]
