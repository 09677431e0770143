"""Bounded memories of what was decided or seen: checked headers, path decisions, deadlines.

Each is a plain dict that an attacker can fill with new keys, so each has a bound, and the way
it is kept is the same everywhere: a memory that reaches its bound is emptied at once rather
than kept in least-recently-used order, so that a hit costs one lookup and a flood of new keys
costs refills, never growth. Memories of deadlines drop the entries whose time is up first.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["drop_expired", "remember"]

K = TypeVar("K")
V = TypeVar("V")


def remember(memory: dict[K, V], key: K, value: V, limit: int) -> None:
    """``memory[key] = value``, the whole memory forgotten first when it holds ``limit``."""
    if len(memory) >= limit:
        memory.clear()
    memory[key] = value


def drop_expired(deadlines: dict[K, float], now: float) -> None:
    """Forget every entry of ``deadlines`` whose deadline is not after ``now``."""
    for key in [key for key, until in deadlines.items() if until <= now]:
        del deadlines[key]
