"""Learned parts of purifiers that the harness trains itself, caches and hands to defenses.

A defense receives plain ``nn.Module`` parts (an autoencoder, an inpainter, a conditional VAE).
When such a part comes from the harness it is a :class:`TrainedPart` placeholder, cheap to
build from its YAML and empty until :func:`prepare_parts` loads its weights from the cache
(:mod:`bench.models.cache`) or trains and caches them; a part with its own ``prepare`` (the
score network, :mod:`bench.models.score`) is prepared in place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench.models.cache import Entry, canonical, fetch, load_state_dict, save_state_dict
from bench.models.checkpoints import check_finite, load_state_dict_checked, sha256_files
from common.checks import integer
from common.errors import CheckpointError, ConfigError
from defenses.base import PartContext

if TYPE_CHECKING:
    from bench.data import ImageDataset

log = logging.getLogger(__name__)


class TrainedPart(nn.Module):
    """A learned purifier network that the harness trains on first use, caches and hands over.

    A placeholder in the defense's module tree until :func:`prepare_parts` resolves it: then it
    builds the network with ``arch(ctx)``, starts from ``init``'s trained weights when given (a
    pre-training stage), trains it with ``train(net, ctx)`` (or loads ``checkpoint``), caches the
    weights and puts the trained network in its own place in the defense. The defense itself
    only ever sees the plain network.

    The cache key hashes everything that determines the weights: ``arch``, ``train`` (with its
    arguments), ``seed``, the dataset, ``init``'s key and, for ``uses_classifier`` parts, the
    classifier's own cache key or description. So fine-tuning against another classifier trains
    again, and changing a pre-training argument retrains every stage after it.

    Args:
        name: the part's name in cache entries and records (e.g. ``carso_cvae``).
        arch: factory ``arch(ctx: PartContext) -> nn.Module`` (``_partial_: true`` in YAML).
        train: ``train(net, ctx) -> dict`` that trains ``net`` in place and returns its metrics
            (loss curve, held-out metric); ``None`` keeps the network as built or as ``init``
            left it (e.g. AToP's purifier without the AToP fine-tuning).
        init: an earlier stage whose trained weights this part starts from.
        seed: initialisation, data order and every random draw of training.
        cache_dir: where trained parts live (``${paths.cache_dir}/purifiers``).
        checkpoint: a local ``state_dict`` file for the network instead of training (e.g. a
            CIFAR-10 purifier trained on a GPU); checked key by key when loaded.
        uses_classifier: whether ``train`` needs the protected classifier (``ctx.classifier``).
    """

    def __init__(
        self,
        name: str,
        arch: Callable[[PartContext], nn.Module],
        train: Callable[[nn.Module, PartContext], dict[str, Any]] | None = None,
        init: TrainedPart | None = None,
        seed: int = 0,
        cache_dir: str = ".cache/purifiers",
        checkpoint: str | None = None,
        uses_classifier: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise ConfigError(f"part name={name!r} must be a non-empty identifier (a-z, 0-9, _)")
        integer(f"part {name!r} seed", seed, minimum=0)
        if init is not None and not isinstance(init, TrainedPart):
            raise ConfigError(f"part {name!r}: init must be another TrainedPart, not {init!r}")
        self.name, self.arch, self.train_fn, self.seed = name, arch, train, seed
        self.init = init
        self.cache_dir = Path(cache_dir).expanduser()
        self.checkpoint = Path(checkpoint).expanduser() if checkpoint else None
        if self.checkpoint is not None and not self.checkpoint.is_file():
            raise CheckpointError(
                f"part {name!r}: checkpoint={str(self.checkpoint)!r} does not exist; give a "
                "local state_dict file, or null to train the part here"
            )
        self.uses_classifier = uses_classifier or (init is not None and init.uses_classifier)
        self._digest: str | None = None  # the checkpoint's, hashed once (plan, then resolve)

    def spec(self, dataset: ImageDataset, classifier_info: dict[str, Any] | None) -> dict:
        """Everything that determines the trained weights (the cache key's input)."""
        spec: dict[str, Any] = {
            "kind": "part",
            "name": self.name,
            "arch": self.arch,
            "train": self.train_fn,
            "seed": self.seed,
            "dataset": dataset.identity(),
            "init": self.init.spec(dataset, classifier_info) if self.init else None,
        }
        if self.uses_classifier:
            spec["classifier"] = _classifier_fingerprint(classifier_info)
        return canonical(spec)

    def fingerprint(self) -> dict[str, Any] | None:
        """What identifies a ``checkpoint`` part's weights (the file's digest); else ``None``.

        A trained part is identified by its spec, which the run's config already holds.
        """
        if self.checkpoint is None:
            return None
        if self._digest is None:
            self._digest = sha256_files([self.checkpoint])
        return {"part": self.name, "sha256": self._digest}

    def resolve(
        self,
        dataset: ImageDataset,
        device: torch.device,
        classifier: nn.Module | None = None,
        classifier_info: dict[str, Any] | None = None,
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Find or train the network; return it (frozen, ``eval()``, on ``device``) and its facts.

        Raises:
            ConfigError: the part needs the classifier and none was given.
            CheckpointError: a ``checkpoint`` file does not fit the network.
        """
        if self.uses_classifier and classifier is None:
            raise ConfigError(
                f"part {self.name!r} is trained against the protected classifier, but none was "
                "given to prepare_parts"
            )
        net, info = self._resolve(dataset, device, classifier, classifier_info)
        return net.to(device).eval().requires_grad_(False), info

    def _context(
        self, dataset: ImageDataset, device: torch.device, classifier: nn.Module | None
    ) -> PartContext:
        x, y = dataset.train()
        x_test, y_test = dataset.test()
        return PartContext(
            x,
            y,
            x_test,
            y_test,
            dataset.num_classes,
            device,
            self.seed,
            classifier if self.uses_classifier else None,
        )

    def _build(self, ctx: PartContext) -> nn.Module:
        torch.manual_seed(self.seed)
        return self.arch(ctx)

    def _resolve(
        self,
        dataset: ImageDataset,
        device: torch.device,
        classifier: nn.Module | None,
        classifier_info: dict[str, Any] | None,
    ) -> tuple[nn.Module, dict[str, Any]]:
        ctx = self._context(dataset, device, classifier)
        if self.checkpoint is not None:
            net = load_state_dict_checked(self._build(ctx), self.checkpoint)
            check_finite(net, f"part {self.name!r} ({self.checkpoint})")
            return net, {
                "part": self.name,
                "kind": "checkpoint",
                "path": str(self.checkpoint),
                **(self.fingerprint() or {}),
            }
        entry = Entry(
            self.cache_dir, f"{dataset.name}-{self.name}", self.spec(dataset, classifier_info)
        )
        init_info: dict[str, Any] | None = None

        def build() -> nn.Module:
            nonlocal init_info
            start = None
            if self.init is not None:  # the earlier stage first: its training draws first
                start, init_info = self.init._resolve(dataset, device, classifier, classifier_info)
            net = self._build(ctx)
            if start is not None:
                net.load_state_dict(start.state_dict())
            return net.to(device)

        net, metrics = fetch(
            entry,
            build=build,
            train=lambda net: self._train(net, ctx, device),
            save=save_state_dict,
            load=lambda path: load_state_dict(self._build(ctx), path, f"cached part {path}"),
            what=self.name,
        )
        info = {
            "part": self.name,
            "kind": "trained",
            "cache_key": entry.key,
            "checkpoint": str(entry.path),
            "sha256": entry.digest(),
            "training": metrics,
        }
        if self.init is not None:
            info["init"] = init_info or self.init.spec(dataset, classifier_info)["name"]
        return net, info

    def _train(self, net: nn.Module, ctx: PartContext, device: torch.device) -> dict[str, Any]:
        start = time.perf_counter()
        metrics = dict(self.train_fn(net, ctx) or {}) if self.train_fn else {}
        metrics.setdefault("train_s", time.perf_counter() - start)
        metrics["device"] = str(device)
        return metrics

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Refuse use before :func:`prepare_parts` has put the trained network in its place."""
        raise RuntimeError(
            f"part {self.name!r} is not trained yet: the harness calls prepare_parts(defense, "
            "dataset, device, classifier=...) before using a defense"
        )


def _classifier_fingerprint(info: dict[str, Any] | None) -> Any:
    """The part of a classifier's description that identifies its weights."""
    if not info:
        return None
    for key in ("cache_key", "sha256", "key"):
        if info.get(key):
            return {key: info[key]}
    return {k: v for k, v in info.items() if k not in {"training", "train_s", "device"}}


def prepare_parts(
    module: nn.Module,
    dataset: ImageDataset,
    device: torch.device,
    *,
    classifier: nn.Module | None = None,
    classifier_info: dict[str, Any] | None = None,
) -> list[dict]:
    """Train or load every source part of a defense, bind the classifier; describe the parts.

    :class:`TrainedPart` placeholders are replaced in the module tree by their trained networks;
    other parts with a ``prepare(dataset, device)`` method (the score network) are prepared in
    place. Finally the defense receives the classifier through ``bind`` when it has one.

    Args:
        module: the defense.
        dataset: the evaluated dataset (training images for the parts).
        device: where the parts are trained and live.
        classifier: the protected classifier, frozen, for parts trained against it.
        classifier_info: its description (cache key), so such parts are cached per classifier.
    """
    described = []
    # Decided before any part is replaced: once a part's network takes its place, a stage below
    # it (its `init`) no longer looks nested, and would be loaded and attached to the network.
    parts = [
        (n, s)
        for n, s in module.named_modules()
        if s is not module and not _inside_source(module, n)
    ]
    for name, sub in parts:
        if isinstance(sub, TrainedPart):
            net, info = sub.resolve(dataset, device, classifier, classifier_info)
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name), attr, net)
            described.append(info)
            continue
        prepare = getattr(sub, "prepare", None)
        if callable(prepare):
            prepare(dataset, device)
            describe = getattr(sub, "describe", None)
            described.append(describe() if callable(describe) else {"part": type(sub).__name__})
    bind = getattr(module, "bind", None)
    if classifier is not None and callable(bind):
        bind(classifier)
    return described


def part_fingerprints(module: nn.Module) -> list[dict[str, Any]]:
    """What identifies the weights of a defense's parts loaded from files (their digests)."""
    out = []
    for name, sub in module.named_modules():
        if sub is module or _inside_source(module, name):
            continue
        fingerprint = getattr(sub, "fingerprint", None)
        if callable(fingerprint) and (found := fingerprint()) is not None:
            out.append(found)
    return out


def _inside_source(root: nn.Module, name: str) -> bool:
    """Whether ``name`` lies below a :class:`TrainedPart` (its ``init`` stage, say)."""
    parts = name.split(".")
    return any(
        isinstance(root.get_submodule(".".join(parts[:i])), TrainedPart)
        for i in range(1, len(parts))
    )
