"""Hermite coefficients of the elementwise nonlinearities (GELU, ReLU, SiLU and their derivatives).

Two tokens whose pre-activations are standard normal with correlation ``ρ``, scaled by ``σ_a``
and ``σ_b``, have ``E[f(σ_a z_1) f(σ_b z_2)] = Σ_k A_a[k] A_b[k] ρ^k`` (Mehler's formula), with
``A[k] = c_k √k!`` the coefficients of ``f(σz) = Σ_k c_k He_k(z)``; ``A[0] = E f`` is the mean
every token shares. The coefficients are computed once per scale by Gauss–Hermite quadrature
(96 nodes), up to :data:`HERMITE_ORDER`; the truncated tail goes into the top order so that
``Σ_k A[k]² = E f²`` exactly.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numpy.polynomial.hermite_e import hermegauss

from .rules import _act_f_df

HERMITE_ORDER = 10
_NODES, _WEIGHTS = hermegauss(96)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


def _relu_f_df(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.maximum(y, 0.0), (y > 0).astype(np.float64)


@lru_cache(maxsize=32)
def _hermite_table(order: int) -> tuple[np.ndarray, ...]:
    """Probabilists' Hermite polynomials ``He_k`` at the quadrature nodes."""
    z = _NODES
    table = [np.ones_like(z), z.copy()]
    for k in range(2, order + 1):
        table.append(z * table[-1] - (k - 1) * table[-2])
    return tuple(table)


@lru_cache(maxsize=2048)
def hermite_coefficients(kind: str, sigma_key: float) -> tuple[np.ndarray, np.ndarray]:
    """Signed ``c_k √k!`` of ``f(σz)`` and ``f'(σz)``, ``k = 0 … HERMITE_ORDER``, so that
    ``E[f(σ_a z_1) f(σ_b z_2)] = Σ_k A_a[k] A_b[k] ρ^k`` for two scales (Mehler). The
    truncated tail goes into the top order (so ``Σ A² = E f²`` exactly)."""
    z = _NODES
    y = sigma_key * z
    f, df = _relu_f_df(y) if kind == "relu" else _act_f_df(kind, y)
    table = _hermite_table(HERMITE_ORDER)
    out = []
    for values in (f, df):
        coef = np.array([float(_WEIGHTS @ (values * table[k])) / math.sqrt(math.factorial(k))
                         for k in range(HERMITE_ORDER + 1)])
        tail = float(_WEIGHTS @ (values * values)) - float(coef @ coef)
        top = coef[-1]
        coef[-1] = math.copysign(math.sqrt(top * top + max(tail, 0.0)), top if top else 1.0)
        coef.setflags(write=False)
        out.append(coef)
    return out[0], out[1]
