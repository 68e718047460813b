"""How large every step of ``make gpu-check`` is, and the task's facts every step shares.

:data:`FULL` is sized for one GPU (under 8 minutes); :data:`TINY` for the CPU test
(tests/test_gpu_check.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from defenses.atop import RandomTransform

SEED = 0
IMAGE = (3, 32, 32)
# AToP's RT2 at the harness's defaults: at 32x32 a 4x4 grid makes 8x8 blocks, 4 of 16 missing.
RT = RandomTransform(kind="rt2", sigma=0.25, grid=4, missing=0.25)

Data = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Sizes:
    """How large every step is: :data:`FULL` on a GPU, :data:`TINY` for the CPU test.

    Attributes:
        batch: images per measured call (3x32x32).
        train_steps: Adam steps of each network (learning rate 1e-3).
        train_batch: images per training step.
        classifier_width: first-stage channels of the ResNet-18 (64 in the paper).
        purifier_width: first-level channels of the inpainter (conf/defense/atop.yaml's 32).
        warmup: calls of every pass before it is timed (compilation happens in the first).
        repeats: timed repetitions (the median is reported).
        inner: calls per timed repetition (a repetition synchronises once, at its end).
        paper_n: images of the paper-profile row.
        paper_overrides: further overrides of the paper row (the tiny run's smaller budgets).
    """

    batch: int
    train_steps: int
    train_batch: int
    classifier_width: int
    purifier_width: int
    warmup: int
    repeats: int
    inner: int
    paper_n: int
    paper_overrides: tuple[str, ...] = ()


FULL = Sizes(
    batch=256,
    train_steps=300,
    train_batch=128,
    classifier_width=32,
    purifier_width=32,
    warmup=3,
    repeats=7,
    inner=10,
    paper_n=16,
)
# Seconds on a CPU. The paper profile's own budgets (AutoAttack at full strength, PGD-200 with
# EOT-20, Square's 5,000 queries) would take hours there, so the tiny row keeps profile=paper
# and shrinks the budgets; gpu.md lists these overrides beside the row.
TINY = Sizes(
    batch=16,
    # 80 steps: about 90% clean and 60% after AToP on the batch, so the row's attacks run.
    train_steps=80,
    train_batch=32,
    classifier_width=8,
    purifier_width=8,
    warmup=1,
    repeats=3,
    inner=1,
    paper_n=4,
    paper_overrides=(
        "suite=smoke",
        "eot_default=2",
        "decision.draws=2",
        "diagnostics.enabled=false",
        "escalation.enabled=false",
    ),
)
