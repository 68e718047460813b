"""Argument validators shared by the harness and the components.

Each returns the value (converted to a plain Python type) or raises
:class:`common.errors.ConfigError` whose message starts with ``name=value`` and says what is
allowed, so a bad config value is reported the same way wherever it is checked.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from numbers import Real
from typing import Any

from common.errors import ConfigError


def integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (bools and floats are refused)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        if minimum is not None and maximum is not None:
            allowed = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        else:
            allowed = "an integer" if maximum is None else f"an integer <= {maximum}"
        raise ConfigError(f"{name}={value!r} is not allowed; it must be {allowed}")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an integer >= 1."""
    return integer(name, value, minimum=1)


def optional_positive_int(name: str, value: Any) -> int | None:
    """``None``, or ``value`` as an integer >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is not allowed; it must be a positive integer or null")
    return int(value)


def real(
    name: str, value: Any, allowed: str = "", ok: Callable[[float], bool] | None = None
) -> float:
    """``value`` as a finite ``float`` for which ``ok`` holds; ``allowed`` says what ``ok`` wants.

    Example:
        >>> real("sigma", 0.25, "> 0", lambda v: v > 0)
        0.25
    """
    good = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if not good or (ok is not None and not ok(float(value))):
        suffix = f" {allowed}" if allowed else ""
        raise ConfigError(f"{name}={value!r} is not allowed; it must be a finite number{suffix}")
    return float(value)


def choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """``value`` if it is one of ``allowed``."""
    options = tuple(allowed)
    # Compared with the type too: True == 1, and a bool must not pass for an integer option.
    if not any(value == o and type(value) is type(o) for o in options):
        listed = ", ".join(str(o) for o in options)
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: {listed}")
    return value


def flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not allowed; it must be true or false")
    return value


def known_keys(what: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Refuse keys of ``given`` that are not in ``allowed``, listing the allowed ones.

    A key close to an allowed one (a typo) is named with it: ``(did you mean n_samples?)``.
    """
    options = sorted(set(allowed))
    unknown = sorted(set(given) - set(options))
    if unknown:
        close = {k: difflib.get_close_matches(k, options, n=1, cutoff=0.75) for k in unknown}
        guesses = [
            f"{m[0]}" if len(unknown) == 1 else f"{m[0]} for {k}" for k, m in close.items() if m
        ]
        hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
        raise ConfigError(
            f"{what} {unknown} {'is' if len(unknown) == 1 else 'are'} not allowed{hint}; allowed: "
            f"{', '.join(options)}"
        )
