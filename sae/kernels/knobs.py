"""Tuning knobs read from the environment at call time (benchmarks compare variants in one
process); every malformed value stops with a message naming the variable and its form."""

from __future__ import annotations

import os

WARPS = (1, 2, 4, 8, 16)


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def tile(
    env: str, default: tuple[int, int, int], pow2: tuple[bool, bool] = (True, True)
) -> tuple[int, int, int]:
    """A kernel's (block, block, num_warps), or the override "a,b,warps" in `env`: blocks must be
    powers of two (tl.arange's sizes; `pow2` False for a count that is not a block, at least 1),
    warps one of WARPS, checked here rather than deep in Triton."""
    override = os.environ.get(env)
    if not override:
        return default
    try:
        a, b, warps = (int(v) for v in override.split(","))
    except ValueError:
        raise ValueError(f'{env} must be three integers "a,b,warps", got {override!r}') from None
    for name, n, block in (("a", a, pow2[0]), ("b", b, pow2[1])):
        if not (_pow2(n) if block else n >= 1):
            want = "a power of two" if block else "an integer of at least 1"
            raise ValueError(f'{env}="a,b,warps": {name} must be {want}, got {override!r}')
    if warps not in WARPS:
        raise ValueError(
            f'{env}="a,b,warps": warps must be one of {", ".join(map(str, WARPS))}, '
            f"got {override!r}"
        )
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
