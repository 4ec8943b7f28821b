"""Sizes and rates as users write them: ``64K``, ``16M``, ``1G`` (binary, as in dd: 1K = 1024)."""

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}

# Anything larger is certainly a typo; it also keeps every value a sane 64-bit integer.
MAX_VALUE = 1 << 62


def parse_size(text: str) -> int:
    """Parse ``123``, ``64K``, ``16M``, ``1G``, ``2T`` (also ``16MiB``/``16MB``, both binary).

    Raises ValueError with a message that names the bad value.
    """
    # by hand, not with re: ``mirrorfs mount`` reads its sizes before its copy begins, and
    # importing re would delay the copy by 3 ms
    digits = text.strip().upper()
    for suffix in ("IB", "B"):  # 16MiB, 16MB, 16B: all binary
        if digits.endswith(suffix):
            digits = digits[:-len(suffix)]
            break
    unit = _UNITS.get(digits[-1:], 1) if digits else 1
    if unit > 1:
        digits = digits[:-1]
    if not digits.isdecimal():
        raise ValueError(f"invalid size {text!r}: expected a whole number with an optional "
                         "K/M/G/T suffix (binary: 1K = 1024)")
    value = int(digits) * unit
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
