"""MobileNetV2 ImageNet-1k classifier (torchvision, the official IMAGENET1K_V1 weights).

Weights come from the asset store (``mobilenet_v2``: ``mobilenet_v2-b0353104.pth``), never
from torchvision's own downloader, so a site works offline with only the mirror.
Preprocessing is torchvision's for these weights: RGB, shorter side 256, centre crop 224,
ImageNet mean/std.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from mlink.models.registry import register
from mlink.models.zoo._torch import TorchImageNetClassifier, load_state_dict_file


@register
class MobileNetV2(TorchImageNetClassifier):
    name = "mobilenet_v2"
    assets = ("mobilenet_v2",)
    description = "MobileNetV2 (torchvision IMAGENET1K_V1), ImageNet-1k class probabilities; 224x224 centre crop"

    def _build(self, weights: Path) -> torch.nn.Module:
        module = torchvision.models.mobilenet_v2(weights=None)
        module.load_state_dict(load_state_dict_file(weights), strict=True)
        return module
