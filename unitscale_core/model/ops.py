"""The operations each parametrization uses: ``standard``, ``unit`` and ``umup``.

Layers call ``self.ops.<op>`` and never branch on the parametrization themselves. Unit-scaled
ops come from ``unit_scaling.functional`` (Graphcore's reference implementation, 0.3.x) where it
has them; this module writes only what the library lacks (ReLU, attention with masks, biases
and probability capture, a residual rule for cross-attention stacks).

* ``standard``: plain ``torch.nn.functional``, PyTorch's default initialisations.
* ``unit``: Unit Scaling (Blake, Orr, Luschi 2023, arXiv 2303.11257): N(0, 1) weights, each op
  scales its output and, separately, its input gradients (§4); where the two must agree the
  geometric mean is used (``constraint="gmean"``, §5.1); residual branches τ-weighted with
  τ = 1 (§5.2, the library default); unit-scaled cross-entropy.
* ``umup``: u-μP (Blake et al. 2024, arXiv 2407.17465) as ``unit-scaling`` 0.3.x implements
  it: forward-scale constraint (``to_output_scale``), ``linear_readout`` head (1/fan_in),
  attention logits ``q·k/d_head`` with the library's attention scale model, and the depth-wise
  residual rule of Appendix G (``transformer_residual_scaling_rule``).

FP8 is simulated: with ``dtype`` ``fp8_e4m3`` (or ``fp8_e5m2``) every matmul input is rounded to
``float8_e4m3fn`` (``float8_e5m2``) in the forward pass and every gradient reaching a matmul
input to ``float8_e5m2`` in the backward pass; the arithmetic itself stays in fp32
(Micikevicius et al. 2022, "FP8 formats for deep learning").
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import unit_scaling.functional as U
from torch import Tensor
from unit_scaling.constraints import apply_constraint
from unit_scaling.core.functional import logarithmic_interpolation
from unit_scaling.scale import scale_bwd, scale_fwd

# ReLU of x ~ N(0, 1): E[relu(x)²] = 1/2 and E[relu'(x)²] = 1/2, so both scales are √2.
RELU_OUTPUT_SCALE = RELU_GRAD_SCALE = math.sqrt(2.0)
#: GeGLU's unit scale ``1/√E[gelu_tanh(g)²]``, g ~ N(0, 1): E = 0.425194 (Gauss–Hermite
#: quadrature, 200 nodes; checked in tests/core/test_model_attention_ffn.py).
GEGLU_SCALE = 1.5335805


@functools.lru_cache(maxsize=64)
def routed_weight_square(n_experts: int, k: int) -> float:
    """``E[Σ_k p̂_k²]`` of the top-k renormalised softmax of ``n_experts`` unit Gaussian router
    logits (seeded Monte Carlo over 2¹⁵ tokens, fewer for thousands of experts so the draw
    stays ~32 MB; 1 for k = 1, ``1/k`` only for equal weights): the mean square of a MoE
    token's combination weights at initialisation."""
    if k == 1:
        return 1.0
    draws = max(1 << 10, min(1 << 15, (1 << 22) // n_experts))
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(draws, n_experts, generator=gen, dtype=torch.float64)
    top = torch.softmax(z, dim=-1).topk(k, dim=-1).values
    top = top / top.sum(dim=-1, keepdim=True)
    return float(top.pow(2).sum(dim=-1).mean())


class _Fp8Round(torch.autograd.Function):
    """Round to ``fwd`` FP8 in the forward pass and the gradient to ``bwd`` FP8 backward."""

    @staticmethod
    def forward(ctx, x: Tensor, fwd: torch.dtype, bwd: torch.dtype) -> Tensor:  # type: ignore[override]
        ctx.bwd = bwd
        return x.to(fwd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad.to(ctx.bwd).to(grad.dtype), None, None


class StandardOps:
    """Plain PyTorch (``torch.nn`` defaults): what a user of ``torch.nn`` gets."""

    name = "standard"

    def __init__(self, dtype: str = "fp32"):
        self.fp8: tuple[torch.dtype, torch.dtype] | None = None
        if dtype == "fp8_e4m3":
            self.fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
        elif dtype == "fp8_e5m2":
            self.fp8 = (torch.float8_e5m2, torch.float8_e5m2)

    # -- helpers ------------------------------------------------------------------------------
    def q(self, x: Tensor) -> Tensor:
        """Simulated FP8 rounding of a matmul input (identity unless dtype is FP8)."""
        if self.fp8 is None:
            return x
        return _Fp8Round.apply(x, *self.fp8)

    # -- initialisation -----------------------------------------------------------------------
    def init_linear(self, module: torch.nn.Linear) -> None:
        """Keep ``nn.Linear``'s default: U(−1/√fan_in, 1/√fan_in) weights and biases."""

    def init_embedding(self, module: torch.nn.Embedding) -> None:
        """Keep ``nn.Embedding``'s default: N(0, 1)."""

    # -- ops ----------------------------------------------------------------------------------
    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, role: str = "hidden"):
        """``y = x Wᵀ + b``."""
        return F.linear(self.q(x), self.q(weight), bias)

    def embedding(self, ids: Tensor, weight: Tensor) -> Tensor:
        """Row lookup ``W[ids]``."""
        return F.embedding(ids, weight)

    def add_positions(self, x: Tensor, pos: Tensor) -> Tensor:
        """Token embedding plus absolute positions: ``x + p``."""
        return x + pos

    def layer_norm(self, x: Tensor, norm: torch.nn.LayerNorm) -> Tensor:
        """``(x − μ)/√(σ² + ε) · γ + β``."""
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def rms_norm(self, x: Tensor, norm: torch.nn.Module) -> Tensor:
        """``x / √(mean(x²) + ε) · g`` over the last dim (Zhang & Sennrich 2019): no mean
        removal, no bias (``torch.nn.functional.rms_norm``)."""
        return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)

    def activation(self, x: Tensor, kind: str) -> Tensor:
        """GELU (exact erf form) or ReLU."""
        return F.gelu(x) if kind == "gelu" else F.relu(x)

    def swiglu(self, up: Tensor, gate: Tensor) -> Tensor:
        """``silu(gate) ⊙ up`` (Shazeer 2020)."""
        return F.silu(gate) * up

    def geglu(self, up: Tensor, gate: Tensor) -> Tensor:
        """``gelu_tanh(gate) ⊙ up`` (Shazeer 2020; Gemma's ``gelu_pytorch_tanh``:
        ``½g(1 + tanh(√(2/π)(g + 0.044715 g³)))``)."""
        return F.gelu(gate, approximate="tanh") * up

    def dropout(self, x: Tensor, p: float, training: bool) -> Tensor:
        return F.dropout(x, p, training)

    def moe_combine(self, weights: Tensor, outputs: Tensor, n_experts: int) -> Tensor:
        """Mixture of experts' output ``y_n = Σ_k p̂_nk · outputs_nk`` (Mixtral):
        ``weights (N, k)`` renormalised router weights, ``outputs (N, k, C)``."""
        return (weights[..., None] * outputs).sum(dim=1)

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Attention logits ``q kᵀ / √d_head`` (Vaswani et al. 2017, eq. 1); the scale is
        applied to q (T·D values) rather than to the logits (T·S values)."""
        return (self.q(q) / math.sqrt(q.shape[-1])) @ self.q(k).transpose(-2, -1)

    def softmax_in(self, scores: Tensor, causal: bool) -> Tensor:
        """What enters the softmax (unit-scaled ops scale its gradient here)."""
        return scores

    def softmax_out(self, probs: Tensor, causal: bool) -> Tensor:
        """What leaves the softmax towards ``probs @ V``."""
        return probs

    def attend(self, probs: Tensor, v: Tensor) -> Tensor:
        """``P V``."""
        return self.q(probs) @ self.q(v)

    def repeat_kv(self, x: Tensor, group: int) -> Tensor:
        """Grouped-query attention's repeat ``(B, H_kv, S, D) → (B, H_kv·g, S, D)``: kv head
        ``j`` becomes query heads ``j·g … j·g + g − 1`` (HF's ``repeat_kv``). Its backward
        sums the ``g`` query heads' gradients into the shared key/value head."""
        b, h, s, d = x.shape
        return x[:, :, None].expand(b, h, group, s, d).reshape(b, h * group, s, d)

    def attention_in(self, q: Tensor, k: Tensor, v: Tensor, causal: bool):
        """Scale Q, K, V's gradients before attention (u-μP's attention model)."""
        return q, k, v

    def attention_out(self, y: Tensor, keys: int, causal: bool) -> Tensor:
        return y

    def residual_split(self, x: Tensor, tau: float) -> tuple[Tensor, Tensor]:
        """(branch input, skip): the same tensor."""
        return x, x

    def residual_add(self, branch: Tensor, skip: Tensor, tau: float) -> Tensor:
        """``skip + branch``."""
        return skip + branch

    def taus(self, kinds: list[str]) -> list[float]:
        """Residual weights per sub-block (unused: standard adds branches unweighted)."""
        return [1.0] * len(kinds)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy, mean over all tokens."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class UnitOps(StandardOps):
    """Unit Scaling (2023): ``unit_scaling.functional`` with the geometric-mean constraint."""

    name = "unit"
    constraint = "gmean"

    def init_linear(self, module: torch.nn.Linear) -> None:
        """Unit-variance weights N(0, 1), zero biases (Blake et al. 2023 §4)."""
        with torch.no_grad():
            module.weight.normal_()
            if module.bias is not None:
                module.bias.zero_()

    def init_embedding(self, module: torch.nn.Embedding) -> None:
        """N(0, 1), as ``nn.Embedding`` already does."""

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, role: str = "hidden"):
        """``unit_scaling.functional.linear``: forward ``fan_in^-½``, grad-input ``fan_out^-½``,
        grad-weight ``b^-½``; forward and grad-input tied by the constraint. The MoE router
        (``role="router"``) keeps its forward scale (``to_output_scale``): its logits feed a
        softmax and a top-k, which must not change with the constraint (as ``scores``)."""
        constraint = "to_output_scale" if role == "router" else self.constraint
        return U.linear(self.q(x), self.q(weight), bias, constraint=constraint)

    def embedding(self, ids: Tensor, weight: Tensor) -> Tensor:
        """``unit_scaling.functional.embedding``: weight-gradient scaled by ``√(V / b)``."""
        return U.embedding(ids, weight)

    def add_positions(self, x: Tensor, pos: Tensor) -> Tensor:
        """``unit_scaling.functional.add``: ``(x + p)/√2`` forward."""
        return U.add(x, pos, constraint=self.constraint)

    def layer_norm(self, x: Tensor, norm: torch.nn.LayerNorm) -> Tensor:
        """``unit_scaling.functional.layer_norm``: gain/bias gradients scaled by ``b^-½``."""
        return U.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def rms_norm(self, x: Tensor, norm: torch.nn.Module) -> Tensor:
        """``unit_scaling.functional.rms_norm``: the forward is the plain RMSNorm (its output
        already has RMS ≈ 1 at gain 1, whatever the input's scale), the gain's gradient is
        scaled by ``b^-½`` (b = positions it is summed over), as ``layer_norm``'s."""
        return U.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)

    def activation(self, x: Tensor, kind: str) -> Tensor:
        """``unit_scaling.functional.gelu``; ReLU (absent from the library) scaled by √2 both
        ways, the exact factors for a unit Gaussian input."""
        if kind == "gelu":
            return U.gelu(x, constraint=self.constraint)
        out_s, grad_s = apply_constraint(self.constraint, RELU_OUTPUT_SCALE, RELU_GRAD_SCALE)
        return scale_fwd(F.relu(scale_bwd(x, grad_s)), out_s)

    def swiglu(self, up: Tensor, gate: Tensor) -> Tensor:
        """``unit_scaling.functional.silu_glu``."""
        return U.silu_glu(up, gate)

    def geglu(self, up: Tensor, gate: Tensor) -> Tensor:
        """GeGLU built as ``unit_scaling.functional.silu_glu`` is (the library has no GELU
        gate): one scale ``s`` on the output (``scale_fwd``) and on both inputs' gradients
        (``scale_bwd``), ``s = 1/√E[gelu_tanh(g)²]`` for ``g ~ N(0, 1)``
        (:data:`GEGLU_SCALE`): with ``up`` and ``gate`` independent unit Gaussians the output
        ``u·gelu(g)`` and the up-gradient ``δ·gelu(g)`` have RMS ``1/s`` exactly, the
        gate-gradient ``δ·u·gelu'(g)`` has RMS ``√E[gelu'(g)²] = 1/1.4812``, so it leaves at
        1.035. (silu_glu's empirical ``2^¾ = 1.682`` is the same rule for SiLU within 0.3%:
        ``1/√E[silu(g)²] = 1.6765``.) One scale for all three, as silu_glu: no constraint
        is needed, so unit and u-μP share it."""
        up, gate = scale_bwd(up, GEGLU_SCALE), scale_bwd(gate, GEGLU_SCALE)
        return scale_fwd(F.gelu(gate, approximate="tanh") * up, GEGLU_SCALE)

    def dropout(self, x: Tensor, p: float, training: bool) -> Tensor:
        return U.dropout(x, p, training)

    def moe_combine(self, weights: Tensor, outputs: Tensor, n_experts: int) -> Tensor:
        """The p̂-weighted sum of k unit-scaled expert outputs, unit-scaled.

        With the router's logits unit Gaussian (it is forward-scaled) and the experts'
        outputs uncorrelated unit RMS, ``Σ_k p̂_k y_k`` has RMS ``√m``,
        ``m = E[Σ_k p̂_k²]`` (:func:`routed_weight_square`; 1 for k = 1, between 1/k and 1
        otherwise), and the gradient reaching a routed output, ``p̂_k δ``, has RMS
        ``√(m/k)``. Output scale ``m^-½`` and output-gradient scale ``(m/k)^-½`` are tied by
        the constraint as every non-cut edge (unit: their geometric mean, so the output is
        ``k^¼`` times an expert's and its gradient ``k^-¼``, as a gmean linear of unequal
        fans; u-μP: the output's, so the MoE output has an expert's RMS). The weights'
        gradient ``Σ_c δ_c y_c`` sums C features (RMS ``√C``) and is scaled by ``C^-½`` as a
        matmul's reduction is, backward only, as the softmax's input gradient is. Measured
        (d 128, 2 layers, T 64, batch 4, swiglu, 3 seeds, layer 0): an expert's ``down``
        gradient 0.50 (unit) / 0.58 (u-μP) with 4 or 8 experts top 2, against 0.61 / 0.83 in
        the dense model and 0.61 / 0.83 with top 1; the router's logits RMS 0.97–1.02; the
        MoE output against the dense output in ``tests/core/test_model_attention_ffn.py``
        (``test_moe_output_keeps_the_dense_feed_forwards_scale``)."""
        m = routed_weight_square(n_experts, weights.shape[-1])
        out_s, grad_s = apply_constraint(self.constraint, m ** -0.5,
                                         (m / weights.shape[-1]) ** -0.5)
        weights = scale_bwd(weights, outputs.shape[-1] ** -0.5)
        outputs = scale_bwd(outputs, grad_s)
        return scale_fwd((weights[..., None] * outputs).sum(dim=1), out_s)

    def repeat_kv(self, x: Tensor, group: int) -> Tensor:
        """The GQA repeat as a unit-scaled broadcast: forward scale 1 (a copy), grad-input
        scale ``g^-½`` (its backward sums the gradients of ``g`` query heads, which are
        uncorrelated — each head has its own queries — so the sum's RMS is ``√g`` times one
        head's). This is ``unit_scaling.functional.add``'s rule for a broadcast input
        (grad scale ``broadcast_size^-½``), constrained like every non-cut edge
        (``apply_constraint``): ``unit`` (gmean) scales both ways by ``g^-¼``, which with the
        k/v projection's own gmean (``(C·H_kv·D)^-¼``) makes projection + repeat scale
        exactly as the multi-head projection ``C → H·D`` does (``(C·H·D)^-¼``): forward and
        the input gradient unit as without GQA; ``umup`` (``to_output_scale``) keeps the copy
        exact, so the attention's input is the same as in multi-head attention and the
        shared head's gradient is ``√g`` larger (the forward-first choice u-μP makes for
        every constrained op). Measured (d 256, 8 heads, T 64, 2 layers, 4 seeds; layer 0,
        H_kv = 8/4/2/1): unit logits RMS 1.00/1.00/1.00/0.99, the attention input's gradient
        1.76/1.83/1.97/1.78; without the ``g^-¼`` the logits grow as ``g^¼`` (1.19, 1.41, 1.67:
        the softmax temperature would change with H_kv) and that gradient to 3.17 at MQA.
        u-μP: the input gradient 1.24/1.22/1.32/1.21 with the exact copy, the shared v
        gradient 1.22/1.70/2.57/3.41 (``√g``). Tests: ``tests/core/test_model_attention_ffn.py``
        (GQA equals multi-head attention with the k/v heads' weights repeated, logits and
        gradients, in every parametrization)."""
        out_s, grad_s = apply_constraint(self.constraint, 1.0, group ** -0.5)
        return scale_fwd(super().repeat_kv(scale_bwd(x, grad_s), group), out_s)

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """``unit_scaling.functional.matmul`` with the forward scale kept (``d_head^-½``, the
        standard temperature): the softmax's input must not change with the constraint."""
        return U.matmul(self.q(q), self.q(k).transpose(-2, -1), constraint="to_output_scale")

    def _softmax_scales(self, keys: int) -> tuple[float, float]:
        """``unit_scaling.functional.softmax``'s empirical model at ``mult = 1``."""
        alpha = 1 / (1 + 4)
        out = logarithmic_interpolation(alpha=alpha, lower=keys, upper=keys**0.5)
        grad = logarithmic_interpolation(alpha=alpha, lower=keys, upper=keys**0.5)
        return apply_constraint(self.constraint, out, grad)

    def softmax_in(self, scores: Tensor, causal: bool) -> Tensor:
        return scale_bwd(scores, self._softmax_scales(scores.shape[-1])[1])

    def softmax_out(self, probs: Tensor, causal: bool) -> Tensor:
        return scale_fwd(probs, self._softmax_scales(probs.shape[-1])[0])

    def attend(self, probs: Tensor, v: Tensor) -> Tensor:
        """``unit_scaling.functional.matmul`` (constrained)."""
        return U.matmul(self.q(probs), self.q(v), constraint=self.constraint)

    def residual_split(self, x: Tensor, tau: float) -> tuple[Tensor, Tensor]:
        """``unit_scaling.functional.residual_split``."""
        return U.residual_split(x, tau)

    def residual_add(self, branch: Tensor, skip: Tensor, tau: float) -> Tensor:
        """``unit_scaling.functional.residual_add``: ``(τ·branch + skip)/√(1 + τ²)``."""
        return U.residual_add(branch, skip, tau)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``unit_scaling.functional.cross_entropy`` (mean; gradient scaled by V/√(V−1))."""
        return U.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class UmupOps(UnitOps):
    """u-μP as ``unit-scaling`` 0.3.x: forward-scale constraint, readout, attention model."""

    name = "umup"
    constraint = "to_output_scale"

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, role: str = "hidden"):
        """Hidden: ``unit_scaling.functional.linear``; the output head: ``linear_readout``
        (forward ``1/fan_in``, u-μP Table 2); feed-forward up/gate/down: no constraint, as the
        library's ``MLP`` (their forward and backward factors mirror each other)."""
        if role == "readout":
            return U.linear_readout(self.q(x), self.q(weight), bias)
        constraint = None if role == "ffn" else self.constraint
        return U.linear(self.q(x), self.q(weight), bias, constraint=constraint)

    def attention_scale(self, keys: int, d_head: int, causal: bool) -> float:
        """``unit_scaling.functional.scaled_dot_product_attention``'s scale (``mult = 1``,
        no dropout): ``1 / interp(α = 1/(1 + 4 d_head), ((log s if causal else 1)/s)^½, 1)``."""
        lower = ((math.log(keys) if causal and keys > 1 else 1.0) / keys) ** 0.5
        return 1.0 / logarithmic_interpolation(alpha=1 / (1 + 4 * d_head), lower=lower,
                                               upper=1.0)

    def attention_in(self, q: Tensor, k: Tensor, v: Tensor, causal: bool):
        s = self.attention_scale(k.shape[-2], v.shape[-1], causal)
        return scale_bwd(q, s), scale_bwd(k, s), scale_bwd(v, s)

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """u-μP logits ``q kᵀ · mult / d_head`` (1/d, not 1/√d: u-μP §4, Table 2)."""
        return self.q(q) @ self.q(k).transpose(-2, -1) / q.shape[-1]

    # The softmax and P·V are plain: u-μP scales attention as a whole (attention_in/out).
    softmax_in = StandardOps.softmax_in
    softmax_out = StandardOps.softmax_out
    attend = StandardOps.attend

    def attention_out(self, y: Tensor, keys: int, causal: bool) -> Tensor:
        return scale_fwd(y, self.attention_scale(keys, y.shape[-1], causal))

    def taus(self, kinds: list[str]) -> list[float]:
        """u-μP Appendix G residual rule, generalised to cross-attention sub-blocks.

        For sub-block k of n (kinds "attn" or "mlp"), with α_mlp = 1 and α_attn = 1:
        ``τ_k = α_k / √(n/2 + Σ_{j<k} α_j²)``; for alternating attn/mlp stacks this is exactly
        ``unit_scaling.core.functional.transformer_residual_scaling_rule()`` (tested).
        """
        n = len(kinds)
        return [1.0 / math.sqrt(n / 2 + k) for k in range(n)]


OPS = {"standard": StandardOps, "unit": UnitOps, "umup": UmupOps}


def make_ops(parametrization: str, dtype: str = "fp32") -> StandardOps:
    """The ops object for a parametrization and number format."""
    return OPS[parametrization](dtype)
