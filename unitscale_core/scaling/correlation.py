"""Which part of a tensor's variance is shared between its rows.

A Transformer's tensors are not i.i.d. across tokens: attention averages values over a
sequence, so its output carries a component common to every position of that sequence; biases
and the mean of GELU/ReLU put a component common to *every* row. These shared parts do not
shrink when attention averages again, and they add coherently in weight and bias gradients
(sums over rows), so a scalar RMS per tensor is not enough to predict either. Each tensor is
described by three variances (:class:`Sig`):

* ``u``: independent from token to token;
* ``s``: shared by the tokens of one sequence, independent across sequences;
* ``m``: shared by every token of the batch.

``rms = √(u + s + m)``. For two tokens of the same sequence the correlation is
``(s + m)/total``; of different sequences ``m/total``.

Elementwise nonlinearities map correlations through their Hermite expansion (Mehler's
formula): with ``f(σz) = Σ_k c_k He_k(z)`` for standard normal ``z``, two inputs of correlation
``ρ`` give ``E[f(x) f(y)] = Σ_k c_k² k! ρ^k``; ``c_0² = E[f]²`` is the mean's contribution.
The coefficients are computed once per input scale by Gauss–Hermite quadrature (96 nodes).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numpy.polynomial.hermite_e import hermegauss

from .rules import _act_f_df, _key

HERMITE_ORDER = 10
_NODES, _WEIGHTS = hermegauss(96)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


class Sig:
    """Variances of a tensor's independent (``u``), per-sequence (``s``) and global (``m``)
    parts. Immutable by convention (every operation returns a new one); a slotted class rather
    than a frozen dataclass because a 96-layer prediction creates thousands of them."""

    __slots__ = ("u", "s", "m")

    def __init__(self, u: float, s: float = 0.0, m: float = 0.0):
        self.u, self.s, self.m = u, s, m

    def __repr__(self) -> str:
        return f"Sig(u={self.u:.4g}, s={self.s:.4g}, m={self.m:.4g})"

    @property
    def total(self) -> float:
        return self.u + self.s + self.m

    @property
    def rms(self) -> float:
        total = self.u + self.s + self.m  # inline: called ~20k times per 96-layer prediction
        return math.sqrt(total) if total > 0 else 0.0

    @property
    def shared(self) -> float:
        """Covariance of two tokens of the same sequence."""
        return self.s + self.m

    def scaled(self, gain: float) -> Sig:
        """The tensor multiplied by ``gain`` (variances × gain²)."""
        g2 = gain * gain
        return Sig(self.u * g2, self.s * g2, self.m * g2)

    def normalised(self, rms: float) -> Sig:
        """The same fractions at RMS ``rms`` (per-token normalisation, e.g. LayerNorm)."""
        total = self.total
        return self.scaled(rms / math.sqrt(total)) if total > 0 else Sig(rms * rms)

    def plus(self, other: Sig) -> Sig:
        """Sum of two independent tensors."""
        return Sig(self.u + other.u, self.s + other.s, self.m + other.m)

    def plus_global(self, var: float) -> Sig:
        """Add a component common to every row (a bias vector) of variance ``var``."""
        return Sig(self.u, self.s, self.m + var)

    def correlations(self) -> tuple[float, float]:
        """(same-sequence, different-sequence) correlation between two tokens."""
        total = self.total
        if total <= 0:
            return 0.0, 0.0
        return min(self.shared / total, 1.0), min(self.m / total, 1.0)


def from_pair_covariances(var: float, same_seq: float, other_seq: float) -> Sig:
    """A Sig from a token's variance and its covariance with another token of the same and
    of a different sequence."""
    m = max(other_seq, 0.0)
    s = max(same_seq - m, 0.0)
    return Sig(max(var - s - m, 0.0), s, m)


def _relu_f_df(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.maximum(y, 0.0), (y > 0).astype(np.float64)


@lru_cache(maxsize=2048)
def hermite_power(kind: str, sigma_key: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(c_k² k!)`` for ``f(σz)`` and for ``f'(σz)``, ``k = 0 … HERMITE_ORDER``.

    ``Σ_k`` of each is ``E[f²]`` (``E[f'²]``) up to the truncated tail; the kernels below put
    the tail into the ``k = HERMITE_ORDER`` term so ``K(1)`` is exact.
    """
    z = _NODES
    y = sigma_key * z
    f, df = _relu_f_df(y) if kind == "relu" else _act_f_df(kind, y)
    table = _hermite_table(HERMITE_ORDER)
    out = []
    for values in (f, df):
        powers = []
        for k in range(HERMITE_ORDER + 1):
            c_k = float(_WEIGHTS @ (values * table[k])) / math.factorial(k)
            powers.append(c_k * c_k * math.factorial(k))
        total = float(_WEIGHTS @ (values * values))
        powers[-1] += max(total - sum(powers), 0.0)  # the truncated tail, at the top order
        out.append(tuple(powers))
    return out[0], out[1]


@lru_cache(maxsize=32)
def _hermite_table(order: int) -> tuple[np.ndarray, ...]:
    """Probabilists' Hermite polynomials ``He_k`` at the quadrature nodes."""
    z = _NODES
    table = [np.ones_like(z), z.copy()]
    for k in range(2, order + 1):
        table.append(z * table[-1] - (k - 1) * table[-2])
    return tuple(table)


def kernel(powers: tuple[float, ...], rho: float) -> float:
    """``Σ_k p_k ρ^k``: the covariance of ``f`` at two inputs of correlation ``ρ``."""
    return float(sum(p * rho**k for k, p in enumerate(powers)))


def elementwise(kind: str, x: Sig, out_gain: float = 1.0) -> Sig:
    """Forward of ``out_gain · f(x)`` for ``f`` in gelu, relu, silu."""
    sigma = x.rms
    if sigma <= 0:
        return Sig(0.0)
    pf, _ = hermite_power(kind, _key(sigma))
    scale = (sigma / _key(sigma)) ** 2 if kind == "relu" else 1.0  # relu is homogeneous
    rho_s, rho_m = x.correlations()
    var = kernel(pf, 1.0) * scale
    return from_pair_covariances(var, kernel(pf, rho_s) * scale,
                                 kernel(pf, rho_m) * scale).scaled(out_gain)


def elementwise_grad(kind: str, x: Sig, g: Sig, grad_gain: float = 1.0) -> Sig:
    """Backward of ``f``: ``grad_gain · f'(x) ⊙ g`` with ``g`` independent of ``x``."""
    sigma = x.rms
    if sigma <= 0:
        return Sig(0.0)
    _, pd = hermite_power(kind, _key(sigma))
    rho_s, rho_m = x.correlations()
    return product(g, pd, (rho_s, rho_m)).scaled(grad_gain)


def product(b: Sig, powers: tuple[float, ...], rhos: tuple[float, float]) -> Sig:
    """``f(a) ⊙ b`` for independent ``a`` (through its kernel ``powers`` and correlations
    ``rhos``) and ``b``: covariances multiply pair by pair."""
    rho_s, rho_m = rhos
    var = kernel(powers, 1.0) * b.total
    same = kernel(powers, rho_s) * b.shared
    other = kernel(powers, rho_m) * b.m
    return from_pair_covariances(var, same, other)


def silu_kernel(gate: Sig) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, float]]:
    """Hermite powers of silu and silu' at the gate's scale, and the gate's correlations."""
    pf, pd = hermite_power("silu", _key(max(gate.rms, 1e-12)))
    return pf, pd, gate.correlations()
