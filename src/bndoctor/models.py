"""Small ResNet-style models with a configurable norm layer, bundled for demos, tests and benchmarks.

``tiny_resnet`` (about 77k parameters) fits scikit-learn's 8x8 digits;
``resnet18`` follows the ResNet-18 layout of He et al. (2016) for a model of
realistic size. Neither ships weights: nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn as nn

from .errors import BNDoctorError

__all__ = ["BUNDLED_MODELS", "BasicBlock", "Bottleneck", "ResNet", "make_norm", "resnet18", "resnet50", "tiny_resnet"]

NormName = Literal["batch", "group", "layer", "instance", "none"]
NormSpec = NormName | Callable[[int], nn.Module]


def make_norm(norm: NormSpec, channels: int) -> nn.Module:
    """Build the norm layer for ``channels`` feature maps.

    ``norm`` is ``"batch"`` (BatchNorm2d), ``"group"`` (GroupNorm with
    bndoctor's default group count), ``"layer"`` (GroupNorm with one group),
    ``"instance"`` (one channel per group), ``"none"`` (identity) or a callable
    ``channels -> module``.
    """
    from .remedies import default_num_groups

    if callable(norm):
        return norm(channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(default_num_groups(channels), channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    if norm == "instance":
        return nn.GroupNorm(channels, channels)
    if norm == "none":
        return nn.Identity()
    raise BNDoctorError(
        f"expected norm to be 'batch', 'group', 'layer', 'instance', 'none' or a callable (got {norm!r})",
        hint="e.g. tiny_resnet(norm='group')",
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016).

    ``in_channels`` in, ``channels`` out, the first conv with ``stride``;
    ``norm`` names the normalisation layer (see :func:`make_norm`).
    """

    def __init__(self, in_channels: int, channels: int, stride: int, norm: NormSpec) -> None:
        super().__init__()
        bias = norm == "none"  # a conv bias before a norm layer is redundant
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=bias)
        self.bn1 = make_norm(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=bias)
        self.bn2 = make_norm(norm, channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=bias), make_norm(norm, channels)
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (He et al. 2016, ResNet-50 and up).

    ``in_channels`` in, ``channels`` inside, ``4 * channels`` out; the 3x3
    conv has ``stride``; ``norm`` as :class:`BasicBlock`.
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, norm: NormSpec) -> None:
        super().__init__()
        bias = norm == "none"
        out = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=bias)
        self.bn1 = make_norm(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=bias)
        self.bn2 = make_norm(norm, channels)
        self.conv3 = nn.Conv2d(channels, out, 1, bias=bias)
        self.bn3 = make_norm(norm, out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride, bias=bias), make_norm(norm, out))
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class ResNet(nn.Module):
    """A ResNet of BasicBlocks: stem, stages of ``blocks[i]`` blocks of ``widths[i]`` channels, head.

    ``in_channels`` of the input, ``num_classes`` outputs, ``norm`` for every
    normalisation layer (see :func:`make_norm`), ``stem_stride`` of the first
    conv, ``bottleneck=True`` for :class:`Bottleneck` blocks (ResNet-50).
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        norm: NormSpec = "batch",
        stem_stride: int = 1,
        bottleneck: bool = False,
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths) or not blocks:
            raise BNDoctorError(
                f"expected as many block counts as widths (got {len(blocks)} and {len(widths)})",
                hint="e.g. ResNet([2, 2], [16, 32])",
            )
        bias = norm == "none"
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=bias),
            make_norm(norm, widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        channels = widths[0]
        for index, (count, width) in enumerate(zip(blocks, widths)):
            layers = []
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                if bottleneck:
                    layers.append(Bottleneck(channels, width, stride, norm))
                    channels = width * Bottleneck.expansion
                else:
                    layers.append(BasicBlock(channels, width, stride, norm))
                    channels = width
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_resnet(num_classes: int = 10, *, norm: NormSpec = "batch", in_channels: int = 1) -> ResNet:
    """About 77k parameters; input ``(N, 1, 8, 8)`` (scikit-learn digits).

    ``num_classes`` outputs, ``in_channels`` of the input, ``norm`` for every
    normalisation layer (see :func:`make_norm`).
    """
    return ResNet([1, 1, 1], [16, 32, 64], in_channels=in_channels, num_classes=num_classes, norm=norm)


def resnet18(num_classes: int = 1000, *, norm: NormSpec = "batch", in_channels: int = 3) -> ResNet:
    """ResNet-18's layout (11.7M parameters with 1000 classes); input ``(N, 3, H, W)``.

    ``num_classes``, ``in_channels`` and ``norm`` as :func:`tiny_resnet`.
    """
    return ResNet(
        [2, 2, 2, 2],
        [64, 128, 256, 512],
        in_channels=in_channels,
        num_classes=num_classes,
        norm=norm,
        stem_stride=2,
    )


def resnet50(num_classes: int = 1000, *, norm: NormSpec = "batch", in_channels: int = 3) -> ResNet:
    """ResNet-50's layout (25.6M parameters with 1000 classes, bottleneck blocks); input ``(N, 3, H, W)``.

    ``num_classes``, ``in_channels`` and ``norm`` as :func:`tiny_resnet`.
    """
    return ResNet(
        [3, 4, 6, 3],
        [64, 128, 256, 512],
        in_channels=in_channels,
        num_classes=num_classes,
        norm=norm,
        stem_stride=2,
        bottleneck=True,
    )


#: Names accepted by ``bndoctor inspect MODEL``.
BUNDLED_MODELS: dict[str, Callable[[], nn.Module]] = {
    "tiny-resnet": tiny_resnet,
    "resnet18": resnet18,
    "resnet50": resnet50,
}
