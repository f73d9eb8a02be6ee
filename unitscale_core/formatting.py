"""Numbers as the GUI and the CLI print them: shares that never round to a false 0% or 100%,
and no negative zero.

``f"{x:.0%}"`` turns 258/259 into "100%" and 1/300 into "0%", each a claim the data does not
make ("all agree", "none do"). :func:`percent` keeps the requested precision but says ">99%" or
"<1%" where rounding would reach a bound the value does not. ``f"{-0.001:.2f}"`` is "-0.00";
:func:`number` drops the sign of a value that is shown as zero.
"""

from __future__ import annotations

import math

__all__ = ["number", "percent", "share"]


def number(x: float, spec: str = ".2f") -> str:
    """``format(x, spec)`` without the sign of a shown zero: −0.001 at ``.2f`` is "0.00",
    −0.0 at ``.4g`` is "0" (a "-" before zero digits says nothing true)."""
    text = format(x, spec)
    if text[:1] == "-" and _is_zero(text[1:]):
        return ("+" if "+" in spec else "") + text[1:]
    return text


def _is_zero(text: str) -> bool:
    mantissa = text.lower().split("e", 1)[0]
    return bool(mantissa) and set(mantissa) <= set("0.,")


def percent(fraction: float, decimals: int = 0, *, significant: int | None = None) -> str:
    """``fraction`` (1 = 100%) as a percentage rounded to ``decimals`` decimals (or to
    ``significant`` significant digits), except that rounding never reaches 100% for a
    fraction below 1, nor 0% for one above 0:

    * ``0 < 100·f`` that would show as 0 → "<1%" (``decimals=1``: "<0.1%");
    * ``100·f < 100`` that would show as 100 → ">99%" (``decimals=1``: ">99.9%";
      ``significant=3``: ">99.9%").

    Exactly 0 and exactly 1 are "0%" and "100%"; values outside [0, 1] are formatted as they
    are (never "-0%").
    """
    value = 100.0 * fraction
    if not math.isfinite(value):
        return f"{value}%"
    spec = f".{significant}g" if significant is not None else f".{decimals}f"
    text = number(value, spec)
    shown = float(text)
    if 0.0 < value < 100.0:
        if shown >= 100.0:
            if significant is not None:
                below = 100.0 - 10.0 ** (2 - significant)
                digits = max(significant - 2, 0)
            else:
                below = 100.0 - 10.0 ** -decimals
                digits = decimals
            return f">{below:.{digits}f}%"
        if shown == 0.0:  # (only fixed decimals reach this: "g" keeps a leading digit)
            return f"<{10.0 ** -decimals:.{decimals}f}%"
    return f"{text}%"


def share(part: int, whole: int, decimals: int = 0) -> str:
    """"part/whole (p%)" with :func:`percent`'s honest rounding: 258/259 is "258/259 (>99%)",
    259/259 "259/259 (100%)", and 0/0 "0/0" (no share of nothing)."""
    if whole <= 0:
        return f"{part}/{whole}"
    return f"{part}/{whole} ({percent(part / whole, decimals)})"
