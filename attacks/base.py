"""The attack contract: what an attack is, and what it may declare about itself.

An attack is built from its YAML as a partial, bound at run time to the model view
(``attack = partial(model=view)``) and called as ``attack(x, y) -> x_adv``. Attacks never see a
defense, only an ``nn.Module`` that maps images in [0, 1] to logits. torchattacks classes
satisfy the call protocol as they are.

Beyond the call, an attack may declare static facts (class or instance attributes) and report
what happened in its last call. The harness reads them only through :func:`traits` and
:func:`report`, whose defaults fail safe: an attack that declares nothing is taken to be a
white-box attack that returns its *last* iterate (so the harness keeps checking for success it
found and lost), averages no gradients itself, and reported nothing.

Declared (read once, after the attack is bound to its view):

* ``kind``: ``"white-box"`` (uses the view's gradients), ``"black-box"`` (queries only) or
  ``"transfer"`` (crafted on another model). Default ``"white-box"``.
* ``returns_best``: ``True`` when the returned point is the best iterate the attack found
  (AutoAttack, the harness's PGD), ``False`` when it is the last one (torchattacks). Default
  ``False``.
* ``internal_eot``: gradient samples the attack averages itself (AutoAttack rand's
  ``eot_iter``), so the harness does not stack its own EOT on top. Default 1.
* ``norms``: the threat norms it attacks under (a class attribute, read before it is built, so
  that a suite holding an attack of another threat is refused before any work). Default
  :data:`LP_NORMS`: every attack that declares nothing is an Lp attack.

Reported (read after every call):

* ``fooled_any``: bool ``(N,)``, images the attack saw fooled at some iterate ("evaluate
  while"). Default: not reported.
* ``warnings``: what the attack's own checks found (AutoAttack's flags, unavailable gradients).
* ``loss_history`` / ``fooled_history``: ``(steps + 1, N)`` per-iterate loss and success, for
  the diagnostics' path indicators. Default: not reported.
* ``flow``: ``(N, H, W, 2)``, the flow field that warped each clean image into the returned one
  (flow threats, :data:`FLOW_NORMS`): an image alone does not reveal its flow, so the threat
  check reads it here and verifies it (``bench/engine/threat.py``). Default: not reported,
  which fails the check under a flow threat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor

from common.checks import choice, positive_int
from common.errors import ConfigError

Norm = Literal["Linf", "L2", "stadv"]
# Balls around the image (additive perturbations).
LP_NORMS: tuple[str, ...] = ("Linf", "L2")
# Flow fields that warp the image (StAdv, docs/threats.md): the bound is on the flow.
FLOW_NORMS: tuple[str, ...] = ("stadv",)
NORMS: tuple[str, ...] = (*LP_NORMS, *FLOW_NORMS)
KINDS: tuple[str, ...] = ("white-box", "black-box", "transfer")


@runtime_checkable
class Attack(Protocol):
    """Maps clean images and labels to adversarial images within the threat model."""

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Return adversarial versions of ``x`` (same shape, in [0, 1])."""
        ...


@dataclass(frozen=True)
class Traits:
    """What an attack declares about itself, with fail-safe defaults (see the module doc).

    Attributes:
        kind: ``white-box``, ``black-box`` or ``transfer``.
        returns_best: whether the returned point is the best iterate found.
        internal_eot: gradient samples the attack averages itself.
    """

    kind: str = "white-box"
    returns_best: bool = False
    internal_eot: int = 1


@dataclass
class Report:
    """What an attack reported about its last call (see the module doc).

    Attributes:
        fooled_any: images seen fooled at some iterate, ``(N,)`` bool on CPU, or ``None``.
        warnings: the attack's own warnings.
        loss_history: per-iterate loss ``(steps + 1, N)``, or ``None``.
        fooled_history: per-iterate success ``(steps + 1, N)``, or ``None``.
        flow: the flow field of the returned images ``(N, H, W, 2)`` on their device, or
            ``None``.
    """

    fooled_any: Tensor | None = None
    warnings: list[str] = field(default_factory=list)
    loss_history: Tensor | None = None
    fooled_history: Tensor | None = None
    flow: Tensor | None = None


def traits(attack: Any, name: str = "attack") -> Traits:
    """The facts ``attack`` declares, defaults where it declares none.

    Raises:
        ConfigError: a declared value is not allowed (names the attack and the value).
    """
    kind = getattr(attack, "kind", Traits.kind)
    returns_best = getattr(attack, "returns_best", Traits.returns_best)
    internal = getattr(attack, "internal_eot", Traits.internal_eot)
    choice(f"attack {name!r} kind", kind, KINDS)
    if not isinstance(returns_best, bool):
        raise ConfigError(f"attack {name!r} returns_best={returns_best!r} must be true or false")
    return Traits(kind, returns_best, positive_int(f"attack {name!r} internal_eot", internal or 1))


def report(attack: Any, n: int) -> Report:
    """What ``attack`` reported about its last call on ``n`` images (ill-shaped reports dropped)."""
    fooled = getattr(attack, "fooled_any", None)
    if not isinstance(fooled, Tensor) or fooled.shape != (n,):
        fooled = None
    histories = []
    for key in ("loss_history", "fooled_history"):
        value = getattr(attack, key, None)
        ok = isinstance(value, Tensor) and value.dim() == 2 and value.shape[1] == n
        histories.append(value if ok else None)
    warnings = [str(w) for w in getattr(attack, "warnings", None) or []]
    flow = getattr(attack, "flow", None)
    # Only the batch size is checked here: the threat check judges the rest (and refuses a
    # flow that is missing under a flow threat).
    flow = (
        flow.detach() if isinstance(flow, Tensor) and flow.dim() >= 1 and len(flow) == n else None
    )
    return Report(
        fooled_any=None if fooled is None else fooled.detach().cpu().bool(),
        warnings=warnings,
        loss_history=histories[0],
        fooled_history=histories[1],
        flow=flow,
    )


def norms_of(attack: Any) -> tuple[str, ...]:
    """The threat norms ``attack`` declares (``norms``; a class, an instance or a partial of one).

    Read from the class, before anything is built: partials (``_partial_: true``, and partials
    of those) are looked through to the class they build. Attacks that declare nothing are Lp
    attacks (:data:`LP_NORMS`).
    """
    target = attack
    while not isinstance(target, type) and hasattr(target, "func"):
        target = target.func
    return tuple(getattr(target, "norms", LP_NORMS))


def check_norm(norm: str, allowed: tuple[str, ...], attack: str) -> None:
    """Raise :class:`ConfigError` naming the attack when it does not support ``norm``."""
    if norm not in allowed:
        raise ConfigError(f"{attack} does not support norm={norm!r}; allowed: {', '.join(allowed)}")
