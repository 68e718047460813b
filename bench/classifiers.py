"""Classifiers the harness evaluates: architectures, checked checkpoint loading and sources.

The file has three parts, in this order:

1. **Architectures** (`SmallCNN`, `ResNet18`, `WideResNet`, plus `Normalize`). Every architecture
   takes ``(in_channels, num_classes, image_size, **own_keyword_args)`` so the runner can build any
   of them from a dataset's shape; configs reference them with ``_partial_: true``. Inputs are
   images in ``[0, 1]`` NCHW, outputs are logits.
2. **Checkpoint loading** (`load_state_dict_checked`): ``weights_only`` loading, wrapper and prefix
   handling, and one error that lists every mismatch instead of PyTorch's first-failure message.
3. **Classifier sources** (`ClassifierSource` and its implementations): cheap objects that Hydra
   instantiates from ``conf/classifier/*.yaml``; ``load(dataset, device)`` does the real work and
   ``describe()`` returns the facts that go into the run record.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import logging
import os
import pickle
import re
import sys
import types
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from bench.data import ImageDataset
    from bench.training import Recipe

logger = logging.getLogger(__name__)


def _require_positive_int(name: str, value: object) -> None:
    """Raise ConfigError unless ``value`` is a positive int (bools are rejected too)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is invalid: expected a positive integer")


def _require_shape_args(in_channels: int, num_classes: int, image_size: int) -> None:
    """Validate the three dataset facts every architecture receives from the runner."""
    _require_positive_int("in_channels", in_channels)
    _require_positive_int("num_classes", num_classes)
    _require_positive_int("image_size", image_size)


# ==================================================================================================
# 1. Architectures
# ==================================================================================================


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
        _require_shape_args(in_channels, num_classes, image_size)
        _require_positive_int("width", width)
        _require_positive_int("hidden", hidden)
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
        _require_shape_args(in_channels, num_classes, image_size)
        _require_positive_int("width", width)
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
        _require_shape_args(in_channels, num_classes, image_size)
        _require_positive_int("widen_factor", widen_factor)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
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


# ==================================================================================================
# 2. Checkpoint loading
# ==================================================================================================

# Keys under which training scripts commonly nest the state_dict; unwrapped automatically only
# when exactly one of them is present, so that an ambiguous file is never guessed at.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# How many keys each section of a mismatch report lists before summarising the rest as a count.
_MAX_LISTED = 10


def _listing(items: Sequence[str], limit: int = _MAX_LISTED) -> str:
    """Join ``items`` with commas, listing at most ``limit`` and counting the rest."""
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... and {len(items) - limit} more"
    return shown


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _read_checkpoint(path: Path) -> object:
    """``torch.load`` with ``weights_only=True``; every failure becomes a CheckpointError."""
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path {path} is not a file")
    try:
        # weights_only=True: unpickling arbitrary objects can execute code, so a checkpoint may
        # hold only tensors and plain containers. Passing it explicitly also means the
        # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD environment variable cannot override it.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(path, e) from e
    except Exception as e:  # zip/EOF/runtime errors: the file is not a torch checkpoint at all
        raise CheckpointError(
            f"checkpoint file {path} is not a readable PyTorch checkpoint: {type(e).__name__}: {e}"
        ) from e


def _unpickling_error(path: Path | str, error: pickle.UnpicklingError) -> CheckpointError:
    """Turn torch's weights-only refusal (or another unpickling failure) into a CheckpointError."""
    message = str(error)
    detail_match = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    detail = detail_match.group(1).strip() if detail_match else message.splitlines()[0]
    # The weights-only unpickler reports both "this pickle asks for a Python object" and "these
    # bytes are not a pickle at all" (an unknown opcode); only the first is a refused object.
    if "weights only load failed" not in message.lower() or "Unsupported operand" in detail:
        return CheckpointError(
            f"checkpoint file {path} is not a readable PyTorch checkpoint: {detail}"
        )
    offending = re.search(r"GLOBAL (\S+)", detail)
    what = f" (first offending object: {offending.group(1)})" if offending else f" ({detail})"
    return CheckpointError(
        f"checkpoint file {path} contains pickled Python objects{what} and is refused: loading "
        "it would unpickle arbitrary objects, which can run code. Re-save only the weights, e.g. "
        "torch.save(model.state_dict(), path)"
    )


def _unwrap_state_dict(obj: object, path: Path, key: str | None) -> Mapping[str, Tensor]:
    """Return the state_dict inside a loaded checkpoint object, unwrapping a wrapper dict."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint file {path} holds a {type(obj).__name__}, not a state_dict "
            "(a dict of parameter name -> tensor)"
        )
    top_keys = [str(k) for k in obj]
    if key is not None:
        if key not in obj:
            raise CheckpointError(
                f"checkpoint file {path} has no entry {key!r} (asked for with key={key!r}); its "
                f"top-level keys are: {_listing(top_keys)}"
            )
        obj = obj[key]
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"checkpoint file {path}: entry {key!r} holds a {type(obj).__name__}, not a "
                "state_dict"
            )
    elif not all(isinstance(v, Tensor) for v in obj.values()):
        found = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if len(found) != 1:
            why = "none" if not found else f"several ({', '.join(found)})"
            raise CheckpointError(
                f"checkpoint file {path} is a dict with non-tensor values and {why} of the "
                f"wrapper keys {', '.join(_WRAPPER_KEYS)}; set key= to the entry that holds the "
                f"state_dict. Top-level keys: {_listing(top_keys)}"
            )
        logger.info("checkpoint %s: using the state_dict under the wrapper key %r", path, found[0])
        obj = obj[found[0]]
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"checkpoint file {path}: the state_dict has {len(not_tensors)} non-tensor "
            f"entries: {_listing(not_tensors)}"
        )
    return obj


def _strip_key_prefix(
    state_dict: Mapping[str, Tensor], prefix: str, path: Path
) -> OrderedDict[str, Tensor]:
    """Remove ``prefix`` from the keys that start with it (DataParallel's ``module.``)."""
    stripped: OrderedDict[str, Tensor] = OrderedDict()
    count = 0
    for name, value in state_dict.items():
        new_name = name
        if prefix and name.startswith(prefix):
            new_name = name[len(prefix) :]
            count += 1
        if new_name in stripped:
            raise CheckpointError(
                f"checkpoint file {path} has both {name!r} and {new_name!r}, which collide once "
                f"the prefix {prefix!r} is stripped"
            )
        stripped[new_name] = value
    if count:
        logger.info("checkpoint %s: stripped the prefix %r from %d keys", path, prefix, count)
    # torch keeps per-module version numbers in `_metadata`; BatchNorm and others use them to
    # upgrade old checkpoints, so carry them over under the renamed module paths.
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        module_prefix = prefix[:-1] if prefix.endswith(".") else prefix
        renamed = OrderedDict()
        for module_name, value in metadata.items():
            if prefix and module_name == module_prefix:
                module_name = ""
            elif prefix and module_name.startswith(prefix):
                module_name = module_name[len(prefix) :]
            renamed[module_name] = value
        stripped._metadata = renamed  # type: ignore[attr-defined]
    return stripped


def _mismatch_report(state_dict: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> list[str]:
    """List missing keys, unexpected keys and shape mismatches; empty when they fit."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {_shape(state_dict[k])} vs model {_shape(expected[k])}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    lines: list[str] = []
    if missing:
        lines.append(
            f"missing keys ({len(missing)}; in the model, not in the checkpoint): "
            f"{_listing(missing)}"
        )
    if unexpected:
        lines.append(
            f"unexpected keys ({len(unexpected)}; in the checkpoint, not in the model): "
            f"{_listing(unexpected)}"
        )
        # The commonest cause is a wrapper prefix other than `module.`; name it when stripping it
        # would make the unexpected keys fit.
        heads = {k.split(".", 1)[0] for k in unexpected}
        if len(heads) == 1 and all("." in k for k in unexpected):
            prefix = heads.pop() + "."
            if any(k[len(prefix) :] in expected for k in unexpected):
                lines.append(
                    f"hint: every unexpected key starts with {prefix!r}; "
                    f"try strip_prefix={prefix!r}"
                )
    if mismatched:
        lines.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
    return lines


def load_state_dict_checked(
    model: nn.Module,
    path: str | Path,
    *,
    key: str | None = None,
    strip_prefix: str = "module.",
) -> nn.Module:
    """Load a state_dict checkpoint into ``model``, refusing anything that does not fit exactly.

    The file is read with ``torch.load(..., weights_only=True)``: it may hold only tensors and
    plain containers, never arbitrary pickled objects. A wrapper dict is unwrapped (the entry
    ``key``, or, when ``key`` is None, the single one of ``state_dict`` / ``model_state_dict`` /
    ``model`` present), ``strip_prefix`` is removed from the keys that carry it, and the result is
    compared with ``model.state_dict()`` before ``load_state_dict(strict=True)``.

    Args:
        model: The freshly built architecture to load into (modified in place).
        path: The checkpoint file.
        key: Entry of a wrapper dict that holds the state_dict (e.g. ``"state_dict"``).
        strip_prefix: Key prefix to remove where present; ``""`` disables stripping.

    Returns:
        ``model``, with the checkpoint's weights.

    Raises:
        CheckpointError: If the file is missing, unreadable, contains pickled objects, holds no
            recognisable state_dict, or does not match the model. A mismatch raises one error that
            lists the missing keys, the unexpected keys and the shape mismatches
            (``name: checkpoint (a, b) vs model (c, d)``), each truncated with a count.
    """
    path = Path(path)
    state_dict = _unwrap_state_dict(_read_checkpoint(path), path, key)
    state_dict = _strip_key_prefix(state_dict, strip_prefix, path)
    problems = _mismatch_report(state_dict, model.state_dict())
    if problems:
        raise CheckpointError(
            f"checkpoint file {path} does not fit {type(model).__name__}:\n  "
            + "\n  ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)
    logger.info("loaded %d tensors from %s into %s", len(state_dict), path, type(model).__name__)
    return model


def _sha256(paths: Sequence[Path]) -> str:
    """SHA-256 of one file, or of the concatenated digests of several (ensembles), in order."""
    digests = []
    for path in paths:
        with path.open("rb") as f:
            digests.append(hashlib.file_digest(f, "sha256").hexdigest())
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


# ==================================================================================================
# 3. Classifier sources
# ==================================================================================================


@runtime_checkable
class ClassifierSource(Protocol):
    """Where the evaluated classifier comes from; what ``conf/classifier/*.yaml`` instantiates.

    Construction must be cheap (Hydra instantiates sources while composing a run); the work
    happens in `load`.
    """

    def load(self, dataset: ImageDataset, device: torch.device) -> nn.Module:
        """Build the classifier for ``dataset`` and return it ready for evaluation.

        Args:
            dataset: The evaluated dataset (its name, number of classes and image shape).
            device: Where the model must live.

        Returns:
            The model on ``device``, in ``eval()`` mode, with no parameter requiring grad. It maps
            images in [0, 1] (N, C, H, W) to logits (N, num_classes).
        """
        ...

    def describe(self) -> dict[str, Any]:
        """Return JSON-able facts for the run record (kind, checkpoint path, name, ...)."""
        ...


def prepare_for_evaluation(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device``, switch it to ``eval()`` and freeze its parameters.

    Attacks need gradients with respect to the input only; frozen parameters save the memory and
    time of parameter gradients, and ``eval()`` fixes BatchNorm statistics and disables dropout so
    the forward pass is deterministic.

    Args:
        model: The classifier.
        device: Target device.

    Returns:
        The same module, on ``device``.
    """
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model


def _square_side(dataset: ImageDataset) -> int:
    """Return H for a dataset of square images; the architectures take a single image_size."""
    _, height, width = dataset.shape
    if height != width:
        raise ConfigError(
            f"dataset {dataset.name!r} has images of shape {tuple(dataset.shape)}: the "
            "architectures take square images only (H == W)"
        )
    return int(height)


def _callable_name(fn: Callable[..., Any]) -> tuple[str, dict[str, Any]]:
    """Qualified name of a (possibly ``functools.partial``) callable and its bound kwargs."""
    kwargs: dict[str, Any] = {}
    if isinstance(fn, functools.partial):
        kwargs = {
            k: v if isinstance(v, str | int | float | bool | type(None)) else repr(v)
            for k, v in fn.keywords.items()
        }
        fn = fn.func
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', '?')}.{name}", kwargs


class CheckpointClassifier:
    """An external state_dict checkpoint loaded into one of the harness's architectures.

    Args:
        arch: Architecture factory, called as ``arch(in_channels=C, num_classes=K,
            image_size=H)``; in YAML a ``_partial_: true`` reference such as
            ``bench.classifiers.ResNet18`` (its own kwargs, e.g. ``width``, go in that block).
        path: The checkpoint file (a state_dict, possibly wrapped).
        key: Wrapper entry holding the state_dict; see `load_state_dict_checked`.
        strip_prefix: Key prefix removed where present (DataParallel's ``module.``).
        mean: Per-channel mean the checkpoint was trained with, if it expects standardised
            inputs; a `Normalize` layer is then put in front (the harness feeds [0, 1]).
        std: Per-channel std, given together with ``mean``.

    Raises:
        ConfigError: If only one of ``mean`` / ``std`` is given, or they are invalid.
    """

    def __init__(
        self,
        arch: Callable[..., nn.Module],
        path: str,
        key: str | None = None,
        strip_prefix: str = "module.",
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        if (mean is None) != (std is None):
            raise ConfigError(
                f"mean={mean!r}, std={std!r}: give both (inputs were standardised during "
                "training) or neither"
            )
        self.arch = arch
        self.path = str(path)
        self.key = key
        self.strip_prefix = strip_prefix
        # Plain floats: Hydra passes ListConfig, which is neither JSON-able nor a tensor input.
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]
        if self.mean is not None and self.std is not None:
            Normalize(self.mean, self.std)  # validates lengths and signs now, not after loading
        self._sha256: str | None = None

    def load(self, dataset: ImageDataset, device: torch.device) -> nn.Module:
        """Build ``arch`` for ``dataset``, load the checkpoint into it and prepare it.

        Args:
            dataset: The evaluated dataset; its shape and class count size the architecture.
            device: Where the model must live.

        Returns:
            The model (behind `Normalize` if mean/std were given) on ``device``, in eval mode,
            with frozen parameters.

        Raises:
            CheckpointError: If the checkpoint is missing, unsafe or does not fit.
            ConfigError: If the images are not square, ``arch`` does not build a module, or
                mean/std do not have one value per channel.
        """
        channels = int(dataset.shape[0])
        side = _square_side(dataset)
        model = self.arch(
            in_channels=channels, num_classes=int(dataset.num_classes), image_size=side
        )
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"arch={self.arch!r} built a {type(model).__name__}, expected a torch.nn.Module"
            )
        path = Path(self.path).expanduser()
        load_state_dict_checked(model, path, key=self.key, strip_prefix=self.strip_prefix)
        self._sha256 = _sha256([path])
        if self.mean is not None and self.std is not None:
            if len(self.mean) != channels:
                raise ConfigError(
                    f"mean={self.mean} and std={self.std} have {len(self.mean)} values but "
                    f"dataset {dataset.name!r} has {channels} channels"
                )
            model = nn.Sequential(
                OrderedDict(normalize=Normalize(self.mean, self.std), model=model)
            )
        return prepare_for_evaluation(model, device)

    def describe(self) -> dict[str, Any]:
        """Return the source's facts; ``sha256`` of the checkpoint is filled in by `load`."""
        arch_name, arch_kwargs = _callable_name(self.arch)
        return {
            "kind": "checkpoint",
            "arch": arch_name,
            "arch_kwargs": arch_kwargs,
            "path": self.path,
            "sha256": self._sha256,
            "key": self.key,
            "strip_prefix": self.strip_prefix,
            "mean": self.mean,
            "std": self.std,
        }


class TrainedClassifier:
    """A classifier the harness trains itself on first use and caches.

    The cache key hashes everything that determines the weights (architecture and its kwargs,
    dataset, recipe, seed), so every run with the same spec reuses one checkpoint, and changing
    any of them trains a new one.

    Args:
        arch: Architecture factory (``_partial_: true`` in YAML), called as ``arch(in_channels=C,
            num_classes=K, image_size=H)``.
        recipe: How to train it (`bench.training.Recipe`): standard, PGD-AT or FGSM-RS.
        seed: Training seed (weight init, data order, adversary randomness).
        cache_dir: Where checkpoints live (``${paths.cache_dir}/classifiers``).
    """

    def __init__(
        self, arch: Callable[..., nn.Module], recipe: Recipe, seed: int, cache_dir: str
    ) -> None:
        self.arch = arch
        self.recipe = recipe
        self.seed = seed
        self.cache_dir = Path(cache_dir).expanduser()
        self._info: dict[str, Any] = {}

    def load(self, dataset: ImageDataset, device: torch.device) -> nn.Module:
        """Load the cached checkpoint for ``dataset`` or train it, then prepare it for attacks."""
        from bench.training import train_or_load  # training imports this module

        _square_side(dataset)
        model, self._info = train_or_load(
            self.arch,
            self.recipe,
            seed=self.seed,
            dataset=dataset,
            device=device,
            cache_dir=self.cache_dir,
        )
        return prepare_for_evaluation(model, device)

    def describe(self) -> dict[str, Any]:
        """Return the source's facts; cache key, checkpoint and training metrics after `load`."""
        arch_name, arch_kwargs = _callable_name(self.arch)
        return {
            "kind": "trained",
            "arch": arch_name,
            "arch_kwargs": arch_kwargs,
            "seed": self.seed,
            **self._info,
        }


# Harness dataset names that RobustBench's zoo also covers, under the same names. ImageNet is a
# RobustBench dataset but not a harness one.
_ROBUSTBENCH_DATASETS = ("cifar10", "cifar100")
# The spellings torch.serialization treats as "set" for its TORCH_FORCE_* variables.
_TORCH_TRUE_VALUES = ("1", "y", "yes", "true")


def _refuse_unsafe_torch_load() -> None:
    """Refuse to run RobustBench's loader when torch would unpickle arbitrary objects.

    robustbench calls ``torch.load`` without ``weights_only``; torch >= 2.6 then defaults to
    ``weights_only=True`` unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set, which flips the default
    for every such call.
    """
    value = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    if value is not None and value.lower() in _TORCH_TRUE_VALUES:
        raise ConfigError(
            f"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD={value!r} is set: RobustBench's loader would then "
            "unpickle checkpoints as arbitrary objects, which can run code. Unset it (allowed: "
            "unset, or a false value such as 0) to load RobustBench models"
        )


def _install_autoattack_shim() -> None:
    """Make ``import autoattack`` work with only PyPI's ``pyautoattack`` installed.

    robustbench 1.1.1 imports ``robustbench.eval`` from its ``__init__``, and that module does
    ``from autoattack import AutoAttack`` and ``from autoattack.state import EvaluationState``
    (the GitHub package's name), so ``import robustbench`` fails beside pyautoattack. This
    registers two small modules in ``sys.modules`` that re-export pyautoattack's classes. It does
    nothing when an ``autoattack`` module is already importable (the GitHub package, or the shim).
    The harness only uses ``robustbench.utils.load_model``; ``robustbench.eval.benchmark`` would
    still fail, because it passes GitHub-only keywords (``bs=``, ``log_path=``).

    Raises:
        ConfigError: If neither autoattack nor pyautoattack is installed.
    """
    if "autoattack" in sys.modules or importlib.util.find_spec("autoattack") is not None:
        return
    try:
        import pyautoattack
        from pyautoattack.state import EvaluationState
    except ImportError as e:
        raise ConfigError(
            "robustbench needs AutoAttack, but neither `autoattack` nor `pyautoattack` can be "
            f"imported ({e}); reinstall the harness: pip install -e .[robustbench]"
        ) from e
    package = types.ModuleType(
        "autoattack", "PureBench shim: pyautoattack under the GitHub module name `autoattack`."
    )
    package.__path__ = []  # a package, so that `autoattack.state` resolves as its submodule
    package.AutoAttack = pyautoattack.AutoAttack  # type: ignore[attr-defined]
    state = types.ModuleType("autoattack.state", "PureBench shim for pyautoattack.state.")
    state.EvaluationState = EvaluationState  # type: ignore[attr-defined]
    package.state = state  # type: ignore[attr-defined]
    sys.modules["autoattack"] = package
    sys.modules["autoattack.state"] = state
    logger.info("registered an `autoattack` shim over pyautoattack so that robustbench imports")


def _import_robustbench() -> types.SimpleNamespace:
    """Import the parts of robustbench the harness uses, after installing the autoattack shim.

    Returns:
        A namespace with ``load_model``, ``model_dicts``, ``BenchmarkDataset`` and
        ``ThreatModel``.

    Raises:
        ConfigError: If robustbench is not installed or cannot be imported.
    """
    _install_autoattack_shim()
    try:
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
        from robustbench.utils import load_model
    except ModuleNotFoundError as e:
        if e.name == "robustbench":
            raise ConfigError(
                "classifier=robustbench needs the optional robustbench extra: "
                "pip install -e .[robustbench]"
            ) from e
        raise ConfigError(
            f"robustbench is installed but cannot be imported: {e} (robustbench 1.1.1 also "
            "needs pkg_resources, i.e. setuptools<81; pip install -e .[robustbench] pins it)"
        ) from e
    except ImportError as e:
        raise ConfigError(f"robustbench is installed but cannot be imported: {e}") from e
    return types.SimpleNamespace(
        load_model=load_model,
        model_dicts=model_dicts,
        BenchmarkDataset=BenchmarkDataset,
        ThreatModel=ThreatModel,
    )


def _timm_knows(model_name: str) -> bool:
    """Whether timm (a robustbench dependency) registers ``model_name``."""
    import timm  # deferred like robustbench itself: only RobustBench sources need it

    return bool(timm.is_model(model_name))


class RobustBenchClassifier:
    """A model from RobustBench's model zoo (https://robustbench.github.io), for online users.

    Checkpoints are read from where RobustBench's ``load_model`` looks for them,
    ``model_dir / dataset / threat_model / f"{name}.pt"``; they are downloaded from RobustBench's
    Google Drive only with ``download=True``. RobustBench models take [0, 1] inputs themselves,
    so no normalisation is added.

    Args:
        name: Model name in the zoo, e.g. ``"Standard"`` or ``"Ding2020MMA"``.
        dataset: RobustBench dataset, ``"cifar10"`` or ``"cifar100"``; must equal the evaluated
            dataset's name.
        threat_model: ``"Linf"``, ``"L2"`` or ``"corruptions"``.
        model_dir: RobustBench's model directory (``${paths.cache_dir}/robustbench`` by default).
        download: Fetch a missing checkpoint (needs internet).

    Raises:
        ConfigError: If ``dataset`` is not a RobustBench dataset that the harness also has.
    """

    def __init__(
        self,
        name: str,
        dataset: str,
        threat_model: str,
        model_dir: str,
        download: bool = False,
    ) -> None:
        if dataset not in _ROBUSTBENCH_DATASETS:
            raise ConfigError(
                f"dataset={dataset!r} is invalid for a RobustBench classifier: allowed are "
                f"{', '.join(_ROBUSTBENCH_DATASETS)} (RobustBench's imagenet is not a harness "
                "dataset)"
            )
        self.name = name
        self.dataset = dataset
        self.threat_model = threat_model
        self.model_dir = str(model_dir)
        self.download = bool(download)
        self._sha256: str | None = None

    @property
    def checkpoint_path(self) -> Path:
        """Where RobustBench's ``load_model`` reads (or downloads) this model's checkpoint."""
        # RobustBench keeps 3D corruption models in the `corruptions` folder.
        threat = self.threat_model.replace("_3d", "")
        return Path(self.model_dir) / self.dataset / threat / f"{self.name}.pt"

    def load(self, dataset: ImageDataset, device: torch.device) -> nn.Module:
        """Load the zoo model from ``model_dir`` (downloading it only if allowed) and prepare it.

        Args:
            dataset: The evaluated dataset; its name must be this source's ``dataset``.
            device: Where the model must live.

        Returns:
            The RobustBench model on ``device``, in eval mode, with frozen parameters.

        Raises:
            ConfigError: If the datasets differ, the name or threat model is not in the zoo,
                robustbench is not installed, or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set.
            CheckpointError: If the checkpoint is missing and ``download`` is False, or
                RobustBench fails to load it (a pickled-object checkpoint is refused).
        """
        if dataset.name != self.dataset:
            raise ConfigError(
                f"classifier.dataset={self.dataset!r} does not match the evaluated dataset "
                f"{dataset.name!r}: a RobustBench model must be evaluated on the dataset it was "
                f"trained on (RobustBench datasets in the harness: "
                f"{', '.join(_ROBUSTBENCH_DATASETS)})"
            )
        _refuse_unsafe_torch_load()
        rb = _import_robustbench()
        threats = [t.value for t in rb.ThreatModel]
        if self.threat_model not in threats:
            raise ConfigError(
                f"threat_model={self.threat_model!r} is invalid: allowed are {', '.join(threats)}"
            )
        # RobustBench keeps 3D corruption models in the `corruptions` folder and zoo entry.
        threat = rb.ThreatModel(self.threat_model.replace("_3d", ""))
        zoo = rb.model_dicts[rb.BenchmarkDataset(self.dataset)]
        if threat not in zoo:
            raise ConfigError(
                f"threat_model={self.threat_model!r}: RobustBench has no {self.dataset} models "
                f"for it; allowed are {', '.join(t.value for t in zoo)}"
            )
        entries = zoo[threat]
        if self.name not in entries:
            names = sorted(entries)
            close = difflib.get_close_matches(self.name, names, n=3)
            raise ConfigError(
                f"name={self.name!r} is not in RobustBench's {self.dataset}/{threat.value} zoo"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + f" It has {len(names)} models, e.g. {_listing(names, limit=6)}"
            )
        # robustbench.utils.load_model serves models that timm knows from the Hugging Face Hub
        # and ignores model_dir for them; say so instead of reporting a missing file.
        timm_name = f"{self.name.lower().replace('-', '_')}_{self.dataset}_{threat.value.lower()}"
        if not self.download and _timm_knows(timm_name):
            raise CheckpointError(
                f"RobustBench serves {self.name} through timm ({timm_name}) from the Hugging Face "
                f"Hub, not from {self.checkpoint_path}; set classifier.download=true (needs "
                "internet) to fetch it"
            )
        # The same paths as robustbench.utils.load_model; ensembles keep one file per member.
        path = self.checkpoint_path
        gdrive_id = entries[self.name]["gdrive_id"]
        files = (
            [Path(f"{path}_m{i}.pt") for i in range(len(gdrive_id))]
            if isinstance(gdrive_id, list)
            else [path]
        )
        missing = [f for f in files if not f.is_file()]
        if missing and not self.download:
            raise CheckpointError(
                f"RobustBench checkpoint {missing[0]} does not exist"
                + (f" (nor {len(missing) - 1} more ensemble members)" if len(missing) > 1 else "")
                + f": RobustBench's loader looks for {self.name} there. Set "
                "classifier.download=true (needs internet) to fetch it from RobustBench's Google "
                "Drive, or put the file there"
            )
        if missing:
            logger.info("downloading RobustBench model %s to %s", self.name, path.parent)
        try:
            model = rb.load_model(
                model_name=self.name,
                model_dir=self.model_dir,
                dataset=self.dataset,
                threat_model=self.threat_model,
            )
        except pickle.UnpicklingError as e:
            raise _unpickling_error(path, e) from e
        except Exception as e:  # robustbench raises bare RuntimeError/KeyError/ValueError
            raise CheckpointError(
                f"RobustBench could not load {self.name} from {path}: {type(e).__name__}: {e}"
            ) from e
        self._sha256 = _sha256(files)
        logger.info("loaded RobustBench model %s from %s", self.name, path)
        return prepare_for_evaluation(model, device)

    def describe(self) -> dict[str, Any]:
        """Return the source's facts; ``sha256`` of the checkpoint is filled in by `load`."""
        return {
            "kind": "robustbench",
            "name": self.name,
            "dataset": self.dataset,
            "threat_model": self.threat_model,
            "model_dir": self.model_dir,
            "path": str(self.checkpoint_path),
            "sha256": self._sha256,
            "download": self.download,
        }
