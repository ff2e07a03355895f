"""Byte sizes: one parser for every size the config or a flag gives, one way to print them. Pure."""

import re
from decimal import Decimal

# Kubernetes quantities (8Gi, 512Mi, 8G, 8e9; apimachinery resource.Quantity) and IEC units (8GiB).
# `8GB` is refused: etcd's own docs write "8GB" for 8 GiB, SI says 8,000,000,000, so it is ambiguous.
_BYTE_UNITS = {
    "": 1,
    "B": 1,
    **{unit: 1000**power for power, unit in enumerate("kMGTPE", 1)},
    **{f"{unit}i": 1024**power for power, unit in enumerate("KMGTPE", 1)},
    **{f"{unit}iB": 1024**power for power, unit in enumerate("KMGTPE", 1)},
}
_AMBIGUOUS_UNITS = {f"{unit}B" for unit in "kKMGTPE"}
_BYTE_SIZE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[A-Za-z]*)")
MAX_BYTES = 2**63 - 1  # etcd's sizes are int64
BYTE_SIZE_HELP = "bytes, or a number with a unit: 8Gi or 8GiB (binary), 8G or 8e9 (decimal)"


def parse_byte_size(value: object) -> int:
    """Bytes from an int or a text like `8Gi`, `512MiB`, `8G`, `8e9`; a ValueError says what to write.

    A bare number is bytes. Binary units: Ki Mi Gi Ti Pi Ei and KiB ... EiB; decimal: k M G T P E.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a byte size: {BYTE_SIZE_HELP}")
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float) and value.is_integer():
        number = Decimal(int(value))
    elif isinstance(value, str) and (match := _BYTE_SIZE.fullmatch(value.strip())):
        unit = match["unit"]
        if unit in _AMBIGUOUS_UNITS:
            digits, letter = match["number"], unit[0]
            raise ValueError(
                f"{value!r} is ambiguous: write {digits}{letter.upper()}i (binary, 1024-based) or "
                f"{digits}{'k' if letter in 'kK' else letter} (decimal, 1000-based)"
            )
        if unit not in _BYTE_UNITS:
            raise ValueError(
                f"{value!r}: unknown unit {unit!r}; use Ki Mi Gi Ti Pi Ei, KiB ... EiB (binary) or "
                "k M G T P E (decimal)"
            )
        try:
            number = Decimal(match["number"]) * _BYTE_UNITS[unit]
        except ArithmeticError:  # decimal.Overflow for an exponent like 1e9999999
            raise ValueError(f"{value!r} is not a byte size: {BYTE_SIZE_HELP}") from None
    else:
        raise ValueError(f"{value!r} is not a byte size: {BYTE_SIZE_HELP}")
    if number < 0:
        raise ValueError(f"{value!r}: a size cannot be negative")
    if number > MAX_BYTES:
        raise ValueError(f"{value!r} is too large (at most {MAX_BYTES} bytes, 8 EiB)")
    if number != number.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(number)


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
