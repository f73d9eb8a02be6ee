"""Per-op variance-propagation rules: the RMS of every output and gradient of one op.

Each rule maps the RMS ("scale") of an op's inputs to the RMS of its output (forward) and the
RMS of the op's output gradient to the RMS of each input gradient and weight gradient
(backward). They are small, pure functions of floats (numpy only where an expectation has to be
integrated numerically) meant to be composed over a Transformer's op graph at initialisation:
standard (plain ``torch.nn`` with PyTorch's default inits), unit (Unit Scaling; Blake, Orr &
Luschi 2023, "Unit Scaling: Out-of-the-Box Low-Precision Training", arXiv:2303.11257) and u-μP
(Blake et al. 2024, "u-μP: The Unit-Scaled Maximal Update Parametrization", arXiv:2407.17465).

Conventions
    * "rms" is the root-mean-square over the whole tensor, ``sqrt(mean(t²))`` — not the
      standard deviation. Inputs are modelled as zero-mean, i.i.d. Gaussian-ish tensors and
      output gradients as zero-mean Gaussians independent of the forward activations (true at
      initialisation for a random upstream gradient; a model's own gradients are only
      approximately so). Predictions are expectations: ``sqrt(E[mean(t²)])``.
    * Unit-scaled ops follow :mod:`unit_scaling`'s ``scale_fwd``/``scale_bwd`` semantics: an op
      multiplies its forward output by an *output scale* and, separately, each input gradient
      by a *grad scale*; a *constraint* ties scales that must agree (``"gmean"``, used by Unit
      Scaling 2023, or ``"to_output_scale"``, the library default used by u-μP, which sets every
      grad scale to the forward one). ``unit_*`` functions return those factors exactly as
      ``unit_scaling`` 0.3 computes them; the ``*_rule`` functions take factors as arguments
      (1.0 = standard op), so one rule serves all three parametrizations.
    * Results are :class:`~typing.NamedTuple` s (immutable, unpackable, cheap to build).

Numerics
    Closed forms are used wherever they exist. Three families of expectations are numerical:

    * elementwise nonlinearities (GELU, SiLU): Gauss–Hermite quadrature
      (``numpy.polynomial.hermite_e.hermegauss``, 96 nodes) for input scales ≤ 2, a fine
      trapezoid rule in the standard-normal variable above that (where the kink of
      ``f(σx)`` at 0 is too sharp for Gauss–Hermite); relative error < 1e-8 against a
      0.002-step reference, plus < 0.1 % from rounding the cache key;
    * softmax statistics over ``n`` i.i.d. ``N(0, σ²)`` logits (``E Σp²``, ``E Σp³``,
      ``E (Σp²)²``, ``E logsumexp``): an *exact* one-dimensional quadrature, no Monte-Carlo and
      no log-normal approximation. With ``1/a^k = ∫₀^∞ t^{k-1} e^{-ta} dt / Γ(k)`` and
      ``u = log t``::

          E[Σ_j p_j^k]          = n/Γ(k)   ∫ m_k(u) m_0(u)^{n-1} du
          E[Σ_{j≠l} p_j² p_l²]  = n(n-1)/6 ∫ m_2(u)² m_0(u)^{n-2} du
          E[logsumexp(z)]       =          ∫ (exp(-e^u) - m_0(u)^n) du   (Frullani)
          m_k(u) = E[exp(k(u+Y) - e^{u+Y})],  Y ~ N(0, σ²)

      ``m_k`` is a Gaussian smoothing of a fixed function (Gauss–Hermite for σ ≤ 1, a discrete
      convolution on a 0.2-step grid above), and the ``u`` integrals are trapezoid sums of
      smooth integrands (checks: a single key gives ``E p^k = 1``, ``E logsumexp = 0`` to
      1e-13; direct sampling with 4·10⁴ rows agrees within its ~1 % noise; the tests repeat
      the sampling check).
      For many row lengths (causal masks: rows see 1…s keys) the statistics are evaluated
      exactly up to 64 keys and on a geometric grid (ratio 1.05) above, interpolated in
      ``log n``;
    * attention logits ``z_ij = m q_i·k_j`` are i.i.d. only *given* the query: the row variance
      is ``σ_z² c`` with ``c ~ χ²_d/d`` (``d`` = head dim). Passing ``head_dim`` averages over
      ``c`` (7-node Gauss–Hermite on the Wilson–Hilferty cube-root normal approximation of
      χ²). It matters for long rows: at ``S = 2048``, ``d_h = 16``, ``σ_z = 2`` it moves the
      probabilities' RMS by 12 % (measured error 0.04 with it, 0.18 without, in log2);
    * a fixed additive logit bias (ALiBi, T5 buckets) enters the same quadrature exactly, key
      by key (:func:`softmax_moments_with_bias`).

    Every numerical result is memoised with :func:`functools.lru_cache`, keyed on the input
    scale rounded to 3 significant digits (closed-form factors such as ``σ`` itself are applied
    unrounded). A first call for a new scale costs ~0.3–4 ms (~20 ms for causal attention over
    8192 keys with the ``head_dim`` mixture); every later call ~1–5 µs.
    :func:`clear_caches` empties them and :func:`cache_info` reports hits and misses.

Reference ops mirrored (``unit_scaling`` 0.3.5): ``functional.linear``,
``functional.linear_readout``, ``functional.matmul``, ``functional.embedding``,
``functional.layer_norm``, ``functional.gelu``, ``functional.silu``, ``functional.silu_glu``,
``functional.softmax``, ``functional.dropout``, ``functional.residual_split``,
``functional.residual_add``, ``functional.scaled_dot_product_attention``,
``functional.cross_entropy``, ``constraints.apply_constraint``,
``core.functional.logarithmic_interpolation`` and
``core.functional.transformer_residual_scaling_rule``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, Literal, NamedTuple

import numpy as np
from numpy.polynomial.hermite_e import hermegauss

__all__ = [
    "Activation",
    "ActivationScales",
    "AttentionScales",
    "CrossEntropyScales",
    "ElementwiseFactors",
    "EmbeddingScales",
    "LayerNormScales",
    "LinearFactors",
    "LinearScales",
    "MatmulFactors",
    "MatmulScales",
    "ResidualAddScales",
    "SoftmaxMoments",
    "SoftmaxScales",
    "SwiGLUScales",
    "activation_moments",
    "activation_rule",
    "add_independent_rms",
    "apply_constraint",
    "attention_logits_rms",
    "attention_rule",
    "bias_rms",
    "bias_row_std",
    "cache_info",
    "clear_caches",
    "cross_entropy_rule",
    "dropout_rule",
    "embedding_rule",
    "layer_norm_rule",
    "linear_rule",
    "logarithmic_interpolation",
    "matmul_rule",
    "residual_add_rule",
    "residual_split_rule",
    "residual_weights",
    "sinusoidal_rms",
    "softmax_moments",
    "softmax_moments_for_counts",
    "softmax_moments_with_bias",
    "softmax_probs_rms",
    "softmax_rule",
    "swiglu_rule",
    "torch_default_embedding_rms",
    "torch_default_layer_norm_rms",
    "torch_default_linear_bias_rms",
    "torch_default_linear_weight_rms",
    "umup_residual_tau",
    "unit_cross_entropy_grad_scale",
    "unit_dropout_scale",
    "unit_embedding_grad_scale",
    "unit_gelu_scales",
    "unit_layer_norm_grad_param_scale",
    "unit_linear_readout_scales",
    "unit_linear_scales",
    "unit_matmul_scales",
    "unit_relu_scales",
    "unit_sdpa_scale",
    "unit_silu_glu_scale",
    "unit_silu_scales",
    "unit_softmax_scales",
    "unit_weight_rms",
]

logger = logging.getLogger(__name__)

Activation = Literal["gelu", "relu", "silu"]

_SQRT2 = math.sqrt(2.0)
_SQRT_HALF = math.sqrt(0.5)
_GELU_TANH_C = math.sqrt(2.0 / math.pi)


# =========================================================================== result types


class LinearFactors(NamedTuple):
    """Scale factors of a (unit-scaled) linear op: forward output, grad input, grad weight.

    The bias gradient gets ``grad_weight`` too (``unit_scaling.functional.linear``).
    ``LinearFactors(1, 1, 1)`` is a standard ``F.linear``.
    """

    output: float
    grad_input: float
    grad_weight: float


class LinearScales(NamedTuple):
    """RMS of a linear op's output and of its input, weight and bias gradients."""

    output: float
    grad_input: float
    grad_weight: float
    grad_bias: float


class MatmulFactors(NamedTuple):
    """Scale factors of a unit-scaled matmul: output, grad of the left and right operands."""

    output: float
    grad_left: float
    grad_right: float


class MatmulScales(NamedTuple):
    """RMS of ``Y = A @ B`` and of the gradients of ``A`` (left) and ``B`` (right)."""

    output: float
    grad_left: float
    grad_right: float


class EmbeddingScales(NamedTuple):
    """RMS of an embedding lookup's output and of its ``[vocab, d]`` weight gradient."""

    output: float
    grad_weight: float


class LayerNormScales(NamedTuple):
    """RMS of LayerNorm's output and of its input, weight (gain) and bias gradients."""

    output: float
    grad_input: float
    grad_weight: float
    grad_bias: float


class ElementwiseFactors(NamedTuple):
    """Scale factors of a unit-scaled elementwise op: forward output and grad input."""

    output: float
    grad_input: float


class ActivationScales(NamedTuple):
    """RMS of an elementwise op's output and of its input gradient."""

    output: float
    grad_input: float


class SwiGLUScales(NamedTuple):
    """RMS of ``y = u ⊙ silu(g)`` and of the gradients of ``u`` (up) and ``g`` (gate)."""

    output: float
    grad_up: float
    grad_gate: float


class ResidualAddScales(NamedTuple):
    """RMS of a residual add's output and of the gradients reaching its two operands."""

    output: float
    grad_residual: float
    grad_skip: float


class SoftmaxMoments(NamedTuple):
    """Expected statistics of one softmax row, averaged over the rows of an attention matrix.

    ``sum_p2 = E[Σ_j p_j²]``, ``sum_p3 = E[Σ_j p_j³]``, ``sum_p2_sq = E[(Σ_j p_j²)²]`` and
    ``logsumexp = E[log Σ_j e^{z_j}]``, for i.i.d. ``z_j ~ N(0, σ²)`` logits. For uniform
    probabilities over ``n`` keys these are ``1/n``, ``1/n²``, ``1/n²`` and ``log n``.
    """

    sum_p2: float
    sum_p3: float
    sum_p2_sq: float
    logsumexp: float

    @property
    def grad_factor(self) -> float:
        """``E[Σ_j p_j²(g_j − Σ_l p_l g_l)²] / σ_g²``: the softmax Jacobian applied to white noise.

        For uncorrelated ``g_j`` of variance ``σ_g²`` (independent of ``p``), the gradient of
        the logits ``p ⊙ (g − p·g)`` has ``E‖·‖² = σ_g² (Σp² − 2Σp³ + (Σp²)²)``.
        """
        return self.sum_p2 - 2.0 * self.sum_p3 + self.sum_p2_sq


class SoftmaxScales(NamedTuple):
    """RMS of softmax's output (probabilities) and of its input (logits) gradient."""

    output: float
    grad_input: float


class AttentionScales(NamedTuple):
    """RMS of every tensor of one scaled-dot-product attention, forward and backward.

    ``logits`` is ``z = m·QKᵀ (+ bias)``; ``probs`` is ``softmax(z)`` over the whole ``[T, S]``
    matrix including masked zeros; ``output`` is the (scaled) ``P V``. Gradients: ``grad_probs``
    ``= gY Vᵀ`` (dense), ``grad_logits`` (zero where masked, included in the mean), and the
    gradients of ``q``, ``k`` and ``v`` after the op's grad scale.
    """

    logits: float
    probs: float
    output: float
    grad_probs: float
    grad_logits: float
    grad_q: float
    grad_k: float
    grad_v: float


class CrossEntropyScales(NamedTuple):
    """Expected loss value (not an RMS) and RMS of the ``[N, V]`` logits gradient."""

    loss: float
    grad_logits: float


_NO_LINEAR_SCALING = LinearFactors(1.0, 1.0, 1.0)
_NO_MATMUL_SCALING = MatmulFactors(1.0, 1.0, 1.0)
_NO_ELEMENTWISE_SCALING = ElementwiseFactors(1.0, 1.0)


# =========================================================================== shared helpers


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def _check_nonnegative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")


def _key(x: float) -> float:
    """``x`` rounded to 3 significant digits: the key numerical caches are stored under."""
    return float(f"{x:.3g}")


def _keys(x: np.ndarray) -> np.ndarray:
    """Every element of ``x`` rounded to 3 significant digits (:func:`_key` vectorised, up to
    the last bit: a cache key needs only to be the same for the same input). Zeros,
    negatives and non-finite values are left as they are."""
    x = np.asarray(x, dtype=np.float64)
    if x.size and x.min() > 0 and x.max() < math.inf:  # the usual case, in fewer operations
        mag = 10.0 ** (np.floor(np.log10(x)) - 2)
        return np.rint(x / mag) * mag
    ok = np.isfinite(x) & (x > 0)
    safe = np.where(ok, x, 1.0)
    mag = 10.0 ** (np.floor(np.log10(safe)) - 2)
    return np.where(ok, np.rint(safe / mag) * mag, x)


def logarithmic_interpolation(alpha: float, lower: float, upper: float) -> float:
    """``exp(α log upper + (1 − α) log lower)``: geometric interpolation (0 → lower, 1 → upper).

    Mirrors ``unit_scaling.core.functional.logarithmic_interpolation``, which the library's
    empirical scale models for GELU, SiLU, softmax and attention are built from. ``lower`` and
    ``upper`` must be positive (``math.log`` raises otherwise, as in the library).
    """
    return math.exp(alpha * math.log(upper) + (1 - alpha) * math.log(lower))


_CONSTRAINTS = (
    "gmean", "hmean", "amean", "to_output_scale", "to_grad_input_scale", "to_left_grad_scale",
    "to_right_grad_scale",
)


def apply_constraint(constraint: str | None, *scales: float) -> tuple[float, ...]:
    """Tie a group of scales ``(output_scale, *grad_input_scales)`` to one value.

    Mirrors ``unit_scaling.constraints.apply_constraint``: ``None`` or ``""`` leaves them
    unconstrained; ``"gmean"`` (geometric mean, Unit Scaling 2023's choice for ops whose
    forward and backward scales must agree), ``"hmean"``, ``"amean"``, ``"to_output_scale"``
    (the forward scale, the library default and u-μP's), ``"to_grad_input_scale"``,
    ``"to_left_grad_scale"`` and ``"to_right_grad_scale"`` return that value for every scale.
    """
    if constraint is None or constraint == "":
        return tuple(scales)
    if constraint not in _CONSTRAINTS:
        raise ValueError(f"unknown constraint {constraint!r}; one of {', '.join(_CONSTRAINTS)}")
    if constraint in ("to_grad_input_scale", "to_left_grad_scale") and len(scales) < 2:
        raise ValueError(f"{constraint} needs at least two scales")
    if constraint == "to_right_grad_scale" and len(scales) < 3:
        raise ValueError("to_right_grad_scale needs three scales")
    if constraint == "gmean":
        value = math.prod(scales) ** (1 / len(scales))
    elif constraint == "hmean":
        value = 1 / (sum(1 / s for s in scales) / len(scales))
    elif constraint == "amean":
        value = sum(scales) / len(scales)
    elif constraint == "to_output_scale":
        value = scales[0]
    elif constraint == "to_right_grad_scale":
        value = scales[2]
    else:  # to_grad_input_scale / to_left_grad_scale
        value = scales[1]
    return tuple(value for _ in scales)


def add_independent_rms(*rms: float) -> float:
    """RMS of a sum of independent zero-mean tensors: ``sqrt(Σ rms_i²)``.

    E.g. token embedding + learned/sinusoidal position encoding, or logits + an additive bias.
    """
    return math.sqrt(sum(r * r for r in rms))


# =========================================================================== initialisation


def torch_default_linear_weight_rms(fan_in: int) -> float:
    """RMS of ``nn.Linear``'s default weight: ``kaiming_uniform_(a=√5)`` = U(±1/√fan_in).

    The gain is ``sqrt(2/(1+a²)) = 1/√3`` and the bound ``√3 · gain/√fan_in = 1/√fan_in``; a
    uniform U(−b, b) has RMS ``b/√3``, so the RMS is ``1/sqrt(3·fan_in)``.
    """
    _check_positive("fan_in", fan_in)
    return 1.0 / math.sqrt(3.0 * fan_in)


def torch_default_linear_bias_rms(fan_in: int) -> float:
    """RMS of ``nn.Linear``'s default bias, U(±1/√fan_in): ``1/sqrt(3·fan_in)``."""
    _check_positive("fan_in", fan_in)
    return 1.0 / math.sqrt(3.0 * fan_in)


def torch_default_embedding_rms() -> float:
    """RMS of ``nn.Embedding``'s default weight, N(0, 1): 1."""
    return 1.0


def torch_default_layer_norm_rms() -> tuple[float, float]:
    """RMS of ``nn.LayerNorm``'s default ``(weight, bias)``: ones and zeros, ``(1.0, 0.0)``."""
    return 1.0, 0.0


def unit_weight_rms() -> float:
    """RMS of ``unit_scaling``'s ``Linear``/``Embedding`` weights (``nn.init.normal_``): 1.

    Their biases are zeroed, so a unit-scaled bias has RMS 0 at initialisation; u-μP uses the
    same unit-variance weights (its ``mult`` hyperparameters live in the ops, not the init).
    """
    return 1.0


# =========================================================================== linear / matmul


def unit_linear_scales(
    fan_in: int,
    fan_out: int,
    b_rows: int,
    constraint: str | None = "to_output_scale",
    scale_power: tuple[float, float, float] = (0.5, 0.5, 0.5),
) -> LinearFactors:
    """Factors of ``unit_scaling.functional.linear``, exactly as the library computes them.

    ``output = fan_in^-p0``, ``grad_input = fan_out^-p1`` and ``grad_weight = grad_bias =
    b_rows^-p2`` with ``b_rows = input.numel() // fan_in``; then ``constraint`` ties
    ``(output, grad_input)`` (the weight gradient is never constrained: Unit Scaling 2023 calls
    weight gradients "cut edges" whose scale is free).
    """
    for name, v in (("fan_in", fan_in), ("fan_out", fan_out), ("b_rows", b_rows)):
        _check_positive(name, v)
    out = 1 / fan_in ** scale_power[0]
    grad_in = 1 / fan_out ** scale_power[1]
    grad_w = 1 / b_rows ** scale_power[2]
    out, grad_in = apply_constraint(constraint, out, grad_in)
    return LinearFactors(out, grad_in, grad_w)


def unit_linear_readout_scales(
    fan_in: int, fan_out: int, b_rows: int, constraint: str | None = None
) -> LinearFactors:
    """Factors of ``unit_scaling.functional.linear_readout``: ``scale_power = (1, ½, ½)``.

    u-μP's output head: the forward scale is ``1/fan_in`` (μP's readout rule) and, with the
    default ``constraint=None``, the input gradient keeps ``1/sqrt(fan_out)``.
    """
    return unit_linear_scales(fan_in, fan_out, b_rows, constraint, (1.0, 0.5, 0.5))


def linear_rule(
    rms_x: float,
    rms_w: float,
    rms_grad_y: float,
    *,
    fan_in: int,
    fan_out: int,
    b_rows: int,
    rms_bias: float = 0.0,
    factors: LinearFactors | None = None,
) -> LinearScales:
    """``Y = α_fwd (X Wᵀ + b)``; ``X [b_rows, fan_in]``, ``W [fan_out, fan_in]``.

    Forward ``rms_y = α_fwd sqrt(fan_in σ_x² σ_w² + σ_b²)`` — exact in expectation whenever
    ``W`` is zero-mean, independent of ``X`` and i.i.d.; the bias term is PyTorch's default
    U(±1/√fan_in) bias (:func:`torch_default_linear_bias_rms`), zero for unit/u-μP.
    Backward (``unit_scaling`` applies ``α_fwd`` with ``scale_fwd``, so the incoming gradient
    is *not* multiplied by it): ``grad_x = α_gx sqrt(fan_out) σ_gy σ_w``,
    ``grad_W = α_gw sqrt(b_rows) σ_x σ_gy`` and ``grad_b = α_gw sqrt(b_rows) σ_gy``. The weight
    and bias formulas are exact for a zero-mean output gradient independent of ``X`` with rows
    uncorrelated to each other (e.g. i.i.d. Gaussian); correlated rows change them.
    Factors: ``None`` = all 1 (standard), :func:`unit_linear_scales` or
    :func:`unit_linear_readout_scales`.
    """
    factors = factors or _NO_LINEAR_SCALING
    out = factors.output * math.sqrt(fan_in * (rms_x * rms_w) ** 2 + rms_bias**2)
    grad_x = factors.grad_input * math.sqrt(fan_out) * rms_grad_y * rms_w
    sqrt_rows = math.sqrt(b_rows)
    grad_w = factors.grad_weight * sqrt_rows * rms_x * rms_grad_y
    grad_b = factors.grad_weight * sqrt_rows * rms_grad_y
    return LinearScales(out, grad_x, grad_w, grad_b)


def unit_matmul_scales(
    left_rows: int, inner: int, right_cols: int, constraint: str | None = "to_output_scale"
) -> MatmulFactors:
    """Factors ``(output, grad_left, grad_right)`` of ``unit_scaling.functional.matmul``.

    ``inner^-½``, ``right_cols^-½`` and ``left_rows^-½``, then ``constraint`` over all three.
    """
    out, left, right = inner**-0.5, right_cols**-0.5, left_rows**-0.5
    return MatmulFactors(*apply_constraint(constraint, out, left, right))


def matmul_rule(
    rms_left: float,
    rms_right: float,
    rms_grad_y: float,
    *,
    left_rows: int,
    inner: int,
    right_cols: int,
    factors: MatmulFactors | None = None,
) -> MatmulScales:
    """``Y = α A B`` with ``A [left_rows, inner]``, ``B [inner, right_cols]``, independent.

    ``rms_y = α sqrt(inner) σ_A σ_B``; ``grad_A = gY Bᵀ → α_A sqrt(right_cols) σ_gy σ_B``;
    ``grad_B = Aᵀ gY → α_B sqrt(left_rows) σ_A σ_gy`` (exact for independent zero-mean
    operands and gradient). Factors: ``None`` = 1 (standard) or :func:`unit_matmul_scales`.
    """
    factors = factors or _NO_MATMUL_SCALING
    out = factors[0] * math.sqrt(inner) * rms_left * rms_right
    grad_left = factors[1] * math.sqrt(right_cols) * rms_grad_y * rms_right
    grad_right = factors[2] * math.sqrt(left_rows) * rms_left * rms_grad_y
    return MatmulScales(out, grad_left, grad_right)


# =========================================================================== embedding


def unit_embedding_grad_scale(vocab: int, n_tokens: int) -> float:
    """Weight-grad factor of ``unit_scaling.functional.embedding``: ``sqrt(vocab / n_tokens)``.

    ``n_tokens`` is ``prod(input.shape)``, the number of ids looked up.
    """
    _check_positive("vocab", vocab)
    _check_positive("n_tokens", n_tokens)
    return math.sqrt(vocab / n_tokens)


def embedding_rule(
    rms_w: float,
    rms_grad_y: float,
    *,
    vocab: int,
    n_tokens: int,
    grad_weight_factor: float = 1.0,
) -> EmbeddingScales:
    """Lookup ``Y[t] = W[id_t]`` of ``n_tokens`` ids into a ``[vocab, d]`` table.

    Forward: each output row is a table row, so ``rms_y = σ_w`` (in expectation over ids).
    Backward: row ``r`` of ``grad_W`` is ``Σ_{t: id_t = r} gY[t]``, so with uncorrelated token
    gradients ``E‖grad_W‖² = Σ_t E‖gY[t]‖² = n_tokens · d · σ_gy²`` whatever the id
    distribution (rows picked by no token are zero and count in the mean):
    ``rms = α sqrt(n_tokens / vocab) σ_gy``. Unit-scaled, ``α = sqrt(vocab/n_tokens)``
    (:func:`unit_embedding_grad_scale`) gives ``σ_gy``. PyTorch's default table is N(0, 1).
    """
    _check_positive("vocab", vocab)
    grad_w = grad_weight_factor * math.sqrt(n_tokens / vocab) * rms_grad_y
    return EmbeddingScales(rms_w, grad_w)


# =========================================================================== layer norm


def unit_layer_norm_grad_param_scale(d: int, b_rows: int) -> float:
    """Gain/bias grad factor of ``unit_scaling.functional.layer_norm``.

    ``(prod(normalized_shape) / input.numel())^½ = 1/sqrt(b_rows)``; the library leaves the
    output and the input gradient unscaled. ``d`` is accepted for symmetry and validated.
    """
    _check_positive("d", d)
    _check_positive("b_rows", b_rows)
    return math.sqrt(d / (d * b_rows))


def layer_norm_rule(
    rms_x: float,
    rms_grad_y: float,
    *,
    d: int,
    b_rows: int,
    eps: float = 1e-5,
    rms_weight: float = 1.0,
    rms_bias: float = 0.0,
    grad_param_factor: float = 1.0,
) -> LayerNormScales:
    """``y = γ (x − μ)/sqrt(v + ε) + β`` over the last ``d`` features of ``b_rows`` rows.

    For a zero-mean i.i.d. row of RMS ``σ``, the biased row variance ``v`` has mean
    ``v̄ = σ²(d−1)/d`` and ``r = v̄/(v̄+ε)`` is the expected ``mean(x̂²)``. Then:

    * ``rms_y = sqrt(σ_γ² r + σ_β²)`` (``sqrt(r)`` ≈ 1 unless ``σ² ≲ ε``);
    * ``grad_x = (γ gy − mean(γ gy) − x̂ mean(γ gy x̂))/sqrt(v+ε)``: the Jacobian removes the
      mean and (most of) the component along ``x̂``, two of ``d`` directions, so
      ``E‖·‖² = σ_gy² σ_γ² ((d−2) + (1−r)²) E[1/(v+ε)]`` with ``E[1/v] = d/(σ²(d−3))``
      (inverse χ²_{d−1}; ``E[1/(v+ε)]`` is taken as ``1/(σ²(d−3)/d + ε)``, exact at both
      ends), i.e. ``≈ σ_gy σ_γ/σ · sqrt((d−2)/(d−3))`` (the expectation diverges for
      ``d ≤ 3``; ``d−3`` is clamped at 1 there);
    * ``grad_γ = α Σ_rows gy x̂ → α sqrt(b_rows r) σ_gy`` and ``grad_β = α sqrt(b_rows) σ_gy``,
      ``α = 1/sqrt(b_rows)`` for unit/u-μP (:func:`unit_layer_norm_grad_param_scale`).

    PyTorch's default ``γ = 1``, ``β = 0`` (:func:`torch_default_layer_norm_rms`).
    """
    _check_positive("d", d)
    var_bar = rms_x**2 * (d - 1) / d
    r = var_bar / (var_bar + eps) if var_bar + eps > 0 else 0.0
    out = math.sqrt(rms_weight**2 * r + rms_bias**2)
    inv_var = 1.0 / (rms_x**2 * max(d - 3, 1) / d + eps)
    grad_x = rms_grad_y * rms_weight * math.sqrt(((d - 2) + (1 - r) ** 2) / d * inv_var)
    sqrt_rows = math.sqrt(b_rows)
    grad_w = grad_param_factor * sqrt_rows * math.sqrt(r) * rms_grad_y
    grad_b = grad_param_factor * sqrt_rows * rms_grad_y
    return LayerNormScales(out, grad_x, grad_w, grad_b)


# =========================================================================== nonlinearities

_GH_NODES, _GH_WEIGHTS = hermegauss(96)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()
_erf = np.frompyfunc(math.erf, 1, 1)


def _sigmoid(y: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * y))


def _act_f_df(kind: str, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if kind == "gelu":
        cdf = 0.5 * (1.0 + _erf(y / _SQRT2).astype(np.float64))
        return y * cdf, cdf + y * np.exp(-0.5 * y * y) / math.sqrt(2 * math.pi)
    if kind == "silu":
        s = _sigmoid(y)
        return y * s, s * (1.0 + y * (1.0 - s))
    if kind == "gelu_tanh":  # GeGLU's gate (Gemma): ½y(1 + tanh(√(2/π)(y + 0.044715y³)))
        u = _GELU_TANH_C * (y + 0.044715 * y**3)
        th = np.tanh(u)
        du = _GELU_TANH_C * (1.0 + 3 * 0.044715 * y * y)
        return 0.5 * y * (1.0 + th), 0.5 * (1.0 + th) + 0.5 * y * (1.0 - th * th) * du
    raise ValueError(f"no numerical activation {kind!r}")


@lru_cache(maxsize=1024)
def _activation_ratio(kind: str, sigma_key: float) -> tuple[float, float]:
    """``(rms f(σX)/σ, rms f'(σX))`` for ``X ~ N(0,1)``, numerically (see module notes)."""
    if sigma_key <= 2.0:
        x, w = _GH_NODES, _GH_WEIGHTS
    else:  # trapezoid: f(σx) has features of width ~1/σ near x = 0
        h = 0.2 / sigma_key
        x = np.arange(-10.0, 10.0 + h / 2, h)
        w = np.exp(-0.5 * x * x)
        w /= w.sum()
    f, df = _act_f_df(kind, sigma_key * x)
    logger.debug("activation quadrature %s σ=%g (%d nodes)", kind, sigma_key, len(x))
    return math.sqrt(float(w @ (f * f))) / sigma_key, math.sqrt(float(w @ (df * df)))


def activation_moments(kind: Activation, sigma: float) -> tuple[float, float]:
    """``(E[f(X)²]^½, E[f'(X)²]^½)`` for ``X ~ N(0, σ²)``: output RMS and grad gain.

    ``kind``: ``"relu"`` (closed form: ``σ/√2`` and ``1/√2`` — RMS, not the std
    ``σ sqrt(½ − 1/(2π))``), ``"gelu"`` (exact erf form ``xΦ(x)``, numerical) or ``"silu"``
    (``x·sigmoid(x)``, numerical). The numerical ratio ``rms/σ`` is cached per σ rounded to 3
    significant digits and multiplied by the exact σ. Limits: GELU and SiLU tend to ``σ/2``,
    ``½`` as σ → 0 and to ReLU's values as σ → ∞.
    """
    _check_nonnegative("sigma", sigma)
    if kind == "relu":
        return sigma * _SQRT_HALF, _SQRT_HALF
    if kind not in ("gelu", "silu", "gelu_tanh"):
        raise ValueError(f"unknown activation {kind!r}; one of gelu, gelu_tanh, relu, silu")
    if sigma < 1e-6:
        return 0.5 * sigma, 0.5
    ratio, grad = _activation_ratio(kind, _key(sigma))
    return ratio * sigma, grad


def activation_rule(
    kind: Activation,
    rms_x: float,
    rms_grad_y: float,
    *,
    mult: float = 1.0,
    factors: ElementwiseFactors | None = None,
) -> ActivationScales:
    """Elementwise ``y = α_out f_mult(x)``, ``x ~ N(0, σ_x²)``; gradient ``α_gx f'_mult(x) gy``.

    ``f_mult`` is ``unit_scaling``'s ``mult`` form: ``gelu(mult·x)/mult`` for GELU,
    ``x·sigmoid(mult·x) = silu(mult·x)/mult`` for SiLU (ReLU ignores ``mult``), so
    ``rms_y = α_out rms f(mult σ_x)/mult`` and ``grad = α_gx rms f'(mult σ_x) σ_gy`` (``gy``
    independent of ``x``) — see :func:`activation_moments`. Factors: ``None`` = 1 (standard),
    :func:`unit_gelu_scales`, :func:`unit_silu_scales` or :func:`unit_relu_scales`.
    """
    factors = factors or _NO_ELEMENTWISE_SCALING
    _check_positive("mult", mult)
    m = 1.0 if kind == "relu" else mult
    f_rms, df_rms = activation_moments(kind, m * rms_x)
    return ActivationScales(factors.output * f_rms / m, factors.grad_input * df_rms * rms_grad_y)


def unit_gelu_scales(
    mult: float = 1.0, constraint: str | None = "to_output_scale"
) -> ElementwiseFactors:
    """Factors of ``unit_scaling.functional.gelu`` (the library's empirical model).

    ``α = 1/(1 + 0.25/mult²)``; output ``loginterp(α, 2, sqrt(2/(1−1/π)))`` and grad
    ``loginterp(α, 2, √2)``, then ``constraint`` (default: both = output). The upper limit
    ``sqrt(2/(1−1/π))`` is 1/*std* of ReLU(N(0,1)), not 1/RMS, so a unit-scaled GELU's output
    RMS is ~1.15 at mult = 1 (≈1.04 std); the rules predict the RMS, not the std.
    """
    alpha = 1 / (1 + 0.25 / mult**2)
    out = logarithmic_interpolation(alpha, 2.0, (2 / (1 - 1 / math.pi)) ** 0.5)
    grad = logarithmic_interpolation(alpha, 2.0, 2**0.5)
    return ElementwiseFactors(*apply_constraint(constraint, out, grad))


def unit_silu_scales(
    mult: float = 1.0, constraint: str | None = "to_output_scale"
) -> ElementwiseFactors:
    """Factors of ``unit_scaling.functional.silu`` (empirical model).

    Output ``loginterp(1/(1 + 0.25/mult²), 2, sqrt(2/(1−1/π)))`` (same as GELU), grad
    ``loginterp(1/(1 + 1/mult²), 2, √2)``, then ``constraint`` (default: both = output).
    """
    out = logarithmic_interpolation(1 / (1 + 0.25 / mult**2), 2.0, (2 / (1 - 1 / math.pi)) ** 0.5)
    grad = logarithmic_interpolation(1 / (1 + 1 / mult**2), 2.0, 2**0.5)
    return ElementwiseFactors(*apply_constraint(constraint, out, grad))


def unit_relu_scales(constraint: str | None = "to_output_scale") -> ElementwiseFactors:
    """Unit-scaling factors for ReLU, which ``unit_scaling`` lacks: ``(√2, √2)``.

    For ``x ~ N(0, 1)``: ``E[relu(x)²] = ½`` and ``E[relu'(x)²] = P(x > 0) = ½``, so dividing by
    the RMS ``sqrt(½)`` makes both the output and the input gradient unit-RMS.
    """
    return ElementwiseFactors(*apply_constraint(constraint, _SQRT2, _SQRT2))


def unit_silu_glu_scale(mult: float = 1.0) -> float:
    """The single factor of ``unit_scaling.functional.silu_glu``: ``loginterp(1/(1+1/mult²),
    2, √2)`` (``2^¾`` at mult = 1), applied to the output and to both input gradients."""
    return logarithmic_interpolation(1 / (1 + 1 / mult**2), 2.0, 2**0.5)


def swiglu_rule(
    rms_up: float,
    rms_gate: float,
    rms_grad_y: float,
    *,
    mult: float = 1.0,
    scale: float = 1.0,
) -> SwiGLUScales:
    """``y = α u ⊙ silu_mult(g)``, ``u ~ N(0, σ_u²)``, ``g ~ N(0, σ_g²)`` independent.

    ``rms_y = α σ_u rms(silu_mult(g))``; ``∂/∂u = α silu_mult(g) gy → α rms(silu_mult(g)) σ_gy``;
    ``∂/∂g = α u silu'(mult g) gy → α σ_u rms(silu'(mult g)) σ_gy``, with
    ``silu_mult(g) = g·sigmoid(mult g)``. ``α = 1`` (standard ``silu(g) * u``) or
    :func:`unit_silu_glu_scale` (``unit_scaling.functional.silu_glu(input=u, gate=g)``, which
    scales the output and both gradients by it).
    """
    _check_positive("mult", mult)
    f_rms, df_rms = activation_moments("silu", mult * rms_gate)
    f_rms /= mult
    return SwiGLUScales(scale * rms_up * f_rms, scale * f_rms * rms_grad_y,
                        scale * rms_up * df_rms * rms_grad_y)


# =========================================================================== dropout


def unit_dropout_scale(p: float) -> float:
    """Factor of ``unit_scaling.functional.dropout``: ``sqrt(1 − p)`` on output and grad."""
    return (1 - p) ** 0.5


def dropout_rule(rms_x: float, rms_grad_y: float, *, p: float, unit: bool = False,
                 training: bool = True) -> ActivationScales:
    """Inverted dropout ``y = x ⊙ mask/(1−p)`` (training): ``rms_y = σ_x/sqrt(1−p)``, same
    gain for the gradient; unit-scaled (:func:`unit_dropout_scale`) both are unchanged.
    In eval mode dropout is the identity."""
    if not 0 <= p < 1:
        raise ValueError(f"p must be in [0, 1), got {p!r}")
    if not training:
        return ActivationScales(rms_x, rms_grad_y)
    gain = (1 / math.sqrt(1 - p)) * (unit_dropout_scale(p) if unit else 1.0)
    return ActivationScales(gain * rms_x, gain * rms_grad_y)


# =========================================================================== residual


def residual_weights(tau: float) -> tuple[float, float]:
    """``(τ/sqrt(1+τ²), 1/sqrt(1+τ²))``: residual and skip weights of ``unit_scaling``'s
    ``residual_split``/``residual_add`` (unit variance out for unit-variance operands)."""
    denom = math.sqrt(1 + tau * tau)
    return tau / denom, 1 / denom


def residual_add_rule(
    rms_residual: float,
    rms_skip: float,
    rms_grad_y: float,
    *,
    tau: float = 1.0,
    unit: bool = False,
) -> ResidualAddScales:
    """``y = w_r r + w_s s`` for independent branch output ``r`` and skip ``s``.

    Standard: ``w_r = w_s = 1`` (plain ``r + s``; ``tau`` ignored). Unit/u-μP
    (``unit_scaling.functional.residual_add``): ``(w_r, w_s) =`` :func:`residual_weights`.
    ``rms_y = sqrt(w_r² σ_r² + w_s² σ_s²)``. The weights are applied with ``scale_fwd``, so both
    operands receive the *unscaled* output gradient: ``grad_residual = grad_skip = σ_gy``; the
    split (:func:`residual_split_rule`) applies the backward weights.
    """
    w_r, w_s = residual_weights(tau) if unit else (1.0, 1.0)
    out = math.sqrt((w_r * rms_residual) ** 2 + (w_s * rms_skip) ** 2)
    return ResidualAddScales(out, rms_grad_y, rms_grad_y)


def residual_split_rule(
    rms_grad_residual: float,
    rms_grad_skip: float,
    *,
    tau: float = 1.0,
    unit: bool = False,
) -> float:
    """RMS of the gradient into ``x`` where ``x`` fans out to a residual branch and the skip.

    ``grad_x = w_r g_branch + w_s g_skip`` with ``(w_r, w_s) =`` :func:`residual_weights` for
    unit/u-μP (``unit_scaling.functional.residual_split``, ``scale_bwd``) or ``(1, 1)``
    standard; ``sqrt(w_r² σ_gr² + w_s² σ_gs²)`` assuming the two gradients are uncorrelated.
    """
    w_r, w_s = residual_weights(tau) if unit else (1.0, 1.0)
    return math.sqrt((w_r * rms_grad_residual) ** 2 + (w_s * rms_grad_skip) ** 2)


def umup_residual_tau(
    index: int, layers: int, residual_mult: float = 1.0, residual_attn_ratio: float = 1.0
) -> float:
    """τ of residual branch ``index`` of ``layers`` (u-μP, Appendix G; mirrors
    ``unit_scaling.core.functional.transformer_residual_scaling_rule``).

    Branches alternate attention (even ``index``) and MLP (odd); ``layers`` counts branches,
    i.e. ``2 × n_transformer_layers`` (``TransformerStack`` calls ``rule(2i, 2L)`` and
    ``rule(2i+1, 2L)``). With ``α_mlp = residual_mult sqrt(2/(1 + ratio²))``, ``α_attn =
    ratio α_mlp``: ``τ = α_branch / sqrt(layers/2 + n_attn α_attn² + n_mlp α_mlp²)``, where
    ``n_attn = (index+1)//2`` and ``n_mlp = index//2`` branches precede this one.
    """
    alpha_mlp = residual_mult * (2 / (1 + residual_attn_ratio**2)) ** 0.5
    alpha_attn = residual_attn_ratio * alpha_mlp
    n_attn = (index + 1) // 2
    n_mlp = index // 2
    alpha = alpha_attn if index % 2 == 0 else alpha_mlp
    return alpha / (layers / 2 + n_attn * alpha_attn**2 + n_mlp * alpha_mlp**2) ** 0.5


# =========================================================================== softmax statistics

_U_STEP = 0.2
_SM_GH_NODES, _SM_GH_WEIGHTS = hermegauss(48)
_SM_GH_WEIGHTS = _SM_GH_WEIGHTS / _SM_GH_WEIGHTS.sum()
_LOG_FLOOR = -800.0  # log m_0 below this is "zero" (e^-800 underflows anyway)
_N_EXACT = 64  # row lengths computed exactly; geometric grid above
_N_RATIO = 1.05
# Wilson–Hilferty: (χ²_d/d)^(1/3) ≈ N(1 − 2/(9d), 2/(9d)); 7 Gauss–Hermite nodes
_WH_NODES, _WH_WEIGHTS = hermegauss(7)
_WH_WEIGHTS = _WH_WEIGHTS / _WH_WEIGHTS.sum()


class _Kernel(NamedTuple):
    """Softmax quadrature kernels on an extended ``u`` grid (step ``_U_STEP``).

    The first ``margin`` points extend the grid to the left so that keys whose logits are
    shifted down by a bias of up to ``(18σ + 40)`` can be evaluated (see
    :func:`softmax_moments_with_bias`); unbiased rows integrate over ``[margin:]`` only.
    """

    u: np.ndarray  # log t grid
    log_m0: np.ndarray  # log m_0, floored at _LOG_FLOOR
    m0: np.ndarray
    m: tuple[np.ndarray, ...]  # m_2, m_3, m_4
    log_m: tuple[np.ndarray, ...]  # their logs, floored at _LOG_FLOOR
    margin: int


def _bias_margin(sigma: float) -> int:
    return math.ceil((18.0 * sigma + 40.0) / _U_STEP)


#: Direct convolutions costing more than this many multiply-adds go through the FFT.
_FFT_MIN_WORK = 4_000_000


def _valid_convolution(kern: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``g ↦ np.convolve(g, kern, mode="valid")``; through the FFT when that is long work.

    A large logit σ (a wide standard model) makes both the grid and the kernel ~10⁴ points
    long, and the direct convolution takes seconds; the FFT takes milliseconds. Its error is
    ~1e-16 of the largest value, so values below that come out as noise: they are clipped
    at 0 (their logs are then floored at ``_LOG_FLOOR``), far below anything the row
    statistics built on them resolve (sums dominated by their largest terms).
    """
    def direct(g: np.ndarray) -> np.ndarray:
        return np.convolve(g, kern, mode="valid")

    spectra: dict[int, np.ndarray] = {}

    def smooth(g: np.ndarray) -> np.ndarray:
        if len(g) * len(kern) <= _FFT_MIN_WORK:
            return direct(g)
        full = len(g) + len(kern) - 1
        size = 1 << (full - 1).bit_length()
        if size not in spectra:
            spectra[size] = np.fft.rfft(kern, size)
        out = np.fft.irfft(np.fft.rfft(g, size) * spectra[size], size)
        return np.maximum(out[len(kern) - 1:len(g)], 0.0)

    return smooth


@lru_cache(maxsize=256)
def _softmax_kernel(sigma: float) -> _Kernel:
    """``m_k(u) = E[exp(k(u+Y) − e^{u+Y})]``, ``Y ~ N(0, σ²)``, on a ``u`` grid (step 0.2)."""
    margin = _bias_margin(sigma)
    lo = math.floor((-9.0 * sigma - 50.0) / _U_STEP) - margin
    hi = math.ceil((9.0 * sigma + 6.0) / _U_STEP)
    u = np.arange(lo, hi + 1) * _U_STEP
    if sigma <= 1.0:  # Gauss–Hermite over Y: g_k(u + σx) is smooth on the scale of x
        w = u[:, None] + sigma * _SM_GH_NODES[None, :]

        def smooth(g: np.ndarray) -> np.ndarray:
            return g @ _SM_GH_WEIGHTS
    else:  # discrete Gaussian convolution on the same grid (σ ≥ 5 steps)
        half = math.ceil(9.0 * sigma / _U_STEP)
        kern = np.exp(-0.5 * (np.arange(-half, half + 1) * _U_STEP / sigma) ** 2)
        kern /= kern.sum()
        w = np.arange(lo - half, hi + half + 1) * _U_STEP

        smooth = _valid_convolution(kern)
    with np.errstate(over="ignore", divide="ignore"):
        ew = np.exp(w)  # may overflow to inf for huge σ: exp(-inf) = 0 is then exact enough
        one_minus_m0 = smooth(-np.expm1(-ew))  # 1 − m_0, accurate where m_0 ≈ 1
        m0_direct = smooth(np.exp(-ew))  # accurate where m_0 ≪ 1
        log_m0 = np.where(m0_direct < 0.5, np.log(m0_direct),
                          np.log1p(-np.minimum(one_minus_m0, 0.5)))
        log_m0 = np.maximum(log_m0, _LOG_FLOOR)
        m = tuple(smooth(np.exp(k * w - ew)) for k in (2, 3, 4))
        log_m = tuple(np.maximum(np.log(mk), _LOG_FLOOR) for mk in m)
    logger.debug("softmax kernel σ=%g: %d grid points", sigma, len(u))
    return _Kernel(u, log_m0, np.exp(log_m0), m, log_m, margin)


def _row_stats(kern: _Kernel, ns: np.ndarray) -> np.ndarray:
    """``[4, len(ns)]``: E Σp², E Σp³, E (Σp²)², E logsumexp for rows of ``ns`` keys."""
    n = ns.astype(np.float64)[:, None]
    i0 = kern.margin
    m2, m3, m4 = (mk[i0:] for mk in kern.m)
    log_m0, m0, u = kern.log_m0[i0:], kern.m0[i0:], kern.u[i0:]
    e1 = np.exp((n - 1.0) * log_m0)  # m_0^{n-1}
    e2 = np.exp(np.maximum(n - 2.0, 0.0) * log_m0)  # m_0^{n-2}
    h = _U_STEP
    s2 = n[:, 0] * h * (e1 @ m2)
    s3 = n[:, 0] * h * (e1 @ m3) / 2.0
    s4 = n[:, 0] * h * (e1 @ m4) / 6.0
    pair = n[:, 0] * (n[:, 0] - 1.0) * h * (e2 @ (m2 * m2)) / 6.0
    with np.errstate(over="ignore"):  # e^u overflows to inf far out; e^-inf = 0 is intended
        lse = h * (np.exp(-np.exp(u)).sum() - e1 @ m0)
    return np.stack([s2, s3, s4 + pair, lse])


def _mean_stats(sigma: float, counts: np.ndarray) -> np.ndarray:
    """Row-averaged statistics ``[4]`` for rows with ``counts`` keys each (σ > 0)."""
    kern = _softmax_kernel(sigma)
    uniq, freq = np.unique(counts, return_counts=True)
    if len(uniq) <= 2 * _N_EXACT:
        stats = _row_stats(kern, uniq)
    else:  # exact up to _N_EXACT keys, geometric grid above, interpolated in log n
        top = int(uniq[-1])
        steps = math.ceil(math.log(top / _N_EXACT) / math.log(_N_RATIO))
        grid = np.unique(np.concatenate([
            np.arange(1, _N_EXACT + 1),
            np.round(_N_EXACT * _N_RATIO ** np.arange(1, steps + 1)).astype(np.int64),
            [top],
        ]))
        grid = grid[grid <= top]
        g_stats = _row_stats(kern, grid)
        lx, lq = np.log(grid), np.log(uniq)
        stats = np.empty((4, len(uniq)))
        for i in range(3):
            stats[i] = np.exp(np.interp(lq, lx, np.log(np.maximum(g_stats[i], 1e-300))))
        stats[3] = np.interp(lq, lx, g_stats[3])
    return (stats @ freq) / freq.sum()


def _uniform_stats(counts: np.ndarray) -> np.ndarray:
    n = counts.astype(np.float64)
    return np.array([np.mean(1 / n), np.mean(1 / n**2), np.mean(1 / n**2), np.mean(np.log(n))])


#: Step in log σ of the grid on which whole-row softmax statistics are computed.
_SIGMA_STEP = math.log(1.02)


@lru_cache(maxsize=8192)
def _grid_stats(j: int, seq_len: int, causal: bool) -> np.ndarray:
    """:func:`_mean_stats` at ``σ = 1.02^j`` for full (or causal) rows of ``seq_len``."""
    counts = _causal_counts(seq_len) if causal else np.array([seq_len])
    return _mean_stats(math.exp(j * _SIGMA_STEP), counts)


def _interpolated_stats(sigma: float, seq_len: int, causal: bool) -> np.ndarray:
    """:func:`_mean_stats` for full (or causal) rows, interpolated between the two nearest
    points of a geometric σ grid (ratio 1.02): geometric for the three moments, linear for
    the log-sum-exp.

    A deep model asks for hundreds of slightly different σ (every layer, every node of the
    ``|q|²`` mixture), each a quadrature of milliseconds; on the grid they share points, and
    an edit of the config reuses them. The statistics are smooth in log σ, so the
    interpolation error is ~``(Δ log σ)²/8 · f''`` ≈ 5e-5 relative, below the 3-digit σ key
    the direct path rounds to (5e-4).
    """
    t = math.log(sigma) / _SIGMA_STEP
    j = math.floor(t)
    a = t - j
    lo, hi = _grid_stats(j, seq_len, causal), _grid_stats(j + 1, seq_len, causal)
    out = np.empty(4)
    out[:3] = np.exp((1.0 - a) * np.log(np.maximum(lo[:3], 1e-300))
                     + a * np.log(np.maximum(hi[:3], 1e-300)))
    out[3] = (1.0 - a) * lo[3] + a * hi[3]
    return out


def _stats_with_mixture(
    sigma: float, counts: np.ndarray, head_dim: int | None,
    rows: tuple[int, bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Row-averaged statistics and the same weighted by the row variance factor ``c``.

    Without ``head_dim`` the two are equal (``c = 1``). The ``c``-weighted statistics give the
    key gradient ``gK = m gZᵀ Q``, whose rows weight ``gZ_ij²`` by ``|q_i|² ∝ c_i``.
    """
    if sigma < 1e-3:  # the O(σ²) corrections are below 1e-6 relative
        stats = _uniform_stats(counts)
        return stats, stats
    def mean_stats(sig: float) -> np.ndarray:
        if rows is not None:  # full or causal rows of rows[0] keys: the shared σ grid
            return _interpolated_stats(sig, *rows)
        return _mean_stats(_key(sig), counts)

    if head_dim is None:
        stats = mean_stats(sigma)
        return stats, stats
    v = 2.0 / (9.0 * head_dim)
    total = np.zeros(4)
    weighted = np.zeros(4)
    for x, w in zip(_WH_NODES, _WH_WEIGHTS):
        c = max(1.0 - v + math.sqrt(v) * x, 0.0) ** 3
        s = sigma * math.sqrt(c)
        stats = _uniform_stats(counts) if s < 1e-3 else mean_stats(s)
        total += w * stats
        weighted += w * c * stats
    return total, weighted


def _causal_counts(seq_len: int) -> np.ndarray:
    return np.arange(1, seq_len + 1)


@lru_cache(maxsize=4096)
def _softmax_moments_cached(
    sigma_key: float, seq_len: int, causal: bool, head_dim: int | None
) -> tuple[SoftmaxMoments, float]:
    """The row statistics and the ``c``-weighted grad factor (see _stats_with_mixture)."""
    counts = _causal_counts(seq_len) if causal else np.array([seq_len])
    stats, weighted = _stats_with_mixture(sigma_key, counts, head_dim, (seq_len, causal))
    weighted_grad = float(weighted[0] - 2.0 * weighted[1] + weighted[2])
    return SoftmaxMoments(*(float(v) for v in stats)), weighted_grad


def softmax_moments(
    sigma_z: float, seq_len: int, causal: bool = False, head_dim: int | None = None
) -> SoftmaxMoments:
    """Softmax row statistics for logits ``N(0, σ_z²)``, averaged over an attention's rows.

    Non-causal: every row has ``seq_len`` keys (also a plain softmax over a ``seq_len``-wide
    last dimension). Causal: row ``i`` sees ``i`` keys, ``i = 1 … seq_len``, averaged over
    rows. ``head_dim`` (optional) averages over the χ² spread of ``|q|²`` (module notes).
    Exact quadrature (module notes); cached on ``(σ_z to 3 significant digits, seq_len,
    causal, head_dim)``, so a repeated call returns the identical object.
    """
    _check_nonnegative("sigma_z", sigma_z)
    _check_positive("seq_len", seq_len)
    return _softmax_moments_cached(_key(sigma_z), int(seq_len), bool(causal), head_dim)[0]


def softmax_moments_for_counts(
    sigma_z: float, key_counts: Sequence[int] | np.ndarray, head_dim: int | None = None
) -> SoftmaxMoments:
    """Like :func:`softmax_moments` for arbitrary rows: row ``i`` sees ``key_counts[i]`` keys.

    For local/strided/padded patterns (count each query's allowed keys). Not cached itself,
    but the per-σ quadrature kernels are, so a call costs well under a millisecond.
    """
    _check_nonnegative("sigma_z", sigma_z)
    counts = np.asarray(key_counts, dtype=np.int64).reshape(-1)
    if counts.size == 0 or counts.min() < 1:
        raise ValueError("key_counts must be a non-empty list of positive counts")
    stats = _stats_with_mixture(sigma_z, counts, head_dim)[0]
    return SoftmaxMoments(*(float(v) for v in stats))


def _biased_row_stats(kern: _Kernel, sigma: float, rows: list[np.ndarray]) -> np.ndarray:
    """``[4, len(rows)]`` statistics for rows of logits ``N(b_j, σ²)`` with fixed offsets ``b_j``.

    Key ``j`` with offset ``b_j`` has ``m_k(u + b_j)``, so ``Σ_j m_k(u+b_j)/m_0(u+b_j) ·
    Π_l m_0(u+b_l)`` replaces ``n m_k m_0^{n-1}``. Offsets are shifted so the row maximum is 0
    (softmax is shift-invariant; the shift is added back to logsumexp), keys more than
    ``18σ + 40`` below it are dropped (``p < e^-40``), and the rest are linearly binned onto the
    grid step, turning the sums over keys into one matrix product per statistic.
    """
    h = _U_STEP
    margin = _bias_margin(sigma)
    n_main = len(kern.u) - kern.margin
    hist = np.zeros((len(rows), margin + 1))
    shifts = np.empty(len(rows))
    for r, b in enumerate(rows):
        shifts[r] = b.max()
        pos = (shifts[r] - b) / h  # ≥ 0, in grid steps below the row maximum
        pos = pos[pos < margin]
        j = np.floor(pos).astype(np.int64)
        frac = pos - j
        np.add.at(hist[r], j, 1.0 - frac)
        np.add.at(hist[r], j + 1, frac)
    start = kern.margin - margin  # grid index of shift -margin at the first main point

    def shifted_sum(f: np.ndarray) -> np.ndarray:
        # windows[i] = f[i : i + n_main]; key shift -j·h needs window kern.margin - j
        windows = np.lib.stride_tricks.sliding_window_view(f[start:], n_main)
        return hist @ windows[margin::-1]

    with np.errstate(over="ignore"):
        log_p = shifted_sum(kern.log_m0)  # Σ_l log m_0(u + b_l)
        prod = np.exp(log_p)
        ratios = [np.exp(np.minimum(lk - kern.log_m0, 700.0)) for lk in kern.log_m]
        a2, a3, a4 = (shifted_sum(a) for a in ratios)
        a22 = shifted_sum(ratios[0] ** 2)
    s2 = h * np.sum(a2 * prod, axis=1)
    s3 = h * np.sum(a3 * prod, axis=1) / 2.0
    s4 = h * np.sum(a4 * prod, axis=1) / 6.0
    pair = h * np.sum((a2 * a2 - a22) * prod, axis=1) / 6.0
    u = kern.u[kern.margin:]
    lse = shifts + h * (np.exp(-np.exp(u)).sum() - prod.sum(axis=1))
    return np.stack([s2, s3, s4 + pair, lse])


def _deterministic_row_stats(rows: list[np.ndarray]) -> np.ndarray:
    out = np.empty((4, len(rows)))
    for r, b in enumerate(rows):
        mx = b.max()
        e = np.exp(b - mx)
        p = e / e.sum()
        p2 = float(np.sum(p * p))
        out[:, r] = (p2, float(np.sum(p**3)), p2 * p2, mx + math.log(e.sum()))
    return out


def _row_sample(counts: np.ndarray, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Representative rows and their weights (number of rows each stands for).

    Rows are ranked by their number of keys; the ``max_rows // 2`` rows with the fewest keys
    are kept exactly (short causal rows dominate ``E Σp²``, which falls like ``1/n``) and the
    rest are split into geometrically growing blocks of ranks, each represented by its
    log-midpoint row — a midpoint rule accurate to ~0.2 % for a ``1/n`` profile.
    """
    order = np.argsort(counts, kind="stable")
    n = len(order)
    if n <= max_rows:
        return order, np.ones(n)
    k0 = max(max_rows // 2, 1)
    nb = max(max_rows - k0, 1)
    edges = np.unique(np.round(k0 * (n / k0) ** (np.arange(nb + 1) / nb)).astype(np.int64))
    mids = np.clip(np.round(np.sqrt(edges[:-1] * edges[1:])).astype(np.int64),
                   edges[:-1], edges[1:] - 1)
    idx = np.concatenate([order[:k0], order[mids]])
    weights = np.concatenate([np.ones(k0), np.diff(edges).astype(np.float64)])
    return idx, weights


def softmax_moments_with_bias(
    sigma_z: float,
    bias: Any,
    allowed: Any = None,
    head_dim: int | None = None,
    max_rows: int = 64,
) -> SoftmaxMoments:
    """Softmax row statistics for logits ``z_ij = ξ_ij + b_ij``, ``ξ ~ N(0, σ_z²)`` i.i.d.

    ``bias`` is a fixed ``[..., T, S]`` additive logit bias (ALiBi ``−m_h|i−j|``, T5 relative
    buckets; ``-inf`` entries count as masked) and ``allowed`` an optional broadcastable bool
    mask (causal, local, strided);
    statistics are averaged over rows (at most ``max_rows`` representative rows are evaluated:
    the shortest half exactly, the rest in geometric blocks, see ``_row_sample``).
    Exact quadrature, as for unbiased rows: key ``j`` enters through ``m_k(u + b_ij)``. A
    structured bias is *not* extra i.i.d. variance — e.g. an ALiBi ramp concentrates
    attention on ``~1/m_h`` nearby keys, which i.i.d. logits of the same variance would
    overstate by up to ~2.7× in the probabilities' RMS. Pass the result to
    :func:`attention_rule` as ``moments``. Not cached (array input); a call costs ~5–10 ms,
    ~50 ms with ``head_dim`` (seven quadrature nodes) when their kernels are not yet cached.
    """
    _check_nonnegative("sigma_z", sigma_z)
    b = np.asarray(bias, dtype=np.float64)
    if b.ndim == 0:
        raise ValueError("bias must have at least one dimension (the keys)")
    mask = (np.ones(b.shape, dtype=bool) if allowed is None
            else np.broadcast_to(np.asarray(allowed, dtype=bool), b.shape))
    mask = mask & np.isfinite(b)  # a -inf bias entry is a masked key
    b2 = b.reshape(-1, b.shape[-1])
    m2 = mask.reshape(-1, b.shape[-1])
    counts = m2.sum(axis=1)
    keep = np.flatnonzero(counts > 0)
    if keep.size == 0:
        raise ValueError("every row is fully masked")
    picked, row_w = _row_sample(counts[keep], max_rows)
    rows = [b2[i][m2[i]] for i in keep[picked]]
    row_w = row_w / row_w.sum()
    if head_dim is None:
        nodes: list[tuple[float, float]] = [(1.0, 1.0)]
    else:
        v = 2.0 / (9.0 * head_dim)
        nodes = [(max(1.0 - v + math.sqrt(v) * x, 0.0) ** 3, w)
                 for x, w in zip(_WH_NODES, _WH_WEIGHTS)]
    total = np.zeros(4)
    for c, w in nodes:
        sig = sigma_z * math.sqrt(c)
        if sig < 1e-3:
            stats = _deterministic_row_stats(rows)
        else:
            key = _key(sig)
            stats = _biased_row_stats(_softmax_kernel(key), key, rows)
        total += w * (stats @ row_w)
    return SoftmaxMoments(*(float(x) for x in total))


def softmax_probs_rms(
    sigma_z: float, seq_len: int, causal: bool = False, head_dim: int | None = None
) -> float:
    """RMS of the ``[seq_len, seq_len]`` probability matrix (masked zeros included).

    ``sqrt(mean_i E[Σ_j p_ij²] / seq_len)``; uniform attention gives ``1/seq_len``
    non-causal and ``sqrt(H_s)/s`` causal (``H_s`` the harmonic number). See
    :func:`softmax_moments`.
    """
    return math.sqrt(softmax_moments(sigma_z, seq_len, causal, head_dim).sum_p2 / seq_len)


def unit_softmax_scales(
    dim_size: int, mult: float = 1.0, constraint: str | None = "to_output_scale"
) -> ElementwiseFactors:
    """Factors of ``unit_scaling.functional.softmax`` (empirical model, input × ``mult``).

    ``α = 1/(1 + 4/mult²)``; output ``loginterp(α, n, √n)``, grad
    ``loginterp(α, n/mult, sqrt(n/mult))`` with ``n = dim_size``, then ``constraint``.
    """
    alpha = 1 / (1 + 4 / mult**2)
    out = logarithmic_interpolation(alpha, dim_size, dim_size**0.5)
    grad = logarithmic_interpolation(alpha, dim_size / mult, (dim_size / mult) ** 0.5)
    return ElementwiseFactors(*apply_constraint(constraint, out, grad))


def softmax_rule(
    rms_x: float,
    rms_grad_y: float,
    *,
    dim_size: int,
    mult: float = 1.0,
    causal: bool = False,
    factors: ElementwiseFactors | None = None,
) -> SoftmaxScales:
    """``p = α_out softmax(mult·x)`` over a last dimension of ``dim_size`` i.i.d. logits.

    ``rms_p = α_out sqrt(E Σp²/n)`` and, for an output gradient of RMS ``σ_gy`` uncorrelated
    across entries, ``grad_x = α_gx mult σ_gy sqrt((E Σp² − 2E Σp³ + E (Σp²)²)/n)``
    (:attr:`SoftmaxMoments.grad_factor`), at logit scale ``mult σ_x``. ``causal`` treats the
    input as a ``[n, n]`` causally masked matrix. Factors: ``None`` = 1 (standard) or
    :func:`unit_softmax_scales`.
    """
    factors = factors or _NO_ELEMENTWISE_SCALING
    mom = softmax_moments(mult * rms_x, dim_size, causal)
    out = factors.output * math.sqrt(mom.sum_p2 / dim_size)
    grad = factors.grad_input * mult * rms_grad_y * math.sqrt(max(mom.grad_factor, 0.0)
                                                               / dim_size)
    return SoftmaxScales(out, grad)


# =========================================================================== attention


def attention_logits_rms(rms_q: float, rms_k: float, head_dim: int, logit_scale: float) -> float:
    """RMS of ``z = m q·k``: ``m sqrt(d_h) σ_q σ_k`` for independent zero-mean ``q``, ``k``.

    ``m = 1/sqrt(d_h)`` standard and unit scaling; ``m = mult/d_h`` in u-μP
    (``unit_scaling.functional.scaled_dot_product_attention``).
    """
    return logit_scale * math.sqrt(head_dim) * rms_q * rms_k


def unit_sdpa_scale(
    seq_len: int, head_dim: int, causal: bool, mult: float = 1.0, dropout_p: float = 0.0
) -> float:
    """The factor of ``unit_scaling.functional.scaled_dot_product_attention`` (u-μP).

    ``(1−p)^½ / loginterp(1/(1 + 4 d_h/mult²), ((log s if causal else 1)/s)^½, 1)``, applied
    to the output (``scale_fwd``) and to the gradients of q, k and v (``scale_bwd``); ``s`` is
    the key length. The lower limit is the output RMS of uniform attention, ``sqrt(1/s)``
    non-causal and ``sqrt(H_s/s) ≈ sqrt((log s + 0.58)/s)`` causal (the library drops Euler's
    constant). Causal ``s = 1`` gives ``log 1 = 0``, on which the library itself fails
    (``math domain error``); so does this function (ValueError).
    """
    _check_positive("seq_len", seq_len)
    lower = ((math.log(seq_len) if causal else 1.0) / seq_len) ** 0.5
    if lower <= 0:
        raise ValueError("unit_scaling's causal attention scale is undefined for seq_len = 1")
    return (1 - dropout_p) ** 0.5 / logarithmic_interpolation(
        1 / (1 + 4 * head_dim / mult**2), lower, 1.0)


def attention_rule(
    rms_q: float,
    rms_k: float,
    rms_v: float,
    rms_grad_y: float,
    *,
    seq_len: int,
    head_dim: int,
    causal: bool = False,
    logit_scale: float | None = None,
    q_len: int | None = None,
    logit_bias_var: float = 0.0,
    scale: float = 1.0,
    row_mixture: bool = True,
    moments: SoftmaxMoments | None = None,
) -> AttentionScales:
    """``Y = α softmax(m QKᵀ + bias) V`` for one head; Q ``[T, d_h]``, K, V ``[S, d_h]``.

    ``S = seq_len`` keys, ``T = q_len`` queries (default ``S``; causal needs ``T = S``),
    ``m = logit_scale`` (default ``1/sqrt(d_h)``), ``α = scale`` (1, or :func:`unit_sdpa_scale`
    which ``unit_scaling`` applies to the output and to the q, k, v gradients). With
    ``σ_z² = (m sqrt(d_h) σ_q σ_k)² + logit_bias_var`` and row statistics ``M`` from
    :func:`softmax_moments` (``E Σp²`` averaged over rows, χ² row mixture when
    ``row_mixture``):

    * ``probs = sqrt(M.sum_p2 / S)``; ``output = α σ_v sqrt(M.sum_p2)`` (``o_i = Σ_j p_ij v_j``);
    * ``grad_probs = gY Vᵀ → sqrt(d_h) σ_gy σ_v``;
    * ``grad_logits = grad_probs sqrt(M.grad_factor / S)`` (softmax Jacobian on uncorrelated
      ``gP``);
    * ``grad_q = α m sqrt(S) σ_k grad_logits`` (``gQ = m gZ K``, treating ``gZ`` and ``K`` as
      independent: off by the one direction of ``k`` along ``q``, a ~1/d_h effect);
      ``grad_k = α m sqrt(T) σ_q grad_logits'`` where ``'`` weights each row's ``Σ_j gZ_ij²``
      by its ``|q_i|²/E|q|²`` (rows with longer queries are peakier; matters at long ``S``);
    * ``grad_v = Pᵀ gY → α σ_gy sqrt((T/S) M.sum_p2)``.

    ``moments`` overrides the row statistics (from :func:`softmax_moments_with_bias` for a
    fixed logit bias such as ALiBi or T5 buckets, or :func:`softmax_moments_for_counts` for
    local/strided masks); ``grad_k`` then uses their unweighted grad factor. Without it a bias
    can only be modelled as extra i.i.d. logit variance ``logit_bias_var`` (use
    :func:`bias_row_std` squared: softmax ignores per-row shifts) — fine for small or
    random-looking biases, badly wrong for an ALiBi ramp (see
    :func:`softmax_moments_with_bias`).
    """
    s = int(seq_len)
    t = s if q_len is None else int(q_len)
    if causal and t != s:
        raise ValueError("causal attention needs q_len == seq_len")
    m = 1 / math.sqrt(head_dim) if logit_scale is None else logit_scale
    rms_qk = attention_logits_rms(rms_q, rms_k, head_dim, m)
    sigma_z = math.sqrt(rms_qk**2 + logit_bias_var)
    if moments is not None:
        mom, grad_factor_k = moments, moments.grad_factor
    else:
        mom, grad_factor_k = _softmax_moments_cached(
            _key(sigma_z), s, bool(causal), head_dim if row_mixture else None)
    probs = math.sqrt(mom.sum_p2 / s)
    out = scale * rms_v * math.sqrt(mom.sum_p2)
    grad_p = math.sqrt(head_dim) * rms_grad_y * rms_v
    grad_z = grad_p * math.sqrt(max(mom.grad_factor, 0.0) / s)
    grad_q = scale * m * math.sqrt(s) * rms_k * grad_z
    grad_k = scale * m * math.sqrt(t) * rms_q * grad_p * math.sqrt(max(grad_factor_k, 0.0) / s)
    grad_v = scale * rms_grad_y * math.sqrt(t / s * mom.sum_p2)
    return AttentionScales(sigma_z, probs, out, grad_p, grad_z, grad_q, grad_k, grad_v)


# =========================================================================== cross-entropy


def unit_cross_entropy_grad_scale(vocab: int) -> float:
    """Logits-grad factor of ``unit_scaling.functional.cross_entropy``: ``V/sqrt(V−1)``."""
    if vocab < 2:
        raise ValueError("vocab must be at least 2")
    return vocab / math.sqrt(vocab - 1)


def cross_entropy_rule(
    rms_logits: float, *, vocab: int, n_tokens: int, unit: bool = False, mult: float = 1.0
) -> CrossEntropyScales:
    """Cross-entropy over ``n_tokens`` rows of ``vocab`` i.i.d. ``N(0, σ_z²)`` logits, random
    targets, mean reduction, backward from ``loss.backward()``.

    Loss: ``E[logsumexp(z) − z_target] = E[logsumexp(z)]`` (numerical, exact quadrature;
    ≈ ``log V + σ_z²/2`` while ``V ≫ e^{σ_z²}``). Gradient of a row: ``(p − onehot)/N``, so
    the RMS over ``[N, V]`` is ``sqrt((1 + E Σp² − 2/V)/V)/N`` (``E p_target = 1/V``; ≈
    ``sqrt((1 − 1/V)/V)/N`` for small σ_z). Unit-scaled (``unit_scaling.functional
    .cross_entropy``): logits × ``mult`` forward only, a "sum" reduction whose value is then
    ``scale_fwd``-ed by ``1/N`` (the loss is still the mean, the gradient is *not* divided by
    ``N``) and the logits gradient × :func:`unit_cross_entropy_grad_scale`, i.e. ≈ 1.
    """
    _check_positive("n_tokens", n_tokens)
    sigma = (mult if unit else 1.0) * rms_logits
    mom = softmax_moments(sigma, vocab)
    per_row = math.sqrt(max(1.0 + mom.sum_p2 - 2.0 / vocab, 0.0) / vocab)
    grad = per_row * unit_cross_entropy_grad_scale(vocab) if unit else per_row / n_tokens
    return CrossEntropyScales(mom.logsumexp, grad)


def tied_cross_entropy_grad(
    rms_logits: float, *, vocab: int, n_tokens: int, p_self: float, p_self_sq: float,
    unit: bool = False, mult: float = 1.0
) -> float:
    """RMS of the ``[N, V]`` logits gradient when one logit of each row is the input token's
    own (a tied head: ``z_t = α e_t·x̂``, large wherever ``x̂`` keeps much of ``e_t``) and takes
    the softmax weight ``p_self`` (``E p_self`` and ``E p_self²`` over the rows given), the
    other ``V − 1`` logits i.i.d. ``N(0, σ_z²)`` sharing ``1 − p_self`` as their own softmax
    ``p̂`` would. Per row::

        Σ_v (p_v − y_v)² = 1 − 2 p_y + p_self² + (1 − p_self)² Σ_{v≠t} p̂_v²

    and ``E p_y = 1/V`` (a random target is the input token with probability ``1/V``, else
    one of the others, which hold ``1 − p_self``), so the RMS is
    ``sqrt((1 + E p_self² + E(1 − p_self)²·EΣp̂² − 2/V)/V)/N`` (unit-scaled: ×
    :func:`unit_cross_entropy_grad_scale` instead of ``/N``). :func:`cross_entropy_rule`
    with all ``V`` logits i.i.d. has ``EΣp̂²`` in place of the self-logit's ``p_self²`` term:
    at d 512, where ``p_self ≈ 1`` and ``EΣp̂² = 0.85``, 0.057 log2 low, and the norm below
    then projects most of that ``p_self e_t`` out again (``_self_logit_lean``)."""
    _check_positive("n_tokens", n_tokens)
    sigma = (mult if unit else 1.0) * rms_logits
    others = softmax_moments(sigma, max(vocab - 1, 1)).sum_p2
    rest_sq = max(1.0 - 2.0 * p_self + p_self_sq, 0.0)  # E(1 − p_self)²
    per_row = math.sqrt(max(1.0 + p_self_sq + rest_sq * others - 2.0 / vocab, 0.0) / vocab)
    return per_row * unit_cross_entropy_grad_scale(vocab) if unit else per_row / n_tokens


def capped_tied_cross_entropy_grad(
    mom: SoftcapSoftmaxMoments, *, vocab: int, n_tokens: int, p_self: float,
    p_self_sq: float, q_self_sq: float, unit: bool = False
) -> float:
    """RMS of the ``[N, V]`` gradient reaching a tied head's (uncapped) output ``z`` through a
    final soft cap ``y = c·tanh(z/c)`` (Gemma 2), the input token's own logit taking the
    capped softmax's weight ``p_self`` (``E p_self``, ``E p_self²``), the other ``V − 1``
    i.i.d. with the capped-softmax moments ``mom`` (:func:`softcap_softmax_moments`). Every
    entry passes the cap's slope ``s = sech²(z/c)``; per row::

        Σ_v (p_v − y_v)² s_v² = q_self² + E s² (1 − 2/V) + (1 − p_self)² EΣ_{v≠t} p̂_v² s_v²

    ``q_self = p_self·sech²(z_self/c)`` (``E q_self²`` over the rows: ≈ 0 once the self-logit
    saturates the cap, while ``p_self → 1``), the target's ``(1 − p_y)² s_y²`` taken as
    ``s²(1 − 2p_y)`` with ``E p_y`` small, the others sharing ``1 − p_self`` as their own
    softmax ``p̂`` would. RMS ``sqrt(per_row/V)/N`` (unit-scaled: ×
    :func:`unit_cross_entropy_grad_scale` instead of ``/N``); without the cap (``s = 1``)
    it is :func:`tied_cross_entropy_grad` less its ``E p_y`` terms."""
    _check_positive("n_tokens", n_tokens)
    _check_positive("vocab", vocab)
    rest_sq = max(1.0 - 2.0 * p_self + p_self_sq, 0.0)  # E(1 − p_self)²
    per_row = max(q_self_sq + mom.slope2 * (1.0 - 2.0 / vocab)
                  + rest_sq * mom.sum_p2_slope2, 0.0)
    rms = math.sqrt(per_row / vocab)
    return rms * unit_cross_entropy_grad_scale(vocab) if unit else rms / n_tokens


# =========================================================================== positions & biases


def sinusoidal_rms(d_model: int, n_positions: int | None = None, base: float = 10000.0) -> float:
    """RMS of the sinusoidal position encoding (Vaswani et al. 2017, §3.5).

    Even ``d_model``: each (sin, cos) pair has ``sin² + cos² = 1``, so every row has RMS
    ``sqrt(½)`` exactly, at every position. Odd ``d_model``: the last column is a lone
    ``sin(pos ω)`` with ``ω = base^{−(d−1)/d}``; its mean square over positions
    ``0 … n_positions−1`` is computed exactly (``n_positions`` is required).
    """
    _check_positive("d_model", d_model)
    if d_model % 2 == 0:
        return _SQRT_HALF
    if n_positions is None:
        raise ValueError("odd d_model: the RMS depends on the positions; pass n_positions")
    omega = base ** (-(d_model - 1) / d_model)
    last = float(np.mean(np.sin(np.arange(n_positions) * omega) ** 2))
    return math.sqrt(((d_model - 1) / 2 + last) / d_model)


def bias_rms(bias: Any, allowed: Any = None) -> float:
    """RMS of an additive logit bias (ALiBi ``−m_h|i−j|``, T5 buckets) over its entries.

    Adding a bias ``b`` to independent zero-mean logits ``z`` gives
    ``rms(z + b)² = rms(z)² + mean(b²)`` (:func:`add_independent_rms`). ``allowed`` (bool,
    broadcastable) restricts the mean to unmasked entries.
    """
    b = np.asarray(bias, dtype=np.float64)
    if allowed is None:
        return float(np.sqrt(np.mean(b * b)))
    mask = np.broadcast_to(np.asarray(allowed, dtype=bool), b.shape)
    return float(np.sqrt(np.mean(b[mask] ** 2)))


def bias_row_std(bias: Any, allowed: Any = None) -> float:
    """``sqrt(mean over rows of the within-row variance)`` of a logit bias ``[..., T, S]``.

    Softmax is invariant to a per-row constant, so this — not :func:`bias_rms` — is the part
    of a bias that changes attention probabilities; pass its square as ``logit_bias_var`` to
    :func:`attention_rule`. ``allowed`` restricts each row to its unmasked keys.
    """
    b = np.asarray(bias, dtype=np.float64)
    mask = np.ones(b.shape, dtype=bool) if allowed is None else np.broadcast_to(
        np.asarray(allowed, dtype=bool), b.shape)
    cnt = mask.sum(axis=-1)
    safe = np.maximum(cnt, 1)
    mean = np.where(mask, b, 0.0).sum(axis=-1) / safe
    var = np.where(mask, (b - mean[..., None]) ** 2, 0.0).sum(axis=-1) / safe
    return float(np.sqrt(np.mean(var[cnt > 0])))


#: head_dim → {(σ key, keys per row) → row of :data:`_ROW_STATS_VALUES`}
#: (:func:`softmax_row_stats`).
_ROW_STATS: dict[int | None, dict[tuple[float, int], int]] = {}
_ROW_STATS_VALUES: list[tuple[float, float]] = []
_ROW_STATS_ARRAY = [np.zeros((0, 2))]  # the values as one array, rebuilt after additions
_ROW_STATS_SIZE = 1 << 16
_ROW_STATS_LOCK = threading.RLock()


def softmax_row_stats(sigma_keys: np.ndarray, counts: np.ndarray, head_dim: int | None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per row ``E Σp²`` and the softmax-Jacobian factor ``max(grad_factor, 0)`` of
    :func:`softmax_moments` (non-causal rows of ``counts[i]`` keys, logits of RMS
    ``sigma_keys[i]``, already keyed by :func:`_keys`).

    A position-resolved attention layer asks for ~50 rows; a plain dict per head width
    answers them in one ``map`` (:func:`softmax_moments` re-keys and checks every time), and
    the answers are gathered from one array.
    """
    keys = list(zip(sigma_keys.tolist(), counts.tolist()))
    with _ROW_STATS_LOCK:  # predictions may run in worker threads
        table = _ROW_STATS.get(head_dim)
        if table is None:
            table = _ROW_STATS[head_dim] = {}
        rows = list(map(table.get, keys))
        if None in rows:
            if len(_ROW_STATS_VALUES) > _ROW_STATS_SIZE:
                _clear_row_stats()
                table = _ROW_STATS[head_dim] = {}
                rows = [None] * len(keys)
            for i, (s, n) in enumerate(keys):
                row = table.get((s, n))
                if row is None:
                    mom = softmax_moments(s, n, False, head_dim)
                    row = table[(s, n)] = len(_ROW_STATS_VALUES)
                    _ROW_STATS_VALUES.append((mom.sum_p2, max(mom.grad_factor, 0.0)))
                rows[i] = row
            _ROW_STATS_ARRAY[0] = np.array(_ROW_STATS_VALUES)
        stats = _ROW_STATS_ARRAY[0][rows]
    return stats[:, 0], stats[:, 1]


def _clear_row_stats() -> None:
    with _ROW_STATS_LOCK:
        _ROW_STATS.clear()
        _ROW_STATS_VALUES.clear()
        _ROW_STATS_ARRAY[0] = np.zeros((0, 2))


# =========================================================================== caches


def cache_info() -> dict[str, Any]:
    """``functools`` cache statistics of the numerical caches, by name."""
    return {
        "activation": _activation_ratio.cache_info(),
        "softmax_kernel": _softmax_kernel.cache_info(),
        "softmax_moments": _softmax_moments_cached.cache_info(),
    }


def clear_caches() -> None:
    """Empty every numerical cache (the next call recomputes)."""
    _activation_ratio.cache_clear()
    _softmax_kernel.cache_clear()
    _softmax_moments_cached.cache_clear()
    _grid_stats.cache_clear()
    _clear_row_stats()


# =========================================================================== modern blocks
# Issue 21's features (Llama, Gemma, Pythia, OLMo, Mixtral): each rule states its formula;
# ``tests/core/test_rules_modern.py`` checks each one against the torch op on Gaussian draws.


def rms_norm_rule(
    rms_x: float,
    rms_grad_y: float,
    *,
    d: int,
    b_rows: int,
    eps: float = 1e-5,
    rms_weight: float = 1.0,
    grad_param_factor: float = 1.0,
) -> LayerNormScales:
    """RMSNorm ``y = γ x/sqrt(ms + ε)``, ``ms = mean(x²)`` over the last ``d`` features
    (Zhang & Sennrich 2019; Llama, Gemma, OLMo 2): no mean is removed and there is no bias.

    For a zero-mean i.i.d. row of RMS ``σ``, ``ms`` has mean ``σ²`` (all ``d`` features, not
    ``d − 1``), ``r = σ²/(σ² + ε)``:

    * ``rms_y = σ_γ sqrt(r)``;
    * ``grad_x = (γ gy − x̂ mean(γ gy x̂))/sqrt(ms + ε)`` removes (most of) the one direction
      ``x̂`` — not the mean, which LayerNorm also removes — so
      ``E‖·‖² = σ_gy² σ_γ² ((d − 1) + (1 − r)²) E[1/(ms + ε)]`` with
      ``E[1/ms] = d/(σ²(d − 2))`` (inverse χ²_d), taken as ``1/(σ²(d − 2)/d + ε)``;
    * ``grad_γ = α sqrt(b_rows r) σ_gy`` (``α = 1/sqrt(b_rows)`` for
      ``unit_scaling.functional.rms_norm``, the same factor as its layer norm); no bias: 0.

    What tokens share is kept: a component every token has along the all-ones direction
    (sinusoidal positions' row means) passes through, and counts in ``ms`` (the predictor's
    stream keeps its flat part through an RMSNorm, where a LayerNorm removes it).
    """
    _check_positive("d", d)
    var = rms_x**2
    r = var / (var + eps) if var + eps > 0 else 0.0
    out = rms_weight * math.sqrt(r)
    inv_var = 1.0 / (var * max(d - 2, 1) / d + eps)
    grad_x = rms_grad_y * rms_weight * math.sqrt(((d - 1) + (1 - r) ** 2) / d * inv_var)
    grad_w = grad_param_factor * math.sqrt(b_rows * r) * rms_grad_y
    return LayerNormScales(out, grad_x, grad_w, 0.0)


def norm_backward_factor(var: np.ndarray | float, d: int, kind: str = "layernorm",
                         eps: float = 1e-5) -> np.ndarray | float:
    """The input-gradient gain of a norm at input variance ``var`` (per token):
    LayerNorm ``sqrt(((d − 2) + (1 − r)²)/d / (σ²(d − 3)/d + ε))``, ``r = v̄/(v̄ + ε)``,
    ``v̄ = σ²(d − 1)/d`` (:func:`layer_norm_rule`); RMSNorm
    ``sqrt(((d − 1) + (1 − r)²)/d / (σ²(d − 2)/d + ε))``, ``r = σ²/(σ² + ε)``
    (:func:`rms_norm_rule`)."""
    var = np.maximum(var, 0.0)
    if kind == "rmsnorm":
        r = var / (var + eps)
        return np.sqrt(((d - 1) + (1 - r) ** 2) / d / (var * max(d - 2, 1) / d + eps))
    var_bar = var * (d - 1) / d
    r = var_bar / (var_bar + eps)
    return np.sqrt(((d - 2) + (1 - r) ** 2) / d / (var * max(d - 3, 1) / d + eps))


def gqa_kv_grad_gain(n_heads: int, kv_heads: int) -> float:
    """Grouped-query attention (Ainslie et al. 2023; MQA at ``kv_heads = 1``): the RMS gain of
    the key and value gradients over plain multi-head attention, ``sqrt(G)``,
    ``G = n_heads / kv_heads``.

    Each K/V head serves ``G`` query heads (``repeat_kv``), so its gradient is the sum of
    theirs: ``gK_j = Σ_h m Σ_i gZ^h_ij q^h_i`` and ``gV_j = Σ_h Σ_i P^h_ij gY^h_i``. The query
    heads' ``q^h`` and ``gY^h`` come from disjoint rows of ``W_q`` and columns of ``W_o``
    (independent, zero-mean at initialisation), so the cross terms vanish and the variances
    add: ``E|gK|² = G E|gK^h|²``. The forward per-head scales (scores, probabilities,
    context) are those of one query head with its own keys."""
    _check_positive("n_heads", n_heads)
    _check_positive("kv_heads", kv_heads)
    if n_heads % kv_heads:
        raise ValueError(f"kv_heads {kv_heads} does not divide n_heads {n_heads}")
    return math.sqrt(n_heads / kv_heads)


def geglu_rule(
    rms_up: float,
    rms_gate: float,
    rms_grad_y: float,
    *,
    scale: float = 1.0,
) -> SwiGLUScales:
    """GeGLU ``y = α u ⊙ gelu_tanh(g)`` (Shazeer 2020; Gemma), ``u ~ N(0, σ_u²)``,
    ``g ~ N(0, σ_g²)`` independent, ``gelu_tanh(x) = ½x(1 + tanh(√(2/π)(x + 0.044715x³)))``:

    * ``rms_y = α σ_u rms(gelu_tanh(g))``;
    * ``∂/∂u = α gelu_tanh(g) gy → α rms(gelu_tanh(g)) σ_gy``;
    * ``∂/∂g = α u gelu_tanh'(g) gy → α σ_u rms(gelu_tanh'(g)) σ_gy``

    (Gaussian moments by quadrature, :func:`activation_moments`; ``α = 1`` standard)."""
    f_rms, df_rms = activation_moments("gelu_tanh", rms_gate)  # type: ignore[arg-type]
    return SwiGLUScales(scale * rms_up * f_rms, scale * f_rms * rms_grad_y,
                        scale * rms_up * df_rms * rms_grad_y)


def unit_geglu_scale() -> float:
    """The one factor of the torch model's unit-scaled GeGLU (built as
    ``unit_scaling.functional.silu_glu`` is: on the output and both input gradients):
    ``1/sqrt(E[gelu_tanh(g)²])``, ``g ~ N(0, 1)`` (≈ 1.5336), so a unit ``u ⊙ gelu_tanh(g)``
    has unit RMS."""
    return 1.0 / activation_moments("gelu_tanh", 1.0)[0]  # type: ignore[arg-type]


class ParallelResidualScales(NamedTuple):
    """:func:`parallel_residual_rule`'s result."""

    output: float  #: RMS of the layer's output ``y``
    grad_output: float  #: the gradient each branch's output (and the skip's add) receives
    grad_x: float  #: RMS of the gradient at the layer's input ``x``
    skip_weight: float  #: ``Π_i w_s,i``: the skip's weight, forward and backward
    branch_weights: tuple[float, ...]  #: ``c_i``, each branch's, forward and backward


def parallel_residual_rule(
    rms_x: float,
    rms_branches: Sequence[float],
    rms_grad_y: float,
    rms_grad_branches: Sequence[float],
    *,
    taus: Sequence[float],
    unit: bool = False,
) -> ParallelResidualScales:
    """GPT-J / GPT-NeoX's parallel block: branches ``b_i = f_i(norm_i x)`` all reading
    ``x`` (attention, then cross-attention in a decoder, then the feed-forward), added to it
    one after another, ``s ← add(b_i, s, τ_i)`` from ``s = x``
    (``layers.EncoderLayer._parallel``). Standard ``y = x + Σ b_i``; unit-scaled ``add`` is
    ``unit_scaling``'s ``residual_add`` (:func:`residual_weights`: ``w_r``, ``w_s``), so

        y = Π_i w_s,i · x + Σ_i c_i b_i,    c_i = w_r,i · Π_{j>i} w_s,j

    (``Σ c_i² + Π w_s² = 1``). With independent parts:

    * ``rms_y² = (Π w_s σ_x)² + Σ (c_i σ_b,i)²``;
    * ``residual_add`` weighs with ``scale_fwd``, so every branch's output receives the
      output's gradient unscaled, ``σ_gy``; the model takes the splits in the reverse
      order, which gives branch i's input the backward scale ``c_i`` and the skip
      ``Π w_s``: with ``σ_g,i`` the gradient branch i's backward returns at its input,
      ``grad_x² = (Π w_s σ_gy)² + Σ (c_i σ_g,i)²`` (the true gradient of the weighted sum).

    Standard: every weight 1 (``taus`` ignored)."""
    if not (len(rms_branches) == len(rms_grad_branches) == len(taus)):
        raise ValueError("parallel_residual_rule: one rms, gradient and tau per branch, got "
                         f"{len(rms_branches)}, {len(rms_grad_branches)} and {len(taus)}")
    pairs = [residual_weights(t) if unit else (1.0, 1.0) for t in taus]
    weights = []
    for i, (w_r, _w_s) in enumerate(pairs):
        weights.append(w_r * math.prod(w_s for _r, w_s in pairs[i + 1:]))
    skip = math.prod(w_s for _r, w_s in pairs)
    out = math.sqrt((skip * rms_x) ** 2 + sum((c * b) ** 2 for c, b in zip(weights,
                                                                          rms_branches)))
    grad_x = math.sqrt((skip * rms_grad_y) ** 2
                       + sum((c * g) ** 2 for c, g in zip(weights, rms_grad_branches)))
    return ParallelResidualScales(out, rms_grad_y, grad_x, skip, tuple(weights))


def partial_rope_correlation(delta: np.ndarray | float, head_size: int, rotary_dims: int,
                             base: float = 10000.0) -> np.ndarray:
    """What rotating two tokens ``Δ`` positions apart leaves of their covariance, averaged
    over a head's ``D`` features, when only the first ``R = rotary_dims`` are rotated
    (GPT-NeoX ``rotary_pct``; pairs ``(2i, 2i+1)``, ``θ_i = base^(−2i/R)``)::

        ρ(Δ) = (R/D)·(2/R) Σ_{i<R/2} cos(θ_i Δ) + (1 − R/D)

    the rotated dims decorrelate as full RoPE over ``R`` dims, the ``D − R`` others keep it
    all. ``R = D`` is full RoPE."""
    _check_positive("head_size", head_size)
    if not 0 < rotary_dims <= head_size or rotary_dims % 2:
        raise ValueError(f"rotary_dims must be even and in (0, {head_size}]: {rotary_dims}")
    theta = base ** (-np.arange(0, rotary_dims, 2, dtype=np.float64) / rotary_dims)
    delta = np.asarray(delta, dtype=np.float64)
    rho = np.cos(delta[..., None] * theta).mean(-1)
    f = rotary_dims / head_size
    return f * rho + (1.0 - f)


@lru_cache(maxsize=1024)
def _softcap_moments(sigma_key: float, cap: float) -> tuple[float, float]:
    if sigma_key <= 2.0 * cap:
        x, w = _GH_NODES, _GH_WEIGHTS
    else:  # trapezoid: sech²(σx/c) has width ~c/σ near x = 0, too sharp for Gauss–Hermite
        h = 0.05 * cap / sigma_key
        x = np.arange(-10.0, 10.0 + h / 2, h)
        w = np.exp(-0.5 * x * x)
        w /= w.sum()
    th = np.tanh(sigma_key * x / cap)
    sech2 = 1.0 - th * th
    return (cap * math.sqrt(float(w @ (th * th))), math.sqrt(float(w @ (sech2 * sech2))))


def softcap_rule(rms_z: float, rms_grad_y: float, *, cap: float | None
                 ) -> ActivationScales:
    """Soft cap ``y = c·tanh(z/c)`` (Gemma 2's attention and final logits), ``z ~ N(0, σ²)``:

    * ``rms_y = c·sqrt(E tanh²(z/c))`` (→ ``σ`` for ``σ ≪ c``, → ``c`` for ``σ ≫ c``);
    * ``grad_z = sech²(z/c)·gy → sqrt(E sech⁴(z/c)) σ_gy`` (``gy`` independent of ``z``).

    Gauss–Hermite quadrature (96 nodes) up to ``σ = 2c``, a trapezoid rule in the standard
    normal variable above (``σ`` keyed to 3 digits). ``cap`` None: identity."""
    if cap is None:
        return ActivationScales(rms_z, rms_grad_y)
    _check_positive("cap", cap)
    _check_nonnegative("rms_z", rms_z)
    if rms_z < 1e-12:
        return ActivationScales(rms_z, rms_grad_y)
    key = _key(rms_z)
    out, grad = _softcap_moments(key, float(cap))
    return ActivationScales(out * rms_z / key, grad * rms_grad_y)


def qk_norm_gain_grad_rows(mode: str, n_heads: int, rows: int, kv: bool = False,
                           kv_heads: int | None = None) -> int:
    """How many rows a QK-norm gain's gradient sums over: ``rows`` tokens for ``all_heads``
    (OLMo 2: one gain per feature of the whole projection), ``rows × heads`` for ``head``
    (Qwen 3 / Gemma 3: one ``d_head`` gain shared by every head, so every head of every
    token adds; the key norm's heads are the K/V heads)."""
    if mode == "all_heads":
        return rows
    if mode == "head":
        return rows * ((kv_heads or n_heads) if kv else n_heads)
    raise ValueError(f"qk_norm mode {mode!r}")


def moe_rule(
    rms_expert: float,
    *,
    n_experts: int,
    top_k: int,
    rows: int,
    router_rms: float = 0.0,
) -> tuple[float, float, float]:
    """A routed mixture of experts (Mixtral): ``y = Σ_{e ∈ top-k} p̂_e E_e(x)``,
    ``p = softmax(router x)``, ``p̂`` renormalised over the ``k`` chosen.

    At initialisation the router's logits are small (``σ_r = router_rms``), the choice is
    uniform: each expert sees ``≈ rows·k/E`` of the rows and the weights ``p̂`` are
    ``≈ 1/k`` (``E p̂² = 1/k² + Var p̂``, taken to first order in ``σ_r²``:
    ``Var p̂ ≈ σ_r²(1 − 1/k)/k²``), so with experts independent given the input::

        rms_y² = k E p̂² σ_E²        rows per expert = rows·k/E

    Returns ``(rms_y, E p̂², rows per expert)``; the expert's input gradient is ``p̂·gy``
    (RMS ``sqrt(E p̂²) σ_gy``) on its own rows."""
    _check_positive("n_experts", n_experts)
    _check_positive("top_k", top_k)
    if top_k > n_experts:
        raise ValueError(f"top_k {top_k} > n_experts {n_experts}")
    p2 = 1.0 / top_k**2 + router_rms**2 * (1.0 - 1.0 / top_k) / top_k**2
    return math.sqrt(top_k * p2) * rms_expert, p2, rows * top_k / n_experts


class SoftcapSoftmaxMoments(NamedTuple):
    """Softmax statistics of ``n`` i.i.d. soft-capped logits (:func:`softcap_softmax_moments`)."""

    sum_p2: float  # E Σ_j p_j²
    sum_p2_slope2: float  # E Σ_j p_j² s_j², s = sech²(z_j/c) the cap's slope
    logsumexp: float  # E logsumexp(y)
    slope2: float  # E s² = E sech⁴(z/c) of one logit
    lean: float  # E Σ_j ∂(p_j s_j)/∂z_j = E[Σ_j p_j s_j z_j]/σ² (Stein): the pull towards x̂


@lru_cache(maxsize=256)
def _softcap_softmax_cached(sigma_key: float, n: int, cap: float) -> SoftcapSoftmaxMoments:
    h = 0.01
    x = np.arange(-9.0, 9.0 + h / 2, h)
    wz = np.exp(-0.5 * x * x)
    wz /= wz.sum()
    th = np.tanh(sigma_key * x / cap)
    y = cap * th
    s2 = (1.0 - th * th) ** 2  # slope²
    du = 0.02
    u = np.arange(-float(y.max()) - math.log(n) - 40.0, -float(y.min()) + 8.0, du)
    # (U, Z): a = e^{u+Y}; m_k(u) = E[a^k e^{−a}]
    a = np.exp(np.minimum(u[:, None] + y[None, :], 700.0))
    e = np.exp(-a)
    m0 = e @ wz
    m2 = (a * a * e) @ wz
    m2s = (a * a * e) @ (wz * s2)
    pow0 = np.exp((n - 1) * np.log(np.maximum(m0, 1e-300)))
    sum_p2 = float(n * du * np.sum(m2 * pow0))
    sum_p2_s = float(n * du * np.sum(m2s * pow0))
    lse = float(du * np.sum(np.exp(-np.exp(np.minimum(u, 700.0))) - pow0 * m0))
    # E Σ p_j f(z_j) = n ∫ E[f a e^{−a}] m_0^{n−1} du: f = s² and f = s·tanh(z/c)
    slope = 1.0 - th * th
    m1 = (a * e) @ np.stack((wz * s2, wz * slope * th), axis=1)
    sum_p_s2, sum_p_s_tanh = (float(n * du * (pow0 @ m1[:, i])) for i in (0, 1))
    lean = sum_p_s2 - sum_p2_s - 2.0 / cap * sum_p_s_tanh
    return SoftcapSoftmaxMoments(sum_p2, sum_p2_s, lse, float(wz @ s2), lean)


def softcap_softmax_moments(sigma: float, n: int, cap: float) -> SoftcapSoftmaxMoments:
    """Softmax statistics of ``n`` i.i.d. logits ``y = c·tanh(z/c)``, ``z ~ N(0, σ²)``
    (Gemma 2's final logits), exactly as :func:`softmax_moments` does for Gaussian ones
    (``u`` integrals of ``m_k(u) = E[a^k e^{−a}]``, ``a = e^{u+Y}``), with ``Y`` the capped
    logit (the cap compresses the top tail, which sets ``E Σp²`` and ``E logsumexp``: a
    Gaussian of the capped RMS put the log-sum-exp of σ 11 logits over 512 at 31 against 24)::

        E Σ_j p_j²        = n ∫ m_2(u) m_0(u)^{n−1} du
        E Σ_j p_j² s_j²   = n ∫ E[s² a² e^{−a}] m_0(u)^{n−1} du     (s = sech²(z/c))
        E logsumexp(y)    = ∫ (exp(−e^u) − m_0(u)^n) du

    A cross-entropy's logits gradient per row is then
    ``Σ_v (p_v − y_v)² s_v² = E s² (1 − 2/V) + E Σ p² s²`` (the target's slope taken
    independent of its small weight). ``lean``, what the softmax's pull ``Σ_j p_j s_j w_j``
    on a head's rows ``w_j`` (``z_j = w_j·x``) keeps along ``x`` (Stein's lemma,
    ``E[z_j h(z)] = σ² E ∂h/∂z_j``; ``1 − EΣp²`` uncapped)::

        E Σ_j ∂(p_j s_j)/∂z_j = E Σ p s² − E Σ p² s² − (2/c) E Σ p s tanh(z/c)

    (``∂p_j/∂z_j = p_j(1 − p_j) s_j``, ``∂s_j/∂z_j = −(2/c) s_j tanh(z_j/c)``), the
    first and last ``n ∫ E[f a e^{−a}] m_0(u)^{n−1} du``: the softmax's weight sits on the
    top logits, where the cap's slope is smallest, so ``E s²`` of one logit overstates it.
    Trapezoid rules (``z`` step 0.01 over ±9σ, ``u`` step 0.02); ``σ`` keyed to 3 digits."""
    _check_positive("cap", cap)
    _check_positive("n", n)
    return _softcap_softmax_cached(_key(max(sigma, 1e-6)), int(n), float(cap))


@lru_cache(maxsize=256)
def _routed_moments(n_experts: int, k: int, sigma_key: float) -> tuple[float, float]:
    rng = np.random.default_rng(0)  # fixed draws: a deterministic expectation
    z = rng.standard_normal((1 << 14, n_experts)) * sigma_key
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = -np.sort(-p, axis=1)[:, :k]
    top /= top.sum(1, keepdims=True)
    s2 = (top * top).sum(1)
    jac = (top * top * (1.0 - 2.0 * top + s2[:, None])).sum(1)
    return float(s2.mean()), float(jac.mean())


def routed_weight_moments(n_experts: int, top_k: int, router_rms: float) -> tuple[float, float]:
    """Mixtral's routing weights at initialisation, router logits i.i.d. ``N(0, σ_r²)``:
    ``(m, r)`` with ``m = E Σ_k p̂_k²`` (the output's variance over one expert's, with
    independent experts) and ``r = E Σ_k p̂_k² (1 − 2p̂_k + Σ_l p̂_l²)``, the router
    gradient's: ``∂L/∂z_e = p̂_e (a_e − Σ_l p̂_l a_l)`` for a chosen expert (``a_e = g·y_e``,
    i.i.d. of variance ``A``; 0 for the others: the renormalised top-k ignores them), so
    ``E Σ_e (∂L/∂z_e)² = r A``. By 2¹⁴ fixed (seeded) draws; ``k = 1``: ``(1, 0)``."""
    _check_positive("n_experts", n_experts)
    if not 0 < top_k <= n_experts:
        raise ValueError(f"top_k must be in [1, {n_experts}]: {top_k}")
    if top_k == 1:
        return 1.0, 0.0
    return _routed_moments(int(n_experts), int(top_k), _key(max(router_rms, 1e-6)))


# ======================================================================= mixture of experts
# (end to end: the predictor's MoE feed-forward, ``_Predictor.moe_fwd`` / ``moe_bwd``)

#: correlations at which :func:`routed_pair_overlap` is tabulated (interpolated between)
_OVERLAP_RHOS = np.array([-1.0, -0.5, -0.25, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
                          0.9, 0.95, 0.98, 1.0])


def _top_k_weights(z: np.ndarray, k: int) -> np.ndarray:
    """Mixtral's routing weights of logits ``z (n, E)``: softmax, top-k, renormalised over the
    k; zero for the experts not chosen (ties have probability 0)."""
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    kth = -np.partition(-p, k - 1, axis=1)[:, k - 1:k]
    p = np.where(p >= kth, p, 0.0)
    return p / p.sum(1, keepdims=True)


@lru_cache(maxsize=128)
def _overlap_table(n_experts: int, k: int, sigma_key: float) -> np.ndarray:
    rng = np.random.default_rng(0)  # fixed draws: a deterministic expectation
    n = max(1 << 10, min(1 << 15, (1 << 21) // n_experts))
    a = rng.standard_normal((n, n_experts))
    b = rng.standard_normal((n, n_experts))
    pa = _top_k_weights(a * sigma_key, k)
    out = np.empty(len(_OVERLAP_RHOS))
    for i, rho in enumerate(_OVERLAP_RHOS):
        z = (rho * a + math.sqrt(max(1.0 - rho * rho, 0.0)) * b) * sigma_key
        out[i] = float((pa * _top_k_weights(z, k)).sum(1).mean())
    out.setflags(write=False)
    return out


def routed_pair_overlap(n_experts: int, top_k: int, router_rms: float,
                        rho: np.ndarray | float) -> np.ndarray | float:
    """The routing overlap of two tokens whose router logits (i.i.d. over the experts,
    ``N(0, σ_r²)``, ``σ_r = router_rms``) have correlation ``rho`` (the correlation of the
    tokens' router inputs: the router is one linear map)::

        Q(ρ) = E Σ_e p̂_ie p̂_je        (p̂_e = 0 for an expert not chosen)

    ``Q(1) = m = E Σ_k p̂_k²`` (:func:`routed_weight_moments`), ``Q(0) = 1/E`` (each expert
    chosen by both with probability ``(k/E)²``, at weight ``1/k`` on average: ``Σ p̂ = 1``).
    What two tokens of a mixture's output share is ``Q(ρ)`` times what two tokens of one
    expert's output share (different experts' weights are independent), and what an expert's
    routed gradients share ``Q(ρ)/E`` of what the output gradients share (its own rows:
    ``m/E``). By 2¹⁵ fixed (seeded) pairs of draws (fewer for over 64 experts) on 16
    correlations (denser towards 1), linearly interpolated."""
    _check_positive("n_experts", n_experts)
    if not 0 < top_k <= n_experts:
        raise ValueError(f"top_k must be in [1, {n_experts}]: {top_k}")
    table = _overlap_table(int(n_experts), int(top_k), _key(max(router_rms, 1e-6)))
    out = np.interp(np.clip(rho, -1.0, 1.0), _OVERLAP_RHOS, table)
    return float(out) if np.ndim(out) == 0 else out


def unit_moe_combine_scales(n_experts: int, top_k: int, d: int,
                            constraint: str | None) -> tuple[float, float, float]:
    """``unitscale_core.model.ops.UnitOps.moe_combine``'s factors: ``(output, routed outputs'
    gradient, routing weights' gradient)`` = ``apply_constraint(m^-½, (m/k)^-½)`` and
    ``d^-½``, with ``m = E Σ_k p̂_k²`` of unit Gaussian router logits
    (:func:`routed_weight_moments` at ``σ_r = 1``; the model draws its own, within 1%)."""
    m = routed_weight_moments(n_experts, top_k, 1.0)[0]
    out, grad = apply_constraint(constraint, m ** -0.5, (m / top_k) ** -0.5)
    return out, grad, d ** -0.5


class MoECombine(NamedTuple):
    """RMS of a mixture's output and gradients (:func:`moe_combine_rule`)."""

    output: float  # y = Σ_k p̂_k o_k
    grad_expert: float  # the gradient reaching one expert's output, on the rows it chose
    grad_logits: float  # the router logits' gradient, per element of (rows, E)
    m: float  # E Σ_k p̂_k²
    r: float  # E Σ_k p̂_k² (1 − 2p̂_k + Σ_l p̂_l²)


def moe_combine_rule(rms_expert: float, rms_grad_y: float, *, n_experts: int, top_k: int,
                     d: int, router_rms: float,
                     scales: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> MoECombine:
    """The routed combine ``y = s_o Σ_k p̂_k o_k`` (Mixtral; ``scales = (s_o, s_g, s_w)``, the
    unit factors of :func:`unit_moe_combine_scales`, ones in a standard model) of independent
    expert outputs ``o`` (RMS ``σ_o``) with routing weights from router logits of RMS
    ``σ_r`` (:func:`routed_weight_moments`: ``m``, ``r``), output gradient of RMS ``σ_g``::

        rms_y          = s_o √m σ_o
        grad_expert    = s_g √(m/k) σ_g                   (E[p̂² | chosen] = m/k)
        grad_logits    = √(r A / E),   A = s_w² d σ_g² σ_o²

    ``A`` is the variance of ``a_e = s_w Σ_c g_c o_ec`` (``∂L/∂p̂_e``); the renormalised top-k
    is a softmax over the chosen logits, so ``∂L/∂z_e = p̂_e (a_e − Σ_l p̂_l a_l)`` for a chosen
    expert and 0 for the others, ``E Σ_e (∂L/∂z_e)² = r A``; with one expert (k = 1) p̂ = 1
    and the router gets no gradient."""
    m, r = routed_weight_moments(n_experts, top_k, router_rms)
    s_o, s_g, s_w = scales
    a = s_w * s_w * d * rms_grad_y ** 2 * rms_expert ** 2
    return MoECombine(s_o * math.sqrt(m) * rms_expert,
                      s_g * math.sqrt(m / top_k) * rms_grad_y,
                      math.sqrt(r * a / n_experts), m, r)


class RoutedLoads(NamedTuple):
    """Per expert of simulated batches (:func:`routed_loads`), its rows' routing: ``n`` the
    rows that chose it, ``p2 = Σ p̂²`` over them, ``pair_seq = Σ p̂_i p̂_j`` over its ordered
    pairs of distinct rows of one sequence, ``pair_batch`` over pairs of two sequences;
    experts no row chose are left out (they do not run)."""

    n: np.ndarray
    p2: np.ndarray
    pair_seq: np.ndarray
    pair_batch: np.ndarray


#: rows at most in one simulated batch of :func:`routed_loads` (longer sequences are cut)
ROUTED_MAX_ROWS = 4096


@lru_cache(maxsize=64)
def _routed_loads(n_experts: int, k: int, sigma_key: float, b: int, t: int, rho_seq: float,
                  rho_batch: float) -> RoutedLoads:
    rng = np.random.default_rng(0)  # fixed draws: a deterministic expectation
    t = max(1, min(t, ROUTED_MAX_ROWS // b))
    trials = int(min(256, max(16, (1 << 16) // (b * t))))
    out: list[list[np.ndarray]] = [[], [], [], []]
    a_b, a_s = math.sqrt(rho_batch), math.sqrt(max(rho_seq - rho_batch, 0.0))
    a_own = math.sqrt(max(1.0 - rho_seq, 0.0))
    for _ in range(trials):
        z = (a_b * rng.standard_normal((1, 1, n_experts))
             + a_s * rng.standard_normal((b, 1, n_experts))
             + a_own * rng.standard_normal((b, t, n_experts))) * sigma_key
        p = _top_k_weights(z.reshape(b * t, n_experts), k).reshape(b, t, n_experts)
        n = (p > 0).sum((0, 1))
        p2 = (p * p).sum((0, 1))
        per_seq = p.sum(1)  # (b, E)
        seq2 = (per_seq * per_seq).sum(0)
        total = per_seq.sum(0)
        keep = n > 0
        for lst, v in zip(out, (n, p2, seq2 - p2, total * total - seq2)):
            lst.append(v[keep].astype(np.float64))
    arrays = [np.concatenate(v) for v in out]
    for v in arrays:
        v.setflags(write=False)
    return RoutedLoads(*arrays)


def routed_loads(n_experts: int, top_k: int, router_rms: float, batch: int, seq: int,
                 rho_seq: float, rho_batch: float) -> RoutedLoads:
    """How unevenly a batch's rows fall to the experts when its tokens share parts of the
    router input: logits ``z_bte = σ_r (√ρ_B g_e + √(ρ_S − ρ_B) h_be + √(1 − ρ_S) ε_bte)``
    (``ρ_S``, ``ρ_B``: the mean correlation of two tokens' router inputs in one sequence and
    in two; ``g`` shared by the batch, ``h`` by a sequence), routed as the model routes
    (softmax, top-k, renormalised), per expert of each simulated batch
    (:class:`RoutedLoads`). Tokens that share much choose alike: a few experts take most
    rows, at large weights, the others few rows at small ones (rows per expert and
    ``E[p̂² | chosen]`` then differ between experts, which each expert's measured RMS
    shows). Fixed (seeded) draws, ``batch × seq`` rows per batch (at most
    :data:`ROUTED_MAX_ROWS`: longer sequences are cut), 2¹⁶ rows over 16–256 batches."""
    _check_positive("n_experts", n_experts)
    if not 0 < top_k <= n_experts:
        raise ValueError(f"top_k must be in [1, {n_experts}]: {top_k}")
    rho_seq = min(max(round(rho_seq, 2), 0.0), 1.0)
    rho_batch = min(max(round(rho_batch, 2), 0.0), rho_seq)
    return _routed_loads(int(n_experts), int(top_k), _key(max(router_rms, 1e-6)), int(batch),
                         int(seq), rho_seq, rho_batch)


def routed_row_gain(loads: RoutedLoads, m: float, top_k: int) -> float:
    """The factor on :func:`moe_combine_rule`'s ``grad_expert`` (``√(m/k)`` of the output
    gradient) that each expert's own rows give, as their RMS is measured expert by
    expert::

        exp E_e[½ ln(Σ_{i∈e} p̂_i² / n_e)] / √(m/k)

    (the geometric mean over experts of :func:`routed_loads`; 1 when routing is even and
    many rows fall to each expert, below it when a few experts take most rows at large
    weights: the others' rows carry small ``p̂``)."""
    return float(np.exp(0.5 * np.mean(np.log(loads.p2 / loads.n))) / math.sqrt(m / top_k))


def routed_weight_grad_gain(loads: RoutedLoads, own: float, pair_seq: float,
                            pair_batch: float, unit: bool) -> float:
    """The factor on an expert's weight-gradient RMS predicted from the expectation
    ``own + pair_seq + pair_batch`` (its sum over its rows' own products, over pairs of one
    sequence and of two, each at the mean routing), for each expert's gradient as it
    comes out of its own rows (:func:`routed_loads`)::

        V_e = w_e (own · P2_e/E P2 + pair_seq · S_e/E S + pair_batch · B_e/E B)
        gain = √(exp E_e[ln V_e] / (own + pair_seq + pair_batch))

    ``w_e = E n / n_e`` under unit scaling (the weight gradient is scaled by
    ``n_e^-½``, its own rows), 1 otherwise. What rows share is summed over the pairs of
    each expert's own rows: the experts that take most rows hold most of it."""
    total = own + pair_seq + pair_batch
    if total <= 0:
        return 1.0
    v = np.zeros_like(loads.p2)
    for part, arr in ((own, loads.p2), (pair_seq, loads.pair_seq),
                      (pair_batch, loads.pair_batch)):
        mean = float(arr.mean())
        if part and mean > 0:
            v = v + part * arr / mean
    if unit:
        v = v * (float(loads.n.mean()) / loads.n)
    v = np.maximum(v, 1e-300 * total)
    return float(math.sqrt(math.exp(float(np.mean(np.log(v)))) / total))
