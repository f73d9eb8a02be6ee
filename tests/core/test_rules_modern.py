"""Issue 21's per-op rules (``unitscale_core.scaling.rules``, "modern blocks") against the
torch op itself run on Gaussian draws: forward and backward with a Gaussian output gradient,
measuring the RMS of the output and of every ``.grad`` (as ``test_rules.py``). No rule is
compared with itself; tolerances ``|log2(pred/measured)|`` as there."""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import unit_scaling.functional as U
from torch import Tensor

from unitscale_core.model.layers import EncoderLayer, apply_rope, softcap
from unitscale_core.model.ops import make_ops
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


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
@pytest.mark.parametrize("n_branches", [2, 3])
def test_parallel_residual_rule(param: str, n_branches: int) -> None:
    """The model's own parallel block (``EncoderLayer._parallel`` with the parametrization's
    ops: ``unit_scaling``'s residual_split/residual_add under unit and u-μP) on Gaussian
    draws, with linear branches ``b_i = h W_i`` of different gains (two: attention and
    feed-forward; three: a decoder's self-, cross-attention and feed-forward) and τ's that
    give each branch its own weight (so one put on the wrong branch shows): the output's RMS,
    the gradient each branch's output receives, and the input's gradient, from the measured
    RMS of each branch's output and of the gradient it returns at its input."""
    torch.manual_seed(5)
    rows, d = 4096, 64
    taus = [1.0, 0.3, 0.6][:n_branches]  # (u-μP's depth τ's give each branch about one c)
    gains = [0.4, 2.0, 0.9][:n_branches]
    x = gauss(rows, d, scale=1.3)
    ws = [torch.randn(d, d, dtype=torch.float64) * (gain / math.sqrt(d)) for gain in gains]
    outs, ins = [], []

    def branch(w: Tensor):
        def f(h: Tensor) -> Tensor:
            h.retain_grad()
            ins.append(h)
            b = h @ w
            b.retain_grad()
            outs.append(b)
            return b
        return f

    layer = SimpleNamespace(ops=make_ops(param), dropout=0.0, training=False)
    # the norm: a fresh tensor per branch (standard's split returns x itself)
    y = EncoderLayer._parallel(layer, x, [(lambda t: t * 1.0, branch(w), tau)
                                          for w, tau in zip(ws, taus)])
    gy = torch.randn_like(y) * 0.7
    y.backward(gy)
    assert len(outs) == len(ins) == n_branches  # (in forward order: the adds')
    r = R.parallel_residual_rule(1.3, [rms(b) for b in outs], 0.7, [rms(h.grad) for h in ins],
                                 taus=taus, unit=param != "standard")
    check("parallel.out", r.output, rms(y), CLOSED)
    for i, b in enumerate(outs):
        check(f"parallel.grad_branch_{i}", r.grad_output, rms(b.grad), CLOSED)
    check("parallel.grad_x", r.grad_x, rms(x.grad), CLOSED)
    if param == "standard":
        assert r.skip_weight == 1.0 and r.branch_weights == (1.0,) * n_branches
    else:  # unit RMS out of unit parts: the weights' squares sum to one
        assert r.skip_weight**2 + sum(c * c for c in r.branch_weights) == pytest.approx(1.0)


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


# =========================================================================== MoE end to end

def _route(z: Tensor, k: int) -> Tensor:
    """The torch model's routing (``layers.MoE.route``) as a dense (rows, E) weight matrix:
    softmax, top-k, renormalised, 0 for the experts not chosen."""
    top, idx = torch.softmax(z, -1).topk(k, -1)
    return torch.zeros_like(z).scatter(-1, idx, top / top.sum(-1, keepdim=True))


@pytest.mark.parametrize("n_experts,top_k,sr", [(4, 2, 1.0), (8, 1, 0.58), (8, 2, 0.58),
                                                (16, 4, 1.0)])
def test_routed_pair_overlap_against_sampled_pairs(n_experts, top_k, sr) -> None:
    """``Q(ρ) = E Σ_e p̂_ie p̂_je`` of two tokens whose router logits have correlation ρ,
    against fresh torch draws routed as the model routes; the ends ``Q(1) = m``,
    ``Q(0) = 1/E``."""
    torch.manual_seed(13)
    rows = 1 << 17
    a = torch.randn(rows, n_experts, dtype=torch.float64)
    pa = _route(a * sr, top_k)
    m = R.routed_weight_moments(n_experts, top_k, sr)[0]
    for rho in (-0.6, 0.0, 0.35, 0.75, 0.97, 1.0):  # (between the rule's table points)
        z = (rho * a + math.sqrt(1 - rho * rho) * torch.randn_like(a)) * sr
        meas = (pa * _route(z, top_k)).sum(-1).mean().item()
        got = R.routed_pair_overlap(n_experts, top_k, sr, rho)
        if rho < 0:  # rare coincidences, a few % of m: sampling noise, on the scale of m
            assert abs(got - meas) < 0.02 * m
        else:
            check("moe.overlap", got, meas, 0.05)  # the rule's 2¹⁵ draws: ±2% at 1/E
    assert R.routed_pair_overlap(n_experts, top_k, sr, 0.0) == pytest.approx(
        1 / n_experts, rel=0.03)
    assert R.routed_pair_overlap(n_experts, top_k, sr, 1.0) == pytest.approx(m, rel=0.01)
    got = R.routed_pair_overlap(n_experts, top_k, sr, np.array([[0.0, 1.0], [0.5, 2.0]]))
    assert got.shape == (2, 2) and got[1, 1] == got[0, 1]  # clipped to ρ ≤ 1


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
@pytest.mark.parametrize("n_experts,top_k,sr", [(4, 2, 1.0), (8, 2, 0.58), (8, 1, 1.0)])
def test_moe_combine_rule_against_the_models_combine(param, n_experts, top_k, sr) -> None:
    """The torch model's routing and ``ops.moe_combine`` (the parametrization's) on Gaussian
    router logits, expert outputs and output gradient, through autograd: the output, the
    gradient reaching each routed output, and the router logits' gradient."""
    from unitscale_core.model.ops import make_ops, routed_weight_square

    torch.manual_seed(14)
    rows, d, so, sg = 8192, 32, 0.8, 1.3
    ops = make_ops(param)
    z = gauss(rows, n_experts, scale=sr)
    top, idx = torch.softmax(z, -1).topk(top_k, -1)
    weights = top / top.sum(-1, keepdim=True)
    outputs = gauss(rows, top_k, d, scale=so)
    y = ops.moe_combine(weights, outputs, n_experts)
    y.backward(torch.randn_like(y) * sg)
    scales = (1.0, 1.0, 1.0) if param == "standard" else R.unit_moe_combine_scales(
        n_experts, top_k, d, "gmean" if param == "unit" else "to_output_scale")
    if param != "standard":  # the rule's m against the model's own draw
        assert R.routed_weight_moments(n_experts, top_k, 1.0)[0] == pytest.approx(
            routed_weight_square(n_experts, top_k), rel=0.01)
    r = R.moe_combine_rule(so, sg, n_experts=n_experts, top_k=top_k, d=d, router_rms=sr,
                           scales=scales)
    check("moe_combine.out", r.output, rms(y), 0.03)
    check("moe_combine.grad_expert", r.grad_expert, rms(outputs.grad), 0.03)
    if top_k == 1:  # p̂ = 1 whatever the logits
        assert r.grad_logits == 0.0 and rms(z.grad) < 1e-12
    else:
        check("moe_combine.grad_logits", r.grad_logits, rms(z.grad), 0.05)


@pytest.mark.parametrize("n_experts,top_k", [(4, 2), (8, 1)])
@pytest.mark.parametrize("shared", [0.0, 0.6])
def test_an_experts_weight_gradient_sums_its_own_rows(n_experts, top_k, shared) -> None:
    """An expert's weight gradient ``Σ_{i chose e} p̂_ie g_i x_iᵀ`` over rows that share a
    part (variance ``s`` of x's and of g's, one vector per batch) — what the predictor's
    ``moe_bwd`` sums: per token ``m/E`` of ``σ_g² σ_x²``, per pair ``Q(ρ)/E`` of
    ``C^g C^x`` (ρ = s, :func:`rules.routed_pair_overlap`), rather than a mask of π on
    both."""
    torch.manual_seed(15)
    trials, rows, d = 48, 256, 64
    w_r = torch.randn(d, n_experts, dtype=torch.float64) / math.sqrt(d)  # unit logits
    sq = []
    for _ in range(trials):
        def draw():
            return (math.sqrt(shared) * torch.randn(1, d, dtype=torch.float64)
                    + math.sqrt(1 - shared) * torch.randn(rows, d, dtype=torch.float64))
        x, g = draw(), draw()
        p = _route(x @ w_r, top_k)
        for e in range(n_experts):
            sq.append(((p[:, e:e + 1] * g).T @ x).pow(2).mean().item())
    meas = math.sqrt(sum(sq) / len(sq))
    m = R.routed_weight_moments(n_experts, top_k, 1.0)[0]
    q = R.routed_pair_overlap(n_experts, top_k, 1.0, shared)
    pred = math.sqrt(m / n_experts * rows + q / n_experts * rows * (rows - 1) * shared ** 2)
    check("moe.expert_wgrad", pred, meas, 0.08)


@pytest.mark.parametrize("n_experts,top_k,rho", [(8, 2, 0.85), (4, 2, 0.5), (8, 1, 0.7),
                                                 (8, 2, 0.0)])
@pytest.mark.parametrize("unit", [False, True])
def test_each_experts_rows_against_sampled_batches(n_experts, top_k, rho, unit) -> None:
    """Batches of 4 sequences × 48 tokens whose router inputs share ``ρ`` per sequence
    (one vector per sequence, as a causal stack's tokens do), routed as the model routes,
    expert by expert: the geometric mean over experts of the RMS of ``p̂·g`` on each
    expert's rows (:func:`rules.routed_row_gain`) and of its weight gradient
    ``α_e Σ_{i∈e} p̂_i g_i x_iᵀ`` (``α_e = n_e^-½`` under unit scaling, 1 otherwise;
    :func:`rules.routed_weight_grad_gain` on the expectation from
    :func:`rules.routed_pair_overlap`), ``g`` sharing ``ρ_g = 0.5`` per sequence. Fresh torch
    draws and router weights; an expert no row chose is left out, as measurement does."""
    torch.manual_seed(16)
    b, t, d, rho_g, trials = 4, 48, 256, 0.5, 24
    rows = b * t
    row_logs, w_logs = [], []
    for _ in range(trials):
        w_r = torch.randn(d, n_experts, dtype=torch.float64) / math.sqrt(d)  # unit logits

        def draw(share: float) -> Tensor:
            return (math.sqrt(share) * torch.randn(b, 1, d, dtype=torch.float64)
                    + math.sqrt(1 - share) * torch.randn(b, t, d, dtype=torch.float64)
                    ).reshape(rows, d)
        x, g = draw(rho), draw(rho_g)
        p = _route(x @ w_r, top_k)
        for e in range(n_experts):
            chosen = p[:, e] > 0
            n = int(chosen.sum())
            if not n:
                continue
            row_logs.append(0.5 * math.log(p[chosen, e].pow(2).mean().item()))
            wg = (p[:, e:e + 1] * g).T @ x / (math.sqrt(n) if unit else 1.0)
            w_logs.append(0.5 * math.log(wg.pow(2).mean().item()))
    m = R.routed_weight_moments(n_experts, top_k, 1.0)[0]
    loads = R.routed_loads(n_experts, top_k, 1.0, b, t, rho, 0.0)
    check("moe.row_gain", R.routed_row_gain(loads, m, top_k) * math.sqrt(m / top_k),
          math.exp(float(np.mean(row_logs))), 0.03)
    own = rows * m / n_experts
    pair = R.routed_pair_overlap(n_experts, top_k, 1.0, rho) / n_experts * b * t * (t - 1) \
        * rho * rho_g
    if unit:  # α² = 1/(mean rows per expert) at the mean routing
        own, pair = own / float(loads.n.mean()), pair / float(loads.n.mean())
    gain = R.routed_weight_grad_gain(loads, own, pair, 0.0, unit)
    check("moe.weight_grad_gain", math.sqrt(own + pair) * gain,
          math.exp(float(np.mean(w_logs))), 0.08)
