"""Tuning knobs read from the environment at call time (benchmarks compare variants in one
process); every malformed value stops with a message naming the variable and its form."""

from __future__ import annotations

import os


def tile(env: str, default: tuple[int, int, int]) -> tuple[int, int, int]:
    """A kernel's (block, block, num_warps), or the override "a,b,warps" in `env`."""
    override = os.environ.get(env)
    if not override:
        return default
    try:
        a, b, warps = (int(v) for v in override.split(","))
    except ValueError:
        raise ValueError(f'{env} must be three integers "a,b,warps", got {override!r}') from None
    return a, b, warps


def choice(env: str, choices: tuple[str, ...]) -> str:
    """One of `choices` from `env` (unset or empty: the first)."""
    value = os.environ.get(env) or choices[0]
    if value not in choices:
        raise ValueError(f"{env} must be one of {', '.join(choices)}, got {value!r}")
    return value


def integer(env: str, default: int, lo: int = 1) -> int:
    """A positive integer knob (at least `lo`) from `env`, or `default` when unset."""
    value = os.environ.get(env)
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        n = lo - 1
    if n < lo:
        raise ValueError(f"{env} must be an integer of at least {lo}, got {value!r}")
    return n
