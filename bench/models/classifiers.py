"""Where the evaluated classifier comes from: the sources ``conf/classifier/*.yaml`` build.

Sources are cheap objects that Hydra instantiates; ``check(dataset)`` finds a bad checkpoint
before any work, ``load(dataset, device)`` does the real work (reading, or training and caching)
and ``describe()`` returns the facts that go into the run record.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from bench.models.architectures import Normalize
from bench.models.checkpoints import check_finite, load_state_dict_checked, sha256_files
from bench.models.training import Recipe, train_or_load
from common.errors import ConfigError

if TYPE_CHECKING:
    from bench.data import ImageDataset


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

    def check(self, dataset: ImageDataset) -> None:
        """Cheap checks before any work: a checkpoint that does not fit fails here.

        Raises:
            CheckpointError, ConfigError: naming the bad file or value.
        """
        ...

    def fingerprint(self) -> dict[str, Any] | None:
        """What identifies the weights beyond the run's config (a file's digest), or ``None``.

        Runs with equal configs and equal fingerprints evaluate the same model, wherever its
        files live.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """Return JSON-able facts for the run record (kind, checkpoint path, name, ...)."""
        ...


def prepare_for_evaluation(model: nn.Module, device: torch.device, what: str) -> nn.Module:
    """Move ``model`` to ``device``, switch it to ``eval()`` and freeze its parameters.

    Attacks need gradients with respect to the input only; frozen parameters save the memory and
    time of parameter gradients, and ``eval()`` fixes BatchNorm statistics and disables dropout so
    the forward pass is deterministic.

    Args:
        model: The classifier.
        device: Target device.
        what: the classifier's name in errors.

    Returns:
        The same module, on ``device``.

    Raises:
        CheckpointError: a weight is NaN or inf (every logit would be, and the defense blamed).
    """
    check_finite(model, what)
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model


def square_side(dataset: ImageDataset) -> int:
    """Return H for a dataset of square images; the architectures take a single image_size."""
    _, height, width = dataset.shape
    if height != width:
        raise ConfigError(
            f"dataset {dataset.name!r} has images of shape {tuple(dataset.shape)}: the "
            "architectures take square images only (H == W)"
        )
    return int(height)


def callable_name(fn: Callable[..., Any]) -> tuple[str, dict[str, Any]]:
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
            ``bench.models.architectures.ResNet18`` (its own kwargs, e.g. ``width``, go in that
            block).
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
        self._model: nn.Module | None = None

    def check(self, dataset: ImageDataset) -> None:
        """Build ``arch`` for ``dataset`` and load the checkpoint into it (kept for `load`).

        Reading a state dict is cheap, so a bad checkpoint is found here, before any work.

        Raises:
            CheckpointError: If the checkpoint is missing, unsafe, does not fit or holds NaN.
            ConfigError: If the images are not square, ``arch`` does not build a module, or
                mean/std do not have one value per channel.
        """
        self._model = self._build(dataset)

    def fingerprint(self) -> dict[str, Any]:
        """The checkpoint file's digest: what identifies the weights, wherever the file lives."""
        if self._sha256 is None:  # check() hashed the file already when it read it
            self._sha256 = sha256_files([Path(self.path).expanduser()])
        return {"sha256": self._sha256}

    def load(self, dataset: ImageDataset, device: torch.device) -> nn.Module:
        """The checked model (behind `Normalize` if mean/std were given), ready for attacks.

        Args:
            dataset: The evaluated dataset; its shape and class count size the architecture.
            device: Where the model must live.

        Returns:
            The model on ``device``, in eval mode, with frozen parameters.
        """
        model = self._model if self._model is not None else self._build(dataset)
        self._model = None
        return prepare_for_evaluation(model, device, f"classifier {self.path}")

    def _build(self, dataset: ImageDataset) -> nn.Module:
        channels = int(dataset.shape[0])
        side = square_side(dataset)
        model = self.arch(
            in_channels=channels, num_classes=int(dataset.num_classes), image_size=side
        )
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"arch={self.arch!r} built a {type(model).__name__}, expected a torch.nn.Module"
            )
        path = Path(self.path).expanduser()
        load_state_dict_checked(model, path, key=self.key, strip_prefix=self.strip_prefix)
        self._sha256 = sha256_files([path])
        if self.mean is not None and self.std is not None:
            if len(self.mean) != channels:
                raise ConfigError(
                    f"mean={self.mean} and std={self.std} have {len(self.mean)} values but "
                    f"dataset {dataset.name!r} has {channels} channels"
                )
            model = nn.Sequential(
                OrderedDict(normalize=Normalize(self.mean, self.std), model=model)
            )
        check_finite(model, f"classifier checkpoint {path}")
        return model

    def describe(self) -> dict[str, Any]:
        """Return the source's facts; ``sha256`` of the checkpoint is filled in by `load`."""
        arch_name, arch_kwargs = callable_name(self.arch)
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
        recipe: How to train it (`bench.models.training.Recipe`): standard, PGD-AT or FGSM-RS.
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

    def check(self, dataset: ImageDataset) -> None:
        """The architectures take square images; the rest is checked when the entry is read."""
        square_side(dataset)

    def fingerprint(self) -> None:
        """``None``: the weights are a function of the spec, which the run's config holds."""
        return None

    def load(self, dataset: ImageDataset, device: torch.device) -> nn.Module:
        """Load the cached checkpoint for ``dataset`` or train it, then prepare it for attacks."""
        square_side(dataset)
        model, self._info = train_or_load(
            self.arch,
            self.recipe,
            seed=self.seed,
            dataset=dataset,
            device=device,
            cache_dir=self.cache_dir,
        )
        return prepare_for_evaluation(model, device, f"classifier {self._info['checkpoint']}")

    def describe(self) -> dict[str, Any]:
        """Return the source's facts; cache key, checkpoint and training metrics after `load`."""
        arch_name, arch_kwargs = callable_name(self.arch)
        return {
            "kind": "trained",
            "arch": arch_name,
            "arch_kwargs": arch_kwargs,
            "seed": self.seed,
            **self._info,
        }
