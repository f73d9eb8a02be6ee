"""Issue 21's per-op rules (``unitscale_core.scaling.rules``, "modern blocks") against the
torch op itself run on Gaussian draws: forward and backward with a Gaussian output gradient,
measuring the RMS of the output and of every ``.grad`` (as ``test_rules.py``). No rule is
compared with itself; tolerances ``|log2(pred/measured)|`` as there."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import unit_scaling.functional as U
from torch import Tensor

from unitscale_core.model.layers import apply_rope, softcap
from unitscale_core.positional import rope_angles
from unitscale_core.scaling import rules as R

from .test_rules import CLOSED, NUMERIC, check, gauss, rms


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


# =========================================================================== RMSNorm


@pytest.mark.parametrize("d", [6, 64])
@pytest.mark.parametrize("sx", [1e-3, 0.5, 4.0])
@pytest.mark.parametrize("unit", [False, True])
def test_rms_norm_rule(d: int, sx: float, unit: bool) -> None:
    """Output, input gradient (one direction removed: ``(d − 1)/(d − 2)``, not LayerNorm's
    ``(d − 2)/(d − 3)``) and gain gradient of RMSNorm; unit: ``unit_scaling``'s rms_norm."""
    torch.manual_seed(1)
    rows, eps, sg, trials = 1024, 1e-5, 0.7, 512 // d  # gains pooled over trials
    x = gauss(trials, rows, d, scale=sx)
    w = torch.ones(trials, 1, d, dtype=torch.float64, requires_grad=True)
    # unit_scaling's rms_norm scales the gain gradient by √(d/numel): one trial's rows
    y = torch.cat([U.rms_norm(x[i], (d,), w[i, 0], eps) for i in range(trials)]) if unit \
        else _rms_norm(x, w, eps)
    gy = torch.randn_like(y) * sg
    y.backward(gy)
    alpha = R.unit_layer_norm_grad_param_scale(d, rows) if unit else 1.0
    r = R.rms_norm_rule(sx, sg, d=d, b_rows=rows, eps=eps, grad_param_factor=alpha)
    check("rms_norm.out", r.output, rms(y), CLOSED)
    check("rms_norm.grad_x", r.grad_input, rms(x.grad), CLOSED)
    check("rms_norm.grad_w", r.grad_weight, rms(w.grad), CLOSED)
    assert r.grad_bias == 0.0
    assert R.norm_backward_factor(sx**2, d, "rmsnorm", eps) * sg == pytest.approx(r.grad_input)


def test_rms_norm_keeps_what_tokens_share_and_layer_norm_removes_it() -> None:
    """A component every token shares along the all-ones direction: RMSNorm keeps it
    (it counts in ``ms``), LayerNorm removes it — what the predictor's flat part does."""
    torch.manual_seed(2)
    d, rows = 64, 2048
    own = torch.randn(rows, d, dtype=torch.float64)
    flat = 2.0 * torch.ones(1, d, dtype=torch.float64)
    x = own + flat
    y_rms = _rms_norm(x, torch.ones(d, dtype=torch.float64), 1e-5)
    y_ln = F.layer_norm(x, (d,))
    # the output's mean over features: the flat part's share 2/√(1 + 4) survives RMSNorm
    assert y_rms.mean(-1).mean().item() == pytest.approx(2 / math.sqrt(5), rel=0.02)
    assert abs(y_ln.mean(-1).mean().item()) < 1e-9


# =========================================================================== GQA


def _attention(q: Tensor, k: Tensor, v: Tensor, group: int) -> Tensor:
    """``softmax(q kᵀ/√D) v`` with each K/V head repeated to its ``group`` query heads."""
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
    return p @ v


@pytest.mark.parametrize("n_heads,kv_heads", [(8, 2), (8, 1), (4, 4)])
def test_gqa_kv_grad_gain(n_heads: int, kv_heads: int) -> None:
    """K/V gradients of grouped-query attention are ``√G`` those of one query head per
    K/V head (the same op with ``G = 1``); the output and the query gradient are not."""
    torch.manual_seed(3)
    b, t, dh = 8, 32, 16
    group = n_heads // kv_heads

    def run(heads: int, kv: int, g: int):
        q, k, v = gauss(b, heads, t, dh), gauss(b, kv, t, dh), gauss(b, kv, t, dh)
        y = _attention(q, k, v, g)
        y.backward(torch.randn_like(y))
        return rms(y), rms(q.grad), rms(k.grad), rms(v.grad)

    mha = run(n_heads, n_heads, 1)
    gqa = run(n_heads, kv_heads, group)
    gain = R.gqa_kv_grad_gain(n_heads, kv_heads)
    check("gqa.out", mha[0], gqa[0], CLOSED)
    check("gqa.grad_q", mha[1], gqa[1], CLOSED)
    check("gqa.grad_k", mha[2] * gain, gqa[2], CLOSED)
    check("gqa.grad_v", mha[3] * gain, gqa[3], CLOSED)
    with pytest.raises(ValueError, match="divide"):
        R.gqa_kv_grad_gain(8, 3)


# =========================================================================== GeGLU


@pytest.mark.parametrize("su,sg", [(1.0, 1.0), (0.2, 3.0), (2.0, 0.05)])
def test_geglu_rule(su: float, sg: float) -> None:
    torch.manual_seed(4)
    up, gate = gauss(512, 256, scale=su), gauss(512, 256, scale=sg)
    y = F.gelu(gate, approximate="tanh") * up
    gy = torch.randn_like(y) * 0.5
    y.backward(gy)
    r = R.geglu_rule(su, sg, 0.5)
    check("geglu.out", r.output, rms(y), NUMERIC)
    check("geglu.grad_up", r.grad_up, rms(up.grad), NUMERIC)
    check("geglu.grad_gate", r.grad_gate, rms(gate.grad), NUMERIC)
    # tanh GELU and erf GELU differ (by < 1e-3 at any input): the moments are its own
    assert R.activation_moments("gelu_tanh", sg) != R.activation_moments("gelu", sg)


# =========================================================================== parallel block


@pytest.mark.parametrize("unit", [False, True])
def test_parallel_residual_rule(unit: bool) -> None:
    """``add(f, add(a, x, τ_a), τ_f)`` with the model's own ops (standard sums; unit
    ``unit_scaling``'s residual_add, whose backward leaves gradients unscaled: the split
    scales them, so here the gradients reaching each operand are the add's weights)."""
    torch.manual_seed(5)
    x, a, f = gauss(256, 128, scale=1.3), gauss(256, 128, scale=0.4), gauss(256, 128, scale=2.0)
    ta, tf = 0.6, 0.5
    if unit:
        wra, wsa = R.residual_weights(ta)
        wrf, wsf = R.residual_weights(tf)
        y = wrf * f + wsf * (wra * a + wsa * x)
    else:
        y = x + a + f
    gy = torch.randn_like(y)
    y.backward(gy)
    out, gx, ga, gf = R.parallel_residual_rule(1.3, 0.4, 2.0, 1.0, tau_attn=ta, tau_ffn=tf,
                                               unit=unit)
    check("parallel.out", out, rms(y), CLOSED)
    check("parallel.grad_x", gx, rms(x.grad), CLOSED)
    check("parallel.grad_attn", ga, rms(a.grad), CLOSED)
    check("parallel.grad_ffn", gf, rms(f.grad), CLOSED)


# =========================================================================== partial rotary


@pytest.mark.parametrize("rotary_dims", [8, 16, 32])
def test_partial_rope_correlation_matches_the_models_rotation(rotary_dims: int) -> None:
    """A vector every position shares, rotated by the model's own ``apply_rope`` with only
    the first ``R`` dims of each head turned: its mean product between positions ``Δ``
    apart over random draws is ``ρ(Δ)``."""
    torch.manual_seed(6)
    t, dh, base = 64, 32, 10000.0
    shared = torch.randn(4096, 1, 1, dh, dtype=torch.float64).expand(-1, 1, t, dh)
    theta = torch.from_numpy(rope_angles(t, rotary_dims, base))
    out = apply_rope(shared, theta.cos(), theta.sin())[:, 0]  # (n, t, D)
    gram = torch.einsum("nid,njd->ij", out, out) / (out.shape[0] * dh)
    for delta in (1, 5, 20, 63):
        meas = torch.diagonal(gram, delta).mean().item()
        pred = float(R.partial_rope_correlation(delta, dh, rotary_dims, base))
        assert pred == pytest.approx(meas, abs=0.03), (delta, pred, meas)
    assert R.partial_rope_correlation(0, dh, rotary_dims) == pytest.approx(1.0)


# =========================================================================== soft caps


@pytest.mark.parametrize("sz", [0.5, 20.0, 50.0, 200.0])
def test_softcap_rule(sz: float) -> None:
    """``c·tanh(z/c)`` with the model's own ``softcap`` op (c = 30, Gemma 2's logits)."""
    torch.manual_seed(7)
    z = gauss(2048, 64, scale=sz)
    y = softcap(z, 30.0)
    gy = torch.randn_like(y) * 0.3
    y.backward(gy)
    r = R.softcap_rule(sz, 0.3, cap=30.0)
    check("softcap.out", r.output, rms(y), NUMERIC)
    check("softcap.grad", r.grad_input, rms(z.grad), NUMERIC)
    assert R.softcap_rule(sz, 0.3, cap=None) == (sz, 0.3)


# =========================================================================== QK-norm rows


@pytest.mark.parametrize("mode", ["head", "all_heads"])
def test_qk_norm_gain_gradient_sums_over_heads(mode: str) -> None:
    """Per-head QK-norm (one ``d_head`` gain shared by the heads) sums its gain gradient over
    ``rows × heads``; over the whole projection, over ``rows``."""
    torch.manual_seed(8)
    rows, heads, dh, trials = 512, 4, 16, 32  # gains pooled over trials
    q = gauss(trials, rows, heads, dh)
    width = dh if mode == "head" else heads * dh
    w = torch.ones(trials, 1, 1, width, dtype=torch.float64, requires_grad=True)
    y = _rms_norm(q, w, 1e-6) if mode == "head" else _rms_norm(q.flatten(2), w[:, 0], 1e-6)
    y.backward(torch.randn_like(y))
    n = R.qk_norm_gain_grad_rows(mode, heads, rows)
    pred = R.rms_norm_rule(1.0, 1.0, d=width, b_rows=n, eps=1e-6).grad_weight
    check("qk_norm.grad_w", pred, rms(w.grad), CLOSED)


# =========================================================================== MoE


@pytest.mark.parametrize("n_experts,top_k", [(8, 2), (4, 1), (8, 4)])
def test_moe_rule(n_experts: int, top_k: int) -> None:
    """Mixtral's routing (softmax over the experts, top-k, renormalised over the k) of
    independent unit experts' outputs: the output's RMS and the rows each expert sees."""
    torch.manual_seed(9)
    rows, d, sr = 8192, 32, 0.3
    logits = torch.randn(rows, n_experts, dtype=torch.float64) * sr
    p = torch.softmax(logits, -1)
    top, idx = p.topk(top_k, -1)
    top = top / top.sum(-1, keepdim=True)
    experts = torch.randn(n_experts, rows, d, dtype=torch.float64)
    y = torch.zeros(rows, d, dtype=torch.float64)
    for slot in range(top_k):
        y += top[:, slot, None] * experts[idx[:, slot], torch.arange(rows)]
    out, p2, per_expert = R.moe_rule(1.0, n_experts=n_experts, top_k=top_k, rows=rows,
                                     router_rms=sr)
    check("moe.out", out, rms(y), CLOSED)
    check("moe.p2", p2, top.pow(2).mean().item(), CLOSED)
    seen = np.bincount(idx.flatten().numpy(), minlength=n_experts)
    check("moe.rows", per_expert, float(seen.mean()), CLOSED)
    assert seen.min() > 0.8 * per_expert


@pytest.mark.parametrize("sz,cap", [(1.0, 30.0), (11.0, 30.0), (4.0, 2.0)])
def test_softcap_softmax_moments_against_sampled_rows(sz: float, cap: float) -> None:
    """``E Σp²``, ``E Σp²s²``, ``E logsumexp`` and the Stein ``lean`` ``E Σ ∂(p s)/∂z`` of
    soft-capped logits over 512 keys against sampled rows, and the cross-entropy gradient
    they give against autograd."""
    torch.manual_seed(10)
    v, rows = 512, 4000
    z = gauss(rows, v, scale=sz)
    y = softcap(z, cap)
    p = torch.softmax(y, -1)
    s = 1 - torch.tanh(z / cap) ** 2
    mom = R.softcap_softmax_moments(sz, v, cap)
    check("softcap_softmax.sum_p2", mom.sum_p2, p.pow(2).sum(-1).mean().item(), NUMERIC)
    check("softcap_softmax.sum_p2_s2", mom.sum_p2_slope2,
          (p * s).pow(2).sum(-1).mean().item(), NUMERIC)
    lse = torch.logsumexp(y, -1).mean().item()
    assert mom.logsumexp == pytest.approx(lse, rel=0.02, abs=0.02)
    # Stein: E Σ_j p_j s_j z_j / σ² (what a head's backward keeps along its input)
    # (measured within 0.004 log2; one logit's slope, (1 − EΣp²)·√E s², was +1.3 (σ 11) and
    # +4.0 (σ 4, cap 2) log2 high: the softmax's weight sits where the slope is small)
    lean = (p * s * z).sum(-1).mean().item() / sz**2
    check("softcap_softmax.lean", mom.lean, lean, NUMERIC)
    assert abs(math.log2(mom.lean / lean)) < 0.02, (mom.lean, lean)
    targets = torch.randint(0, v, (rows,))
    F.cross_entropy(y, targets, reduction="sum").backward()
    per_row = mom.slope2 * (1 - 2 / v) + mom.sum_p2_slope2
    check("softcap_softmax.grad", math.sqrt(per_row / v), rms(z.grad), NUMERIC)


def test_unit_geglu_scale_is_the_models_and_unit_both_ways() -> None:
    """The torch model's unit GeGLU (``UnitOps.geglu``) on unit Gaussians against
    :func:`rules.geglu_rule` at :func:`rules.unit_geglu_scale`."""
    from unitscale_core.model.ops import make_ops

    torch.manual_seed(11)
    up, gate = gauss(512, 256), gauss(512, 256)
    y = make_ops("unit").geglu(up, gate)
    y.backward(torch.randn_like(y))
    r = R.geglu_rule(1.0, 1.0, 1.0, scale=R.unit_geglu_scale())
    check("unit_geglu.out", r.output, rms(y), NUMERIC)
    check("unit_geglu.grad_up", r.grad_up, rms(up.grad), NUMERIC)
    check("unit_geglu.grad_gate", r.grad_gate, rms(gate.grad), NUMERIC)
    assert r.output == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("n_experts,top_k,sr", [(8, 2, 1.0), (4, 2, 0.5), (8, 1, 1.0)])
def test_routed_weight_moments_against_the_router_gradient(n_experts, top_k, sr) -> None:
    """``m = E Σp̂²`` and the router logits' gradient ``r·A`` of Mixtral's softmax → top-k →
    renormalise, through autograd (fresh torch draws, not the rule's own)."""
    torch.manual_seed(12)
    rows, d = 8192, 16
    z = gauss(rows, n_experts, scale=sr)
    p = torch.softmax(z, -1)
    top, idx = p.topk(top_k, -1)
    top = top / top.sum(-1, keepdim=True)
    y = torch.randn(rows, top_k, d, dtype=torch.float64)
    g = torch.randn(rows, d, dtype=torch.float64)
    ((top[..., None] * y).sum(1) * g).sum().backward()
    m, r = R.routed_weight_moments(n_experts, top_k, sr)
    check("moe.m", m, top.pow(2).sum(-1).mean().item(), CLOSED)
    meas = z.grad.pow(2).sum(-1).mean().item() / d  # A = d (unit g, y)
    if top_k == 1:
        assert r == 0.0 and meas < 1e-20
    else:
        check("moe.router_grad", r, meas, CLOSED)
