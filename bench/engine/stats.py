"""What the engine measured, as plain data (no torch): counts and per-attack facts.

The engine counts; :mod:`bench.reporting` turns counts into accuracies with intervals and
records. Both read these types, which import nothing heavy, so the leaderboard stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Tally:
    """Images that count under one decision rule, out of ``n``.

    Attributes:
        correct: the count; fractional for the ``avg`` rule (a mean over draws per image).
        n: images judged.
    """

    correct: float
    n: int


@dataclass
class AttackStats:
    """What one attack of the suite did, apart from the accuracies it left.

    Attributes:
        target: the attack's ``_target_`` (its implementation).
        n_attacked: images the attack ran on (still robust under some rule when it started, in
            a cascade; clean-correct otherwise).
        wall_s: seconds spent in the attack, its judging included.
        max_perturbation: largest perturbation norm it returned (threat norm).
        warnings: what the attack's own checks reported (AutoAttack's flags).
        kind: ``white-box``, ``black-box`` or ``transfer``.
        view: how the attack saw the defense (gradient mode, EOT, randomness).
        passes: images pushed through the attack's view: classifier forwards, backwards
            reaching the input, purifier calls (EOT samples counted one by one), and the
            view's gradient counts (``gradients``, ``grad_missing``, ``grad_zero``,
            ``grad_nonfinite``; see ``gradient_failures``).
        purifier_calls_per_image: purifier network evaluations per attacked image, the
            attack's and its judging's together (``passes.purify`` times the defense's NFE).
        peak_memory_mb: peak memory during the attack (CUDA allocator on GPU; the process's
            resident high-water mark on CPU).
        believed_fooled: images the attack's own view judged fooled (approximate-gradient
            and transfer attacks only).
        transfer_failure: fraction of those that the real defense classified correctly.
        broken_on_path: images the attack saw fooled at some iterate (attacks that track it).
        gradient_failures: input gradients the attack's view handed back that had failed,
            counted per image and backward: ``missing`` (the graph was cut: the attack got
            zeros), ``zero`` (exactly zero everywhere), ``nonfinite`` (NaN or inf, set to
            zero), out of ``gradients``. Empty in records written before it was counted.
    """

    target: str
    n_attacked: int
    wall_s: float
    max_perturbation: float
    warnings: list[str] = field(default_factory=list)
    kind: str = "white-box"
    view: dict[str, Any] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)
    purifier_calls_per_image: float = 0.0
    peak_memory_mb: float | None = None
    believed_fooled: int | None = None
    transfer_failure: float | None = None
    broken_on_path: int | None = None
    gradient_failures: dict[str, int] = field(default_factory=dict)
