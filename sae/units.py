"""Parsing of the human-friendly counts researchers type: 1e9, 500M, 2B, 1_000_000."""

from __future__ import annotations

import math
import re
from decimal import Decimal

from sae.errors import SaeError

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_LARGEST = Decimal(10) ** 30  # far beyond any token count; keeps 1e400 from meaning anything
_PATTERN = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?)\s*([KkMmBbGgTt]?)\s*$")


def parse_count(text: str | int | float, *, name: str = "count", allow_zero: bool = False) -> int:
    """Parse a positive whole count such as ``1e9``, ``500M``, ``2B``, ``1_000_000`` or ``12.5K``.

    Raises SaeError with a one-line message naming ``name`` when the text is not such a count.
    """
    if isinstance(text, bool):
        raise SaeError(f"{name}: expected a count, got {text!r}")
    if isinstance(text, int):
        value: Decimal = Decimal(text)
    elif isinstance(text, float):
        if not math.isfinite(text):
            raise SaeError(f"{name}: {text!r} is not a finite number")
        value = Decimal(text)
    else:
        match = _PATTERN.match(text)
        if match is None:
            raise SaeError(
                f"{name}: cannot read {text!r} as a count; write it like 1e9, 500M, 2B or 1_000_000"
            )
        number, suffix = match.groups()
        if number.startswith("_") or "__" in number or number.endswith("_"):
            raise SaeError(f"{name}: misplaced underscore in {text!r}; write it like 1_000_000")
        # Decimal, not float: 1.001K is exactly 1001 (as a float product it is 1000.9999…)
        value = Decimal(number.replace("_", "")) * _SUFFIXES[suffix.upper()]
    if value > _LARGEST:
        raise SaeError(f"{name}: {text!r} is too large")
    if value < 0 or (value == 0 and not allow_zero):
        raise SaeError(f"{name}: must be positive, got {text!r}")
    if value != int(value):
        raise SaeError(f"{name}: {text!r} is not a whole number")
    return int(value)


def format_count(n: int) -> str:
    """Short human form of a count: 1.00B, 20.0M, 4.10K, 17."""
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


def format_bytes(n: float) -> str:
    """Bytes in binary units: 4.3 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
