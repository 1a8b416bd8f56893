"""Table 4 harness, the DRLS baseline: a DQN that picks, frame by frame, which models to run.

DRLS (Yuan et al., ICDE 2020, the MLink authors' earlier scheduler) learns the value of running
each model given the outputs of those already run on the frame. Here, per frame, an episode:

- state: for every model, whether it ran on this frame and a small encoding of its outputs so
  far (a count as count/10; class probabilities as top-1 probability and normalised entropy;
  boxes as their number/10 and mean score), plus the memory in use (as a share of all the
  models' costs, so that one policy serves every budget with the same feasible sets);
- actions: run one more model, or END. A model may run only if it fits the budget *together
  with the models already run on this frame* (they are resident at once: no per-frame swapping,
  which would cost a load per model per frame); models that did not run have no output;
- reward for running a model: the accuracy its new outputs add to the frame's mean over models
  (1/|F| times the mean of its nodes' accuracies against the oracle, which is 1 for an executed
  model), minus ``time_penalty`` x its latency / the slowest model's latency; END: 0;
- Q-learning with a small MLP (state -> 64 -> 64 -> actions), experience replay, a target
  network, epsilon-greedy exploration over the valid actions, on frames of the training share;
  served greedily on the evaluation stream.

With outputs of unexecuted models counted as missing, no state can make a model's output worth
more or less than another's, so the learnt policy is close to a fixed choice: the most models
that fit at once, fastest first. That is the honest result under a memory budget held at once;
the paper's DRLS figures (45.7% at 5 GB at 58.7 ms, about 1.4 models a frame) imply that its
DRLS ran models one after another within a frame, i.e. beyond what fits at once.

Model swaps: whenever a frame's chosen set is not all resident, the missing models are loaded
(models of the set that are held stay; others are unloaded, oldest first, only as far as needed
to make room: :meth:`~mlink.bench.table4_methods.Residency.load`), and each load is charged at
its measured load time, spread over the evaluation frames. No expected accuracy: the DQN's
values are rewards with a time penalty, not an accuracy (``expected_accuracy`` is None).
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mlink.bench.table4_costs import fitting_sets
from mlink.bench.table4_methods import Context, Residency, result
from mlink.models.spec import Task


def output_code(ctx: Context) -> tuple[np.ndarray, dict[str, slice]]:
    """(per position, per model: its output encoding), and each model's slice in a state."""
    n = len(ctx.oracle.tuples)
    parts: list[np.ndarray] = []
    slices: dict[str, slice] = {}
    off = 1  # budget share first
    for m in ctx.models:
        cols = [np.ones((n, 1), np.float32)]  # the "ran" flag, masked when it did not
        for k in ctx.oracle.nodes_of(m):
            spec = ctx.oracle.tuples.specs[k]
            vals = ctx.oracle.tuples.values[k]
            if spec.task is Task.COUNT:
                cols.append(np.array([[min(float(v[0]), 30.0) / 10.0] for v in vals], np.float32))
            elif spec.task is Task.CLASS:
                p = np.stack(vals).astype(np.float64).clip(1e-12, 1)
                ent = -(p * np.log(p)).sum(1) / math.log(p.shape[1])
                cols.append(np.stack([p.max(1), ent], 1).astype(np.float32))
            else:
                cols.append(
                    np.array(
                        [[min(len(v), 30) / 10.0, float(v[:, 4].mean()) if len(v) else 0.0] for v in vals], np.float32
                    )
                )
        block = np.concatenate(cols, 1)
        parts.append(block)
        slices[m] = slice(off, off + block.shape[1])
        off += block.shape[1]
    return np.concatenate(parts, 1), slices


class _Env:
    def __init__(
        self, ctx: Context, budget: float, code: np.ndarray, slices: Mapping[str, slice], penalty: float
    ) -> None:
        self.ctx = ctx
        self.models = ctx.models
        self.budget = budget
        self.code = code
        self.slices = slices
        self.dim = code.shape[1] + 1
        self.n_actions = len(self.models) + 1  # last: END
        slowest = max(ctx.latency.values()) or 1.0
        f = len(self.models)
        self.total_cost = sum(ctx.costs.values()) or 1.0
        self.reward = [1.0 / f - penalty * ctx.latency[m] / slowest for m in self.models]

    def state(self, p: int, ran: frozenset[str]) -> np.ndarray:
        s = np.zeros(self.dim, np.float32)
        s[0] = sum(self.ctx.costs[m] for m in ran) / self.total_cost
        for m in ran:
            sl = self.slices[m]
            s[sl] = self.code[p, sl.start - 1 : sl.stop - 1]
        return s

    def valid(self, ran: frozenset[str]) -> np.ndarray:
        used = sum(self.ctx.costs[m] for m in ran)
        mask = np.zeros(self.n_actions, bool)
        for i, m in enumerate(self.models):
            mask[i] = m not in ran and used + self.ctx.costs[m] <= self.budget + 1e-9
        mask[-1] = True
        return mask


class _QNet(nn.Module):
    def __init__(self, dim: int, n_actions: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_actions)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_dqn(
    env: _Env, positions: list[int], steps: int, seed: int = 0, gamma: float = 0.99, progress: bool = False
) -> tuple[_QNet, dict]:
    from tqdm import tqdm

    rng = random.Random(seed)
    torch.manual_seed(seed)
    q = _QNet(env.dim, env.n_actions)
    target = _QNet(env.dim, env.n_actions)
    target.load_state_dict(q.state_dict())
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    cap, batch = 5000, 64
    buf: deque[tuple] = deque(maxlen=cap)
    p = rng.choice(positions)
    ran: frozenset[str] = frozenset()
    losses = []
    returns, ep_return = [], 0.0
    for step in tqdm(range(steps), desc="DRLS DQN", unit="step", disable=not progress, leave=False):
        eps = max(0.05, 1.0 - step / max(1.0, 0.6 * steps))
        s = env.state(p, ran)
        mask = env.valid(ran)
        if rng.random() < eps:
            a = rng.choice([i for i in range(env.n_actions) if mask[i]])
        else:
            with torch.no_grad():
                qv = q(torch.from_numpy(s)[None])[0].numpy()
            a = int(np.argmax(np.where(mask, qv, -np.inf)))
        if a == env.n_actions - 1:
            r, done, ran2 = 0.0, True, ran
        else:
            m = env.models[a]
            r, ran2 = env.reward[a], ran | {m}
            done = not env.valid(ran2)[:-1].any()
        s2 = env.state(p, ran2)
        buf.append((s, a, r, s2, done, env.valid(ran2)))
        ep_return += r
        if done:
            returns.append(ep_return)
            ep_return = 0.0
            p = rng.choice(positions)
            ran = frozenset()
        else:
            ran = ran2
        if len(buf) >= batch:
            sample = rng.sample(buf, batch)
            S = torch.from_numpy(np.stack([b[0] for b in sample]))
            A = torch.tensor([b[1] for b in sample])
            R = torch.tensor([b[2] for b in sample], dtype=torch.float32)
            S2 = torch.from_numpy(np.stack([b[3] for b in sample]))
            D = torch.tensor([b[4] for b in sample], dtype=torch.float32)
            M2 = torch.from_numpy(np.stack([b[5] for b in sample]))
            with torch.no_grad():
                nxt = target(S2).masked_fill(~M2, -1e9).max(1).values
                y = R + gamma * (1.0 - D) * nxt
            pred = q(S).gather(1, A[:, None])[:, 0]
            loss = nn.functional.smooth_l1_loss(pred, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if step % 100 == 0:
            target.load_state_dict(q.state_dict())
    q.eval()
    tail = returns[-200:]
    return q, {
        "steps": steps,
        "final_loss": float(np.mean(losses[-100:])) if losses else None,
        "train_return": float(np.mean(tail)) if tail else None,
    }


def serve(env: _Env, q: _QNet, p: int) -> tuple[frozenset[str], int]:
    ran: frozenset[str] = frozenset()
    decisions = 0
    while True:
        mask = env.valid(ran)
        with torch.no_grad():
            qv = q(torch.from_numpy(env.state(p, ran))[None])[0].numpy()
        a = int(np.argmax(np.where(mask, qv, -np.inf)))
        decisions += 1
        if a == env.n_actions - 1:
            return ran, decisions
        ran = ran | {env.models[a]}


def drls(ctx: Context, budget: float, cache: dict) -> dict[str, Any]:
    steps = int(ctx.opt("dqn_steps", 4000))
    penalty = float(ctx.opt("drls_time_penalty", 0.1))
    key = frozenset(fitting_sets(ctx.costs, budget))
    if "code" not in cache:
        cache["code"] = output_code(ctx)
    code, slices = cache["code"]
    env = _Env(ctx, budget, code, slices, penalty)
    if key not in cache:
        cache[key] = train_dqn(env, ctx.protocol.train, steps, seed=int(ctx.opt("seed", 0)), progress=ctx.progress)
    q, fit = cache[key]
    ev = ctx.protocol.eval
    chosen: dict[int, frozenset[str]] = {}
    ms = np.zeros(len(ev))
    decisions = 0
    t0 = time.perf_counter()
    for i, p in enumerate(ev):
        ran, d = serve(env, q, p)
        chosen[p] = ran
        decisions += d
        ms[i] = sum(ctx.latency[m] for m in ran)
    decide_ms = 1000.0 * (time.perf_counter() - t0) / max(1, len(ev))
    res = Residency(ctx.costs, budget)
    for p in ev:
        for m in sorted(chosen[p]):
            res.load(m, protect=chosen[p])
    scored = ctx.protocol.scored
    preds: dict[str, list] = {}
    for m in ctx.models:
        for k in ctx.oracle.nodes_of(m):
            vals = ctx.oracle.tuples.values[k]
            preds[k] = [vals[p] if m in chosen[p] else None for p in scored]
    executions = sum(len(s) for s in chosen.values())
    memory = max((sum(ctx.costs[m] for m in s) for s in chosen.values()), default=0.0)
    counts: dict[str, int] = {}
    for s in chosen.values():
        k = "+".join(sorted(s)) or "(none)"
        counts[k] = counts.get(k, 0) + 1
    return result(
        ctx,
        "DRLS",
        budget,
        preds,
        float(ms.mean()) + decide_ms,
        executions,
        memory,
        memory_mode="at once",
        runs=executions > 0,
        residency=res,
        decision_ms=decide_ms,
        models_per_frame=executions / max(1, len(ev)),
        sets_served=dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        dqn=fit,
    )
