"""Small ResNet-style models with a configurable norm layer, bundled for demos, tests and benchmarks.

``tiny_resnet`` (about 77k parameters) fits scikit-learn's 8x8 digits;
``resnet1d`` (BatchNorm1d, about 90k parameters) fits MNIST-1D's sequences of
40 values; ``resnet18`` follows the ResNet-18 layout of He et al. (2016) for
a model of realistic size. None ships weights: nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn as nn

from .errors import BNDoctorError

__all__ = [
    "BUNDLED_MODELS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "make_norm",
    "resnet1d",
    "resnet18",
    "resnet50",
    "tiny_resnet",
]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}

NormName = Literal["batch", "group", "layer", "instance", "none"]
NormSpec = NormName | Callable[[int], nn.Module]


def make_norm(norm: NormSpec, channels: int, dims: int = 2) -> nn.Module:
    """Build the norm layer for ``channels`` feature maps of ``dims`` spatial dimensions (1, 2 or 3).

    ``norm`` is ``"batch"`` (BatchNorm1d/2d/3d), ``"group"`` (GroupNorm with
    bndoctor's default group count), ``"layer"`` (GroupNorm with one group),
    ``"instance"`` (one channel per group), ``"none"`` (identity) or a callable
    ``channels -> module``.
    """
    from .remedies import default_num_groups

    if callable(norm):
        return norm(channels)
    if norm == "batch":
        return _BN[dims](channels)
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
    ``norm`` names the normalisation layer (see :func:`make_norm`); ``dims``
    the spatial dimensions (2: images, 1: sequences).
    """

    def __init__(self, in_channels: int, channels: int, stride: int, norm: NormSpec, dims: int = 2) -> None:
        super().__init__()
        bias = norm == "none"  # a conv bias before a norm layer is redundant
        conv = _CONV[dims]
        self.conv1 = conv(in_channels, channels, 3, stride, 1, bias=bias)
        self.bn1 = make_norm(norm, channels, dims)
        self.conv2 = conv(channels, channels, 3, 1, 1, bias=bias)
        self.bn2 = make_norm(norm, channels, dims)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                conv(in_channels, channels, 1, stride, bias=bias), make_norm(norm, channels, dims)
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
    conv, ``bottleneck=True`` for :class:`Bottleneck` blocks (ResNet-50),
    ``dims`` the spatial dimensions of the input (2: images ``(N, C, H, W)``,
    1: sequences ``(N, C, L)`` with Conv1d and BatchNorm1d).
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
        dims: int = 2,
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths) or not blocks:
            raise BNDoctorError(
                f"expected as many block counts as widths (got {len(blocks)} and {len(widths)})",
                hint="e.g. ResNet([2, 2], [16, 32])",
            )
        bias = norm == "none"
        if dims not in _CONV or (bottleneck and dims != 2):
            raise BNDoctorError(
                f"expected dims 1, 2 or 3 (bottleneck blocks: 2) (got dims={dims!r})", hint="dims=1 for sequences"
            )
        self.stem = nn.Sequential(
            _CONV[dims](in_channels, widths[0], 3, stem_stride, 1, bias=bias),
            make_norm(norm, widths[0], dims),
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
                    layers.append(BasicBlock(channels, width, stride, norm, dims))
                    channels = width
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = _POOL[dims](1)
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


def resnet1d(num_classes: int = 10, *, norm: NormSpec = "batch", in_channels: int = 1) -> ResNet:
    """A 1D ResNet for sequences ``(N, in_channels, L)`` (MNIST-1D: L = 40) with Conv1d and BatchNorm1d.

    Three stages of one basic block each (32, 64, 96 channels; stride 2 from
    the second), global average pooling, a linear head: about 81k parameters. ``num_classes``,
    ``in_channels`` and ``norm`` as :func:`tiny_resnet`.
    """
    return ResNet([1, 1, 1], [32, 64, 96], in_channels=in_channels, num_classes=num_classes, norm=norm, dims=1)


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
    "resnet1d": resnet1d,
    "resnet18": resnet18,
    "resnet50": resnet50,
}
