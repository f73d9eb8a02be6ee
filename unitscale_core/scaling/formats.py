"""Number formats and the headroom a zero-mean Gaussian tensor has in each of them.

A tensor whose values are ``X ~ N(0, σ²)`` (``σ`` is its RMS) is cast to a floating-point
format with round-to-nearest-even. What happens to each value depends only on ``|X|``:

* **underflow** — ``|X| ≤ s/2`` rounds to zero, where ``s`` is the smallest subnormal (the
  tie at exactly ``s/2`` goes to the even neighbour, which is zero);
* **subnormal** — ``s/2 < |X| < n − s/2`` lands on a subnormal and keeps fewer mantissa bits
  (``n`` is the smallest normal; the tie at ``n − s/2`` rounds up to ``n``, whose mantissa is
  even);
* **normal** — ``n − s/2 ≤ |X| < o``, the value keeps full relative precision;
* **overflow** — ``|X| ≥ o`` where ``o = max_normal + ulp_top/2`` and ``ulp_top`` is the
  spacing of the top binade: beyond ``o`` round-to-nearest would pass ``max_normal``.
  fp32, bf16, fp16 and fp8_e5m2 then give ``inf``. fp8_e4m3fn has no ``inf``: torch 2.13 saturates
  to ±448 (``inf`` too; only ``NaN`` stays ``NaN``), while older torch releases gave ``NaN`` —
  either way the value is lost, so it counts as overflow. (e4m3fn's 448 has an even mantissa,
  so its tie at 464 rounds down to 448; the continuous fractions below do not depend on ties.)

All thresholds above were checked against torch's casts (``tests/core/test_formats.py``).

For ``X ~ N(0, σ²)``, with ``z(t) = t / (σ·√2)``::

    P(|X| < t) = erf(z(t))        P(|X| > t) = erfc(z(t))
    underflow  = erf(z(s/2))
    subnormal  = erf(z(n − s/2)) − erf(z(s/2))
    normal     = erf(z(o)) − erf(z(n − s/2))
    overflow   = erfc(z(o))

Each band is evaluated as a difference of ``erf`` values near zero and of ``erfc`` values in
the tail, so a fraction of 1e-300 is as accurate as one of 0.3 (no ``1 − erf`` cancellation).
The headroom is measured in binades (powers of two)::

    headroom_max_log2 = log2(max_normal / σ)     headroom_min_log2 = log2(σ / s)

This is the range analysis behind Unit Scaling — Blake, Orr & Luschi 2023, "Unit Scaling:
Out-of-the-Box Low-Precision Training", arXiv:2303.11257, §3: a tensor with σ = 1 sits in the
middle of every format's range. The FP8 limits are those of Micikevicius et al. 2022, "FP8
Formats for Deep Learning", arXiv:2209.05433 (E4M3: max 448, min normal 2⁻⁶, min subnormal 2⁻⁹;
E5M2: max 57344, 2⁻¹⁴, 2⁻¹⁶).

Pure Python + numpy: torch is imported only by :meth:`NumberFormat.torch_dtype`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "AT_RISK_OVERFLOW",
    "AT_RISK_SUBNORMAL",
    "AT_RISK_UNDERFLOW",
    "FORMATS",
    "FormatStats",
    "HeadroomStatus",
    "LOST_FRACTION",
    "NumberFormat",
    "gaussian_format_stats",
    "gaussian_format_table",
    "get_format",
    "headroom_status",
]

HeadroomStatus = Literal["zero", "fine", "at_risk", "lost"]

_SQRT2 = math.sqrt(2.0)
#: Below this ``z`` a band is computed from ``erf`` values, at or above it from ``erfc`` values.
_TAIL_Z = 1.0


@dataclass(frozen=True)
class NumberFormat:
    """A binary floating-point format: its largest and smallest magnitudes.

    ``torch_dtype_name`` is the attribute of ``torch`` holding the matching dtype
    (``"float8_e4m3fn"``, ...). The derived thresholds are exact binary fractions.
    """

    name: str
    max_normal: float
    min_normal: float
    min_subnormal: float
    torch_dtype_name: str

    @property
    def mantissa_bits(self) -> int:
        """Explicit mantissa bits ``m``: ``min_normal / min_subnormal = 2**m``."""
        return round(math.log2(self.min_normal / self.min_subnormal))

    @property
    def ulp_at_max(self) -> float:
        """Spacing of the top binade: ``2**(floor(log2(max_normal)) − m)``."""
        return math.ldexp(1.0, math.frexp(self.max_normal)[1] - 1 - self.mantissa_bits)

    @property
    def underflow_threshold(self) -> float:
        """``s/2``: magnitudes at or below it round to zero."""
        return self.min_subnormal / 2

    @property
    def normal_threshold(self) -> float:
        """``n − s/2``: magnitudes at or above it round to a normal number."""
        return self.min_normal - self.min_subnormal / 2

    @property
    def overflow_threshold(self) -> float:
        """``max_normal + ulp_at_max/2``: magnitudes beyond it overflow (inf, NaN or clipped)."""
        return self.max_normal + self.ulp_at_max / 2

    def torch_dtype(self) -> Any:
        """The ``torch.dtype`` (imports torch, which the rest of this module never does)."""
        import torch

        return getattr(torch, self.torch_dtype_name)


FORMATS: dict[str, NumberFormat] = {
    f.name: f
    for f in (
        NumberFormat("fp32", (2 - 2.0**-23) * 2.0**127, 2.0**-126, 2.0**-149, "float32"),
        NumberFormat("bf16", (2 - 2.0**-7) * 2.0**127, 2.0**-126, 2.0**-133, "bfloat16"),
        NumberFormat("fp16", 65504.0, 2.0**-14, 2.0**-24, "float16"),
        NumberFormat("fp8_e4m3", 448.0, 2.0**-6, 2.0**-9, "float8_e4m3fn"),
        NumberFormat("fp8_e5m2", 57344.0, 2.0**-14, 2.0**-16, "float8_e5m2"),
    )
}


def get_format(fmt: NumberFormat | str) -> NumberFormat:
    """``fmt`` itself, or the entry of :data:`FORMATS` it names (ValueError if unknown)."""
    if isinstance(fmt, NumberFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(
            f"fmt: unknown number format {fmt!r}; expected one of {', '.join(FORMATS)}"
        ) from None


@dataclass(frozen=True)
class FormatStats:
    """Fate of the values of ``N(0, rms²)`` cast to ``fmt`` (fractions sum to 1)."""

    fmt: str
    rms: float
    underflow: float
    subnormal: float
    normal: float
    overflow: float
    headroom_max_log2: float
    headroom_min_log2: float


# -- the shared vectorised core -------------------------------------------------------------


def _apply(fn: Callable[[float], float], z: np.ndarray) -> np.ndarray:
    """``fn`` elementwise via ``map`` over a list: ~60 µs per 1,000 values, libm-exact."""
    flat = z.ravel().tolist()
    return np.fromiter(map(fn, flat), dtype=np.float64, count=len(flat)).reshape(z.shape)


def _band(z_lo: np.ndarray, z_hi: np.ndarray) -> np.ndarray:
    """``P(lo < |X| < hi)`` from ``z`` values, free of cancellation at either end."""
    out = np.empty(z_lo.shape)
    near = z_lo < _TAIL_Z
    tail = ~near
    out[near] = _apply(math.erf, z_hi[near]) - _apply(math.erf, z_lo[near])
    out[tail] = _apply(math.erfc, z_lo[tail]) - _apply(math.erfc, z_hi[tail])
    return out


def _table(rms: np.ndarray, fmt: NumberFormat) -> dict[str, np.ndarray]:
    with np.errstate(divide="ignore", over="ignore"):
        scale = 1.0 / (rms * _SQRT2)  # inf where rms == 0 (and for subnormal rms): every z → inf
        z_u = fmt.underflow_threshold * scale
        z_n = fmt.normal_threshold * scale
        z_o = fmt.overflow_threshold * scale
        log2_rms = np.log2(rms)  # -inf where rms == 0
    z_u, z_n, z_o = (np.where(np.isnan(z), np.inf, z) for z in (z_u, z_n, z_o))
    return {
        "underflow": _apply(math.erf, z_u),
        "subnormal": _band(z_u, z_n),
        "normal": _band(z_n, z_o),
        "overflow": _apply(math.erfc, z_o),
        "headroom_max_log2": np.asarray(math.log2(fmt.max_normal) - log2_rms),
        "headroom_min_log2": np.asarray(log2_rms - math.log2(fmt.min_subnormal)),
    }


# -- public API ------------------------------------------------------------------------------


def gaussian_format_stats(rms: float, fmt: NumberFormat | str) -> FormatStats:
    """Underflow, subnormal, normal and overflow fractions of ``N(0, rms²)`` cast to ``fmt``.

    See the module docstring for the formulas. ``rms == 0`` gives ``underflow == 1``,
    ``headroom_max_log2 == inf`` and ``headroom_min_log2 == -inf``. ``rms`` must be a finite,
    non-negative real number (not a bool); anything else raises ValueError naming ``rms``.
    """
    if isinstance(rms, bool) or not isinstance(rms, Real):
        raise ValueError(f"rms: expected a finite number ≥ 0, got {rms!r}")
    value = float(rms)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"rms: expected a finite number ≥ 0, got {value!r}")
    f = get_format(fmt)
    row = _table(np.array([value]), f)
    return FormatStats(f.name, value, **{k: float(v[0]) for k, v in row.items()})


def gaussian_format_table(
    rms_array: npt.ArrayLike, fmt: NumberFormat | str
) -> dict[str, np.ndarray]:
    """:func:`gaussian_format_stats` for every RMS in ``rms_array`` at once.

    Returns float64 arrays shaped like ``rms_array`` under the keys ``underflow``,
    ``subnormal``, ``normal``, ``overflow``, ``headroom_max_log2`` and ``headroom_min_log2``.
    A 1,000-element call takes well under 2 ms. Non-finite or negative entries raise
    ValueError naming ``rms`` and the first offending index.
    """
    f = get_format(fmt)
    try:
        rms = np.asarray(rms_array, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rms: expected an array of finite numbers ≥ 0 ({exc})") from None
    bad = ~np.isfinite(rms) | (rms < 0)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"rms: expected finite numbers ≥ 0, got {rms[index]!r} at index {index}"
        )
    return _table(rms, f)


#: ``lost`` when more than this fraction of values round to zero or overflow.
LOST_FRACTION = 0.5
#: ``at_risk`` when more than this fraction overflows (inf/NaN poisons reductions; ~4.9 σ).
AT_RISK_OVERFLOW = 1e-6
#: ``at_risk`` when more than this fraction underflows to zero.
AT_RISK_UNDERFLOW = 1e-3
#: ``at_risk`` when more than this fraction lands in the (imprecise) subnormal range.
AT_RISK_SUBNORMAL = 0.1


def headroom_status(stats: FormatStats) -> HeadroomStatus:
    """Classify a tensor's fit in its format.

    * ``"zero"``: ``rms == 0`` — every value is exactly 0, which every format represents: no
      value is lost (a LayerNorm bias at initialisation, the gradient of a key bias, which
      softmax cancels). Its fractions still read ``underflow == 1`` (the Gaussian limit), so
      this test comes first;
    * ``"lost"``: ``underflow + overflow > 0.5`` (:data:`LOST_FRACTION`) — most values are gone;
    * ``"at_risk"``: ``overflow > 1e-6`` (:data:`AT_RISK_OVERFLOW`; overflowed values become
      inf/NaN or are clipped and poison every sum they enter — for a Gaussian this means less
      than ~4.9 σ below the overflow threshold), or ``underflow > 1e-3``
      (:data:`AT_RISK_UNDERFLOW`), or ``subnormal > 0.1`` (:data:`AT_RISK_SUBNORMAL`; those
      values keep fewer mantissa bits);
    * ``"fine"`` otherwise.

    A unit-scaled tensor (rms = 1) is ``"fine"`` in every format of :data:`FORMATS`.
    """
    if stats.rms == 0:
        return "zero"
    if stats.underflow + stats.overflow > LOST_FRACTION:
        return "lost"
    if (
        stats.overflow > AT_RISK_OVERFLOW
        or stats.underflow > AT_RISK_UNDERFLOW
        or stats.subnormal > AT_RISK_SUBNORMAL
    ):
        return "at_risk"
    return "fine"


def headroom_status_array(
    underflow: npt.ArrayLike, subnormal: npt.ArrayLike, overflow: npt.ArrayLike,
    rms: npt.ArrayLike | None = None,
) -> np.ndarray:
    """:func:`headroom_status` of many tensors at once, from their fraction arrays.

    Returns a string array of ``"zero"`` / ``"fine"`` / ``"at_risk"`` / ``"lost"`` with the
    same rules and thresholds (a 96-layer model's ~6000 rows in well under a millisecond).
    ``rms`` tells the exactly-zero tensors (``"zero"``) from tiny ones, whose fractions are the
    same; without it there is no ``"zero"``.
    """
    u, s, o = (np.asarray(a, dtype=np.float64) for a in (underflow, subnormal, overflow))
    lost = u + o > LOST_FRACTION
    risk = (o > AT_RISK_OVERFLOW) | (u > AT_RISK_UNDERFLOW) | (s > AT_RISK_SUBNORMAL)
    out = np.where(lost, "lost", np.where(risk, "at_risk", "fine")).astype("<U7")
    if rms is not None:
        out[np.broadcast_to(np.asarray(rms, dtype=np.float64) == 0, out.shape)] = "zero"
    return out
