"""The classifier architectures the harness trains or loads checkpoints into.

Every architecture takes ``(in_channels, num_classes, image_size, **own_keyword_args)`` so the
harness can build any of them from a dataset's shape; configs reference them with
``_partial_: true``. Inputs are images in ``[0, 1]`` NCHW, outputs are logits. ``Normalize``
puts a checkpoint trained on standardised inputs behind the harness's ``[0, 1]`` images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.checks import positive_int
from common.errors import ConfigError


def _check_shape_args(in_channels: int, num_classes: int, image_size: int) -> None:
    """Validate the three dataset facts every architecture receives from the harness."""
    positive_int("in_channels", in_channels)
    positive_int("num_classes", num_classes)
    positive_int("image_size", image_size)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``, for checkpoints trained on normalised inputs.

    The harness always feeds images in ``[0, 1]``; a model trained on standardised inputs gets this
    module in front of it so that attacks and budgets stay in pixel space.

    Args:
        mean: One value per channel.
        std: One positive value per channel.

    Raises:
        ConfigError: If the lengths differ, are empty, or a std is not positive.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_values = [float(v) for v in mean]
        std_values = [float(v) for v in std]
        if not mean_values or len(mean_values) != len(std_values):
            raise ConfigError(
                f"mean={mean_values} and std={std_values} are invalid: expected two non-empty "
                "lists of the same length (one value per channel)"
            )
        if any(s <= 0 for s in std_values):
            raise ConfigError(f"std={std_values} is invalid: every value must be positive")
        # Non-persistent: the statistics come from the config, so they do not belong in (and must
        # not be expected from) any checkpoint.
        self.register_buffer("mean", torch.tensor(mean_values).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std_values).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Standardise ``x`` (N, C, H, W) channel-wise."""
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        """Show the statistics in ``print(model)``."""
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class SmallCNN(nn.Module):
    """Small two-conv CNN, the fast CPU workhorse of the harness.

    conv3x3(width) - ReLU - maxpool2 - conv3x3(2·width) - ReLU - maxpool2 - flatten -
    linear(hidden) - ReLU - linear(num_classes). It has the shape of the MNIST network of Madry et
    al., "Towards Deep Learning Models Resistant to Adversarial Attacks"
    (https://arxiv.org/abs/1706.06083), with 3x3 kernels and a smaller hidden layer so that it
    trains and is attacked quickly on a CPU. About 0.42 M parameters at 1x28x28 with the defaults.

    Args:
        in_channels: Image channels (1 or 3).
        num_classes: Number of logits.
        image_size: Side of the square input; at least 4 (8 for digits, 28, 32 all work).
        width: Channels of the first conv; the second has twice as many.
        hidden: Units of the hidden linear layer.

    Raises:
        ConfigError: If an argument is not a positive integer or ``image_size < 4``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: int = 32,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        _check_shape_args(in_channels, num_classes, image_size)
        positive_int("width", width)
        positive_int("hidden", hidden)
        if image_size < 4:
            raise ConfigError(
                f"image_size={image_size} is invalid for SmallCNN: its two 2x2 max-pools need "
                "at least 4 pixels"
            )
        # Padding 1 keeps the size through each conv and each max-pool floors, so the side after
        # two pools is floor(floor(s / 2) / 2) == s // 4 for every s.
        side = image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map images in [0, 1] (N, C, H, W) to logits (N, num_classes)."""
        return self.classifier(self.features(x))


class _ResNetBasicBlock(nn.Module):
    """Standard (post-activation) ResNet basic block with a 1x1 projection shortcut when needed."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # An empty Sequential is the identity and adds no state_dict keys, which keeps the key
        # names identical to the widely used CIFAR ResNet (kuangliu/pytorch-cifar, RobustBench).
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (He et al., "Deep Residual Learning for Image Recognition").

    Paper: https://arxiv.org/abs/1512.03385. The CIFAR variant used throughout robustness work: a
    3x3 stem with stride 1 and no max-pool, four stages of two standard basic blocks with widths
    ``width·(1, 2, 4, 8)`` and strides (1, 2, 2, 2), global average pooling and a linear head.
    State-dict keys (``conv1``, ``bn1``, ``layer1.0.conv1`` …, ``linear``) match RobustBench's
    and kuangliu/pytorch-cifar's ResNet-18, so their checkpoints load with ``width=64``.

    Args:
        in_channels: Image channels.
        num_classes: Number of logits.
        image_size: Side of the square input. Only validated: global average pooling makes the
            network independent of the input size.
        width: Channels of the first stage (64 in the paper).

    Raises:
        ConfigError: If an argument is not a positive integer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: int = 64,
    ) -> None:
        super().__init__()
        _check_shape_args(in_channels, num_classes, image_size)
        positive_int("width", width)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes = [width, 2 * width, 4 * width, 8 * width]
        self.layer1 = self._make_stage(width, planes[0], stride=1)
        self.layer2 = self._make_stage(planes[0], planes[1], stride=2)
        self.layer3 = self._make_stage(planes[1], planes[2], stride=2)
        self.layer4 = self._make_stage(planes[2], planes[3], stride=2)
        self.linear = nn.Linear(planes[3], num_classes)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            _ResNetBasicBlock(in_planes, planes, stride), _ResNetBasicBlock(planes, planes, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map images in [0, 1] (N, C, H, W) to logits (N, num_classes)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Adaptive pooling instead of the usual avg_pool2d(4): identical at 32x32, and it also
        # works at 8x8 and 28x28.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class _WideBasicBlock(nn.Module):
    """Pre-activation wide basic block (BN-ReLU-conv-BN-ReLU-dropout-conv) as in TRADES."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes and stride == 1
        # Named `convShortcut` (not snake case) so that TRADES / RobustBench WRN checkpoints load
        # without renaming keys.
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # When the shape changes, the projection shortcut reads the pre-activated input, as in
        # the reference implementation.
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class _WideStage(nn.Module):
    """A stage of ``n`` wide blocks; the ``layer`` attribute matches TRADES' NetworkBlock."""

    def __init__(
        self, n: int, in_planes: int, out_planes: int, stride: int, dropout: float
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                _WideBasicBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    dropout,
                )
                for i in range(n)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """Wide residual network WRN-depth-k (Zagoruyko & Komodakis, "Wide Residual Networks").

    Paper: https://arxiv.org/abs/1605.07146. The variant used in robustness work (TRADES, Rice et
    al., RobustBench): a 3x3 stem with 16 channels, three stages of ``(depth - 4) / 6``
    pre-activation blocks with widths ``(16, 32, 64)·widen_factor`` and strides (1, 2, 2), a final
    BN-ReLU, global average pooling and a linear head. State-dict keys (``conv1``,
    ``block1.layer.0.bn1`` …, ``convShortcut``, ``bn1``, ``fc``) match TRADES' and RobustBench's
    WideResNet, so their plain WRN checkpoints load directly.

    Args:
        in_channels: Image channels.
        num_classes: Number of logits.
        image_size: Side of the square input. Only validated: global average pooling makes the
            network independent of the input size.
        depth: Total depth; must be ``6n + 4`` (10, 16, 22, 28, 34, 40, 70, …).
        widen_factor: Width multiplier k.
        dropout: Dropout probability between the two convs of each block, in ``[0, 1)``.

    Raises:
        ConfigError: If ``depth`` is not ``6n + 4`` with ``n >= 1``, ``dropout`` is outside
            ``[0, 1)``, or an integer argument is not positive.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_shape_args(in_channels, num_classes, image_size)
        positive_int("widen_factor", widen_factor)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 10 or (depth - 4) % 6:
            raise ConfigError(
                f"depth={depth!r} is invalid for WideResNet: expected 6n + 4 with n >= 1 "
                "(10, 16, 22, 28, 34, 40, 70, ...)"
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout={dropout!r} is invalid: expected a value in [0, 1)")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _WideStage(n, channels[0], channels[1], 1, float(dropout))
        self.block2 = _WideStage(n, channels[1], channels[2], 2, float(dropout))
        self.block3 = _WideStage(n, channels[2], channels[3], 2, float(dropout))
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        # The initialisation of the reference code: He-normal (fan-out) convs, BN at (1, 0),
        # zero linear bias.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map images in [0, 1] (N, C, H, W) to logits (N, num_classes)."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        # Adaptive pooling instead of the reference avg_pool2d(8): identical at 32x32, and it
        # also works at 8x8 and 28x28.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
