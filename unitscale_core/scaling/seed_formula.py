"""The seed document's "unit scaling" formula — not Unit Scaling.

The project's seed document (§4.3, with code in §5.3) calls this "unit scaling"::

    d_e        = log(P_t) / log(α)
    Parameters = β · d_e

where ``P_t`` is a target performance, ``α`` a base and ``β`` a parameters-per-unit factor.
It is unrelated to Unit Scaling as published by Blake, Orr & Luschi 2023 ("Unit Scaling:
Out-of-the-Box Low-Precision Training", arXiv:2303.11257), which scales operations so that
weights, activations and gradients have unit variance (see :mod:`.formats` for why that
matters). This module evaluates the seed's formula exactly as written and says plainly when
its answer is meaningless; it never clamps.

``d_e`` is positive only when ``log P_t`` and ``log α`` have the same sign, i.e. when ``P_t``
and ``α`` are on the same side of 1. The seed's own example (``P_t = 0.85``, ``α = 1.2``,
``β = 10⁶``) gives ``d_e ≈ −0.891`` and ``Parameters ≈ −8.91·10⁵``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

__all__ = ["SeedFormulaError", "SeedFormulaResult", "seed_formula"]


class SeedFormulaError(ValueError):
    """Invalid inputs to :func:`seed_formula`.

    ``field`` names the first invalid input (``"target"``, ``"alpha"`` or ``"beta"``) and
    ``reason`` says why; ``errors`` lists every ``(field, reason)`` found, in input order.
    """

    def __init__(self, errors: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> None:
        if not errors:
            raise TypeError("SeedFormulaError needs at least one (field, reason) pair")
        self.errors: tuple[tuple[str, str], ...] = tuple(errors)
        self.field: str = self.errors[0][0]
        self.reason: str = self.errors[0][1]
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in self.errors))

    @property
    def fields(self) -> tuple[str, ...]:
        """Every invalid field, in input order."""
        return tuple(field for field, _ in self.errors)


@dataclass(frozen=True)
class SeedFormulaResult:
    """``d_e`` and ``parameters = β·d_e`` as computed; ``warning`` is ``""`` when sound."""

    d_e: float
    parameters: float
    warning: str


def _finite_number(field: str, value: object, errors: list[tuple[str, str]]) -> float | None:
    """``value`` as a float, or None after recording why it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, Real):
        errors.append((field, f"must be a finite number, got {value!r}"))
        return None
    number = float(value)
    if not math.isfinite(number):
        errors.append((field, f"must be a finite number, got {number!r}"))
        return None
    return number


def seed_formula(target: float, alpha: float, beta: float) -> SeedFormulaResult:
    """Evaluate the seed document's §4.3/§5.3 formula ``d_e = log P_t / log α``, ``β·d_e``.

    This is *not* Unit Scaling (Blake, Orr & Luschi 2023); see the module docstring.

    Inputs must be finite real numbers (bools, strings, NaN and inf are rejected) with
    ``target > 0`` and ``alpha > 0`` (logarithms), ``alpha != 1`` (``log 1 = 0`` would divide by
    zero) and ``beta > 0``. All problems are collected and raised together as one
    :class:`SeedFormulaError` whose ``field`` is the first bad input.

    The result is never clamped. ``warning`` is ``""`` when ``d_e > 0`` (and the count is a
    positive finite number); otherwise it explains why the count is meaningless.
    """
    errors: list[tuple[str, str]] = []
    p_t = _finite_number("target", target, errors)
    a = _finite_number("alpha", alpha, errors)
    b = _finite_number("beta", beta, errors)
    if p_t is not None and p_t <= 0:
        errors.append(("target", f"must be > 0 (log P_t is undefined otherwise), got {p_t!r}"))
    if a is not None and a <= 0:
        errors.append(("alpha", f"must be > 0 (log α is undefined otherwise), got {a!r}"))
    elif a is not None and a == 1:
        errors.append(("alpha", "must not be 1 (log 1 = 0, so d_e would divide by zero)"))
    if b is not None and b <= 0:
        errors.append(("beta", f"must be > 0 (β is parameters per unit of d_e), got {b!r}"))
    if errors:
        order = {"target": 0, "alpha": 1, "beta": 2}
        raise SeedFormulaError(sorted(errors, key=lambda e: order[e[0]]))
    assert p_t is not None and a is not None and b is not None

    log_p, log_a = math.log(p_t), math.log(a)
    d_e = log_p / log_a
    parameters = b * d_e
    return SeedFormulaResult(d_e, parameters, _warning(p_t, a, d_e, parameters))


def _warning(p_t: float, alpha: float, d_e: float, parameters: float) -> str:
    if d_e == 0:
        return (
            f"P_t = {p_t:g} gives log P_t = 0, so d_e = 0 and the parameter count β·d_e is 0: "
            "a model with zero parameters is meaningless. The formula only gives a positive "
            "count when P_t and α are on the same side of 1 (both above or both below)."
        )
    if d_e < 0:
        side_p = "below" if p_t < 1 else "above"
        side_a = "below" if alpha < 1 else "above"
        sign_p = "negative" if p_t < 1 else "positive"
        sign_a = "negative" if alpha < 1 else "positive"
        return (
            f"P_t = {p_t:g} is {side_p} 1 but α = {alpha:g} is {side_a} 1, so log P_t is "
            f"{sign_p} and log α is {sign_a}: d_e = log P_t / log α = {d_e:.4g} is negative, "
            f"and so is the parameter count β·d_e = {parameters:.4g}. A negative parameter "
            "count is meaningless. The formula only gives a positive count when P_t and α are "
            "on the same side of 1 (both above or both below). The value is shown as computed, "
            "not clamped."
        )
    if not math.isfinite(parameters):
        return (
            f"β·d_e overflows the floating-point range (d_e = {d_e:.4g}): the parameter count "
            "is not a usable number."
        )
    if parameters == 0:
        return (
            f"β·d_e underflows to 0 (d_e = {d_e:.4g}): a model with zero parameters is "
            "meaningless."
        )
    return ""
