"""In-memory objects as the engine's parts: a user's purifier, classifier and tensors.

The engine (:mod:`bench.engine`) takes a :class:`defenses.Defense`, a classifier source
(:class:`bench.models.classifiers.ClassifierSource`) and an :class:`bench.data.ImageDataset`,
normally built from ``conf/``. A researcher in a notebook has a module, a function and two
tensors instead; these adapters make them those parts without changing what the engine does:
the same judging rules, diagnostics, escalation and record.

The facts a defense declares (:class:`defenses.DefenseInfo`) decide how it is attacked, so an
undeclared purifier gets them measured on a probe batch rather than assumed: two calls under
different seeds tell whether it is stochastic, one backward pass whether gradients reach the
input. The diagnostics still check the gradients during the run, whatever was declared.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from bench.data import ImageDataset
from bench.models.classifiers import prepare_for_evaluation
from common.errors import ConfigError
from defenses.base import Defense, DefenseInfo

log = logging.getLogger(__name__)

Purifier = Callable[..., Tensor]


def qualified_name(obj: Any) -> str:
    """``module.QualName`` of an object's class (or of a function itself)."""
    target = obj if inspect.isfunction(obj) else type(obj)
    return f"{target.__module__}.{target.__qualname__}"


def digest(obj: Any) -> str:
    """A short digest of what an object computes: its weights and buffers, else its source.

    It goes into the run's config, so two purifiers of one class with other weights are other
    configurations (their own leaderboard rows and resume files).
    """
    h = hashlib.sha256(qualified_name(obj).encode())
    if isinstance(obj, nn.Module):
        h.update(repr(obj).encode())  # extra_repr carries hyper-parameters
        for key, tensor in sorted(obj.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if isinstance(obj, nn.Module) or inspect.isfunction(obj):
        try:
            h.update(inspect.getsource(obj if inspect.isfunction(obj) else type(obj)).encode())
        except (OSError, TypeError):  # defined in a REPL: the weights and name must do
            pass
    return h.hexdigest()[:16]


def digest_tensors(*tensors: Tensor) -> str:
    """A short digest of tensors' shapes and values (in-memory data in the run's config)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def purify_callable(obj: Any) -> Purifier:
    """The purifying callable of ``obj``: its ``purify`` method, else ``obj`` itself."""
    fn = getattr(obj, "purify", None)
    if callable(fn):
        return fn
    if callable(obj):
        return obj
    raise ConfigError(
        f"defense {qualified_name(obj)} is neither a defenses.Defense, nor an nn.Module with a "
        "purify(x) method, nor a callable x -> x"
    )


def _takes_generator(fn: Purifier) -> bool:
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class WrappedPurifier(Defense):
    """A user's purifier (``purify(x)`` method or callable) under the defense contract.

    Randomness enters only through the harness's ``torch.Generator``: a purifier that takes a
    ``generator`` argument gets it; one that draws from torch's global generator runs with that
    generator seeded from the harness's (and restored afterwards), so its draws are reproducible
    and EOT and the judging draws are fresh where they must be.
    """

    info = DefenseInfo(stochastic=False, differentiable=True, purifier_calls=1)

    def __init__(self, inner: Any) -> None:
        super().__init__()
        # A module is registered (device moves, eval mode, state_dict); a function is kept.
        self.inner = inner if isinstance(inner, nn.Module) else None
        self._fn = purify_callable(inner)
        self._with_generator = _takes_generator(self._fn)

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The user's purification of ``x``, with the harness's randomness."""
        if self._with_generator:
            return self._fn(x, generator=generator)
        if generator is None:
            return self._fn(x)
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        devices = [x.device.index or 0] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self._fn(x)


def _measured_info(defense: WrappedPurifier, probe: Tensor, paper: str) -> DefenseInfo:
    """Stochastic and differentiable as measured on ``probe``."""
    gens = [torch.Generator(device=probe.device).manual_seed(s) for s in (0, 1)]
    with torch.no_grad():
        a, b = (defense.purify(probe, generator=g) for g in gens)
    if a.shape != probe.shape:
        raise ConfigError(
            f"purifier returns shape {tuple(a.shape)} for images of shape {tuple(probe.shape)}; "
            "it must return images of the input's shape"
        )
    stochastic = not torch.equal(a, b)
    x = probe.clone().requires_grad_(True)
    with torch.enable_grad():
        out = defense.purify(x, generator=gens[0])
        differentiable = out.requires_grad
        if differentiable:
            (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
            differentiable = grad is not None and bool(torch.isfinite(grad).all())
    # One call of the user's purifier per purification: the cost columns count those.
    info = DefenseInfo(
        stochastic=stochastic, differentiable=differentiable, paper=paper, purifier_calls=1
    )
    log.info("measured the purifier's facts on %d images: %s", len(probe), info)
    return info


def as_defense(obj: Any, probe: Tensor, *, info: DefenseInfo | None = None) -> Defense:
    """``obj`` as a :class:`defenses.Defense`; a given one is returned as it is.

    Args:
        obj: a ``Defense``, an ``nn.Module`` with ``purify(x)``, or a callable ``x -> x``.
        probe: a few images of the evaluated data, to measure the facts not declared.
        info: the facts, declared; else ``obj.info`` when it is a ``DefenseInfo``, else measured.
    """
    if isinstance(obj, Defense):
        return obj
    wrapped = WrappedPurifier(obj)
    declared = info or getattr(obj, "info", None)
    if not isinstance(declared, DefenseInfo):
        declared = _measured_info(wrapped, probe, paper=str(getattr(obj, "paper", "")))
    # DefenseInfo is a class attribute the engine reads off the type: one subclass per wrap.
    name = getattr(obj, "__name__", None) or type(obj).__name__
    cls = type(name, (WrappedPurifier,), {"info": declared, "__module__": __name__})
    return cls(obj)


def eval_forward(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` in eval mode without gradients, on the model's device; its mode restored."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x.to(device))
    finally:
        model.train(was_training)


class ModuleClassifier:
    """An in-memory ``nn.Module`` as a classifier source (images in [0, 1] to logits)."""

    def __init__(self, model: nn.Module, name: str | None = None) -> None:
        self.model = model
        self.name = name or type(model).__name__
        self._digest = digest(model)

    def check(self, dataset: ImageDataset) -> None:
        """One forward on a blank image: the logits must have one entry per class."""
        c, h, w = dataset.shape
        try:
            out = eval_forward(self.model, torch.zeros(1, c, h, w))
        except Exception as err:
            raise ConfigError(
                f"classifier {self.name} fails on an image of shape {(c, h, w)}: {err}"
            ) from err
        if tuple(out.shape) != (1, dataset.num_classes):
            raise ConfigError(
                f"classifier {self.name} returns shape {tuple(out.shape)} for one image of "
                f"{dataset.name}; it must return (1, {dataset.num_classes}) logits"
            )

    def fingerprint(self) -> dict[str, Any]:
        """The weights' digest: the config holds only the class name."""
        return {"digest": self._digest}

    def load(self, dataset: ImageDataset, device: torch.device) -> nn.Module:
        """The module itself, on ``device``, in eval mode, its parameters frozen."""
        self.check(dataset)
        return prepare_for_evaluation(self.model, device, f"classifier {self.name}")

    def describe(self) -> dict[str, Any]:
        """Facts for the record."""
        return {"kind": "in-memory", "class": qualified_name(self.model), "digest": self._digest}


def tensor_dataset(x: Tensor, y: Tensor, *, name: str, num_classes: int) -> ImageDataset:
    """``(x, y)`` as a test-only dataset; asking for its training split names the problem."""
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise ConfigError(
            f"data must be images (N, C, H, W) and labels (N,); got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if x.dtype != torch.float32 or float(x.min()) < 0 or float(x.max()) > 1:
        raise ConfigError("data images must be float32 in [0, 1]")
    x, y = x.detach().cpu(), y.detach().cpu().long()

    def load(train: bool) -> tuple[Tensor, Tensor]:
        if train:
            raise ConfigError(
                f"dataset {name!r} came as tensors and has no training split: something in "
                "this run must train (a purifier part or a config classifier); pass "
                "dataset=<name> instead"
            )
        return x, y

    return ImageDataset(name=name, num_classes=num_classes, shape=tuple(x.shape[1:]), _load=load)
