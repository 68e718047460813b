"""Every seed PureBench derives from another, in one table.

A run has one user seed (``seed=``); everything random in it draws from seeds derived here, so
that each stream is independent of the others and of how much ran before it: a resumed run
that skips finished batches draws what an uninterrupted run draws for the rest. The constants
are arbitrary but fixed: changing one changes every result that depends on it.
"""

from __future__ import annotations

from enum import IntEnum

# Seeds handed to torch generators stay below 2**62 (they are drawn as int64).
SEED_HIGH = 2**62


def evaluation(seed: int) -> int:
    """The evaluator's seed stream (clean judging), separate from every attacker's."""
    return seed * 1_000_003 + 999_983


def attack(seed: int, k: int) -> int:
    """The ``k``-th attack's own randomness (random starts, AutoAttack's seed stream)."""
    return seed * 1000 + k


def attack_view(seed: int, k: int) -> int:
    """The purifications the ``k``-th attack's view draws while it attacks."""
    return seed * 1_000_003 + k + 1


def judge(seed: int, k: int) -> int:
    """The fresh purifications that judge the ``k``-th attack's adversarial images."""
    return evaluation(seed) + k + 1


def batch(base: int, index: int) -> int:
    """The seed of batch ``index`` of a stream seeded ``base``, from its position alone."""
    return (base * 2_654_435_761 + index * 40_503 + 1) % SEED_HIGH


def diagnostics(seed: int) -> int:
    """The first seed of the diagnostics' probe attacks and views (each takes the next one)."""
    return seed * 7919 + 17


def defense_loss(seed: int) -> int:
    """The randomness of a defense's attack-loss term (CARSO's latents), per attack view."""
    return (seed * 1_000_003 + 500_009) % SEED_HIGH


def escalation_probe(seed: int, level: int) -> int:
    """Which survivors escalation level ``level`` probes first."""
    return seed * 104_729 + level * 7 + 3


def perf_judge(seed: int) -> int:
    """The purifications ``make perf`` judges compared attacks with (the same for all)."""
    return seed + 12345


class Stream(IntEnum):
    """The generators of one training run, offset from its seed.

    ``DATA``: data order and batch sampling (and torch's global seed for weight init);
    ``NOISE``: masks, noise and adversarial starts drawn during training; ``HELD_OUT``: the
    final held-out metric; ``HELD_OUT_ATTACK``: a second held-out stream (attacked images).
    """

    DATA = 0
    NOISE = 1
    HELD_OUT = 2
    HELD_OUT_ATTACK = 3


def training(seed: int, stream: Stream) -> int:
    """The seed of one generator of a training run seeded ``seed``."""
    return seed + int(stream)
