"""Position-resolved covariance of a tensor's tokens: what attention averages and sums share.

A tensor ``x[b, i, :]`` (batch ``b``, position ``i``) at initialisation is described, per
feature and averaged over features, by

* ``u[i]``: the variance that belongs to token ``i`` alone;
* ``C[i, j]``: the covariance of two *distinct* tokens ``i ≠ j`` of one sequence;
* ``M[i, j]``: the covariance of tokens of two different sequences;

so ``Var x_i = u_i + C_ii``. Positions matter: causal attention lets token 0 see only itself
and every later token average it in, so early tokens keep their own part while late ones
share almost everything (a measured 12-layer unit-scaled decoder keeps 100× more token-specific
variance at position 0 than at 31); its backward piles gradient onto the first keys; local
windows share only with neighbours; sinusoidal encodings make near positions alike. One
scalar per part (the earlier model) averaged these away and missed by 2–8 log2 in deep models.

Long sequences are grouped into at most :data:`MAX_BINS` bins (single positions first, then
geometrically wider): tokens of one bin are exchangeable, ``C[a, a]`` is the covariance of two
distinct tokens of bin ``a``. Expected attention weights are uniform over each query's
allowed keys (logits at initialisation are exchangeable), except under ALiBi's fixed ramps
(``attention_map``'s ``slope``); their spread adds to the token-specific part through
``E[p²] − p̄²``. RoPE rotates queries and keys by position, which decorrelates what they
share across positions (:func:`rotated`).
"""

from __future__ import annotations

import math
import threading
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from .hermite import HERMITE_ORDER, hermite_coefficients
from .rules import _key, _keys

#: Sequences up to this long are resolved position by position; longer ones are binned.
MAX_BINS = 48
#: Binned grids keep this many leading positions single (causal structure is sharpest there).
SINGLE_POSITIONS = 16
#: Attention maps of longer sequences are built on this many positions scaled up.
MAX_MAP_POSITIONS = 2048


class Grid(NamedTuple):
    """Position bins of a length-``t`` sequence: ``edges`` (K+1), sizes ``n`` (K)."""

    t: int
    edges: np.ndarray
    n: np.ndarray  # float sizes
    w: np.ndarray  # n / t: weights of a mean over positions
    pairs: np.ndarray  # (K, K) ordered pairs of distinct tokens: n_a n_b − δ_ab n_a
    nn: np.ndarray  # (K, K) n_a n_b
    single: np.ndarray  # indices of the bins one position wide
    upper: tuple[np.ndarray, np.ndarray]  # the pairs a ≤ b (of a symmetric matrix)
    upper_flat: np.ndarray  # the same as indices into a flattened K×K matrix
    half_index: np.ndarray  # (K, K): index of (a, b) among those pairs
    zero: np.ndarray  # (K, K) zeros: C or M of a tensor that has none
    none: np.ndarray  # (0, K, K): the stacked pair matrices of a tensor with neither


@lru_cache(maxsize=64)
def grid(t: int) -> Grid:
    """Bins for ``t`` positions: one per position up to :data:`MAX_BINS`, else the first
    :data:`SINGLE_POSITIONS` single and the rest geometrically spaced."""
    t = max(int(t), 1)
    if t <= MAX_BINS:
        edges = np.arange(t + 1)
    elif t <= MAX_MAP_POSITIONS:
        tail = np.geomspace(SINGLE_POSITIONS, t, MAX_BINS - SINGLE_POSITIONS + 1)
        edges = np.unique(np.concatenate([np.arange(SINGLE_POSITIONS),
                                          np.round(tail).astype(np.int64)]))
    else:  # the map's bins scaled up, so every bin holds at least one map position
        edges = np.floor(grid(MAX_MAP_POSITIONS).edges * (t / MAX_MAP_POSITIONS))
        edges[-1] = t
        edges = np.unique(edges.astype(np.int64))
    n = np.diff(edges).astype(np.float64)
    nn = np.outer(n, n)
    pairs = nn - np.diag(n)
    k = len(n)
    upper = np.triu_indices(k)
    half_index = np.empty((k, k), dtype=np.intp)
    half_index[upper] = half_index[upper[::-1]] = np.arange(len(upper[0]))
    out = Grid(t, edges, n, n / t, pairs, nn, np.flatnonzero(n <= 1), upper,
               upper[0] * k + upper[1], half_index, np.zeros((k, k)), np.zeros((0, k, k)))
    for arr in (*out[1:7], *upper, *out[8:]):
        arr.setflags(write=False)
    return out


class Cov:
    """``u`` (K), ``C`` (K×K) and ``M`` (K×K) over :class:`Grid` ``g`` (module notes).

    ``C`` and ``M`` are kept stacked, ``S = [C, M]``, so that an operation on both is one
    numpy call (a 96-layer prediction makes thousands, each costing more in call overhead than
    in arithmetic at K = 48). Trailing ones that are exactly zero are left out: ``S = [C]``
    for most gradients (little of the backward is shared across sequences: the loss gradient
    is not; what the forward shares across the batch reaches the attention gradients),
    ``S = []`` for independent tokens; ``C`` and ``M`` read as zeros then. An operation's
    result is what its arithmetic on the zeros would give (0·x = 0, x + 0 = x), without
    doing it.

    Immutable by convention: every operation returns a new one (arrays may be shared
    between objects, and none is written after it is made). That lets summaries (``var``,
    ``total``) and what several ops derive from one tensor (:attr:`memo`: a linear layer's
    output, pair-sum weights, nonlinearity kernels, row variances) be computed once per
    object.
    """

    __slots__ = ("g", "u", "S", "_var", "_total", "_same", "_memo")

    def __init__(self, g: Grid, u: np.ndarray, C: np.ndarray, M: np.ndarray):
        self.g, self.u, self.S = g, u, np.stack((C, M))
        self._var = self._total = self._same = self._memo = None

    @classmethod
    def of(cls, g: Grid, u: np.ndarray, S: np.ndarray) -> Cov:
        """From ``u`` and the stacked pair matrices ``S`` (``[C, M]``, ``[C]`` or ``[]``)."""
        out = cls.__new__(cls)
        out.g, out.u, out.S = g, u, S
        out._var = out._total = out._same = out._memo = None
        return out

    @property
    def C(self) -> np.ndarray:
        S = self.S
        return S[0] if len(S) else self.g.zero

    @property
    def M(self) -> np.ndarray:
        S = self.S
        return S[1] if len(S) > 1 else self.g.zero

    @property
    def memo(self) -> dict:
        """Quantities derived from this tensor, by the name of what derives them."""
        memo = self._memo
        if memo is None:
            memo = self._memo = {}
        return memo

    # -- constructors ----------------------------------------------------------------------
    @staticmethod
    def independent(g: Grid, var: float | np.ndarray) -> Cov:
        """Tokens independent of each other (and of other sequences), variance ``var``."""
        u = np.array(var, dtype=np.float64)  # a copy
        return Cov.of(g, u if u.ndim else np.full(len(g.n), u), g.none)

    @staticmethod
    def constant(g: Grid, var: float) -> Cov:
        """One vector shared by every token of the batch (a bias), variance ``var``."""
        k = len(g.n)
        return Cov.of(g, np.zeros(k), np.full((2, k, k), float(var)))

    # -- summaries -------------------------------------------------------------------------
    @property
    def var(self) -> np.ndarray:
        """Variance of one token, per bin (read-only by convention)."""
        var = self._var
        if var is None:
            S = self.S
            var = self._var = self.u + S[0].diagonal() if len(S) else self.u
        return var

    @property
    def total(self) -> float:
        """Mean variance over positions (the tensor's RMS²)."""
        total = self._total
        if total is None:
            total = self._total = float(self.g.w @ self.var)
        return total

    @property
    def rms(self) -> float:
        total = self._total
        if total is None:
            total = self.total
        return math.sqrt(total) if total > 0 else 0.0

    @property
    def same(self) -> float:
        """Mean covariance of two distinct tokens of one sequence."""
        out = self._same
        if out is None:
            t = self.g.t
            out = self._same = (float(np.vdot(self.g.pairs, self.C)) / (t * (t - 1))
                                if t > 1 else 0.0)
        return out

    @property
    def m(self) -> float:
        """Mean covariance of tokens of two different sequences."""
        return float((self.g.nn * self.M).sum()) / (self.g.t * self.g.t)

    def parts(self) -> tuple[float, float, float]:
        """(independent, per-sequence, batch-wide) variances: the scalar summary that
        measurement reports (``u = total − same``, ``s = same − m``)."""
        total, same, m = self.total, self.same, self.m
        return total - same, same - m, m

    # -- algebra ---------------------------------------------------------------------------
    def scaled(self, gain: float) -> Cov:
        if gain == 1.0:  # most gains of a standard model (no dropout, plain residuals)
            return self
        g2 = gain * gain
        S = self.S
        out = Cov.of(self.g, self.u * g2, S * g2 if len(S) else S)
        if self._total is not None:
            out._total = self._total * g2
        return out

    def plus(self, other: Cov) -> Cov:
        """Sum of two independent tensors."""
        return Cov.of(self.g, self.u + other.u, _added(self.S, other.S))

    def plus_global(self, var: float) -> Cov:
        """Add a vector common to every row (a bias) of variance ``var``."""
        if var == 0:
            return self
        S = self.S
        if len(S) < 2:  # M (and C) become nonzero: write out the zeros they add to
            S = np.concatenate((S, np.zeros((2 - len(S), *S.shape[1:]))))
        return Cov.of(self.g, self.u, S + var)

    def minus_shared(self, F: np.ndarray, FM: np.ndarray) -> Cov:
        """Remove a deterministic component with pair covariances ``F`` (distinct tokens of
        a sequence) and ``FM`` (other sequences), e.g. sinusoidal encodings' row means."""
        C = self.C - F
        var = self.u + np.diagonal(C)
        # a token's variance cannot go below zero: take any overshoot back from C's diagonal
        C = C + np.diag(np.maximum(-var, 0.0))
        return Cov(self.g, self.u, C, self.M - FM)

    def normalised(self, rms: float) -> Cov:
        """Every token rescaled to RMS ``rms`` (a LayerNorm): ``x_i ↦ rms · x_i/σ_i``."""
        var = self.var
        if var.min() >= 1e-300:  # (the usual case, in fewer operations)
            return self.rescaled(rms / np.sqrt(var))
        return self.rescaled(np.where(var > 0, rms / np.sqrt(np.maximum(var, 1e-300)), 0.0))

    def rescaled(self, d: np.ndarray) -> Cov:
        """Token ``i`` multiplied by ``d[i]`` (per bin)."""
        S = self.S
        return Cov.of(self.g, self.u * (d * d), S * (d[:, None] * d) if len(S) else S)

    def correlations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per bin ``σ``, and the correlation matrices of distinct tokens of one sequence
        and of different sequences."""
        sd = np.sqrt(np.maximum(self.var, 1e-300))
        inv = 1.0 / np.outer(sd, sd)
        return sd, np.clip(self.C * inv, -1.0, 1.0), np.clip(self.M * inv, -1.0, 1.0)

    def pair_weights(self, b: int, m: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """This tensor's side of :func:`pair_sum` over ``b`` sequences: ``n ⊙ Var x`` and
        the stack ``[pairs ⊙ C, (b − 1) nn ⊙ M]``, its first ``m`` at most (a gradient has
        no ``M``). Memoised: a layer's input meets three gradients, q's, k's and v's."""
        S = self.S
        m = min(m, len(S))
        key = ("pair_weights", b, m)
        memo = self._memo
        if memo is None:
            memo = self._memo = {}
        out = memo.get(key)
        if out is None:
            n, weights = _bias_pair_weights(self.g.t, b)
            out = memo[key] = (n * self.var, weights[:m] * S[:m])
        return out

    def __repr__(self) -> str:
        u, s, m = self.parts()
        return f"Cov(u={u:.4g}, s={s:.4g}, m={m:.4g}, K={len(self.g.n)})"


def _added(S1: np.ndarray, S2: np.ndarray) -> np.ndarray:
    """``S1 + S2`` for stacks that may leave out trailing zero matrices."""
    if len(S1) == len(S2):
        return S1 + S2
    if len(S1) < len(S2):
        S1, S2 = S2, S1
    if not len(S2):
        return S1  # + 0 (immutable: shared)
    out = S1.copy()
    out[:len(S2)] += S2
    return out


@lru_cache(maxsize=64)
def _bias_pair_weights(t: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`Cov.pair_weights` of an all-ones tensor: ``Σ_rows g`` (a bias gradient); the
    stack multiplies any tensor's ``S`` into its own pair weights."""
    g = grid(t)
    out = g.n, np.stack((g.pairs, (b - 1) * g.nn))
    out[1].setflags(write=False)
    return out


def pair_sum(b: int, g: Cov, x: Cov | None) -> float:
    """``E[(Σ_rows g·x)²]`` per element over ``b`` sequences (``x`` None: ``Σ_rows g``),
    with ``g`` independent of ``x``: the same token, distinct tokens of one sequence and
    tokens of different sequences::

        b Σ_i Var g_i Var x_i + b Σ_{i≠j} C^g_ij C^x_ij + b(b − 1) Σ_ij M^g_ij M^x_ij
    """
    S = g.S
    n = len(S)
    nv, weights = _bias_pair_weights(g.g.t, b) if x is None else x.pair_weights(b, n)
    if not n:
        return b * float(nv @ g.var)
    if len(weights) != n:  # only the pair matrices both sides have (the rest are zeros)
        n = min(n, len(weights))
        weights, S = weights[:n], S[:n]
    return b * (float(nv @ g.var) + float(np.vdot(weights, S)))


# ============================================================================ attention maps

class AttentionMap(NamedTuple):
    """Binned statistics of the expected attention weights ``p̄_ij`` (uniform over allowed
    keys) of ``t`` queries on ``t`` keys.

    ``W[a, c]``: a query of bin ``a``'s weight on keys of bin ``c``; ``V[c, a]``: a key of
    bin ``c``'s total weight from queries of bin ``a``; ``Q[a, b, c]``: ``Σ_{j∈c} p̄_ij p̄_kj``
    for distinct queries ``i ∈ a``, ``k ∈ b`` (for a single-position bin and ``a = b``: the
    same query); ``Qt[c, d, a]``: ``Σ_{i∈a} p̄_ij p̄_il`` for distinct keys; ``R0[a, c]``:
    ``Σ_{j∈c} p̄_ij²`` for a query of ``a``; ``RT0[c, a]``: ``Σ_{i∈a} p̄_ij²`` for a key of
    ``c``; ``counts[a]``: allowed keys of a query of ``a``; ``r0[a]``: ``Σ_j p̄_ij²``
    (``R0``'s row sums); ``keys[a]``: ``counts[a]`` rounded to a whole row length (≥ 1), as
    the softmax statistics take it. ``Q`` and ``Qt`` are symmetric in their
    first two indices: ``Q_half``, ``Qt_half`` hold their rows ``a ≤ b`` only, and
    ``half_index[a, b]`` is the row of ``(a, b)`` there (:func:`_pair_overlaps`);
    ``pair_inverse[a]``: ``1/(1 − Σ_j p̄_ij²)``, 0 for a query with one key (no pairs);
    ``Q_by_second[b, a, c] = Q[a, b, c]`` (contiguous, for batched products over ``c``);
    ``WT``, ``VT``: ``Wᵀ`` and ``Vᵀ`` laid out row by row (a product with a transposed view
    costs a quarter more, and every layer makes several); ``r3[a]``: ``Σ_j p̄_ij³``.
    """

    W: np.ndarray
    V: np.ndarray
    Q: np.ndarray
    Qt: np.ndarray
    R0: np.ndarray
    RT0: np.ndarray
    counts: np.ndarray
    r0: np.ndarray
    keys: np.ndarray
    Q_half: np.ndarray
    Qt_half: np.ndarray
    half_index: np.ndarray
    pair_inverse: np.ndarray
    Q_by_second: np.ndarray
    WT: np.ndarray
    VT: np.ndarray
    r3: np.ndarray


def _mask(t: int, pattern: str, window: int, causal: bool) -> np.ndarray:
    """Allowed (query, key) pairs, as ``unitscale_core.model.masks`` builds them."""
    i = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    causal = causal or pattern == "causal"
    if pattern in ("full", "causal"):
        ok = np.ones((t, t), dtype=bool)
    else:
        d = i - j
        ok = np.abs(d) < window
        if pattern == "strided":
            ok |= d % window == 0
    if causal:
        ok &= j <= i
    return ok


@lru_cache(maxsize=64)
def attention_map(t: int, pattern: str, window: int, causal: bool,
                  slope: float = 0.0) -> AttentionMap:
    """:class:`AttentionMap` for ``t`` positions on :func:`grid` ``(t)``.

    ``slope`` > 0: an ALiBi head's fixed logit bias ``−slope·|i − j|`` (Press et al. 2022),
    so the expected weights are ``p̄_ij ∝ e^{−slope·|i−j|}`` over the allowed keys instead
    of uniform (the random logits at initialisation are exchangeable, the bias is not), and
    ``counts`` is each query's effective number of keys ``1/Σ_j p̄_ij²``.

    Sequences longer than :data:`MAX_MAP_POSITIONS` are mapped on that many positions, each
    standing for ``t / MAX_MAP_POSITIONS`` tokens (windows and distances scaled alike): the
    binned averages change slowly with ``t`` there, and the exact map would need ``t²``
    memory.
    """
    g = grid(t)
    scale = 1.0
    tm, win = t, window
    if t > MAX_MAP_POSITIONS:
        scale = t / MAX_MAP_POSITIONS
        tm, win = MAX_MAP_POSITIONS, max(1, round(window / scale))
    ok = _mask(tm, pattern, win, causal)
    rows = ok.sum(1).astype(np.float64)
    if slope > 0:
        i = np.arange(tm, dtype=np.float64)
        logit = np.where(ok, -slope * np.abs(i[:, None] - i[None, :]) * scale, -np.inf)
        # relative to each row's largest allowed logit, so no row underflows to all zeros
        P = np.exp(logit - logit.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        rows = 1.0 / (P * P).sum(1)  # effective keys (map positions; counts scales them)
    else:
        P = ok / rows[:, None]
    # the bins of the map's positions (positions scaled onto the real sequence)
    pos = np.minimum(np.floor(np.arange(tm) * scale).astype(np.int64), t - 1)
    b_of = np.searchsorted(g.edges, pos, side="right") - 1
    k = len(g.n)
    onehot = np.zeros((tm, k))
    onehot[np.arange(tm), b_of] = 1.0
    nb = onehot.sum(0)  # map positions per bin
    nb_safe = np.maximum(nb, 1.0)
    Zr = onehot.T @ P  # (K, tm): Σ_{i∈a} p̄_ij
    Zc = P @ onehot  # (tm, K): Σ_{j∈c} p̄_ij
    W = (Zr @ onehot) / nb_safe[:, None]
    V = (onehot.T @ Zc).T / nb_safe[:, None]  # V[c, a] = mean_{j∈c} Σ_{i∈a} p̄_ij
    P2 = P * P
    S2 = onehot.T @ P2 @ onehot  # Σ_{i∈a, j∈c} p̄_ij²
    R0 = S2 / nb_safe[:, None]
    RT0 = S2.T / nb_safe[:, None]
    # pair sums (scaled: a map position stands for `scale` tokens, each p̄ is 1/scale smaller)
    Q = np.empty((k, k, k))
    Qt = np.empty((k, k, k))
    for c in range(k):
        cols = b_of == c
        Q[:, :, c] = Zr[:, cols] @ Zr[:, cols].T
        Qt[c] = (Zc[:, c][:, None] * Zc).T @ onehot
    # Qt[c, d, a] = Σ_{i∈a} Zc[i, c] Zc[i, d]; remove the same-token terms on the diagonal
    pair_n = np.outer(nb, nb) - np.diag(nb)
    single = nb <= 1
    for a in range(k):
        Q[a, a, :] -= S2[a, :]
        Qt[a, a, :] -= S2[:, a]
    with np.errstate(invalid="ignore", divide="ignore"):
        Q = np.where(pair_n[:, :, None] > 0, Q / pair_n[:, :, None], 0.0)
        Qt = np.where(pair_n[:, :, None] > 0, Qt / pair_n[:, :, None], 0.0)
    for a in np.nonzero(single)[0]:  # one position: the "pair" is the token with itself
        Q[a, a, :] = R0[a, :]
        Qt[a, a, :] = RT0[a, :]
    counts = (onehot.T @ rows) / nb_safe * scale
    if scale > 1:  # each map position stands for `scale` tokens with weights 1/scale
        Q, Qt, R0, RT0 = Q / scale, Qt / scale, R0 / scale, RT0 / scale
    counts = np.maximum(counts, 1.0)
    r3 = (onehot.T @ (P * P * P).sum(1)) / nb_safe / scale**2
    out = AttentionMap(W, V, Q, Qt, R0, RT0, counts, R0.sum(1),
                       np.maximum(np.rint(counts).astype(np.int64), 1),
                       Q[g.upper], Qt[g.upper], g.half_index, _pair_inverse(R0.sum(1)),
                       np.ascontiguousarray(Q.transpose(1, 0, 2)),
                       np.ascontiguousarray(W.T), np.ascontiguousarray(V.T), r3)
    for arr in out:
        if isinstance(arr, np.ndarray):
            arr.setflags(write=False)
    return out


def _pair_inverse(r0: np.ndarray) -> np.ndarray:
    """:attr:`AttentionMap.pair_inverse` from ``Σ_j p̄_ij²`` per query bin."""
    denom = 1.0 - r0
    ok = denom > 1e-12
    return np.where(ok, 1.0 / np.where(ok, denom, 1.0), 0.0)


def attend(amap: AttentionMap, v: Cov, excess: np.ndarray, common: float,
           pairs: np.ndarray | None = None) -> Cov:
    """``Σ_j p_ij v_j`` for weights with mean ``p̄`` and ``E Σ_j p_ij² = Σ_j p̄_ij² +
    excess_i`` (spread over the allowed keys); ``common`` multiplies the token-specific
    overlap of two queries (their weights lean the same way when queries share a part);
    ``pairs`` (per query bin, default 1) multiplies what the weights' spread adds, when
    keys and values are projections of one input (:func:`key_value_pairs`).

    ``C' = W C Wᵀ + Q·u`` (distinct queries), ``Var' = diag(W C Wᵀ) + R0·u + excess ·
    row_variance(v)``, ``M' = W M Wᵀ``. Checked against sampled attention
    (``tests/core/test_covariance.py``).
    """
    W = amap.W
    # the spread δ = p − p̄ of a row sums to zero, so it weighs the keys' unshared spread:
    # Σ_jl E[δ_ij δ_il] Cov(v_j, v_l) = excess_i · row_variance_i
    spread = excess * row_variance(amap, v)
    if pairs is not None:
        spread = spread * pairs
        if common != 1.0:
            # the common preference's share of two queries' overlap is a spread of the same
            # kind
            root = np.sqrt(pairs)
            common = 1.0 + (common - 1.0) * (root[:, None] * root)
    return _averaged(v, W @ v.S @ amap.WT, _pair_overlaps(amap.Q_half, amap, v.u),
                     common, amap.R0 @ v.u, spread)


@lru_cache(maxsize=32)
def rope_correlations(t: int, head_dim: int, base: float = 10000.0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct, every)`` (K × K) on :func:`grid` ``(t)``: the mean of ``ρ(i − j)`` over
    the pairs of distinct tokens of bins ``a``, ``b`` (one sequence) and over every pair
    (two sequences: one position may meet itself), where ``ρ(Δ) = (2/D) Σ_f cos(θ_f Δ)``,
    ``θ_f = base^(−2f/D)``, is what rotating both tokens by their positions (RoPE, Su et al.
    2021) leaves of their covariance, averaged over a head's ``D`` features. Bins wider than
    16 positions are sampled at 16."""
    theta = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    rho = np.cos(np.arange(t, dtype=np.float64)[:, None] * theta).mean(1)  # ρ(|Δ|), Δ < t
    pos, onehot, cnt = sampled_positions(t)
    distinct, every, _var = binned_pairs(rho[np.abs(pos[:, None] - pos[None, :])], onehot, cnt)
    for arr in (distinct, every):
        arr.setflags(write=False)
    return distinct, every


@lru_cache(maxsize=64)
def sampled_positions(t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions standing for :func:`grid` ``(t)``'s bins — every position of a bin up to
    16 wide, 16 evenly spread in a wider one — their one-hot bin matrix and each bin's count:
    ``(pos, onehot, count)``, for pair quantities of fixed position patterns (sinusoidal
    encodings, RoPE) without a ``t × t`` matrix."""
    edges = grid(t).edges
    samples = [np.unique(np.linspace(lo, hi - 1, min(hi - lo, 16)).round()).astype(np.int64)
               for lo, hi in zip(edges[:-1], edges[1:])]
    pos = np.concatenate(samples)
    onehot = np.zeros((len(pos), len(samples)))
    onehot[np.arange(len(pos)), np.repeat(np.arange(len(samples)),
                                          [len(x) for x in samples])] = 1.0
    for arr in (pos, onehot):
        arr.setflags(write=False)
    return pos, onehot, onehot.sum(0)


def binned_pairs(gram: np.ndarray, onehot: np.ndarray, count: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A position-level pair matrix ``gram`` over :func:`sampled_positions`, binned:
    ``(distinct, every, diagonal)`` — its mean over pairs of distinct positions of bins
    ``a``, ``b`` (for a one-position bin, the position with itself), over every pair, and
    each bin's mean diagonal."""
    total = onehot.T @ gram @ onehot
    diag = onehot.T @ np.diagonal(gram) / count
    every = total / np.outer(count, count)
    pairs = np.outer(count, count) - np.diag(count)
    distinct = (total - np.diag(diag * count)) / np.maximum(pairs, 1.0)
    single = count <= 1
    distinct[single, single] = diag[single]  # one position: the token itself
    return distinct, every, diag


def rotated(x: Cov, head_dim: int, base: float = 10000.0) -> Cov:
    """``x`` with every token rotated by its position (RoPE of θ ``base``): each token's
    variance is kept, two tokens' covariances are multiplied by :func:`rope_correlations`
    (a larger θ turns far tokens less, so more of what they share is kept), and what a token no
    longer shares with the others of its bin becomes its own. Its own transpose, so it also
    takes a gradient with respect to rotated queries or keys back through the rotation.
    Memoised on ``x``."""
    memo = x.memo
    hit = memo.get(("rotated", head_dim, base))
    if hit is not None:
        return hit
    S = x.S
    if not len(S):
        out = x
    else:
        distinct, every = rope_correlations(x.g.t, head_dim, base)
        R = np.stack((distinct, every))[:len(S)]
        C = S[0]
        out = Cov.of(x.g, x.u + np.diagonal(C) * (1.0 - np.diagonal(distinct)), S * R)
    memo[("rotated", head_dim, base)] = out
    return out


#: RoPE's frequencies are taken in at most this many bands of consecutive ones where one
#: frequency's rotation must not be averaged with the others' (:func:`rope_bands`).
ROPE_BANDS = 8


@lru_cache(maxsize=64)
def rope_bands(t: int, head_dim: int, base: float = 10000.0, bands: int = ROPE_BANDS
               ) -> tuple[tuple[np.ndarray, np.ndarray, float], ...]:
    """:func:`rope_correlations` per band of consecutive frequencies ``θ_f = base^(−2f/D)``
    (at most ``bands`` of them, as equal in size as they can be): ``(distinct, every,
    share of the head's features)`` per band, ``ρ_b(Δ)`` the mean of ``cos(θ_f Δ)`` over the
    band's own frequencies.

    One frequency's rotation composes with itself: a query rotated by ``θi`` against a key
    by ``θj`` and back gives ``cos θ((i − k) − (j − l))`` for two pairs of positions, which
    over the head's features averages to ``E_f[cos θ_f(i − k) cos θ_f(j − l)]`` (the sines'
    product cancels for queries spread evenly over positions), not to the product
    ``ρ(i − k)·ρ(j − l)`` of the means: where the key gradient's rows sum to zero (softmax
    ignores a shift), the low frequencies, which barely turn along a row, cancel in the
    key bias's gradient on their own, but a product of means lets the high ones' part
    survive in them."""
    theta = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    pos, onehot, cnt = sampled_positions(t)
    lag = np.abs(pos[:, None] - pos[None, :])
    steps = np.arange(t, dtype=np.float64)[:, None]
    out = []
    for chunk in np.array_split(theta, min(len(theta), bands)):
        rho = np.cos(steps * chunk).mean(1)
        distinct, every, _var = binned_pairs(rho[lag], onehot, cnt)
        for arr in (distinct, every):
            arr.setflags(write=False)
        out.append((distinct, every, len(chunk) / len(theta)))
    return tuple(out)


def rotated_band(x: Cov, band: tuple[np.ndarray, np.ndarray, float]) -> Cov:
    """``x`` rotated by one band's frequencies (:func:`rope_bands`), as :func:`rotated` does
    with all of them: covariances times the band's ``ρ_b``, what a token no longer shares
    with the others of its bin its own."""
    S = x.S
    if not len(S):
        return x
    distinct, every, _share = band
    R = np.stack((distinct, every))[:len(S)]
    return Cov.of(x.g, x.u + np.diagonal(S[0]) * (1.0 - np.diagonal(distinct)), S * R)


def rope_key_gradient(amap: AttentionMap, g: Cov, v: Cov, q: Cov, sum_p2: np.ndarray,
                      jacobian: np.ndarray, excess: np.ndarray, head_dim: int,
                      base: float = 10000.0) -> Cov:
    """:func:`key_gradient` under RoPE, with respect to the keys before their rotation, for
    queries ``q`` before theirs: per band of frequencies (:func:`rope_bands`) the queries
    rotated by the band, the key gradient (whose rows sum to zero in every sequence: those
    of the rotated keys do, ``Σ_j gZ_ij = 0``), rotated back by the same band; the bands
    mixed by their shares of the features.

    The key bias's gradient is ``Σ_ij gZ_ij R_θ(i−j) q_i`` per frequency: only how the
    rotation differs across a row's keys reaches it. With near-uniform weights over ``T``
    keys, what queries and gradients share across a sequence gives it
    ``Σ_jl Cov(ṽ_j, ṽ_l)|S_θ|² cos θ(j − l) ∝ T|S_θ|² − |S_θ|⁴/T`` (``S_θ = Σ_i e^{iθi}``,
    ``ṽ`` the values centred on the row), zero for the low frequencies (``|S_θ|² ≈ T²``);
    one mean rotation over all frequencies gives ``T·E|S|² − (E|S|²)²/T`` instead, which
    the high frequencies leave large. Checked against sampled attention with the model's
    own ``apply_rope`` (``tests/core/test_predict_tied_rope.py``)."""
    parts = []
    for band in rope_bands(g.g.t, head_dim, base):
        gk = key_gradient(amap, g, v, rotated_band(q, band), sum_p2, jacobian, excess)
        parts.append((rotated_band(gk, band), band[2]))
    return mixture(parts)


def mixture(parts: list[tuple[Cov, float]]) -> Cov:
    """Heads of different attention patterns side by side: each ``(Cov, share)`` holds that
    share of the features, so the variances and covariances average with those weights.
    One part of share 1 is returned as it is."""
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    first, share = parts[0]
    out = first.scaled(math.sqrt(share))
    for cov, share in parts[1:]:
        out = out.plus(cov.scaled(math.sqrt(share)))
    return out


def key_value_pairs(amap: AttentionMap, d: int, sigma2: np.ndarray, excess: np.ndarray,
                    aniso: float = 1.0) -> np.ndarray:
    """Per query bin: how much more the weights' spread moves ``Σ_j p_ij v_j`` because keys
    and values are projections of one ``d``-wide input, for logits ``q·k`` of variance
    ``sigma2`` and ``E Σp² − Σp̄² = excess``::

        1 + S (1 − r0)/(d r0) · σ² r0 (1 − r0)/excess,   r0 = Σ_j p̄_ij²

    To first order ``δp_ij = p̄_ij (s_ij − s̄_i)`` with ``s_ij = q_i·k_j``, so the spread's part
    of ``|Σ_j p_ij ṽ_j|²`` is ``Σ_jl p̄_ij p̄_il E[(q·k̃_j)(q·k̃_l)] ṽ_j·ṽ_l``. With keys and
    values independent only ``j = l`` survives (``excess · row_variance``). With ``K = W_k x``,
    ``V = W_v x`` each pair ``j ≠ l`` adds ``E(x̃_j·x̃_l)² = S|x̃|⁴/d`` over the diagonal's
    ``|x̃|⁴`` (``S``: the deviations' anisotropy, 1 when isotropic, as in
    :func:`~unitscale_core.scaling.predict.shared_input_factor`), and ``Σ_{j≠l} p̄_ij p̄_il =
    1 − r0``. That term is of first order in ``σ²``, whose own diagonal is ``σ² r0(1 − r0)``
    where the exact ``excess`` has grown like ``e^{σ²}``: hence the last factor (at most 1).
    Checked against sampled attention (``tests/core/test_covariance.py``: within 10%, 16–43%
    low without it)."""
    r0 = np.maximum(amap.r0, 1e-300)
    first = np.maximum(sigma2, 0.0) * r0 * (1.0 - r0)
    ok = excess > 1e-300
    share = np.where(ok, np.minimum(first / np.where(ok, excess, 1.0), 1.0), 0.0)
    return 1.0 + aniso * np.maximum(1.0 - r0, 0.0) / (d * r0) * share


def _pair_overlaps(half: np.ndarray, amap: AttentionMap, u: np.ndarray) -> np.ndarray:
    """``Q·u`` (or ``Qt·u``) from the rows ``a ≤ b`` of the symmetric ``Q``: half the
    largest array of the map to read."""
    return np.take(half @ u, amap.half_index)  # (np.take: fancy indexing costs more)


def _averaged(x: Cov, sandwich: np.ndarray, Qu: np.ndarray, common: float | np.ndarray,
              own: np.ndarray, spread: np.ndarray) -> Cov:
    """An attention average of ``x``: the stacked ``W S Wᵀ`` (``sandwich``, fresh), the
    distinct-token overlaps ``Q·u``, and what each token's own part adds to its variance
    through the expected weights (``own``) and their spread (``spread``)."""
    overlap = _overlap(Qu, common, x.g.single)
    if not len(sandwich):  # no shared part in x: C' is the overlap alone
        return Cov.of(x.g, np.maximum(own + spread - overlap.diagonal(), 0.0), overlap[None])
    WC = sandwich[0]
    WC += overlap  # C' = W C Wᵀ + Q·u, in place in the fresh product
    # Var' − C'_aa: W C Wᵀ's diagonal is in both, so it is left out of the difference
    return Cov.of(x.g, np.maximum(own + spread - overlap.diagonal(), 0.0), sandwich)


def _overlap(Qu: np.ndarray, common: float | np.ndarray, single: np.ndarray) -> np.ndarray:
    """The token-specific overlap ``Q·u`` of two queries, times ``common`` (a number, or
    per pair of query bins) — except on the diagonal of one-position bins, where the "pair"
    is one query with itself."""
    if not isinstance(common, np.ndarray) and common == 1.0:
        return Qu
    own = Qu[single, single]
    Qu = Qu * common
    Qu[single, single] = own
    return Qu


def attend_transposed(amap: AttentionMap, g: Cov, excess: np.ndarray, common: float) -> Cov:
    """``Σ_i p_ij g_i`` (the value gradient): :func:`attend` with queries and keys swapped;
    ``excess`` is per query bin."""
    V = amap.V
    # E[p_ij²] − p̄_ij² = excess_i / count_i on allowed keys: Σ_{i∈a} of it is V[c, a]·excess_a;
    # different queries' weights spread independently, so each meets its own g_i, all of it.
    # Two keys of one query share its row: E p_ij p_il = a_i p̄_ij p̄_il (j ≠ l), with
    # a = (1 − EΣp²)/(1 − Σp̄²) = 1 − excess/(1 − Σp̄²) — the row's weights sum to one, so
    # what one key gains the others lose (measured: the keys' covariance 15% lower at σ = 1)
    a = 1.0 - excess * amap.pair_inverse
    return _averaged(g, V @ g.S @ amap.VT, _pair_overlaps(amap.Qt_half, amap, g.u * a),
                     common, amap.RT0 @ g.u, V @ (excess * g.var))


def _mean(C: np.ndarray) -> float:
    """``C.mean()``, without its wrapper (called per layer in a 96-layer prediction)."""
    return float(np.add.reduce(C, axis=None)) / C.size


def _smooth_split(x: Cov) -> tuple[np.ndarray, np.ndarray]:
    """``(u, C)`` of ``x`` with the one-position bins' ``C[a, a]`` taken from their
    neighbours (the mean of ``C[a, a ± 1]``, at most ``Var x_a``) and ``u`` the rest.

    ``C[a, a]`` of a one-position bin is not a covariance of two tokens, only a share of the
    token's variance, and ops leave different shares there. The attention-gradient rules
    weigh the tokens' own parts and their shared parts by different random-weight factors,
    so they need the share that continues the shared part smoothly: for a collapsed stream
    (every token ≈ λ_j z) a zero ``C[a, a]`` would count ``λ_a² z²`` as the token's own and
    over-predict the query gradient 40× once the weights spread (sampled check).
    """
    memo = x.memo
    hit = memo.get("smooth_split")
    if hit is not None:
        return hit
    C, var = x.C, x.var
    single = x.g.single
    if not len(single) or not len(x.S):
        out = (x.u, C)
    else:
        k = len(var)
        if k > 1:
            side = np.diagonal(C, 1)  # C[a, a + 1]
            near = np.empty(k)  # the mean of the neighbours there are
            near[1:-1] = 0.5 * (side[:-1] + side[1:])
            near[0], near[-1] = side[0], side[-1]
        else:
            near = np.zeros(1)
        C = C.copy()
        C[single, single] = np.minimum(np.maximum(near[single], 0.0), var[single])
        out = (var - C.diagonal(), C)
    memo["smooth_split"] = out
    return out


def _centring(amap: AttentionMap, x: Cov) -> tuple[np.ndarray, ...]:
    """``(u, C − c, (C − c) Wᵀ, W (C − c) Wᵀ)`` of ``x`` (:func:`_smooth_split`) for the
    centring on the queries' weights; memoised per (tensor, map): the values meet both
    gradients.

    ``c`` is ``C``'s mean. Both gradients take the values (and the query gradient the keys)
    only centred on a query's weights, so a constant added to every covariance drops out
    (``Σ_j p_ij = 1``; checked to 1e-13 in ``tests/core/test_covariance.py``). Taking it off
    first keeps what is left from being rounding: in a collapsed stack (tokens sharing all
    but 1e-8 of their variance) the centred products are that small a difference of
    products of the full ones, which gave rows alternating between 0 and 1e-17 layer by
    layer in a 96-layer prediction."""
    memo = x.memo
    hit = memo.get("centring")
    if hit is not None and hit[0] is amap:
        return hit[1]
    u, C = _smooth_split(x)
    C = C - _mean(C)
    R = C @ amap.WT
    out = (u, C, R, amap.W @ R)
    memo["centring"] = (amap, out)
    return out


def query_gradient(amap: AttentionMap, g: Cov, v: Cov, k: Cov, sum_p2: np.ndarray,
                   jacobian: np.ndarray, shared_input: np.ndarray, chance: float = 0.0
                   ) -> Cov:
    """``Σ_j p_ij (g_i·ṽ_ij) k̃_ij`` per unit ``m²·d_head``: the query gradient, where
    ``ṽ_ij = v_j − Σ_l p_il v_l`` and ``k̃_ij`` likewise are centred on query ``i``'s own
    weights (the softmax Jacobian), with ``g`` (the context gradient), ``v`` and ``k``
    independent of each other.

    For two queries ``i, k`` (the same one or distinct), with ``A``, ``B`` the full
    covariances of values and keys (``A = diag(u) + C``), the centring terms sum to zero
    against the other side's, leaving::

        E[gq_i·gq_k] ∝ Cov(g_i, g_k) · Σ_jl p_ij p_kl A_jl B̃_ik(j, l),
        B̃_ik(j, l) = B_jl − (B p_k)_j − (p_i B)_l + p_i B p_k

    which splits into the tokens' own parts (``u_v u_k``: what independent tokens give, with
    the spread of random weights from the moments ``E p² = EΣp²·p̄``), their cross terms
    ``u·C`` and the coherent ``C·C`` part. The last matters in a deep or correlated stack:
    the centred keys and values of one sequence then lean the same way at every position
    (``k̃_j ∝ (λ_j − λ̄) z``), so the sum over keys adds up coherently instead of averaging
    out as ``Σ_j p_ij²`` — the earlier per-token model missed the query gradients of such
    stacks by 1.5–2.7 log2. On the bins::

        C·C = W(C_v ∘ C_k)Wᵀ − Z − Zᵀ + (W C_v Wᵀ) ∘ (W C_k Wᵀ),
        Z_ab = Σ_c W_ac (C_v Wᵀ)_cb (C_k Wᵀ)_cb

    and the ``u·C`` terms use the distinct-query overlaps ``Q`` (``R0`` for one query).
    Random weights multiply the parts with a shared factor by ``a_i a_k``,
    ``a = (1 − EΣp²)/(1 − Σp̄²)`` (``E p_ij p_il`` for ``j ≠ l``, over ``p̄_ij p̄_il``); the
    same query's own-part term by ``jacobian / jacobian₀`` (the softmax-Jacobian factor with
    random over uniform weights); the weights' spread about ``p̄`` adds, to first order,
    ``excess·a`` times the keys' unshared spread of the shared products (as in :func:`attend`;
    damped by ``a`` because the first-order term overshoots once the weights concentrate);
    ``shared_input`` multiplies the own parts
    (:func:`~unitscale_core.scaling.predict.shared_input_factor`). When the context gradient,
    values and keys all have parts shared across the batch (``M``: learned or sinusoidal
    positions), so does the query gradient (:func:`_coherent_across`, plus ``chance`` times
    the keys' and values' spreads when they are projections of one input). Exact for uniform
    weights at one position per bin (brute force), checked against sampled attention
    (``tests/core/test_covariance.py``).
    """
    W, R0, n, r0 = amap.W, amap.R0, amap.counts, amap.r0
    # keys and values are often one tensor (one projection of one input, no rotation):
    # then each term that is the same for both is computed once (the same arithmetic)
    same = v is k
    uv, Cv, RV, XV = _centring(amap, v)  # RV[c, b]: (C p_b) at key bin c; XV = W C Wᵀ
    uk, Ck, RK, XK = _centring(amap, k)
    coherent = _centred_products(amap, Cv, RV, XV, Ck, RK, XK)
    XVd, XKd, coherent_d = XV.diagonal(), XK.diagonal(), coherent.diagonal()
    uvk = uv * uk
    h = uv * Ck.diagonal() + Cv.diagonal() * uk
    a = (1.0 - sum_p2) * amap.pair_inverse
    aa = a[:, None] * a
    # distinct queries: the overlaps Q against four vectors at once, and Σ_c Q_abc u_c R_cb
    # for keys and values as one batched product
    # (from the rows a ≤ b of the symmetric Q: half the largest array to read)
    Qv, Qk, Quu, Qh = np.moveaxis(np.take(amap.Q_half @ np.stack((uv, uk, uvk, h), 1),
                                          amap.half_index, axis=0), 2, 0)
    v.memo["Q_u"] = (amap, Qv)  # the key gradient's values meet the same overlaps
    both = np.matmul(amap.Q_by_second, np.stack(((uv[:, None] * RK).T, (uk[:, None] * RV).T),
                                                 2))  # [b, a, 2]
    QuR = both[..., 0] + both[..., 1]  # transposed: [b, a]
    cross = Qh - QuR - QuR.T + Qv * XK + XV * Qk
    rest = 1.0 - sum_p2
    root = np.sqrt(shared_input)
    own = (rest[:, None] * rest * Quu + aa * (Qv * Qk - Quu / (n[:, None] * n))) * (
        root[:, None] * root)
    pair = g.C * (own + aa * (cross + coherent))
    # one query with itself
    Rv, Rk, Ruu, Rh = (R0 @ np.stack((uv, uk, uvk, h), 1)).T
    own0 = Ruu * (1.0 - 2.0 / n) + Rv * Rk
    jac0 = r0 * (1.0 - 2.0 / n) + r0 * r0
    ok = jac0 > 1e-300
    own_s = np.where(ok, own0 * jacobian / np.where(ok, jac0, 1.0), 0.0) * shared_input
    uv_rk = ((R0 * uv) * RK.T).sum(1)
    uk_rv = uv_rk if same else ((R0 * uk) * RV.T).sum(1)
    cross_s = Rh - 2.0 * uv_rk - 2.0 * uk_rv + Rv * XKd + XVd * Rk
    # the weights' spread about p̄ meets the keys' unshared spread of the shared products
    # (first order in δp, as in :func:`attend`): E δp_j δp_l = excess·(δ_jl/n − 1/(n(n−1)))
    cv_d = Cv.diagonal()[None, :] - 2.0 * RV.T + XVd[:, None]  # [a, c]: Ã_cc
    ck_d = cv_d if same else Ck.diagonal()[None, :] - 2.0 * RK.T + XKd[:, None]
    prod = cv_d * ck_d
    shared_d = uv * ck_d + cv_d * uk + prod
    spread = np.maximum((W * shared_d).sum(1) - (coherent_d - (R0 * prod).sum(1))
                        * amap.pair_inverse, 0.0) * np.maximum(sum_p2 - r0, 0.0) * a
    var = g.var * np.maximum(own_s + a * a * (cross_s + coherent_d) + spread, 0.0)
    single = g.g.single
    pair[single, single] = 0.0  # a one-position bin has no distinct pair
    u = np.maximum(var - pair.diagonal(), 0.0)
    if len(g.S) > 1 and len(v.S) > 1 and len(k.S) > 1:
        across = _coherent_across(amap, v.M, k.M)
        if chance:
            # what keys and values of one input share by chance, E(x̃_j·x̃_l)² = S|x̃|⁴/d
            # beyond the shared parts (``chance`` = S/d, as in shared_input_factor), each
            # centred on its own query's weights
            spread_v, spread_k = row_variance(amap, v), row_variance(amap, k)
            across = across + chance * 0.5 * (np.outer(spread_v, spread_k)
                                              + np.outer(spread_k, spread_v))
        return Cov.of(g.g, u, np.stack((pair, g.M * across)))
    return Cov.of(g.g, u, pair[None])


def _coherent_across(amap: AttentionMap, Mv: np.ndarray, Mk: np.ndarray) -> np.ndarray:
    """``Σ_jl p̄_ij p̄_kl M̃_v(j, l) M̃_k(j, l)`` for queries ``i``, ``k`` of two sequences:
    the query gradients' part shared across the batch, from what the values and keys share
    across it (learned or sinusoidal positions, biases), each centred on its own query's
    weights (``M̃(j, l) = M_jl − (M p̄_k)_j − (p̄_i M)_l + p̄_i M p̄_k``). The two queries'
    weights are independent, so their products are the expected ones: the ``C·C`` term of
    :func:`query_gradient` with ``M`` for ``C`` and no random-weight factor."""
    W = amap.W
    same = Mv is Mk  # (keys and values one tensor: centred once)
    Mv = Mv - _mean(Mv)
    RV = Mv @ amap.WT
    XV = W @ RV
    if same:
        return _centred_products(amap, Mv, RV, XV, Mv, RV, XV)
    Mk = Mk - _mean(Mk)
    RK = Mk @ amap.WT
    return _centred_products(amap, Mv, RV, XV, Mk, RK, W @ RK)


def _centred_products(amap: AttentionMap, A: np.ndarray, RA: np.ndarray, XA: np.ndarray,
                      B: np.ndarray, RB: np.ndarray, XB: np.ndarray) -> np.ndarray:
    """``Σ_jl p̄_ij p̄_kl Ã(j, l) B̃(j, l)`` for two pair matrices each centred on the two
    queries' weights, from ``A``, ``R_A = A Wᵀ`` and ``X_A = W A Wᵀ`` (likewise ``B``)::

        W (A ∘ B) Wᵀ − Z − Zᵀ + X_A ∘ X_B,   Z = W (R_A ∘ R_B)"""
    W = amap.W
    Z = W @ (RA * RB)
    return W @ (A * B) @ amap.WT - Z - Z.T + XA * XB


def _query_products(g: Cov, q: Cov) -> tuple[np.ndarray, np.ndarray]:
    """``(C_g ∘ C_q, Var g ∘ Var q)`` per query bin pair / bin (shared parts smoothly split):
    what the key gradient and the key weights' mean part both weigh the queries by.
    Memoised on ``g`` for this ``q`` (the same context gradient meets both)."""
    memo = g.memo
    hit = memo.get("query_products")
    if hit is not None and hit[0] is q:
        return hit[1]
    out = (_smooth_split(g)[1] * _smooth_split(q)[1], g.var * q.var)
    memo["query_products"] = (q, out)
    return out


def key_gradient(amap: AttentionMap, g: Cov, v: Cov, q: Cov, sum_p2: np.ndarray,
                 jacobian: np.ndarray, excess: np.ndarray, zero_sum: bool = True) -> Cov:
    """``Σ_i p_ij (g_i·ṽ_ij) q_i`` per unit ``m²·d_head``: the key gradient, ``ṽ_ij`` centred
    on query ``i``'s weights, with ``g``, ``v``, ``q`` independent of each other.

    With ``G_ik = Cov(g_i, g_k)·Cov(q_i, q_k)`` split into the queries' own parts
    ``diag(γ)`` and the shared ``Γ = C_g ∘ C_q``, and ``Ã_ik(j, l)`` the values' covariance
    centred on the weights of queries ``i`` and ``k``::

        E[gk_j·gk_l] ∝ Σ_ik p_ij p_kl G_ik Ã_ik(j, l)

    * own (``i = k``): per key, ``Σ_i E p_ij² γ_i ·`` the row's unshared value spread
      (with the weights' spread, as before); between keys, the same query's centring
      (``Qt``: ``Σ_i p_ij p_il``), which makes them anti-correlated;
    * shared (``i ≠ k``): the queries attending to a key lean the same way when ``g`` and
      ``q`` share a part across tokens, so they add coherently (``V Γ Vᵀ``); random weights
      enter through ``E p_ij p_il = a_i p̄_ij p̄_il`` (``a = (1 − EΣp²)/(1 − Σp̄²)``) and
      ``E p_ij² = EΣp²·p̄_ij``.

    Rows of ``g_Z`` sum to zero, so ``Σ_j gk_j = 0`` in every sequence (unless RoPE rotates
    each key differently: ``zero_sum`` False): the full covariance's rows sum to zero. The
    pair covariances are closed to that exactly with a correction ``α_j + α_l``, which also
    absorbs the terms of third order in ``p`` left out above. Checked against sampled
    attention (``tests/core/test_covariance.py``).
    """
    V, Q, Qt, RT0, n = amap.V, amap.Q, amap.Qt, amap.RT0, amap.counts
    uv, Cv, RV, XV = _centring(amap, v)
    shared, full = _query_products(g, q)
    own = np.maximum(full - shared.diagonal(), 0.0)
    rest = 1.0 - sum_p2
    a = rest * amap.pair_inverse
    aa = a[:, None] * a
    per_p2 = own * row_variance(amap, v) * jacobian / sum_p2
    hit = v.memo.get("Q_u")
    Quv = hit[1] if hit is not None and hit[0] is amap else Q @ uv
    # the same query: per key (Qt against four vectors at once), and its centring between
    # keys; Σ_a Qt_cda x_ca for two x as one batched product (the first from the rows
    # c ≤ d of the symmetric Qt)
    # (two keys of one query: E p_ij p_il = a_i p̄_ij p̄_il)
    own_a = own * a
    Qo, Qox, Qon, Qor = np.moveaxis(np.take(amap.Qt_half @ np.stack(
        (own_a, own_a * XV.diagonal(), own_a / n, own_a * (amap.R0 @ uv)), 1),
        amap.half_index, axis=0), 2, 0)
    third = (rest + a / n)[:, None] * shared * a
    VT = amap.VT
    t2, U = np.moveaxis(np.matmul(Qt, np.stack((own_a * RV, V @ third), 2)), 2, 0)
    U = uv[:, None] * U
    pair = Qo * Cv - t2 - t2.T + Qox - (uv[:, None] + uv) * Qon + Qor
    var = RT0 @ per_p2 + V @ (excess * per_p2)
    # distinct queries: the coherent sum over the queries attending to each key
    VS = V @ shared
    VSV = VS @ VT
    T2 = (VS * RV) @ VT
    coherent = Cv * VSV - T2 - T2.T + V @ (shared * (XV + aa * Quv)) @ VT
    centred_own = rest[:, None] * rest - aa / (n[:, None] * n)
    var = var + coherent.diagonal() + uv * ((V @ (shared * centred_own)) * V).sum(1)
    pair = pair + coherent - U - U.T
    if zero_sum and g.g.t > 2:
        nb = g.g.n
        t = float(g.g.t)
        deficit = -(pair @ nb - pair.diagonal() + var)  # Σ_l Cov(gk_j, gk_l) should be 0
        mean = float(nb @ deficit) / (2.0 * t - 2.0)
        alpha = (deficit - mean) / (t - 2.0)
        pair = pair + alpha[:, None] + alpha[None]
    var = np.maximum(var, 0.0)
    single = g.g.single
    pair[single, single] = 0.0
    return Cov.of(g.g, np.maximum(var - pair.diagonal(), 0.0), pair[None])


def shared_projection_term(amap: AttentionMap, x: Cov, g: Cov, q: Cov,
                           sum_p2: np.ndarray) -> float:
    """``Σ_ii' ū_i ū_i' Cov(g_i, g_i') Cov(q_i, q_i')`` over one sequence: the mean part of
    the key (and value) weight gradients, per unit of their gains.

    Keys and values are projections of one input ``x``, so the gradient reaching key ``j``,
    ``m Σ_i p_ij (g_i·W_v x̃_ij) q_i``, is linear in ``x_j`` itself: ``Σ_j x_j g_kj`` has the
    mean ``m Σ_i ū_i q_i (W_vᵀ g_i)ᵀ``, with ``ū_i = E Σ_j p_ij (x_j − x̄_i)·x_j`` per feature
    (the input's spread among query ``i``'s keys; random weights take ``1 − EΣp²`` of the
    own part). Over ``W_v`` its square is ``κ_v·d_head·Σ_ii' ū_i ū_i' C_g C_q`` — coherent over
    the queries, like the key gradient itself. The value weights get the same through the
    logits' dependence on ``x_j`` (``κ_k`` and the logit scale). Not in ``pair_sum``, which
    takes the gradient independent of the input.
    """
    u, C = _smooth_split(x)
    W = amap.W
    spread = (1.0 - sum_p2) * (W @ u) + np.maximum(
        W @ C.diagonal() - ((W @ C) * W).sum(1), 0.0)
    shared, own = _query_products(g, q)
    n = g.g.n
    s = n * spread
    return float(s @ shared @ s - (n * spread * spread) @ (shared.diagonal() - own))


def row_variance(amap: AttentionMap, k: Cov) -> np.ndarray:
    """Per query bin: the variance of its keys that is *not* shared between them — what the
    softmax statistics (i.i.d. logits) and its Jacobian (which centres each row itself) take:
    the weighted mean variance ``Σ_j p̄_ij Var k_j`` less the weighted mean covariance of two
    distinct keys, ``Σ_{j≠l} p̄_ij p̄_il Cov(k_j, k_l) / (1 − Σ_j p̄_ij²)``.

    Both terms change by the same ``c`` when a constant ``c`` is added to every covariance,
    so one is taken off first: in a deep stack the tokens share almost everything and the
    spread is a small difference of two large numbers, which would otherwise be rounding.
    Memoised per (tensor, map): keys and values are often one tensor (the same projection
    of the same input), so the backward's values ask again for the forward's keys."""
    memo = k.memo
    hit = memo.get("row_variance")
    if hit is not None and hit[0] is amap:
        return hit[1]
    W = amap.W
    C = k.C
    c = _mean(C)
    Cc = C - c
    mean_var = W @ (k.u + Cc.diagonal())
    distinct = np.add.reduce((W @ Cc) * W, axis=1) - amap.R0 @ Cc.diagonal()
    out = np.maximum(mean_var - distinct * amap.pair_inverse, 0.0)
    memo["row_variance"] = (amap, out)
    return out


# ============================================================================ nonlinearities

class Hermite(NamedTuple):
    """Per-bin Hermite coefficients ``A`` (K, order + 1) of ``f`` at each bin's scale, and
    ``A``'s row sums of squares ``energy`` (``E f²`` per bin). When every bin has the same
    coefficients up to a factor, ``A[a] = scale[a] · row`` (``scale`` None: 1) — the usual
    case, as a LayerNorm gives every token one scale — and ``row`` is that row (``A`` is
    then not needed: None), else ``row`` is None."""

    A: np.ndarray | None
    energy: np.ndarray
    row: np.ndarray | None
    scale: np.ndarray | None


def rho_powers(rho: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``ρ^1 … ρ^order`` (order, …) of correlations ``rho`` (any shape), into ``out`` when
    given. By doubling: each multiplication extends the known powers ``ρ^1 … ρ^h`` by
    ``ρ^h`` (4 array operations for order 10)."""
    if out is None:
        out = np.empty((HERMITE_ORDER, *rho.shape))
    out[0] = rho
    have = 1
    while have < HERMITE_ORDER:
        more = min(have, HERMITE_ORDER - have)
        np.multiply(out[:more], out[have - 1], out=out[have:have + more])
        have += more
    return out


#: Per thread, the buffer :func:`kernels` computes the powers of ``ρ`` in (used and dropped
#: within one call; a fresh 190 kB array each time costs more than the products).
_SCRATCH = threading.local()


def _powers_buffer(shape: tuple[int, ...]) -> np.ndarray:
    buf = getattr(_SCRATCH, "powers", None)
    if buf is None or buf.shape[1:] != shape:
        buf = _SCRATCH.powers = np.empty((HERMITE_ORDER, *shape))
    return buf


def _coefficients(kind: str, sd: np.ndarray) -> tuple[Hermite, Hermite, np.ndarray | None]:
    """Per bin the signed Hermite coefficients (:func:`.hermite.hermite_coefficients`)
    of ``f`` and of ``f'`` at that bin's scale; and when each has one row, the stack of
    both rows squared (the weights of :func:`kernels`' one product), else None."""
    k = len(sd)
    if kind == "relu":  # homogeneous: f(σz) = σ f(z), f'(σz) = f'(z)
        f, df, c = _uniform_coefficients("relu", 1.0, k)
        return Hermite(None, (float(f.energy[0]) * sd) * sd, f.row, sd), df, c
    # one key for the smallest and the largest scale: one for all (rounding is monotonic)
    lo = _key(max(float(sd.min()), 1e-12))
    if lo == _key(max(float(sd.max()), 1e-12)):
        return _uniform_coefficients(kind, lo, k)
    keys = _keys(np.maximum(sd, 1e-12))
    distinct, index = np.unique(keys, return_inverse=True)
    out = []
    for which in (0, 1):
        rows = np.stack([hermite_coefficients(kind, key)[which] for key in distinct.tolist()])
        A = rows[index]
        out.append(Hermite(A, (A * A).sum(1), rows[0] if len(rows) == 1 else None, None))
    f, df = out
    return f, df, _squared_rows(f.row, df.row) if f.row is not None else None


@lru_cache(maxsize=2048)
def _uniform_coefficients(kind: str, key: float, k: int) -> tuple[Hermite, Hermite, np.ndarray]:
    """:func:`_coefficients` when all ``k`` bins have the scale ``key`` (arrays read-only:
    shared by every tensor at that scale)."""
    rows = hermite_coefficients(kind, key)
    f, df = (Hermite(None, np.full(k, float((row * row).sum())), row, None) for row in rows)
    f.energy.setflags(write=False)
    df.energy.setflags(write=False)
    return f, df, _squared_rows(*rows)


def _squared_rows(f_row: np.ndarray, df_row: np.ndarray) -> np.ndarray:
    """``[f_row², df_row²]`` (2, order + 1): the Mehler weights of both kernels."""
    c = np.stack((f_row, df_row))
    c *= c
    c.setflags(write=False)
    return c


class Kernel(NamedTuple):
    """``f`` at a tensor ``a``: ``S`` = ``[K(ρ_C), K(ρ_M)]``, the covariances of ``f(a)`` at
    two distinct tokens of a sequence and of different sequences, and ``energy`` = ``E f²``
    per bin (the same-token covariance). A derivative's kernel carries ``K(ρ_C)`` only: it
    multiplies gradients, which have no ``M``."""

    S: np.ndarray
    energy: np.ndarray


def kernels(kind: str, x: Cov) -> tuple[Kernel, Kernel]:
    """:class:`Kernel` s of ``f`` and of ``f'`` at ``x``, memoised on ``x`` (the backward
    takes the forward's): ``K(ρ_ab) = Σ_k A[a, k] A[b, k] ρ_ab^k`` (Mehler) for each pair
    of bins at their own scales and correlation.

    The matrices are symmetric: everything is computed for the pairs ``a ≤ b`` only
    (:attr:`Grid.upper`) and spread to both halves at the end. With one coefficient row
    each (the usual case) both kernels are one product over the powers of ``ρ``."""
    key = ("kernels", kind)
    out = x.memo.get(key)
    if out is None:
        out = x.memo[key] = _kernels(kind, x)
    return out


def _kernels(kind: str, x: Cov) -> tuple[Kernel, Kernel]:
    g = x.g
    sd, rho = _half_correlations(x)
    A, dA, c = _coefficients(kind, sd)
    # (order, both matrices' pairs)
    powers = rho_powers(rho, _powers_buffer(rho.shape)).reshape(HERMITE_ORDER, -1)
    if c is not None:
        both = np.dot(c[:, 1:], powers).reshape(2, *rho.shape)
        both += c[:, :1, None]
    else:
        both = np.stack([_pair_kernel(h, powers, g.upper).reshape(rho.shape)
                         for h in (A, dA)])
    for i, h in enumerate((A, dA)):
        if h.row is not None and h.scale is not None:
            both[i] *= h.scale[g.upper[0]] * h.scale[g.upper[1]]
    # f's C and M, f''s C (the only one a gradient meets), each spread to (K, K)
    full = np.take(both.reshape(4, -1)[:3], g.half_index, axis=1)
    return Kernel(full[:2], A.energy), Kernel(full[2:], dA.energy)


def _half_correlations(x: Cov) -> tuple[np.ndarray, np.ndarray]:
    """Per bin ``σ`` and the correlations ``[ρ_C, ρ_M]`` of the pairs of bins ``a ≤ b``
    (2, pairs), clipped to [−1, 1]."""
    g = x.g
    sd = np.sqrt(np.maximum(x.var, 1e-300))
    inv = 1.0 / np.take(sd[:, None] * sd, g.upper_flat)  # 1/(σ_a σ_b)
    S = x.S
    # (K·K, not −1: a stream with no shared part, S of shape (0, K, K), as the first
    # parallel block's feed-forward reads with no additive positions)
    half = np.take(S.reshape(len(S), len(sd) * len(sd)), g.upper_flat, axis=1)
    if len(S) == 2:
        rho = np.multiply(half, inv, out=half)
    else:  # the missing matrices' correlations are zeros
        rho = np.zeros((2, len(inv)))
        np.multiply(half, inv, out=rho[:len(S)])
    np.maximum(rho, -1.0, out=rho)  # (np.clip costs more)
    return sd, np.minimum(rho, 1.0, out=rho)


def _pair_kernel(h: Hermite, powers: np.ndarray, upper: tuple[np.ndarray, np.ndarray]
                 ) -> np.ndarray:
    """``Σ_k A[a, k] A[b, k] ρ^k`` for pairs ``(a, b)`` of bins with different coefficient
    rows; ``powers``: (order, matrices × pairs)."""
    if h.row is not None:
        c = h.row * h.row
        return c[0] + c[1:] @ powers
    i, j = upper
    coef = h.A[i] * h.A[j]  # (pairs, order + 1)
    n = len(i)
    return (coef[:, 0] + np.einsum("pk,kmp->mp", coef[:, 1:],
                                   powers.reshape(HERMITE_ORDER, -1, n))).ravel()


def elementwise(kind: str, x: Cov, gain: float = 1.0) -> Cov:
    """``gain · f(x)`` for ``f`` in gelu, relu, silu: every pair of tokens through Mehler's
    formula at its own scales and correlation; the mean (``k = 0``) is shared by all."""
    f = kernels(kind, x)[0]
    out = Cov.of(x.g, np.maximum(f.energy - f.S[0].diagonal(), 0.0), f.S)
    return out.scaled(gain) if gain != 1.0 else out


def elementwise_grad(kind: str, x: Cov, g: Cov, gain: float = 1.0) -> Cov:
    """``gain · f'(x) ⊙ g`` with ``g`` independent of ``x``: covariances multiply pair by
    pair."""
    return gated(g, kernels(kind, x)[1], gain)


def gated(b: Cov, f: Kernel, gain: float = 1.0) -> Cov:
    """``f(a) ⊙ b`` for ``b`` independent of ``a`` (``f``: :func:`kernels` at ``a``)."""
    n = len(b.S)  # only the pair matrices b has
    S = b.S * f.S[:n] if n else b.S
    var = b.var * f.energy
    out = Cov.of(b.g, np.maximum(var - S[0].diagonal(), 0.0) if n else np.maximum(var, 0.0),
                 S)
    return out.scaled(gain) if gain != 1.0 else out


def product(a: Cov, b: Cov) -> Cov:
    """``a ⊙ b`` for independent zero-mean-part tensors: covariances multiply."""
    n = min(len(a.S), len(b.S))
    S = a.S[:n] * b.S[:n]
    var = a.var * b.var
    return Cov.of(a.g, np.maximum(var - S[0].diagonal(), 0.0) if n else np.maximum(var, 0.0),
                  S)


def partially_rotated(x: Cov, head_dim: int, rotary_dims: int, base: float = 10000.0) -> Cov:
    """``x`` with only the first ``rotary_dims`` of each head's ``head_dim`` features rotated
    by position (partial RoPE, GPT-NeoX ``rotary_pct``): the rotated share ``f = R/D`` of the
    features is :func:`rotated` over ``R`` dims, the rest is ``x`` unchanged, side by side
    (:func:`mixture`), so two tokens' covariance is multiplied by
    :func:`.rules.partial_rope_correlation` ``f ρ_R + (1 − f)``. Its own transpose (a
    gradient goes back through it alike). ``rotary_dims == head_dim``: :func:`rotated`."""
    if rotary_dims >= head_dim:
        return rotated(x, head_dim, base)
    f = rotary_dims / head_dim
    return mixture([(rotated(x, rotary_dims, base), f), (x, 1.0 - f)])
