"""Positional encodings as plain numpy arrays: what each scheme feeds the model.

Every function is pure numpy (no torch, no Qt) and returns a fresh array, so the model code
(``unitscale_core.model``) and the explorer's plots share one definition of each scheme:

* sinusoidal: fixed sin/cos table added to the embeddings (Vaswani et al. 2017, §3.5);
* learned: a trained ``max_len × d_model`` table (e.g. BERT's ``position_embeddings``);
* relative: T5's bucketed relative positions (Raffel et al. 2020, §2.1) and Shaw et al.'s
  clipped distances (Shaw et al. 2018);
* rope: rotary angles, rotation and long-term decay (Su et al. 2021, RoFormer);
* alibi: per-head slopes and linear distance biases (Press et al. 2022);
* none: no positional information.

Wrong arguments raise :class:`PositionalError`, whose message names the parameter.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: The positional schemes the explorer knows (same order as ``config.POSITIONALS``).
POSITIONAL_KINDS = ("sinusoidal", "learned", "relative", "rope", "alibi", "none")

SIMILARITY_KINDS = ("dot", "cosine")

#: Largest array a function here returns: 4 GiB (ALiBi's 8 heads × 16,384² float32 is 8 GiB).
#: A view samples positions and never needs more; ``--max-len 1000000`` would ask 7.28 TiB.
MAX_TABLE_BYTES = 4 << 30


class PositionalError(ValueError):
    """A positional-encoding argument is invalid; the message names the parameter and why."""


# --------------------------------------------------------------------------- validation


def _int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``; bools and non-integers are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise PositionalError(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise PositionalError(f"{name}={value} must be at least {minimum}")
    return int(value)


def _base(value: Any, name: str = "base") -> float:
    """A finite real ``base > 0`` and ``!= 1`` (the frequencies ``base^(-2i/d)`` must vary)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise PositionalError(f"{name}={value!r} must be a number")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise PositionalError(f"{name}={value} must be a finite number above 0")
    if value == 1.0:
        raise PositionalError(f"{name}={value} must not be 1 (every frequency would be equal)")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise PositionalError(f"{name}={value!r} must be True or False")
    return bool(value)


def _check_size(name: str, value: int, shape: tuple[int, ...], dtype: Any) -> None:
    """Refuse, before allocating, an array of ``shape`` and ``dtype`` above MAX_TABLE_BYTES,
    naming the argument ``name=value`` that sized it."""
    itemsize = np.dtype(dtype).itemsize
    nbytes = math.prod(shape) * itemsize
    if nbytes > MAX_TABLE_BYTES:
        from .sizing import format_bytes

        dims = " × ".join(f"{n:,}" for n in shape)
        raise PositionalError(f"{name}={value:,} makes a {format_bytes(nbytes)} table "
                              f"({dims} {np.dtype(dtype).name}), above the "
                              f"{format_bytes(MAX_TABLE_BYTES)} this program builds")


def _even(name: str, value: int, kind: str) -> int:
    if value % 2:
        raise PositionalError(f"{name}={value} must be even for {kind}")
    return value


def _numeric(name: str, value: Any) -> np.ndarray:
    """``value`` as a real numeric numpy array (torch tensors are detached and copied)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor; torch not imported
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() else value).numpy()
    arr = np.asarray(value)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer)
                                     or np.issubdtype(arr.dtype, np.floating)):
        raise PositionalError(f"{name} has dtype {arr.dtype}; it must hold real numbers")
    return arr


# --------------------------------------------------------------------------- sinusoidal


def sinusoidal(max_len: int, d_model: int, base: float = 10000.0) -> np.ndarray:
    """Fixed sinusoidal encoding, ``[max_len, d_model]`` float32 (Vaswani et al. 2017, §3.5).

    ``PE(pos, 2i) = sin(pos / base^(2i/d))`` and ``PE(pos, 2i+1) = cos(pos / base^(2i/d))``
    with ``d = d_model``: column pair (2i, 2i+1) shares the frequency ``ω_i = base^(-2i/d)``.
    This is the seed's ``positional_encoding`` (which computes ``ω_i`` as
    ``exp(2i · -ln(base)/d)``), evaluated in float64 and rounded once to float32.

    Odd ``d_model`` (which the seed's code cannot do): the formula is applied as written, with
    ``d = d_model`` in the exponent; there are ``ceil(d/2)`` frequencies, every cos column
    ``2i+1`` uses the frequency of its sin partner ``2i``, and the last column ``d-1`` is the sin
    of the extra frequency ``ω_{(d-1)/2}``, which has no cos partner.
    """
    max_len, width = _int("max_len", max_len), _int("d_model", d_model)
    _check_size(*(("d_model", width) if width > max_len else ("max_len", max_len)),
                (max_len, width), np.float64)
    return sinusoidal_at(np.arange(max_len), d_model, base)


def sinusoidal_at(positions: Any, d_model: int, base: float = 10000.0) -> np.ndarray:
    """Rows ``positions`` of :func:`sinusoidal` (same formula), ``[len(positions), d_model]``.

    Lets a view sample every k-th of 8192 positions without building the whole table.
    """
    pos = _numeric("positions", positions).reshape(-1)
    d_model, base = _int("d_model", d_model), _base(base)
    _check_size("d_model" if d_model > len(pos) else "max_len", max(d_model, len(pos)),
                (len(pos), d_model), np.float64)
    pos = pos.astype(np.float64)
    i2 = np.arange(0, d_model, 2, dtype=np.float64)  # 2i for each frequency
    angle = pos[:, None] * base ** (-i2 / d_model)
    max_len = len(pos)
    pe = np.empty((max_len, d_model), dtype=np.float64)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : d_model // 2])
    return pe.astype(np.float32)


# --------------------------------------------------------------------------- learned


def learned(weight: Any) -> np.ndarray:
    """A learned position table ``P[pos, c]`` as a float32 numpy copy, ``[max_len, d_model]``.

    Learned absolute positions (Gehring et al. 2017; BERT, Devlin et al. 2019; GPT-2) are just
    a trained matrix added to the token embeddings; the source is a checkpoint's
    position-embedding weight (a numpy array or a torch tensor). It must be 2-D, non-empty and
    finite.
    """
    arr = _numeric("weight", weight)
    if arr.ndim != 2:
        raise PositionalError(f"weight has shape {arr.shape}; it must be 2-D [max_len, d_model]")
    if arr.size == 0:
        raise PositionalError(f"weight has shape {arr.shape}; it must not be empty")
    out = np.array(arr, dtype=np.float32, copy=True)
    if not np.isfinite(out).all():
        raise PositionalError("weight holds NaN or infinite values")
    log.debug("learned position table %s", out.shape)
    return out


# --------------------------------------------------------------------------- relative


def relative_positions(q_len: int, k_len: int) -> np.ndarray:
    """``rel[i, j] = j - i``: key position minus query position, ``[q_len, k_len]`` int64.

    This is T5's ``memory_position - context_position`` (Raffel et al. 2020; ``transformers``'
    ``T5Attention.compute_bias``): positive values are keys after the query.
    """
    q_len, k_len = _int("q_len", q_len), _int("k_len", k_len)
    _check_size("q_len" if q_len >= k_len else "k_len", max(q_len, k_len), (q_len, k_len),
                np.int64)
    return np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]


def _t5_args(bidirectional: Any, num_buckets: Any, max_distance: Any) -> tuple[bool, int, int]:
    """Validated (bidirectional, buckets per direction, max_distance) for the T5 buckets."""
    bidirectional = _bool("bidirectional", bidirectional)
    num_buckets = _int("num_buckets", num_buckets, minimum=4 if bidirectional else 2)
    if bidirectional:
        num_buckets = _even("num_buckets", num_buckets, "bidirectional buckets") // 2
    max_distance = _int("max_distance", max_distance)
    if max_distance <= num_buckets // 2:
        raise PositionalError(
            f"max_distance={max_distance} must be above the {num_buckets // 2} exact buckets "
            "(the logarithmic buckets span the distances between them)")
    return bidirectional, num_buckets, max_distance


def t5_relative_bucket(relative_position: Any, bidirectional: bool = True, num_buckets: int = 32,
                       max_distance: int = 128) -> np.ndarray:
    """T5's relative-position bucket of each ``memory_position - query_position`` (int64).

    Raffel et al. 2020 §2.1, exactly ``transformers``' ``T5Attention._relative_position_bucket``
    (from Mesh TensorFlow). Bidirectional: half the buckets for keys after the query
    (offset ``n = num_buckets/2``), half for the rest, on ``|rel|``; causal: ``n = num_buckets``
    on ``max(-rel, 0)`` (keys after the query share bucket 0). Within ``n``, with
    ``e = n // 2`` exact buckets: ``r < e ↦ r``, otherwise
    ``min(e + ⌊ln(r/e) / ln(max_distance/e) · (n - e)⌋, n - 1)``, computed in float32 like
    the reference so boundary cases round identically.

    Refused (where the reference would give meaningless buckets): odd ``num_buckets`` when
    bidirectional, fewer than 2 buckets per direction, ``max_distance <= e``.
    """
    bidirectional, n, max_distance = _t5_args(bidirectional, num_buckets, max_distance)
    rel = _numeric("relative_position", relative_position)
    if not np.issubdtype(rel.dtype, np.integer):
        raise PositionalError(f"relative_position has dtype {rel.dtype}; it must hold integers")
    rel = rel.astype(np.int64)
    buckets = np.zeros(rel.shape, dtype=np.int64)
    if bidirectional:
        buckets += (rel > 0).astype(np.int64) * n
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    exact = n // 2
    # float32 throughout, as torch computes it; max(rel, 1) only avoids log(0) in masked entries
    ratio = np.maximum(rel, 1).astype(np.float32) / np.float32(exact)
    scaled = np.log(ratio) / np.float32(math.log(max_distance / exact)) * np.float32(n - exact)
    large = np.minimum(exact + scaled.astype(np.int64), n - 1)
    return buckets + np.where(rel < exact, rel, large)


def t5_bucket_matrix(max_len: int, bidirectional: bool = True, num_buckets: int = 32,
                     max_distance: int = 128) -> np.ndarray:
    """``B[i, j] = t5_relative_bucket(j - i)``, ``[max_len, max_len]`` int64 (query rows, key
    columns), the bucket table T5 indexes its learned per-head bias with (Raffel et al. 2020).
    """
    max_len = _int("max_len", max_len)
    _check_size("max_len", max_len, (max_len, max_len), np.int64)
    rel = relative_positions(max_len, max_len)
    return t5_relative_bucket(rel, bidirectional, num_buckets, max_distance)


def shaw_clipped(max_len: int, max_distance: int, as_index: bool = False) -> np.ndarray:
    """Shaw et al. 2018 clipped relative distance, ``[max_len, max_len]`` int64.

    ``clip(j - i, -k, k)`` with ``k = max_distance`` (query ``i`` rows, key ``j`` columns):
    every distance beyond ``k`` shares the edge embedding. ``as_index=True`` adds ``k``, giving
    the row ``0 … 2k`` of the ``(2k+1)``-row relative embedding table ``w``.
    """
    k = _int("max_distance", max_distance)
    as_index = _bool("as_index", as_index)
    _check_size("max_len", _int("max_len", max_len), (max_len, max_len), np.int64)
    clipped = np.clip(relative_positions(_int("max_len", max_len), max_len), -k, k)
    return clipped + k if as_index else clipped


# --------------------------------------------------------------------------- rope


def _rope_freqs(d_model: int, base: float) -> np.ndarray:
    """``θ_i = base^(-2i/d)`` for ``i = 0 … d/2 - 1`` (float64)."""
    return base ** (-np.arange(0, d_model, 2, dtype=np.float64) / d_model)


def rope_angles(max_len: int, d_model: int, base: float = 10000.0) -> np.ndarray:
    """Rotary angles ``angle[pos, i] = pos · base^(-2i/d)``, ``[max_len, d_model/2]`` float64.

    Su et al. 2021 (RoFormer), eq. 15: pair ``(2i, 2i+1)`` of a query or key at position
    ``pos`` is rotated by ``pos · θ_i`` with ``θ_i = base^(-2(i-1)/d)`` (1-based i in the
    paper). ``d_model`` is the rotated size (a head's size) and must be even.
    """
    max_len, width = _int("max_len", max_len), _int("d_model", d_model, minimum=2)
    _check_size(*(("d_model", width) if width > max_len else ("max_len", max_len)),
                (max_len, width // 2), np.float64)
    return rope_angles_at(np.arange(max_len), d_model, base)


def rope_angles_at(positions: Any, d_model: int, base: float = 10000.0) -> np.ndarray:
    """Rows ``positions`` of :func:`rope_angles`: ``pos · base^(-2i/d)``, float64."""
    pos = _numeric("positions", positions).reshape(-1)
    base = _base(base)
    d_model = _even("d_model", _int("d_model", d_model, minimum=2), "rope")
    _check_size("d_model", d_model, (len(pos), d_model // 2), np.float64)
    return pos.astype(np.float64)[:, None] * _rope_freqs(d_model, base)


def rope_rotate(x: Any, positions: Any = None, base: float = 10000.0) -> np.ndarray:
    """Rotate ``x [..., n, d]`` by RoPE: pair ``(2i, 2i+1)`` of row ``t`` by ``positions[t]·θ_i``.

    ``(x₀, x₁) ↦ (x₀ cos a − x₁ sin a, x₀ sin a + x₁ cos a)`` with ``a = pos · base^(-2i/d)``
    (Su et al. 2021, eq. 34; the interleaved pairs of the paper, not the "rotate half" layout
    of GPT-NeoX/LLaMA). ``positions`` (length ``n``, default ``0 … n-1``) may be any finite
    reals. Hence ``<R(m)q, R(n)k>`` depends only on ``m - n``. Float inputs keep their dtype;
    integer inputs give float64.
    """
    arr = _numeric("x", x)
    if arr.ndim < 2:
        raise PositionalError(f"x has shape {arr.shape}; it must be [..., n, d]")
    n, d = arr.shape[-2:]
    _even("d", _int("d (x.shape[-1])", d, minimum=2), "rope")
    pos = np.arange(n, dtype=np.float64) if positions is None else _numeric("positions", positions)
    if pos.shape != (n,):
        raise PositionalError(f"positions has shape {pos.shape}; it must be ({n},) to match x")
    if not np.isfinite(pos).all():
        raise PositionalError("positions holds NaN or infinite values")
    angle = pos.astype(np.float64)[:, None] * _rope_freqs(d, _base(base))  # (n, d/2)
    cos, sin = np.cos(angle), np.sin(angle)
    x0, x1 = arr[..., 0::2].astype(np.float64), arr[..., 1::2].astype(np.float64)
    out = np.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), axis=-1).reshape(arr.shape)
    return out.astype(arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64)


def rope_distance_decay(max_distance: int, d_model: int, base: float = 10000.0) -> np.ndarray:
    """RoPE score against relative distance, ``[max_distance + 1]`` float64, 1 at distance 0.

    ``score(Δ) = qᵀ R(Δ) k / d`` for the all-ones query and key, ``q = k = 1``; each pair
    contributes ``(1, 1) R(Δθ_i) (1, 1)ᵀ = 2 cos(Δθ_i)``, so
    ``score(Δ) = (2/d) Σ_i cos(Δ · base^(-2i/d))``, ``Δ = 0 … max_distance``. It shows the
    long-term decay of Su et al. 2021 §3.4.3 (see :func:`rope_relative_upper_bound` for the
    paper's own bound).
    """
    max_distance = _int("max_distance", max_distance)
    d_model = _even("d_model", _int("d_model", d_model, minimum=2), "rope")
    _check_size("max_distance", max_distance, (max_distance + 1, d_model // 2), np.float64)
    delta = np.arange(max_distance + 1, dtype=np.float64)[:, None]
    return 2.0 * np.cos(delta * _rope_freqs(d_model, _base(base))).sum(axis=1) / d_model


def rope_relative_upper_bound(max_distance: int, d_model: int,
                              base: float = 10000.0) -> np.ndarray:
    """RoFormer's relative upper bound ``(1/(d/2)) Σ_{j=1}^{d/2} |S_j|``, ``[max_distance + 1]``.

    Su et al. 2021 §3.4.3, eq. 37 and Fig. 2: ``S_j = Σ_{k=0}^{j-1} exp(i Δ θ_k)`` with
    ``θ_k = base^(-2k/d)`` (float64). At ``Δ = 0`` every ``|S_j| = j``, so it starts at
    ``(d/2 + 1)/2``, and it decays (with oscillations) as the distance ``Δ`` grows.
    """
    max_distance = _int("max_distance", max_distance)
    d_model = _even("d_model", _int("d_model", d_model, minimum=2), "rope")
    _check_size("max_distance", max_distance, (max_distance + 1, d_model // 2), np.complex128)
    delta = np.arange(max_distance + 1, dtype=np.float64)[:, None]
    partial = np.cumsum(np.exp(1j * delta * _rope_freqs(d_model, _base(base))), axis=1)
    return np.abs(partial).mean(axis=1)


# --------------------------------------------------------------------------- alibi


def alibi_slopes(n_heads: int) -> np.ndarray:
    """ALiBi head slopes ``m_h``, ``[n_heads]`` float64 (Press et al. 2022, §3).

    As the reference ``get_slopes`` (ofirpress/attention_with_linear_biases): for ``n`` a power
    of two, ``start = 2^(-8/n)`` and ``m_h = start · start^h``, ``h = 0 … n-1`` (8 heads:
    1/2, 1/4, …, 1/256). Otherwise, with ``p`` the largest power of two below ``n``:
    ``slopes(p) + slopes(2p)[0::2][: n - p]``, the extra heads interleaved between the others.
    """
    n_heads = _int("n_heads", n_heads)
    _check_size("n_heads", n_heads, (2 * n_heads,), np.float64)  # slopes(p) and slopes(2p)
    p = 1 << (n_heads.bit_length() - 1)  # largest power of two <= n_heads

    def power_of_two(n: int) -> np.ndarray:
        start = 2.0 ** (-8.0 / n)
        return start * start ** np.arange(n, dtype=np.float64)

    if p == n_heads:
        return power_of_two(n_heads)
    return np.concatenate((power_of_two(p), power_of_two(2 * p)[0::2][: n_heads - p]))


def alibi_bias(n_heads: int, max_len: int) -> np.ndarray:
    """ALiBi logit bias ``bias[h, i, j] = -m_h · |i - j|``, ``[n_heads, max_len, max_len]`` float32.

    Press et al. 2022 (``m_h`` from :func:`alibi_slopes`, query ``i`` rows, key ``j`` columns).
    The paper adds ``-m_h · (i - j)`` for the keys a causal query sees (``j <= i``); the
    symmetric ``|i - j|`` here equals it there and extends it to bidirectional attention.
    Masking future keys is the attention pattern's job, not this bias's.
    """
    n_heads, max_len = _int("n_heads", n_heads), _int("max_len", max_len)
    name, value = ("n_heads", n_heads) if n_heads > max_len else ("max_len", max_len)
    _check_size(name, value, (n_heads, max_len, max_len), np.float32)
    slopes = alibi_slopes(n_heads)
    dist = np.abs(relative_positions(max_len, max_len)).astype(np.float64)
    out = np.empty((n_heads, max_len, max_len), dtype=np.float32)
    step = max(1, (1 << 22) // (max_len * max_len))  # heads per chunk: <= 32 MiB of float64
    for h in range(0, n_heads, step):  # no [H, L, L] float64 temporary, no loop of 10⁷ heads
        out[h:h + step] = -slopes[h:h + step, None, None] * dist[None]
    return out


# --------------------------------------------------------------------------- similarity


def position_similarity(matrix: Any, kind: str = "dot") -> np.ndarray:
    """Similarity between the position rows of an encoding ``P [n, d]``: ``[n, n]`` float64.

    ``kind="dot"``: ``S = P Pᵀ``; ``kind="cosine"``: ``S[i, j] = p_i·p_j / (‖p_i‖ ‖p_j‖)``,
    with 0 for any row of zero norm (such a row is similar to nothing, itself included).
    The usual "position-wise similarity" heat map (e.g. Wang & Chen 2020).
    """
    if kind not in SIMILARITY_KINDS:
        raise PositionalError(f"kind={kind!r} must be one of {', '.join(SIMILARITY_KINDS)}")
    p = _numeric("matrix", matrix)
    if p.ndim != 2 or p.size == 0:
        raise PositionalError(f"matrix has shape {p.shape}; it must be 2-D [n, d], non-empty")
    _check_size("n (matrix.shape[0])", p.shape[0], (p.shape[0], p.shape[0]), np.float64)
    p = p.astype(np.float64)
    if kind == "cosine":
        norm = np.linalg.norm(p, axis=1, keepdims=True)
        p = np.divide(p, norm, out=np.zeros_like(p), where=norm > 0)
    return p @ p.T
