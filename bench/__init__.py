"""PureBench: the harness (the engine, everything trained and cached, the reporting, the tools).

The public API is imported lazily so that light commands (the leaderboard) do not pay for torch
and the attack libraries.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "evaluate": "bench.api",
    "attack_view": "bench.api",
    "run_attack": "bench.api",
    "RunRecord": "bench.reporting.records",
    "build_leaderboard": "bench.reporting.leaderboard",
    "Defense": "defenses.base",
    "DefenseInfo": "defenses.base",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
