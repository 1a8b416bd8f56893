"""Table 4 harness, the MTL baseline: one shared pretrained backbone, a small head per task.

The paper's MTL shares a ResNet50 between three heads trained on the models' outputs. Here the
backbone is MobileNetV2's convolutional part (the zoo's ``mobilenet_v2`` weights, frozen,
globally pooled: :class:`mlink.bench.table4_data.Backbone`), computed once per frame, and the
heads train on the models' outputs on the training share only:

- count nodes: a regression MLP (1280 -> 64 -> 1, MSE on the count);
- class nodes: a linear layer trained with soft labels (cross-entropy against the model's
  probabilities), served as softmax probabilities;
- box nodes: no head. A box list cannot be read off a pooled feature vector by a small head;
  MTL serves the trivial output (the empty list, as the links' trivial predictor does), which is
  right exactly on frames where the model finds nothing. The count head of the same model is
  the "count-like summary" of its boxes.

Its cost is measured like a model's (backbone + heads, load + warm-up, in a child process:
:mod:`mlink.bench.table4_costs`), and it runs only under budgets it fits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mlink.links.ensemble import trivial_output
from mlink.models.spec import OutputSpec, Task

HIDDEN = 64


def head_specs(specs: Mapping[str, OutputSpec]) -> dict[str, dict[str, Any]]:
    """What the heads' shapes depend on (passed to the cost child)."""
    return {k: {"task": s.task.value, "dim": s.dim} for k, s in specs.items() if s.task is not Task.BOXES}


class Heads(nn.Module):
    mean: torch.Tensor  # buffers (registered in __init__)
    std: torch.Tensor
    count_scale: torch.Tensor

    def __init__(self, shapes: Mapping[str, Mapping[str, Any]], in_dim: int = 1280) -> None:
        super().__init__()
        self.shapes = {k: dict(v) for k, v in shapes.items()}
        self.names = list(self.shapes)
        mods: list[nn.Module] = []
        for k in self.names:
            if self.shapes[k]["task"] == Task.COUNT.value:
                mods.append(nn.Sequential(nn.Linear(in_dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1)))
            else:
                mods.append(nn.Linear(in_dim, int(self.shapes[k]["dim"])))
        self.heads = nn.ModuleList(mods)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.register_buffer("count_scale", torch.ones(len(self.names)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = (x - self.mean) / self.std
        return {k: h(z) for k, h in zip(self.names, self.heads)}

    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raw = self(x)
        out = {}
        for i, k in enumerate(self.names):
            if self.shapes[k]["task"] == Task.COUNT.value:
                out[k] = (raw[k] * self.count_scale[i]).clamp_min(0.0)
            else:
                out[k] = torch.softmax(raw[k], dim=-1)
        return out


class MTL:
    """Trained heads + the trivial outputs of the nodes without a head."""

    def __init__(
        self, specs: Mapping[str, OutputSpec], heads: Heads, trivial: Mapping[str, np.ndarray], fit: dict
    ) -> None:
        self.specs = dict(specs)
        self.heads = heads
        self.trivial = dict(trivial)
        self.fit = fit

    @classmethod
    def train(
        cls,
        specs: Mapping[str, OutputSpec],
        features: np.ndarray,
        targets: Mapping[str, Sequence[np.ndarray]],
        *,
        epochs: int = 300,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        seed: int = 0,
    ) -> MTL:
        torch.manual_seed(seed)
        shapes = head_specs(specs)
        heads = Heads(shapes, features.shape[1])
        x = torch.from_numpy(np.asarray(features, np.float32))
        heads.mean.copy_(x.mean(0))
        heads.std.copy_(x.std(0).clamp_min(1e-3))
        ys = {}
        for i, k in enumerate(heads.names):
            y = torch.from_numpy(np.stack([np.asarray(v, np.float32) for v in targets[k]]))
            if shapes[k]["task"] == Task.COUNT.value:
                scale = float(max(y.std().item(), 1.0))
                heads.count_scale[i] = scale
                y = y / scale
            ys[k] = y
        opt = torch.optim.Adam(heads.parameters(), lr=lr, weight_decay=weight_decay)
        loss_v = float("nan")
        for _ in range(max(1, epochs)):
            raw = heads(x)
            loss = x.new_zeros(())
            for k in heads.names:
                if shapes[k]["task"] == Task.COUNT.value:
                    loss = loss + nn.functional.mse_loss(raw[k], ys[k])
                else:
                    loss = loss - (ys[k] * torch.log_softmax(raw[k], dim=-1)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_v = float(loss.detach())
        heads.eval().requires_grad_(False)
        trivial = {k: trivial_output(s, list(targets[k])) for k, s in specs.items() if k not in shapes}
        return cls(specs, heads, trivial, {"epochs": epochs, "final_loss": loss_v, "n_train": len(x)})

    def predict(self, features: np.ndarray) -> dict[str, list[np.ndarray]]:
        with torch.inference_mode():
            out = self.heads.outputs(torch.from_numpy(np.asarray(features, np.float32)))
        n = len(features)
        preds = {k: [v[i].numpy().astype(np.float32) for i in range(n)] for k, v in out.items()}
        for k, t in self.trivial.items():
            preds[k] = [t.copy() for _ in range(n)]
        return preds

    def head_ms(self, features: np.ndarray, repeats: int = 20) -> float:
        """Median time of the heads on one frame (ms)."""
        import time

        x = torch.from_numpy(np.asarray(features[:1], np.float32))
        times = []
        with torch.inference_mode():
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.heads.outputs(x)
                times.append(time.perf_counter() - t0)
        return 1000 * float(np.median(times))
