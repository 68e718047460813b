"""The errors PureBench raises on purpose, each naming the bad value and what is allowed.

Bad input (a config value, a data directory, a checkpoint) raises one of them before any heavy
compute, so a run that fails with :class:`ConfigError`, :class:`DataNotFoundError` or
:class:`CheckpointError` leaves no record behind. The others stop a run that is under way and
say which component broke which rule.
"""

from __future__ import annotations


class PureBenchError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(PureBenchError, ValueError):
    """A configuration value is invalid (names the key, the value and what is allowed)."""


class DataNotFoundError(PureBenchError, FileNotFoundError):
    """A dataset's files are missing; the message says where it looked and how to get them."""


class CheckpointError(PureBenchError, ValueError):
    """A checkpoint is missing, unreadable or does not match the architecture it is loaded into."""


class ThreatModelViolation(PureBenchError, RuntimeError):
    """An attack returned a point outside the threat model (beyond eps or outside [0, 1])."""


class NonFiniteError(PureBenchError, FloatingPointError):
    """NaN or inf in purified images, logits or gradients: the batch fails, never a number."""


class ContractViolation(PureBenchError, RuntimeError):
    """A component broke its contract (names the component and the rule).

    A defense returned images of the wrong shape, dtype or range, or a classifier returned
    logits of the wrong shape.
    """


class Interrupted(BaseException):
    """The process received SIGTERM (what SLURM and ``timeout`` send) during a run.

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` on the way
    (in the harness or in a library) swallows it.

    Args:
        signal_name: the signal's name, e.g. ``SIGTERM``.
    """

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name = signal_name
