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
