"""Position-resolved covariance rules (``unitscale_core.scaling.covariance``) against direct
computation and sampling: attention maps against the masks, and each op's prediction against
many draws of that op on Gaussian inputs with the covariance it assumes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unitscale_core.model import allowed
from unitscale_core.scaling import covariance as cv
from unitscale_core.scaling import rules as R
from unitscale_core.scaling.covariance import Cov


def _expected_weights(t: int, pattern: str, window: int, causal: bool) -> np.ndarray:
    mask = allowed(t, t, pattern, window, causal)
    ok = np.ones((t, t), dtype=bool) if mask is None else mask.numpy()
    return ok / ok.sum(1, keepdims=True)


def _bins(g: cv.Grid) -> np.ndarray:
    return np.repeat(np.arange(len(g.n)), g.n.astype(int))


@pytest.mark.parametrize("t", [20, 100])
@pytest.mark.parametrize(("pattern", "window", "causal"), [
    ("full", 1, False), ("causal", 1, True), ("local", 4, False), ("strided", 5, True)])
def test_attention_map_against_the_mask(t, pattern, window, causal):
    """W, R0 and the pair sums Q, Qt, binned by hand from the model's own mask."""
    P = _expected_weights(t, pattern, window, causal)
    g = cv.grid(t)
    amap = cv.attention_map(t, pattern, window, causal)
    b = _bins(g)
    k = len(g.n)
    onehot = np.eye(k)[b]  # (t, K)
    n = g.n
    np.testing.assert_allclose(amap.W, (onehot.T @ P @ onehot) / n[:, None], atol=1e-12)
    np.testing.assert_allclose(amap.R0, (onehot.T @ (P * P) @ onehot) / n[:, None],
                               atol=1e-12)
    np.testing.assert_allclose(amap.counts, onehot.T @ (P > 0).sum(1) / n)
    # Q[a, b, c]: mean over distinct queries i ∈ a, k ∈ b of Σ_{j∈c} p_ij p_kj
    rng = np.random.default_rng(0)
    for _ in range(40):
        a_, b_, c_ = rng.integers(0, k, 3)
        rows_a, rows_b = np.nonzero(b == a_)[0], np.nonzero(b == b_)[0]
        cols = b == c_
        vals = [P[i, cols] @ P[m, cols] for i in rows_a for m in rows_b if i != m]
        want = np.mean(vals) if vals else (P[rows_a[0], cols] ** 2).sum()
        assert amap.Q[a_, b_, c_] == pytest.approx(want, abs=1e-12)
        keys_a, keys_b = rows_a, rows_b  # key bins use the same grid
        vals = [P[cols, j] @ P[cols, m] for j in keys_a for m in keys_b if j != m]
        want = np.mean(vals) if vals else (P[cols, keys_a[0]] ** 2).sum()
        assert amap.Qt[a_, b_, c_] == pytest.approx(want, abs=1e-12)


GROUP = 4  # sequences per batch: the batch-wide part is one draw per batch


def _sample(cov: Cov, n_seq: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Gaussian tokens ``(n_seq, t, d)`` with ``cov``'s structure: per-token independent
    parts of variance ``u``, per-sequence parts with covariance ``C − M`` between distinct
    tokens, and a part shared by the :data:`GROUP` sequences of a batch with covariance
    ``M`` (built from the exact position-level matrices, one bin per position)."""
    t = cov.g.t
    assert len(cov.g.n) == t and n_seq % GROUP == 0
    shared = np.linalg.cholesky(cov.C - cov.M + 1e-9 * np.eye(t))
    batch = np.linalg.cholesky(cov.M + 1e-9 * np.eye(t))
    z_tok = torch.randn(n_seq, t, d, generator=gen, dtype=torch.float64)
    z_seq = torch.randn(n_seq, t, d, generator=gen, dtype=torch.float64)
    z_all = torch.randn(n_seq // GROUP, 1, t, d, generator=gen, dtype=torch.float64)
    z_all = z_all.expand(-1, GROUP, -1, -1).reshape(n_seq, t, d)
    return (torch.from_numpy(np.sqrt(cov.u))[None, :, None] * z_tok
            + torch.einsum("ij,bjd->bid", torch.from_numpy(shared), z_seq)
            + torch.einsum("ij,bjd->bid", torch.from_numpy(batch), z_all))


def _measured(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-position variance, covariance of distinct tokens of one sequence, and covariance
    of tokens of two sequences of one batch (averaged over features and sequences)."""
    n, t, d = x.shape
    var = x.pow(2).mean((0, 2)).numpy()
    cov = torch.einsum("bid,bjd->ij", x, x).numpy() / (n * d)
    groups = x.reshape(n // GROUP, GROUP, t, d)
    s = groups.sum(1)
    both = torch.einsum("gid,gjd->ij", s, s) - torch.einsum("gbid,gbjd->ij", groups, groups)
    cross = both.numpy() / (n // GROUP * GROUP * (GROUP - 1) * d)
    return var, cov, cross


def _structured(t: int) -> Cov:
    """Heteroscedastic, position-correlated tokens: what a causal stack makes."""
    g = cv.grid(t)
    pos = np.arange(t)
    load = 1.0 / np.sqrt(1.0 + pos)  # early tokens carry more of a shared vector
    C = 0.6 * np.outer(load, load) + 0.3 * np.exp(-np.abs(pos[:, None] - pos[None]) / 3)
    M = 0.1 * np.ones((t, t))
    u = 0.5 + 1.5 * (pos == 0)
    return Cov(g, u, C + M, M)


def _causal_softmax(t: int, n_seq: int, sigma: float, gen: torch.Generator
                    ) -> tuple[torch.Tensor, cv.AttentionMap, np.ndarray]:
    """Causal softmax weights of random logits ``N(0, σ²)`` ``(n_seq, t, t)``, the map, and
    each query bin's ``E Σp²`` beyond ``Σ p̄²`` (the excess the predictor passes)."""
    z = sigma * torch.randn(n_seq, t, t, generator=gen, dtype=torch.float64)
    z = z.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    amap = cv.attention_map(t, "causal", 1, True)
    sum_p2 = np.array([R.softmax_moments(sigma, int(n)).sum_p2 for n in amap.counts])
    return z.softmax(-1), amap, np.maximum(sum_p2 - amap.r0, 0.0)


def test_attend_matches_sampled_attention():
    """Σ_j p_ij v_j with softmax weights of random logits (causal), against draws."""
    t, d, n_seq = 12, 8, 6000
    gen = torch.Generator().manual_seed(1)
    v_cov = _structured(t)
    v = _sample(v_cov, n_seq, d, gen)
    p, amap, excess = _causal_softmax(t, n_seq, 1.0, gen)
    out = cv.attend(amap, v_cov, excess, 1.0)
    var, cov, _ = _measured(p @ v)
    np.testing.assert_allclose(out.var, var, rtol=0.06)
    off = ~np.eye(t, dtype=bool)
    np.testing.assert_allclose(out.C[off], cov[off], rtol=0.06, atol=0.01)


def test_attend_transposed_matches_sampled_value_gradient():
    """Σ_i p_ij g_i (the value gradient) for heteroscedastic, correlated gradients."""
    t, d, n_seq = 12, 8, 6000
    gen = torch.Generator().manual_seed(2)
    g_cov = _structured(t)
    g = _sample(g_cov, n_seq, d, gen)
    p, amap, excess = _causal_softmax(t, n_seq, 1.0, gen)
    out = cv.attend_transposed(amap, g_cov, excess, 1.0)
    var, cov, _ = _measured(p.transpose(1, 2) @ g)
    np.testing.assert_allclose(out.var, var, rtol=0.06)
    off = ~np.eye(t, dtype=bool)
    np.testing.assert_allclose(out.C[off], cov[off], rtol=0.08, atol=0.02)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_value_gradient_keys_share_their_queries_rows(sigma):
    """Two keys of one query split its unit of weight: E p_ij p_il = a·p̄_ij p̄_il with
    a = (1 − EΣp²)/(1 − Σp̄²) < 1, so independent gradients reach two keys less alike than
    the expected weights alone would make them (36% less at σ = 2)."""
    t, d, n_seq = 12, 8, 6000
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(n_seq, t, d, generator=gen, dtype=torch.float64)
    p, amap, excess = _causal_softmax(t, n_seq, sigma, gen)
    out = cv.attend_transposed(amap, Cov.independent(cv.grid(t), 1.0), excess, 1.0)
    _var, cov, _ = _measured(p.transpose(1, 2) @ g)
    off = ~np.eye(t, dtype=bool)
    assert out.C[off].sum() == pytest.approx(cov[off].sum(), rel=0.03)


def test_row_variance_is_the_keys_unshared_spread():
    t, d, n_seq = 10, 16, 4000
    gen = torch.Generator().manual_seed(3)
    k_cov = _structured(t)
    k = _sample(k_cov, n_seq, d, gen)
    amap = cv.attention_map(t, "causal", 1, True)
    got = cv.row_variance(amap, k_cov)
    for i in range(1, t):  # row 0 has one key: nothing to spread
        keys = k[:, : i + 1]
        gram = torch.einsum("bjd,bld->jl", keys, keys).numpy() / (n_seq * d)
        n = i + 1
        spread = np.trace(gram) / n - (gram.sum() - np.trace(gram)) / (n * (n - 1))
        assert got[i] == pytest.approx(spread, rel=0.05)


def test_pair_sum_matches_sampled_weight_gradient():
    """E[(Σ_rows g·x)²] and E[(Σ_rows g)²] for independent structured g and x."""
    t, d, n_seq, b = 8, 4000, 4, 4
    gen = torch.Generator().manual_seed(4)
    g_cov, x_cov = _structured(t), _structured(t).scaled(0.7)
    sums, bias = [], []
    for _ in range(4):
        g = _sample(g_cov, n_seq, d, gen)
        x = _sample(x_cov, n_seq, d, gen)
        sums.append(float((g * x).sum((0, 1)).pow(2).mean()))
        bias.append(float(g.sum((0, 1)).pow(2).mean()))
    assert cv.pair_sum(b, g_cov, x_cov) == pytest.approx(np.mean(sums), rel=0.06)
    assert cv.pair_sum(b, g_cov, None) == pytest.approx(np.mean(bias), rel=0.06)


@pytest.mark.parametrize("kind", ["gelu", "relu", "silu"])
def test_elementwise_matches_sampled_nonlinearity(kind):
    """f(x) of correlated tokens at different scales (Mehler's formula per pair)."""
    t, d, n_seq = 6, 64, 4000
    gen = torch.Generator().manual_seed(5)
    x_cov = _structured(t).scaled(1.3)
    x = _sample(x_cov, n_seq, d, gen)
    f = {"gelu": torch.nn.functional.gelu, "relu": torch.relu,
         "silu": torch.nn.functional.silu}[kind]
    y = f(x)
    out = cv.elementwise(kind, x_cov)
    var, cov, cross = _measured(y)
    np.testing.assert_allclose(out.var, var, rtol=0.04)
    off = ~np.eye(t, dtype=bool)
    np.testing.assert_allclose(out.C[off], cov[off], rtol=0.06, atol=0.01)
    # the mean (k = 0) and the batch-wide part reach tokens of other sequences
    np.testing.assert_allclose(out.M, cross, rtol=0.1, atol=0.01)


def test_grid_bins_cover_the_sequence():
    for t in (1, 7, 48, 49, 300, 2048, 5000, 131072):
        g = cv.grid(t)
        assert g.n.sum() == t and (g.n >= 1).all() and len(g.n) <= cv.MAX_BINS
        assert g.edges[0] == 0 and g.edges[-1] == t
    # long sequences: the first positions stay single, the rest widen
    g = cv.grid(2048)
    assert (g.n[: cv.SINGLE_POSITIONS] == 1).all() and g.n[-1] > g.n[cv.SINGLE_POSITIONS]


def test_long_sequences_map_on_fewer_positions():
    """Past MAX_MAP_POSITIONS the map is built on scaled positions: still normalised rows,
    counts that reach the real sequence length."""
    t = 3 * cv.MAX_MAP_POSITIONS
    amap = cv.attention_map(t, "causal", 1, True)
    np.testing.assert_allclose(amap.W.sum(1), 1.0)
    g = cv.grid(t)
    middle = (g.edges[:-1] + g.edges[1:] + 1) / 2  # a causal query at i sees i + 1 keys
    np.testing.assert_allclose(amap.counts[cv.SINGLE_POSITIONS:], middle[cv.SINGLE_POSITIONS:],
                               rtol=0.05)
    assert math.isfinite(float(amap.Q.sum()))


# ============================================================== attention's query and key gradients

def _collapsed(t: int) -> Cov:
    """A deep stack's stream: one shared vector whose load grows slowly with position, near
    neighbours a little alike, and little of each token's own."""
    pos = np.arange(t)
    lam = 1.0 + 0.3 * np.log1p(pos) / math.log(t)
    C = np.outer(lam, lam) + 0.05 * np.exp(-np.abs(pos[:, None] - pos[None]) / 8)
    return Cov(cv.grid(t), np.full(t, 0.02), C, np.zeros((t, t)))


def _full(cov: Cov) -> np.ndarray:
    """Position-level covariance of a one-position-per-bin ``cov`` (variance on the diagonal)."""
    full = cov.C.copy()
    np.fill_diagonal(full, cov.var)
    return full


def _score_gradient(g, v, p):
    """g_Z = P ⊙ (g Vᵀ − rowsum(P ⊙ g Vᵀ)): the softmax backward of ``Y = P V``."""
    gp = g @ v.transpose(1, 2)
    return p * (gp - (p * gp).sum(-1, keepdim=True))


def _sampled_attention(inputs: str, sigma: float, seed: int, t: int = 12, d: int = 8,
                       n_seq: int = 6000):
    """Causal softmax of random logits (σ) over ``t`` positions, with the context gradient
    (structured) and the values and keys or queries (``inputs``: structured or collapsed)
    sampled in ``d`` features: their Covs, the samples, the weights, their map and excess, and
    the softmax row statistics ``(EΣp², Jacobian)`` the rules take."""
    gen = torch.Generator().manual_seed(seed)
    make = _structured if inputs == "structured" else _collapsed
    covs = _structured(t), make(t), make(t)
    samples = tuple(_sample(c, n_seq, d, gen) for c in covs)
    p, amap, excess = _causal_softmax(t, n_seq, sigma, gen)
    sum_p2, jacobian = R.softmax_row_stats(np.full(t, sigma), amap.keys, None)
    return covs, samples, p, amap, excess, sum_p2, jacobian


def test_query_gradient_is_exact_for_uniform_weights():
    """Σ_jl p_ij p_kl A_jl B̃_ik(j, l) by brute force over positions (causal, heteroscedastic,
    correlated values and keys), for the same query and for distinct ones."""
    t = 12
    v, k = _structured(t), _collapsed(t)
    A, B = _full(v), _full(k)
    P = _expected_weights(t, "causal", 1, True)
    amap = cv.attention_map(t, "causal", 1, True)
    want = np.empty((t, t))
    for i in range(t):
        for m in range(t):
            Bt = B - (B @ P[m])[:, None] - (P[i] @ B)[None, :] + P[i] @ B @ P[m]
            want[i, m] = P[i] @ (A * Bt) @ P[m]
    uniform_jacobian = amap.r0 - 2 * (P ** 3).sum(1) + amap.r0 ** 2
    g = Cov(cv.grid(t), np.full(t, 0.5), np.full((t, t), 0.5), np.zeros((t, t)))
    out = cv.query_gradient(amap, g, v, k, amap.r0, uniform_jacobian, np.ones(t))
    np.testing.assert_allclose(out.var, want.diagonal(), rtol=1e-9, atol=1e-15)
    off = ~np.eye(t, dtype=bool)
    np.testing.assert_allclose(out.C[off], 0.5 * want[off], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("t", [12, 120])
def test_attention_gradients_ignore_a_constant_shared_by_every_pair(t):
    """The values (and the query gradient's keys) enter centred on a query's weights, so a
    constant added to every covariance drops out exactly. With it at 1e4 × the tokens'
    spread (a collapsed stream) the results stay within 1e-9 of the unshifted ones; taking
    the products uncentred left errors of 1e-5 of the largest variance at this constant."""
    g = cv.grid(t)
    k = len(g.n)
    amap = cv.attention_map(t, "causal", 1, True)
    pos = np.arange(k)
    C = 0.3 * np.exp(-np.abs(pos[:, None] - pos[None]) / 4) + 0.2 / np.sqrt(1.0 + pos)[:, None]
    C = 0.5 * (C + C.T)
    zero = np.zeros((k, k))
    v, keys = Cov(g, np.full(k, 0.1), C, zero), Cov(g, np.full(k, 0.05), 0.8 * C, zero)
    grad = Cov(g, np.full(k, 0.5), np.full((k, k), 0.2), zero)
    sum_p2, jacobian = R.softmax_row_stats(np.full(k, 1.0), amap.keys, None)
    excess = np.maximum(sum_p2 - amap.r0, 0.0)

    def both(shift: float) -> tuple[Cov, Cov]:
        vs = Cov(g, v.u, v.C + shift, zero)
        ks = Cov(g, keys.u, keys.C + shift, zero)
        return (cv.query_gradient(amap, grad, vs, ks, sum_p2, jacobian, np.ones(k)),
                cv.key_gradient(amap, grad, vs, keys, sum_p2, jacobian, excess))

    (q0, k0), (q1, k1) = both(0.0), both(1e4)
    for a, b in ((q0, q1), (k0, k1)):
        scale = np.abs(a.var).max()
        np.testing.assert_allclose(b.var, a.var, rtol=0, atol=1e-9 * scale)
        np.testing.assert_allclose(b.C, a.C, rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("sigma", [0.3, 1.0])
@pytest.mark.parametrize("inputs", ["structured", "collapsed"])
def test_query_gradient_matches_sampled_attention(inputs, sigma):
    """m·g_Z·K for causal softmax of random logits, values and keys with position structure:
    the variance per query and the covariance of distinct queries (which the earlier
    per-token model had as zero, and the variance 2–8× low for a collapsed stream)."""
    t, d = 12, 8
    (g_cov, v_cov, k_cov), (g, v, k), p, amap, _excess, sum_p2, jacobian = _sampled_attention(
        inputs, sigma, 11)
    var, cov, _ = _measured(_score_gradient(g, v, p) @ k)
    out = cv.query_gradient(amap, g_cov, v_cov, k_cov, sum_p2, jacobian, np.ones(t)).scaled(
        math.sqrt(d))
    np.testing.assert_allclose(out.var[1:], var[1:], rtol=0.12)
    off = ~np.eye(t, dtype=bool)
    assert out.C[off].sum() == pytest.approx(cov[off].sum(), rel=0.08)
    np.testing.assert_allclose(out.C[off], cov[off], rtol=0.25, atol=0.02 * var.max())


def test_query_gradient_of_a_binned_collapsed_stream():
    """Sequences longer than the bins: tokens of a wide bin differ in their load of the shared
    vector; the one-position bins' shares are taken smoothly (``_smooth_split``). Sampled at
    every position, compared bin by bin."""
    t, d, n_seq, sigma = 120, 8, 1500, 0.5
    gen = torch.Generator().manual_seed(12)
    exact = {name: _collapsed(t) if name != "g" else _structured(t) for name in "gvk"}
    samples = {}
    for name, c in exact.items():
        chol = np.linalg.cholesky(_full(c) + 1e-9 * np.eye(t))
        z = torch.randn(n_seq, t, d, generator=gen, dtype=torch.float64)
        samples[name] = torch.einsum("ij,bjd->bid", torch.from_numpy(chol), z)
    z = sigma * torch.randn(n_seq, t, t, generator=gen, dtype=torch.float64)
    p = z.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    gq = _score_gradient(samples["g"], samples["v"], p) @ samples["k"]
    grid = cv.grid(t)
    onehot = np.eye(len(grid.n))[_bins(grid)]

    def binned(c: Cov) -> Cov:
        full = _full(c)
        var = onehot.T @ np.diag(full) / grid.n
        C = onehot.T @ (full - np.diag(np.diag(full))) @ onehot / np.maximum(grid.pairs, 1)
        C[grid.single, grid.single] = 0.0  # as some ops leave it: the rule must not care
        return Cov(grid, var - np.diag(C), C, np.zeros_like(C))

    amap = cv.attention_map(t, "causal", 1, True)
    sum_p2, jacobian = R.softmax_row_stats(np.full(len(grid.n), sigma), amap.keys, None)
    out = cv.query_gradient(amap, binned(exact["g"]), binned(exact["v"]), binned(exact["k"]),
                            sum_p2, jacobian, np.ones(len(grid.n)))
    measured = onehot.T @ gq.pow(2).mean((0, 2)).numpy() / grid.n
    np.testing.assert_allclose(d * out.var[1:], measured[1:], rtol=0.15)


@pytest.mark.parametrize("sigma", [0.3, 1.0])
@pytest.mark.parametrize("inputs", ["structured", "collapsed"])
def test_key_gradient_matches_sampled_attention(inputs, sigma):
    """m·g_Zᵀ·Q: per key, and between keys; the columns of g_Z meet queries that share a
    part, so they add coherently, and every sequence's key gradients sum to zero."""
    t, d = 12, 8
    (g_cov, v_cov, q_cov), (g, v, q), p, amap, excess, sum_p2, jacobian = _sampled_attention(
        inputs, sigma, 13)
    var, cov, _ = _measured(_score_gradient(g, v, p).transpose(1, 2) @ q)
    out = cv.key_gradient(amap, g_cov, v_cov, q_cov, sum_p2, jacobian, excess).scaled(
        math.sqrt(d))
    # the own (same-query) part takes the values' spread per query row, not per key: within
    # 20% here (10% in RMS); the first key (seen by every query, alone by the first) and the
    # last (seen by the last query only, the farthest from its row's mean) within 30%
    np.testing.assert_allclose(out.var[1:-1], var[1:-1], rtol=0.2)
    np.testing.assert_allclose(out.var[[0, -1]], var[[0, -1]], rtol=0.3)
    off = ~np.eye(t, dtype=bool)
    assert out.C[off].sum() == pytest.approx(cov[off].sum(), rel=0.05)  # = −Σ var, exactly
    assert out.C[off].sum() == pytest.approx(-out.var.sum(), rel=1e-9)
    # single pairs carry the closure's share of what was left out (third order in p)
    np.testing.assert_allclose(out.C[off], cov[off], rtol=0.3, atol=0.08 * var.max())


def test_shared_projection_term_is_the_key_weight_gradients_mean_part():
    """Keys and values projected from one input: Σ_j x_j ⊗ g_kj has a part that a copy of x
    drawn independently of the gradient lacks. Measured as that difference over draws of x,
    the projections, g and q; the term leaves out what is third order in p (20% of it here)."""
    t, d, dh, n_seq = 12, 32, 8, 3000
    gen = torch.Generator().manual_seed(22)
    x_cov, g_cov, q_cov = _structured(t), _structured(t).scaled(0.8), _structured(t).scaled(1.2)
    m = 1 / math.sqrt(dh)
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    same, independent = [], []
    for _ in range(10):
        x, x_other = _sample(x_cov, n_seq, d, gen), _sample(x_cov, n_seq, d, gen)
        g, q = _sample(g_cov, n_seq, dh, gen), _sample(q_cov, n_seq, dh, gen)
        w_k, w_v = (torch.randn(d, dh, generator=gen, dtype=torch.float64) / math.sqrt(d)
                    for _ in range(2))
        p = (m * q @ (x @ w_k).transpose(1, 2)).masked_fill(mask, float("-inf")).softmax(-1)
        g_k = m * _score_gradient(g, x @ w_v, p).transpose(1, 2) @ q
        same.append(torch.einsum("nja,njb->nab", x, g_k).pow(2).mean().item())
        independent.append(torch.einsum("nja,njb->nab", x_other, g_k).pow(2).mean().item())
    measured = np.mean(same) - np.mean(independent)
    assert measured > 0.05 * np.mean(same)  # a real part of the weight gradient
    amap = cv.attention_map(t, "causal", 1, True)
    sigma = m * math.sqrt(dh * q_cov.total * float(np.mean(cv.row_variance(amap, x_cov))))
    sum_p2, _ = R.softmax_row_stats(np.full(t, round(sigma, 2)), amap.keys, None)
    # gain² = m²·d_head, κ_v = σ_w² = 1/d
    predicted = m * m * dh / d * cv.shared_projection_term(amap, x_cov, g_cov, q_cov, sum_p2)
    assert predicted == pytest.approx(measured, rel=0.3)


@pytest.mark.parametrize("t, d, causal", [(40, 32, False), (40, 32, True), (24, 64, False)])
def test_attend_with_keys_and_values_of_one_input(t, d, causal):
    """Queries, keys and values projected from one isotropic input (fresh weights per
    sequence: the expectation over initialisations), logits of variance 1: each query's
    token-specific output variance (its variance less its covariance with other queries),
    against :func:`cv.key_value_pairs`'s factor on the weights' spread. Without it the later
    queries' part is 16–43% low; with it within 10%."""
    n_seq = 400
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n_seq, t, d, generator=gen, dtype=torch.float64)
    wq, wk, wv = (torch.randn(n_seq, d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
                  for _ in range(3))
    z = (x @ wq) @ (x @ wk).transpose(1, 2) / math.sqrt(d)
    if causal:
        z = z.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    p = z.softmax(-1)
    var, cov, _ = _measured(p @ (x @ wv))
    off = ~np.eye(t, dtype=bool)
    amap = cv.attention_map(t, "causal" if causal else "full", 1, causal)
    excess = np.maximum((p * p).sum(-1).mean(0).numpy() - amap.r0, 0.0)
    v = Cov.independent(cv.grid(t), 1.0)

    def own(var, C):  # the later half of the queries (the earlier have few keys)
        return np.mean([var[i] - C[i][off[i]].mean() for i in range(t // 2, t)])

    measured = own(var, cov)
    paired = cv.attend(amap, v, excess, 1.0,
                       cv.key_value_pairs(amap, d, np.ones(len(excess)), excess))
    alone = cv.attend(amap, v, excess, 1.0)
    err_paired = abs(math.log2(own(paired.var, paired.C) / measured))
    err_alone = abs(math.log2(own(alone.var, alone.C) / measured))
    assert err_paired <= math.log2(1.1) and err_alone > 2 * err_paired, (err_paired, err_alone)


def test_alibi_map_matches_sampled_attention():
    """An ALiBi head (slope 0.5, causal): its expected weights decay with distance
    (``p̄ ∝ e^{−0.5(i−j)}``); ``attend`` on that map against softmax weights of random logits
    (σ = 1) plus the bias, on structured values. The uniform map's variances are 2–4× off for
    the later queries, which see 1–2 effective keys of up to 12."""
    t, d, n_seq, slope = 12, 8, 6000, 0.5
    gen = torch.Generator().manual_seed(5)
    v_cov = _structured(t)
    v = _sample(v_cov, n_seq, d, gen)
    i = torch.arange(t, dtype=torch.float64)
    bias = -slope * (i[:, None] - i[None, :]).abs()
    z = torch.randn(n_seq, t, t, generator=gen, dtype=torch.float64) + bias
    p = z.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    amap = cv.attention_map(t, "causal", 1, True, slope)
    expected = torch.softmax(bias.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1),
                                              float("-inf")), -1).numpy()
    np.testing.assert_allclose(amap.W, expected, atol=1e-12)  # one position per bin
    np.testing.assert_allclose(amap.counts, 1.0 / (expected**2).sum(1), rtol=1e-12)
    excess = np.maximum((p * p).sum(-1).mean(0).numpy() - amap.r0, 0.0)
    out = cv.attend(amap, v_cov, excess, 1.0)
    var, cov, _ = _measured(p @ v)
    np.testing.assert_allclose(out.var, var, rtol=0.08)
    off = ~np.eye(t, dtype=bool)
    np.testing.assert_allclose(out.C[off], cov[off], rtol=0.08, atol=0.01)
    uniform = cv.attend(cv.attention_map(t, "causal", 1, True), v_cov, excess, 1.0)
    err = np.abs(uniform.C[off] - cov[off]) / (np.abs(cov[off]) + 0.01)
    assert err.max() > 0.5  # two tokens' covariance: the uniform map averages too far back
    # the softmax Jacobian's E[Σp² − 2Σp³ + (Σp²)²]: uniform rows of the effective length
    # (the row statistics) times the biased weights' own factor over the uniform one
    s2, s3 = (p * p).sum(-1), (p**3).sum(-1)
    sampled = (s2 - 2 * s3 + s2 * s2).mean(0).numpy()[2:]
    _sum_p2, rows = R.softmax_row_stats(np.ones(t), amap.keys, d)
    r0, r3 = amap.r0[2:], amap.r3[2:]  # (query 0 has one key: no Jacobian)
    biased = rows[2:] * (r0 - 2 * r3 + r0 * r0) / (r0 - r0 * r0)
    np.testing.assert_allclose(biased, sampled, rtol=0.1)
    assert np.abs(np.log(rows[2:] / sampled)).max() > np.abs(np.log(biased / sampled)).max()


def test_rotated_matches_sampled_rope():
    """Structured tokens (shared across positions and sequences) rotated by the model's own
    ``apply_rope``: per-position variances kept, covariances of two positions (one sequence,
    and two sequences of a batch) multiplied by the mean cosine of the angle between them."""
    from unitscale_core import positional
    from unitscale_core.model.layers import apply_rope

    t, d, n_seq = 12, 16, 4000
    gen = torch.Generator().manual_seed(7)
    x_cov = _structured(t)
    x = _sample(x_cov, n_seq, d, gen)
    theta = torch.from_numpy(positional.rope_angles(t, d))
    y = apply_rope(x[:, None], theta.cos(), theta.sin())[:, 0]  # one head of d features
    out = cv.rotated(x_cov, d)
    var, cov, cross = _measured(y)
    np.testing.assert_allclose(out.var, var, rtol=0.06)
    np.testing.assert_allclose(out.var, x_cov.var, rtol=1e-12)
    off = ~np.eye(t, dtype=bool)
    np.testing.assert_allclose(out.C[off], cov[off], rtol=0.08, atol=0.02)
    np.testing.assert_allclose(out.M, cross, rtol=0.1, atol=0.02)
    # far apart, the rotation leaves little of what the tokens shared
    assert abs(out.C[0, t - 1]) < 0.7 * x_cov.C[0, t - 1]


def test_rotated_matches_sampled_rope_of_a_larger_base():
    """``rope_base`` (Llama 3: θ = 500000): the model's rotation with that θ, sampled, keeps
    the mean cosine of the angle between two positions; far tokens keep more of what they
    share than at θ = 10000."""
    from unitscale_core import positional
    from unitscale_core.model.layers import apply_rope

    t, d, n_seq, base = 12, 16, 4000, 500000.0
    gen = torch.Generator().manual_seed(11)
    x_cov = _structured(t)
    x = _sample(x_cov, n_seq, d, gen)
    theta = torch.from_numpy(positional.rope_angles(t, d, base))
    y = apply_rope(x[:, None], theta.cos(), theta.sin())[:, 0]
    out = cv.rotated(x_cov, d, base)
    var, cov, cross = _measured(y)
    np.testing.assert_allclose(out.var, var, rtol=0.06)
    off = ~np.eye(t, dtype=bool)
    np.testing.assert_allclose(out.C[off], cov[off], rtol=0.08, atol=0.02)
    np.testing.assert_allclose(out.M, cross, rtol=0.1, atol=0.02)
    default = cv.rotated(x_cov, d)
    assert out.C[0, t - 1] > default.C[0, t - 1] + 0.05 * abs(x_cov.C[0, t - 1])


def test_query_gradient_shares_what_positions_share_across_the_batch():
    """Values and keys with a part shared by every sequence that varies with position (as
    learned positions give) and a context gradient with a part shared across the batch: the
    query gradients of two sequences are correlated (``M``), which sums into the query bias
    gradient. Sampled; the model without it had ``M = 0``."""
    t, d, n_seq, sigma = 12, 8, 6000, 0.7
    gen = torch.Generator().manual_seed(13)
    pos = np.arange(t)
    # position patterns shared by every sequence (PSD: sums of outer products)
    M = 0.25 * np.outer(np.sin(pos), np.sin(pos)) + 0.5 * np.outer(np.cos(0.4 * pos),
                                                                    np.cos(0.4 * pos))

    def shared(scale: float) -> Cov:
        return Cov(cv.grid(t), np.full(t, 0.6), scale * M + 0.1, scale * M)

    g_cov, v_cov, k_cov = shared(1.0), shared(1.0), shared(0.8)
    g, v, k = (_sample(c, n_seq, d, gen) for c in (g_cov, v_cov, k_cov))
    p, amap, _excess = _causal_softmax(t, n_seq, sigma, gen)
    sum_p2, jacobian = R.softmax_row_stats(np.full(t, sigma), amap.keys, None)
    _var, _cov, cross = _measured(_score_gradient(g, v, p) @ k)
    out = cv.query_gradient(amap, g_cov, v_cov, k_cov, sum_p2, jacobian, np.ones(t)).scaled(
        math.sqrt(d))
    assert len(out.S) == 2
    later = np.ix_(range(4, t), range(4, t))  # queries with a few keys to centre on
    np.testing.assert_allclose(out.M[later], cross[later], rtol=0.3, atol=0.1 * np.abs(
        cross[later]).max())
    assert np.abs(cross[later]).max() > 0.05 * _var[4:].max()  # a part worth predicting


@pytest.mark.parametrize("param", ["standard", "unit"])
def test_dropout_leaves_what_tokens_share_at_s_squared(param):
    """A mask per element and token: each token's variance gains ``1/(1−p)`` (× ``s²``, the
    unit-scaled factor ``1 − p``), the covariance of two tokens only ``s²`` — sampled through
    the model's own dropout (``torch`` / ``unit_scaling``), p = 0.3. One scalar gain for
    both (the predictor before) puts the covariance ``1/(1−p)`` = 43% high."""
    from unitscale_core import ModelConfig
    from unitscale_core.model.ops import make_ops
    from unitscale_core.scaling.predict import _Predictor

    p, t, d, shared, own = 0.3, 16, 200_000, 0.7, 0.5
    cfg = ModelConfig(dropout=p, parametrization=param, seq_len=t, max_len=t)
    g = cv.grid(t)
    x = Cov.of(g, np.full(len(g.n), own), np.full((1, len(g.n), len(g.n)), shared))
    y = _Predictor(cfg)._dropout(x)
    torch.manual_seed(0)
    z = torch.randn(1, d, dtype=torch.float64) * math.sqrt(shared)
    xs = z + torch.randn(t, d, dtype=torch.float64) * math.sqrt(own)
    ys = make_ops(param).dropout(xs, p, True)
    var = float(ys.pow(2).mean())
    gram = (ys @ ys.T) / d
    cov = float((gram.sum() - gram.diagonal().sum()) / (t * (t - 1)))
    assert var == pytest.approx(float(y.var.mean()), rel=0.02)
    assert cov == pytest.approx(y.same, rel=0.03)
