"""Errors the harness raises for bad input, each naming the bad value and what is allowed.

They are raised before any heavy compute (training, attacks), so a run that fails with one of
them leaves no record behind.
"""

from __future__ import annotations


class PureBenchError(Exception):
    """Base class of every error the harness raises on purpose."""


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
