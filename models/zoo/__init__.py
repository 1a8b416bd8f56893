"""The zoo: every adapter module registers its models on import (see ``mlink.models.registry``).

Backends: ONNX Runtime (yolox_nano, centerface), OpenCV (hog_people), torch/torchvision
(mobilenet_v2, efficientnet_lite0, the torchvision COCO detectors and keypoint R-CNN).
"""

from mlink.models.zoo import (  # noqa: F401
    centerface,
    efficientnet_lite0,
    hog_people,
    mobilenet_v2,
    torchvision_detectors,
    yolox_nano,
)
