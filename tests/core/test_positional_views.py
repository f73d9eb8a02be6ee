"""What the positional panel draws: views built from the generators, bounded at any length."""

from __future__ import annotations

import numpy as np
import pytest

from unitscale_core import positional as P
from unitscale_core.positional_views import (
    KINDS,
    MAX_SIDE,
    VIEWS,
    ViewSpec,
    compute_view,
    export_array,
    minilm_position_table,
    sampled_positions,
)


def test_sampled_positions_bounded():
    assert len(sampled_positions(100)) == 100
    pos = sampled_positions(8192)
    assert len(pos) <= MAX_SIDE and pos[0] == 0 and pos[1] == 8


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("view", VIEWS)
def test_every_kind_and_view_draws_or_explains(kind, view):
    spec = ViewSpec(kind=kind, view=view, length=64, d_model=32, n_heads=6, head=5)
    try:
        result = compute_view(spec)
    except P.PositionalError as exc:
        # additive schemes put no bias on logits: the only refusal, and it says why
        assert kind in ("sinusoidal", "learned") and view == "head_bias"
        assert "no bias" in str(exc)
        return
    if result.matrix is not None:
        assert np.isfinite(result.matrix).all() and result.matrix.ndim == 2
    else:
        assert result.curves and all(np.isfinite(c.y).all() for c in result.curves)


def test_alibi_head_bias_is_the_formula_at_sampled_positions():
    spec = ViewSpec(kind="alibi", view="head_bias", length=8192, n_heads=12, head=3)
    result = compute_view(spec)
    pos = result.row_coords
    assert result.matrix.shape == (len(pos), len(pos)) and len(pos) <= MAX_SIDE
    m = P.alibi_slopes(12)[3]
    i, j = 17, 900
    assert result.matrix[i, j] == pytest.approx(-m * abs(pos[i] - pos[j]), rel=1e-6)
    assert "every 8-th position" in result.note


def test_sinusoidal_encoding_and_similarity_match_the_generator():
    spec = ViewSpec(kind="sinusoidal", view="encoding", length=50, d_model=16)
    np.testing.assert_array_equal(compute_view(spec).matrix, P.sinusoidal(50, 16))
    sim = compute_view(ViewSpec(kind="sinusoidal", view="similarity_cosine", length=50,
                                d_model=16)).matrix
    pe = P.sinusoidal(50, 16).astype(np.float64)
    pe /= np.linalg.norm(pe, axis=1, keepdims=True)
    np.testing.assert_allclose(sim, pe @ pe.T, atol=1e-6)


def test_sinusoidal_dot_similarity_depends_only_on_distance():
    """PE(i)·PE(j) = Σ cos((i−j)ω_k): the property that makes the similarity view banded."""
    sim = compute_view(ViewSpec(kind="sinusoidal", view="similarity_dot", length=40,
                                d_model=32)).matrix
    np.testing.assert_allclose(sim[5, 12], sim[20, 27], atol=1e-4)
    w = 10000.0 ** (-np.arange(0, 32, 2) / 32)
    assert sim[5, 12] == pytest.approx(np.cos(7 * w).sum(), abs=1e-4)


def test_learned_view_is_the_checkpoint_table():
    table = minilm_position_table()
    assert table.shape == (512, 384)
    result = compute_view(ViewSpec(kind="learned", view="encoding", length=128))
    np.testing.assert_array_equal(result.matrix, table[:128])
    assert "MiniLM" in result.note


def test_export_shapes():
    assert export_array(ViewSpec(kind="sinusoidal", length=10, d_model=8)).shape == (10, 8)
    assert export_array(ViewSpec(kind="rope", length=10, d_model=8)).shape == (10, 4)
    assert export_array(ViewSpec(kind="alibi", length=10, n_heads=3)).shape == (3, 10, 10)
    assert export_array(ViewSpec(kind="relative", length=10)).dtype == np.int64
    assert export_array(ViewSpec(kind="learned", length=10)).shape == (10, 384)


@pytest.mark.parametrize("kind", ["alibi", "relative"])
def test_causal_bias_masks_the_keys_after_the_query(kind):
    """Causal (bidirectional off): the upper triangle (key j > query i) is masked (NaN), not
    the mirror of the lower one; bidirectional: every cell has a value."""
    causal = compute_view(ViewSpec(kind=kind, view="head_bias", length=40, n_heads=4, head=1,
                                   bidirectional=False))
    i, j = np.indices(causal.matrix.shape)
    assert np.isnan(causal.matrix[j > i]).all() and np.isfinite(causal.matrix[j <= i]).all()
    assert "masked" in causal.note
    both = compute_view(ViewSpec(kind=kind, view="head_bias", length=40, n_heads=4, head=1))
    assert np.isfinite(both.matrix).all() and "masked" not in both.note
    if kind == "alibi":  # the past is the same either way
        np.testing.assert_array_equal(causal.matrix[j <= i], both.matrix[j <= i])
        assert causal.matrix[5, 2] == pytest.approx(-P.alibi_slopes(4)[1] * 3)
    else:
        want = P.t5_relative_bucket(j - i, False, 32, 128)
        np.testing.assert_array_equal(causal.matrix[j <= i], want[j <= i])


def test_colour_maps_fit_the_values():
    """Diverging only for signed encodings centred on 0; T5 bucket indices are ordinals
    (sequential map, integer steps); ALiBi's non-positive bias sequential."""
    from unitscale_core.positional_views import DIVERGING_CMAP

    enc = compute_view(ViewSpec(kind="sinusoidal", view="encoding", length=16, d_model=8))
    assert enc.cmap == DIVERGING_CMAP and enc.symmetric and not enc.integer
    for view in ("encoding", "head_bias"):  # both draw T5's buckets
        t5 = compute_view(ViewSpec(kind="relative", view=view, length=16))
        assert t5.integer and t5.cmap != DIVERGING_CMAP and not t5.symmetric
        assert (t5.matrix == np.round(t5.matrix)).all()
        alibi = compute_view(ViewSpec(kind="alibi", view=view, length=16))
        assert alibi.cmap != DIVERGING_CMAP and not alibi.integer
    sim = compute_view(ViewSpec(kind="sinusoidal", view="similarity_cosine", length=16))
    assert sim.cmap != DIVERGING_CMAP


def test_causal_t5_distance_curves_leave_out_the_masked_direction():
    both = compute_view(ViewSpec(kind="relative", view="distance", length=20))
    causal = compute_view(ViewSpec(kind="relative", view="distance", length=20,
                                   bidirectional=False))
    assert len(both.curves) == 2 and [c.name for c in causal.curves] == \
        ["bucket of key − query = −Δ"]
    assert "masked" in causal.note
