"""Purification defenses, one module each, selected by ``conf/defense/*.yaml``."""

from defenses.base import Defense, DefenseInfo

__all__ = ["Defense", "DefenseInfo"]
