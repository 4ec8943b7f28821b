"""Sizes and rates as users write them: ``64K``, ``16M``, ``1G`` (binary, as in dd: 1K = 1024)."""

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"(\d+)([KMGTP]?)(?:I?B)?")

# Anything larger is certainly a typo; it also keeps every value a sane 64-bit integer.
MAX_VALUE = 1 << 62


def parse_size(text: str) -> int:
    """Parse ``123``, ``64K``, ``16M``, ``1G``, ``2T`` (also ``16MiB``/``16MB``, both binary).

    Raises ValueError with a message that names the bad value.
    """
    m = _SIZE_RE.fullmatch(text.strip().upper())
    if m is None:
        raise ValueError(f"invalid size {text!r}: expected a whole number with an optional "
                         "K/M/G/T suffix (binary: 1K = 1024)")
    value = int(m.group(1)) * _UNITS[m.group(2)]
    if value > MAX_VALUE:
        raise ValueError(f"size {text!r} is too large")
    return value


def format_size(n: float) -> str:
    """Human form, binary units: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
