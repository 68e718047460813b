"""The original AutoAttack (fra31/auto-attack) through PyPI's ``pyautoattack`` 0.2.0.

This file is the only place that knows pyautoattack's API, which differs from the GitHub version
(keyword-only constructor, ``attacks=`` for ``attacks_to_run=``, ``batch_size=`` for ``bs=``, an
``(x_adv, y_adv)`` tuple as result, warnings through ``logging``). Never use torchattacks'
``AutoAttack`` for reported numbers: it runs 10 iterations where the original runs 100.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

import torch
from pyautoattack import AutoAttack as _PyAutoAttack
from torch import Tensor, nn

from attacks.base import check_norm
from common.checks import choice, known_keys, optional_positive_int, positive_int, real
from common.errors import ConfigError

log = logging.getLogger(__name__)

_VERSIONS = ("standard", "plus", "rand", "custom")
_SUBATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")


class _Collect(logging.Handler):
    """Keeps what AutoAttack's checks log at WARNING level, for the run record.

    The checks cover output randomness, zero gradients, Square beating the white-box attacks and
    optimisation at inference.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class AutoAttack:
    r"""AutoAttack in the paper 'Reliable evaluation of adversarial robustness with an ensemble...'.

    'Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
    attacks' [https://arxiv.org/abs/2003.01690]

    ``standard``: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries), each at
    100 iterations, run as a cascade on the points still robust. ``rand``: APGD-CE and APGD-DLR
    with EOT over 20 gradient samples, for randomized models. ``custom``: the sub-attacks listed
    in ``attacks``, optionally with fewer APGD iterations (``n_iter``), for quick checks only.

    Arguments:
        model (nn.Module): the model view to attack (images in [0, 1] -> logits).
        norm (str): ``"Linf"`` or ``"L2"``.
        eps (float): perturbation budget.
        version (str): ``standard``, ``plus``, ``rand`` or ``custom``. (Default: standard)
        attacks (list[str] | None): sub-attacks for ``custom`` only.
        n_iter (int | None): APGD iterations for ``custom`` only (AutoAttack uses 100).
        n_queries (int | None): Square queries for ``custom`` only (AutoAttack uses 5,000).
        eot_iter (int | None): gradient samples APGD averages (EOT), ``custom`` only (``rand``
            uses 20).
        n_restarts (int | None): APGD-CE / APGD-DLR restarts, ``custom`` only.
        n_target_classes (int | None): target classes of APGD-T and FAB-T, ``custom`` only
            (``standard`` uses 9).
        seed (int): AutoAttack's seed; without it AutoAttack would seed from the clock.
        batch_size (int): AutoAttack's batch size.

    Gradient failures never stop it: the harness's view hands it zero gradients where the
    defense cut the graph or gave NaN, and an image that still comes back non-finite is
    replaced by its clean image, with a warning.

    Attributes:
        warnings (list[str]): the warnings AutoAttack's own checks raised in the last call,
            and the wrapper's own (non-finite images replaced).

    Example:
        >>> attack = AutoAttack(model, norm="Linf", eps=0.1, version="standard", seed=0)
        >>> x_adv = attack(x, y)
    """

    returns_best: ClassVar[bool] = True  # APGD, FAB and Square keep the best point they found

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str,
        eps: float,
        version: str = "standard",
        attacks: Sequence[str] | None = None,
        n_iter: int | None = None,
        n_queries: int | None = None,
        eot_iter: int | None = None,
        n_restarts: int | None = None,
        n_target_classes: int | None = None,
        seed: int = 0,
        batch_size: int = 500,
    ) -> None:
        check_norm(norm, ("Linf", "L2"), "AutoAttack")
        real("AutoAttack eps", eps, "> 0", lambda v: v > 0)
        choice("AutoAttack version", version, _VERSIONS)
        if version == "custom":
            if not attacks:
                raise ConfigError(
                    f"AutoAttack attacks={attacks!r} is not allowed with version='custom'; it "
                    "must list sub-attacks"
                )
            known_keys("AutoAttack sub-attacks", attacks, _SUBATTACKS)
        budget = {
            "n_iter": n_iter,
            "n_queries": n_queries,
            "eot_iter": eot_iter,
            "n_restarts": n_restarts,
            "n_target_classes": n_target_classes,
        }
        if version != "custom" and (
            attacks is not None or any(v is not None for v in budget.values())
        ):
            # pyautoattack raises on `attacks` with a preset version; a budget change would
            # silently alter a preset that reported numbers depend on.
            raise ConfigError(
                f"`attacks`, {', '.join(f'`{k}`' for k in budget)} are only allowed with "
                "version='custom'"
            )
        for key, value in budget.items():
            optional_positive_int(f"AutoAttack {key}", value)
        positive_int("AutoAttack batch_size", batch_size)
        self.model, self.norm, self.eps, self.version = model, norm, eps, version
        self.attacks = list(attacks) if attacks is not None else None
        self.n_iter, self.n_queries, self.eot_iter = n_iter, n_queries, eot_iter
        self.n_restarts, self.n_target_classes = n_restarts, n_target_classes
        self.seed, self.batch_size = seed, batch_size
        self.warnings: list[str] = []

    @property
    def kind(self) -> str:
        """``black-box`` for Square alone, else ``white-box`` (gradient attacks lead)."""
        return "black-box" if self.attacks == ["square"] else "white-box"

    @property
    def internal_eot(self) -> int:
        """Gradient samples AutoAttack averages itself (``rand``: 20), 1 otherwise."""
        return self._eot_iter() or (20 if self.version == "rand" else 1)

    def _eot_iter(self) -> int | None:
        """APGD's EOT samples to set (``None``: the version's own).

        On a model that says it is deterministic (``model.stochastic`` false, as the harness's
        attack view of a deterministic defense) every EOT sample is the same gradient, and
        their mean is that gradient: one sample gives the same attack at a fraction of the cost.
        """
        if getattr(self.model, "stochastic", True) is False:
            return 1
        return self.eot_iter

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Run AutoAttack on ``(x, y)`` and return the adversarial images."""
        # Built per call on the inputs' device: works for parameter-free models and any device.
        adversary = _PyAutoAttack(
            self.model,
            attacks=self.attacks,
            device=x.device,
            eps=self.eps,
            norm=self.norm,
            seed=self.seed,
            version=self.version,
        )
        # pyautoattack exposes no other way to set a `custom` budget than its attack objects.
        if self.n_iter is not None:
            adversary.apgd.n_iter = self.n_iter
            adversary.apgd_targeted.n_iter = self.n_iter
            adversary.fab.n_iter = self.n_iter
        if self.n_queries is not None:
            adversary.square.n_queries = self.n_queries
        eot_iter = self._eot_iter()
        if eot_iter is not None:
            adversary.apgd.eot_iter = eot_iter
            adversary.apgd_targeted.eot_iter = eot_iter
        if self.n_restarts is not None:
            adversary.apgd.n_restarts = self.n_restarts
            adversary.fab.n_restarts = self.n_restarts
        if self.n_target_classes is not None:
            adversary.apgd_targeted.n_target_classes = self.n_target_classes
            adversary.fab.n_target_classes = self.n_target_classes
        collect = _Collect()
        logger = logging.getLogger("auto-attack")
        logger.addHandler(collect)
        try:
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=self.batch_size)
        finally:
            logger.removeHandler(collect)
        self.warnings = collect.messages
        return self._finite_or_clean(x, x_adv)

    def _finite_or_clean(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """``x_adv`` with every non-finite image replaced by its clean image (and a warning).

        FAB divides by gradient norms: a degenerate gradient must cost the attack its point,
        never the run (a NaN image fails the threat check).
        """
        bad = ~torch.isfinite(x_adv).flatten(1).all(1)
        n_bad = int(bad.sum())
        if not n_bad:
            return x_adv
        message = (
            f"AutoAttack returned non-finite images for {n_bad} of {len(x)} points; the clean "
            "images were kept for them"
        )
        log.warning(message)
        self.warnings.append(message)
        return torch.where(bad.view(-1, *([1] * (x.dim() - 1))), x, x_adv)
