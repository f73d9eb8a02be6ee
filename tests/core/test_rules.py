"""Per-op variance rules (``unitscale_core.scaling.rules``) against direct torch measurements.

Every rule is checked against the op itself run in torch on Gaussian inputs — ``torch.nn`` /
``torch.nn.functional`` for the standard parametrization, the ``unit_scaling.functional`` op
for unit / u-μP — forward and backward with a Gaussian output gradient, measuring the RMS of
the output and of every ``.grad``. A prediction must satisfy ``|log2(pred / measured)| ≤ 0.1``
(closed forms) or ``≤ 0.2`` (numerical rules), over several sizes and input scales including
non-unit ones. No rule is ever compared with itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import unit_scaling.functional as U
from torch import Tensor, nn
from unit_scaling.core.functional import scale_elementwise, transformer_residual_scaling_rule

from unitscale_core.scaling import rules as R

CLOSED = 0.1  # |log2| tolerance for closed-form rules (7 %)
NUMERIC = 0.2  # |log2| tolerance for numerical rules (15 %)

#: Worst |log2(pred/measured)| seen per rule in this session (for reports; not asserted).
WORST: dict[str, float] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """These tensors are small: one intra-op thread is as fast and does not spin-wait when
    the machine is busy (two threads on a loaded 2-core box made this file ~5× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rms(t: Tensor) -> float:
    return t.detach().double().pow(2).mean().sqrt().item()


def check(rule: str, pred: float, meas: float, tol: float) -> None:
    assert pred > 0 and meas > 0, (rule, pred, meas)
    err = abs(math.log2(pred / meas))
    WORST[rule] = max(WORST.get(rule, 0.0), err)
    assert err <= tol, f"{rule}: predicted {pred:.5g}, measured {meas:.5g}, |log2| = {err:.3f}"


def gauss(*shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> Tensor:
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_()


# =========================================================================== linear / matmul


LINEAR_SIZES = [(64, 256, 512), (512, 96, 256)]  # (fan_in, fan_out, rows)


def _pooled(run: Callable[[], tuple[Tensor, ...]], trials: int) -> list[float]:
    """RMS of each tensor ``run`` returns, pooled over independent trials (bias gradients
    have only ``fan_out`` entries, too few for a 7 % test on their own)."""
    outs = [run() for _ in range(trials)]
    return [rms(torch.cat([o[i].reshape(-1) for o in outs])) for i in range(len(outs[0]))]


@pytest.mark.parametrize("fan_in,fan_out,rows", LINEAR_SIZES)
@pytest.mark.parametrize("sx,sg", [(0.3, 1.0), (3.0, 0.3)])
def test_linear_standard_torch_default_init(
    fan_in: int, fan_out: int, rows: int, sx: float, sg: float
) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(fan_in, fan_out).double()

    def run() -> tuple[Tensor, ...]:
        lin.zero_grad()
        x = gauss(rows, fan_in, scale=sx)
        y = lin(x)
        y.backward(torch.randn_like(y) * sg)
        return y, x.grad, lin.weight.grad.clone(), lin.bias.grad.clone()

    y, gx, gw, gb = _pooled(run, 8)
    pred = R.linear_rule(
        sx, R.torch_default_linear_weight_rms(fan_in), sg, fan_in=fan_in, fan_out=fan_out,
        b_rows=rows, rms_bias=R.torch_default_linear_bias_rms(fan_in),
    )
    check("linear.output", pred.output, y, CLOSED)
    check("linear.grad_input", pred.grad_input, gx, CLOSED)
    check("linear.grad_weight", pred.grad_weight, gw, CLOSED)
    check("linear.grad_bias", pred.grad_bias, gb, CLOSED)


def test_default_inits_match_torch_modules() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(300, 700)
    check("init.linear_weight", R.torch_default_linear_weight_rms(300), rms(lin.weight), CLOSED)
    check("init.linear_bias", R.torch_default_linear_bias_rms(300), rms(lin.bias), CLOSED)
    check("init.embedding", R.torch_default_embedding_rms(), rms(nn.Embedding(500, 64).weight),
          CLOSED)
    ln = nn.LayerNorm(32)
    assert R.torch_default_layer_norm_rms() == (rms(ln.weight), rms(ln.bias))


@pytest.mark.parametrize("fan_in,fan_out,rows,sx,sw", [(64, 256, 512, 0.3, 1.0),
                                                     (512, 96, 256, 3.0, 0.5)])
@pytest.mark.parametrize("constraint", [None, "gmean", "to_output_scale", "readout"])
def test_linear_unit_scaled(
    fan_in: int, fan_out: int, rows: int, constraint: str | None, sx: float, sw: float
) -> None:
    torch.manual_seed(1)
    sg = 2.0

    def run() -> tuple[Tensor, ...]:
        x = gauss(rows, fan_in, scale=sx)
        w = gauss(fan_out, fan_in, scale=sw)
        b = torch.zeros(fan_out, dtype=torch.float64, requires_grad=True)
        if constraint == "readout":
            y = U.linear_readout(x, w, b)
        else:
            y = U.linear(x, w, b, constraint=constraint)
        y.backward(torch.randn_like(y) * sg)
        return y, x.grad, w.grad, b.grad

    y, gx, gw, gb = _pooled(run, 8)
    if constraint == "readout":
        factors = R.unit_linear_readout_scales(fan_in, fan_out, rows)
    else:
        factors = R.unit_linear_scales(fan_in, fan_out, rows, constraint)
    pred = R.linear_rule(sx, sw, sg, fan_in=fan_in, fan_out=fan_out, b_rows=rows,
                         factors=factors)
    check("linear.output", pred.output, y, CLOSED)
    check("linear.grad_input", pred.grad_input, gx, CLOSED)
    check("linear.grad_weight", pred.grad_weight, gw, CLOSED)
    check("linear.grad_bias", pred.grad_bias, gb, CLOSED)


def test_unit_linear_scales_gmean_and_scale_power() -> None:
    # gmean ties output and grad-input to sqrt(fan_in^-½ · fan_out^-½); a custom power
    # changes each exponent. Measured through the library op, not re-derived.
    torch.manual_seed(2)
    x, w = gauss(128, 64), gauss(256, 64)
    y = U.linear(x, w, None, constraint="gmean", scale_power=(1.0, 0.25, 1.0))
    y.backward(torch.randn_like(y))
    f = R.unit_linear_scales(64, 256, 128, "gmean", (1.0, 0.25, 1.0))
    pred = R.linear_rule(1.0, 1.0, 1.0, fan_in=64, fan_out=256, b_rows=128, factors=f)
    check("linear.output", pred.output, rms(y), CLOSED)
    check("linear.grad_input", pred.grad_input, rms(x.grad), CLOSED)
    check("linear.grad_weight", pred.grad_weight, rms(w.grad), CLOSED)


@pytest.mark.parametrize("constraint", [None, "to_output_scale"])
@pytest.mark.parametrize("sa,sb", [(0.3, 3.0), (1.0, 1.0)])
def test_matmul(constraint: str | None, sa: float, sb: float) -> None:
    torch.manual_seed(3)
    m, k, n = 96, 200, 48
    a, b = gauss(m, k, scale=sa), gauss(k, n, scale=sb)
    for unit in (False, True):
        a.grad = b.grad = None
        y = U.matmul(a, b, constraint=constraint) if unit else a @ b
        y.backward(torch.randn_like(y) * 0.5)
        factors = R.unit_matmul_scales(m, k, n, constraint) if unit else None
        pred = R.matmul_rule(sa, sb, 0.5, left_rows=m, inner=k, right_cols=n, factors=factors)
        check("matmul.output", pred.output, rms(y), CLOSED)
        check("matmul.grad_left", pred.grad_left, rms(a.grad), CLOSED)
        check("matmul.grad_right", pred.grad_right, rms(b.grad), CLOSED)


# =========================================================================== embedding


@pytest.mark.parametrize("vocab,n_tokens", [(100, 2048), (5000, 256)])
@pytest.mark.parametrize("ids", ["uniform", "zipf"])
@pytest.mark.parametrize("unit", [False, True])
def test_embedding(vocab: int, n_tokens: int, ids: str, unit: bool) -> None:
    torch.manual_seed(4)
    d, sg = 64, 0.3
    if ids == "uniform":
        idx = torch.randint(0, vocab, (8, n_tokens // 8))
    else:  # skewed ids: the weight-grad RMS does not depend on the id distribution
        p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
        idx = torch.multinomial(p / p.sum(), n_tokens, replacement=True).view(8, -1)
    w = gauss(vocab, d, scale=1.0)
    y = U.embedding(idx, w) if unit else F.embedding(idx, w)
    y.backward(torch.randn_like(y) * sg)
    factor = R.unit_embedding_grad_scale(vocab, n_tokens) if unit else 1.0
    pred = R.embedding_rule(1.0, sg, vocab=vocab, n_tokens=n_tokens, grad_weight_factor=factor)
    check("embedding.output", pred.output, rms(y), CLOSED)
    check("embedding.grad_weight", pred.grad_weight, rms(w.grad), CLOSED)


# =========================================================================== layer norm


@pytest.mark.parametrize("d", [16, 256])
@pytest.mark.parametrize("sx", [0.3, 3.0, 0.002])
@pytest.mark.parametrize("unit", [False, True])
def test_layer_norm(d: int, sx: float, unit: bool) -> None:
    torch.manual_seed(5)
    rows, sg = 256, 0.7
    trials = 2048 // d  # pool gain/bias gradients of independent trials: d entries are few
    ys, gxs, gws, gbs = [], [], [], []
    for _ in range(trials):
        x = gauss(rows, d, scale=sx)
        weight = torch.ones(d, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(d, dtype=torch.float64, requires_grad=True)
        if unit:
            y = U.layer_norm(x, (d,), weight, bias)
        else:
            y = F.layer_norm(x, (d,), weight, bias, eps=1e-5)
        y.backward(torch.randn_like(y) * sg)
        ys.append(y)
        gxs.append(x.grad)
        gws.append(weight.grad)
        gbs.append(bias.grad)
    factor = R.unit_layer_norm_grad_param_scale(d, rows) if unit else 1.0
    pred = R.layer_norm_rule(sx, sg, d=d, b_rows=rows, grad_param_factor=factor)
    check("layer_norm.output", pred.output, rms(torch.cat(ys)), CLOSED)
    check("layer_norm.grad_input", pred.grad_input, rms(torch.cat(gxs)), CLOSED)
    check("layer_norm.grad_weight", pred.grad_weight, rms(torch.cat(gws)), CLOSED)
    check("layer_norm.grad_bias", pred.grad_bias, rms(torch.cat(gbs)), CLOSED)


def test_layer_norm_random_gain_and_bias() -> None:
    torch.manual_seed(6)
    d, rows = 128, 256
    x = gauss(rows, d, scale=2.0)
    weight = gauss(d, scale=1.5)
    bias = gauss(d, scale=0.5)
    y = F.layer_norm(x, (d,), weight, bias)
    y.backward(torch.randn_like(y))
    # the rule's inputs are the RMS of this particular gain and bias (128 values each)
    pred = R.layer_norm_rule(2.0, 1.0, d=d, b_rows=rows, rms_weight=rms(weight),
                             rms_bias=rms(bias))
    check("layer_norm.output", pred.output, rms(y), CLOSED)
    check("layer_norm.grad_input", pred.grad_input, rms(x.grad), CLOSED)


# =========================================================================== nonlinearities

ACT_SIGMAS = [0.3, 1.0, 3.0, 12.0]
TORCH_ACT: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu,
                                                    "silu": F.silu}


@pytest.mark.parametrize("kind", ["gelu", "relu", "silu"])
@pytest.mark.parametrize("sx", ACT_SIGMAS)
def test_activation_standard(kind: R.Activation, sx: float) -> None:
    torch.manual_seed(7)
    x = gauss(100_000, scale=sx)
    y = TORCH_ACT[kind](x)
    y.backward(torch.randn_like(y) * 0.4)
    pred = R.activation_rule(kind, sx, 0.4)
    tol = CLOSED if kind == "relu" else NUMERIC
    check(f"{kind}.output", pred.output, rms(y), tol)
    check(f"{kind}.grad_input", pred.grad_input, rms(x.grad), tol)


@pytest.mark.parametrize("kind", ["gelu", "silu"])
@pytest.mark.parametrize("mult", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("constraint", ["to_output_scale", None])
@pytest.mark.parametrize("sx", [0.3, 3.0])
def test_activation_unit_scaled(kind: str, mult: float, constraint: str | None,
                                sx: float) -> None:
    torch.manual_seed(8)
    x = gauss(50_000, scale=sx)
    op = U.gelu if kind == "gelu" else U.silu
    y = op(x, mult=mult, constraint=constraint)
    y.backward(torch.randn_like(y) * 2.0)
    scales = R.unit_gelu_scales if kind == "gelu" else R.unit_silu_scales
    pred = R.activation_rule(kind, sx, 2.0, mult=mult, factors=scales(mult, constraint))
    check(f"unit_{kind}.output", pred.output, rms(y), NUMERIC)
    check(f"unit_{kind}.grad_input", pred.grad_input, rms(x.grad), NUMERIC)


def test_unit_relu_scales_give_unit_rms() -> None:
    # ReLU made unit-scaled with the library's own machinery and our factors
    torch.manual_seed(9)
    f = R.unit_relu_scales()
    op = scale_elementwise(F.relu, f.output, f.grad_input, constraint=None)
    for sx in (1.0, 0.3):
        x = gauss(100_000, scale=sx)
        y = op(x)
        y.backward(torch.randn_like(y))
        if sx == 1.0:
            check("unit_relu.output", 1.0, rms(y), CLOSED)
            check("unit_relu.grad_input", 1.0, rms(x.grad), CLOSED)
        pred = R.activation_rule("relu", sx, 1.0, factors=f)
        check("unit_relu.output", pred.output, rms(y), CLOSED)
        check("unit_relu.grad_input", pred.grad_input, rms(x.grad), CLOSED)


@pytest.mark.parametrize("su,sg_", [(1.0, 1.0), (0.3, 3.0), (3.0, 0.3)])
@pytest.mark.parametrize("mult", [None, 1.0, 2.0])
def test_swiglu(su: float, sg_: float, mult: float | None) -> None:
    torch.manual_seed(10)
    u, g = gauss(100_000, scale=su), gauss(100_000, scale=sg_)
    if mult is None:  # standard: silu(gate) * up
        y = F.silu(g) * u
        pred = R.swiglu_rule(su, sg_, 0.5)
    else:
        y = U.silu_glu(u, g, mult=mult)
        pred = R.swiglu_rule(su, sg_, 0.5, mult=mult, scale=R.unit_silu_glu_scale(mult))
    y.backward(torch.randn_like(y) * 0.5)
    check("swiglu.output", pred.output, rms(y), NUMERIC)
    check("swiglu.grad_up", pred.grad_up, rms(u.grad), NUMERIC)
    check("swiglu.grad_gate", pred.grad_gate, rms(g.grad), NUMERIC)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("unit", [False, True])
def test_dropout(p: float, unit: bool) -> None:
    torch.manual_seed(11)
    x = gauss(100_000, scale=3.0)
    y = U.dropout(x, p, training=True) if unit else F.dropout(x, p, training=True)
    y.backward(torch.randn_like(y) * 0.3)
    pred = R.dropout_rule(3.0, 0.3, p=p, unit=unit)
    check("dropout.output", pred.output, rms(y), CLOSED)
    check("dropout.grad_input", pred.grad_input, rms(x.grad), CLOSED)


# =========================================================================== residual


@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("c", [0.5, 2.0])
@pytest.mark.parametrize("unit", [False, True])
def test_residual_split_add(tau: float, c: float, unit: bool) -> None:
    torch.manual_seed(12)
    d, rows, sx, sg = 256, 512, 1.5, 0.8
    x = gauss(rows, d, scale=sx)
    w = torch.randn(d, d, dtype=torch.float64) * (c / math.sqrt(d))  # branch gain ≈ c
    if unit:
        res, skip = U.residual_split(x, tau)
        branch = res @ w
        branch.retain_grad()
        y = U.residual_add(branch, skip, tau)
    else:
        branch = x @ w
        branch.retain_grad()
        y = branch + x
    y.backward(torch.randn_like(y) * sg)
    add = R.residual_add_rule(c * sx, sx, sg, tau=tau, unit=unit)
    check("residual_add.output", add.output, rms(y), CLOSED)
    check("residual_add.grad_residual", add.grad_residual, rms(branch.grad), CLOSED)
    grad_x = R.residual_split_rule(c * add.grad_residual, add.grad_skip, tau=tau, unit=unit)
    check("residual_split.grad_input", grad_x, rms(x.grad), CLOSED)


@pytest.mark.parametrize("mult,ratio", [(1.0, 1.0), (0.5, 2.0), (3.0, 0.25)])
@pytest.mark.parametrize("n_layers", [1, 4, 96])
def test_umup_residual_tau_matches_library(mult: float, ratio: float, n_layers: int) -> None:
    rule = transformer_residual_scaling_rule(mult, ratio)
    for index in range(2 * n_layers):
        ours = R.umup_residual_tau(index, 2 * n_layers, mult, ratio)
        assert ours == pytest.approx(rule(index, 2 * n_layers), rel=1e-12)


def test_umup_taus_balance_branch_contributions() -> None:
    # With every branch output unit-RMS and independent, u-μP's taus make the embedding, all
    # attention and all MLP branches contribute equal variance to the final residual stream.
    torch.manual_seed(13)
    layers, d, rows = 6, 64, 2048
    x = torch.randn(rows, d, dtype=torch.float64)
    emb = x.clone()
    parts = {"attn": torch.zeros_like(x), "mlp": torch.zeros_like(x)}
    for index in range(2 * layers):
        tau = R.umup_residual_tau(index, 2 * layers)
        w_r, w_s = R.residual_weights(tau)
        branch = torch.randn(rows, d, dtype=torch.float64)
        kind = "attn" if index % 2 == 0 else "mlp"
        x = U.residual_add(branch, x, tau)
        emb, parts["attn"], parts["mlp"] = (w_s * emb, w_s * parts["attn"], w_s * parts["mlp"])
        parts[kind] = parts[kind] + w_r * branch
    for part in parts.values():
        check("umup_residual_tau.balance", rms(part), rms(emb), CLOSED)
    check("umup_residual_tau.balance", R.add_independent_rms(1, 1, 1) * rms(emb), rms(x), CLOSED)


# =========================================================================== softmax


@pytest.mark.parametrize("n,rows", [(16, 8192), (512, 512)])
@pytest.mark.parametrize("sx", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("mult", [None, 1.0, 2.0])
def test_softmax(n: int, rows: int, sx: float, mult: float | None) -> None:
    torch.manual_seed(14)
    x = gauss(rows, n, scale=sx)
    if mult is None:
        y = F.softmax(x, dim=-1)
        pred = R.softmax_rule(sx, 1.5, dim_size=n)
    else:
        y = U.softmax(x, dim=-1, mult=mult)
        pred = R.softmax_rule(sx, 1.5, dim_size=n, mult=mult,
                              factors=R.unit_softmax_scales(n, mult))
    y.backward(torch.randn_like(y) * 1.5)
    check("softmax.output", pred.output, rms(y), NUMERIC)
    check("softmax.grad_input", pred.grad_input, rms(x.grad), NUMERIC)


@pytest.mark.parametrize("sigma", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("n", [2, 7, 300])
def test_softmax_moments_against_direct_sampling(sigma: float, n: int) -> None:
    rng = np.random.default_rng(15)
    rows = min(max(1_000_000 // n, 20_000), 50_000)
    z = rng.standard_normal((rows, n)) * sigma
    zm = z.max(axis=1, keepdims=True)
    e = np.exp(z - zm)
    p = e / e.sum(axis=1, keepdims=True)
    s2 = (p * p).sum(axis=1)
    mom = R.softmax_moments(sigma, n)
    # the quadrature is exact; the tolerance is for the sampling noise of heavy-tailed rows
    check("softmax_moments.sum_p2", mom.sum_p2, float(s2.mean()), CLOSED)
    check("softmax_moments.sum_p2_sq", mom.sum_p2_sq, float((s2 * s2).mean()), CLOSED)
    if n > 1:
        check("softmax_moments.sum_p3", mom.sum_p3, float((p**3).sum(axis=1).mean()), CLOSED)
        lse = zm[:, 0] + np.log(e.sum(axis=1))
        assert mom.logsumexp == pytest.approx(float(lse.mean()), abs=0.02 * (1 + sigma))


# =========================================================================== attention


def _attention(q: Tensor, k: Tensor, v: Tensor, scale: float, allowed: Tensor | None,
               bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    z = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        z = z + bias
    zm = z if allowed is None else z.masked_fill(~allowed, float("-inf"))
    zm.retain_grad()
    p = zm.softmax(-1)
    p.retain_grad()
    return z, zm, p, p @ v


# (S, d_head, σ_z, heads). Near-uniform attention makes every output row ≈ the mean of V, so
# only heads × d_head values are independent: small-σ_z cases need many heads.
ATTN_CASES = [
    (64, 16, 0.5, 96), (256, 64, 2.0, 16), (128, 32, 4.0, 16), (128, 16, 3.0, 32),
    (512, 64, 8.0, 4), (1024, 16, 2.0, 4),
]


@pytest.mark.parametrize("s,d,sz,heads", ATTN_CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_standard(s: int, d: int, sz: float, heads: int, causal: bool) -> None:
    torch.manual_seed(16)
    sq, sk, sv, sg = math.sqrt(2 * sz), math.sqrt(sz / 2), 0.5, 2.0  # σ_z = σ_q σ_k
    q, k, v = (gauss(heads, s, d, scale=x, dtype=torch.float32) for x in (sq, sk, sv))
    allowed = torch.ones(s, s, dtype=torch.bool).tril() if causal else None
    z, zm, p, y = _attention(q, k, v, 1 / math.sqrt(d), allowed)
    y.backward(torch.randn_like(y) * sg)
    pred = R.attention_rule(sq, sk, sv, sg, seq_len=s, head_dim=d, causal=causal)
    check("attention.logits", pred.logits, rms(z), CLOSED)
    check("attention.grad_probs", pred.grad_probs, rms(p.grad), CLOSED)
    for name, meas in (("probs", p), ("output", y), ("grad_logits", zm.grad),
                       ("grad_q", q.grad), ("grad_k", k.grad), ("grad_v", v.grad)):
        check(f"attention.{name}", getattr(pred, name), rms(meas), NUMERIC)
    check("softmax_probs_rms", R.softmax_probs_rms(sz, s, causal, d), rms(p), NUMERIC)


@pytest.mark.parametrize("s,d", [(128, 64), (512, 32)])
@pytest.mark.parametrize("mult", [1.0, 8.0, 32.0])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_unit_scaled_umup(s: int, d: int, mult: float, causal: bool) -> None:
    torch.manual_seed(17)
    heads, sq, sk, sv, sg = 8192 // s, 1.0, 1.3, 0.7, 1.0  # see ATTN_CASES on heads
    q, k, v = (gauss(2, heads // 2, s, d, scale=x, dtype=torch.float32) for x in (sq, sk, sv))
    y = U.scaled_dot_product_attention(q, k, v, is_causal=causal, mult=mult)
    y.backward(torch.randn_like(y) * sg)
    scale = R.unit_sdpa_scale(s, d, causal, mult)
    pred = R.attention_rule(sq, sk, sv, sg, seq_len=s, head_dim=d, causal=causal,
                            logit_scale=mult / d, scale=scale)
    for name, meas in (("output", y), ("grad_q", q.grad), ("grad_k", k.grad),
                       ("grad_v", v.grad)):
        check(f"unit_attention.{name}", getattr(pred, name), rms(meas), NUMERIC)


def test_attention_cross_lengths() -> None:
    torch.manual_seed(18)
    t, s, d, heads, sz = 64, 256, 32, 16, 1.5
    q, k, v = gauss(heads, t, d, scale=sz), gauss(heads, s, d), gauss(heads, s, d)
    z, zm, p, y = _attention(q, k, v, 1 / math.sqrt(d), None)
    y.backward(torch.randn_like(y))
    pred = R.attention_rule(sz, 1.0, 1.0, 1.0, seq_len=s, q_len=t, head_dim=d)
    for name, meas in (("probs", p), ("output", y), ("grad_q", q.grad), ("grad_k", k.grad),
                       ("grad_v", v.grad)):
        check(f"attention.{name}", getattr(pred, name), rms(meas), NUMERIC)


@pytest.mark.parametrize("window", [8, 64])
def test_attention_local_window_counts(window: int) -> None:
    torch.manual_seed(19)
    s, d, heads, sz = 256, 32, 16, 2.0
    i = torch.arange(s)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    q, k, v = gauss(heads, s, d, scale=math.sqrt(sz)), gauss(heads, s, d,
                                                             scale=math.sqrt(sz)), gauss(
        heads, s, d)
    z, zm, p, y = _attention(q, k, v, 1 / math.sqrt(d), allowed)
    y.backward(torch.randn_like(y))
    mom = R.softmax_moments_for_counts(sz, allowed.sum(-1).numpy(), head_dim=d)
    pred = R.attention_rule(math.sqrt(sz), math.sqrt(sz), 1.0, 1.0, seq_len=s, head_dim=d,
                            moments=mom)
    for name, meas in (("probs", p), ("output", y), ("grad_logits", zm.grad),
                       ("grad_q", q.grad), ("grad_k", k.grad), ("grad_v", v.grad)):
        check(f"attention_counts.{name}", getattr(pred, name), rms(meas), NUMERIC)


@pytest.mark.parametrize("kind,strength", [("alibi", 1 / 256), ("alibi", 1 / 16),
                                           ("alibi", 0.5), ("t5", 1.0), ("t5", 8.0)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_fixed_bias(kind: str, strength: float, causal: bool) -> None:
    torch.manual_seed(20)
    s, d, heads, sz = 256, 32, 8, 1.0
    i = torch.arange(s)
    dist = (i[:, None] - i[None, :]).abs().double()
    if kind == "alibi":
        bias = -strength * dist
    else:  # T5-like: a random value per log-spaced distance bucket
        bias = (torch.randn(16, dtype=torch.float64) * strength)[
            torch.clamp(torch.log2(dist + 1).long(), max=15)]
    allowed = torch.ones(s, s, dtype=torch.bool).tril() if causal else None
    q, k, v = (gauss(heads, s, d, dtype=torch.float32) for _ in range(3))
    z, zm, p, y = _attention(q, k, v, 1 / math.sqrt(d), allowed, bias.float())
    y.backward(torch.randn_like(y))
    mom = R.softmax_moments_with_bias(sz, bias.numpy(),
                                      None if allowed is None else allowed.numpy(), head_dim=d)
    pred = R.attention_rule(1.0, 1.0, 1.0, 1.0, seq_len=s, head_dim=d, causal=causal,
                            moments=mom)
    for name, meas in (("probs", p), ("output", y), ("grad_logits", zm.grad),
                       ("grad_q", q.grad), ("grad_k", k.grad), ("grad_v", v.grad)):
        check(f"attention_bias.{name}", getattr(pred, name), rms(meas), NUMERIC)
    # the biased logits' RMS is the independent sum of both parts
    bias_part = R.bias_rms(bias.numpy(), None if allowed is None else allowed.numpy())
    meas_z = rms(z[:, allowed]) if allowed is not None else rms(z)
    check("bias_rms", R.add_independent_rms(pred.logits, bias_part), meas_z, CLOSED)


def test_bias_row_std_matches_torch() -> None:
    torch.manual_seed(21)
    b = torch.randn(4, 32, 48, dtype=torch.float64) * 2 + torch.randn(4, 32, 1,
                                                                    dtype=torch.float64) * 5
    want = b.var(dim=-1, unbiased=False).mean().sqrt().item()
    assert R.bias_row_std(b.numpy()) == pytest.approx(want, rel=1e-12)
    allowed = torch.rand(32, 48) > 0.3
    rows = [b[h, r][allowed[r]] for h in range(4) for r in range(32) if allowed[r].any()]
    want = math.sqrt(sum(x.var(unbiased=False).item() for x in rows) / len(rows))
    assert R.bias_row_std(b.numpy(), allowed.numpy()) == pytest.approx(want, rel=1e-12)


def test_unit_sdpa_scale_causal_length_one_fails_like_library() -> None:
    q = torch.randn(1, 1, 1, 8)
    with pytest.raises(ValueError):
        U.scaled_dot_product_attention(q, q, q, is_causal=True)
    with pytest.raises(ValueError):
        R.unit_sdpa_scale(1, 8, causal=True)
    assert R.unit_sdpa_scale(1, 8, causal=False) == pytest.approx(1.0)


# =========================================================================== cross-entropy


@pytest.mark.parametrize("vocab,n", [(100, 1024), (4096, 256)])
@pytest.mark.parametrize("sz", [0.3, 3.0])
@pytest.mark.parametrize("mult", [None, 1.0, 2.0])
def test_cross_entropy(vocab: int, n: int, sz: float, mult: float | None) -> None:
    torch.manual_seed(22)
    z = gauss(n, vocab, scale=sz, dtype=torch.float32)
    target = torch.randint(0, vocab, (n,))
    if mult is None:
        loss = F.cross_entropy(z, target)
        pred = R.cross_entropy_rule(sz, vocab=vocab, n_tokens=n)
    else:
        loss = U.cross_entropy(z, target, mult=mult)
        pred = R.cross_entropy_rule(sz, vocab=vocab, n_tokens=n, unit=True, mult=mult)
    loss.backward()
    # the loss is an expectation (not an RMS); its sampling noise is ~1.5 % here
    check("cross_entropy.loss", pred.loss, loss.item(), CLOSED)
    check("cross_entropy.grad_logits", pred.grad_logits, rms(z.grad), NUMERIC)


# =========================================================================== positions


@pytest.mark.parametrize("d", [64, 10, 7])
def test_sinusoidal_rms(d: int) -> None:
    n = 300
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    i2 = torch.arange(0, d, 2, dtype=torch.float64)
    angle = pos * 10000.0 ** (-i2 / d)
    pe = torch.zeros(n, d, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d // 2])
    pred = R.sinusoidal_rms(d, n)
    assert pred == pytest.approx(rms(pe), rel=1e-9)
    if d % 2 == 0:  # every position separately
        assert torch.allclose(pe.pow(2).mean(-1).sqrt(), torch.full((n,), pred,
                                                                     dtype=torch.float64))
    torch.manual_seed(23)
    emb = torch.randn(n, d, dtype=torch.float64) * 0.5
    check("add_independent_rms", R.add_independent_rms(0.5, pred), rms(emb + pe), CLOSED)


# =========================================================================== caches & misc


def test_numeric_rules_are_cached() -> None:
    R.clear_caches()
    first = R.softmax_moments(1.2345, 300, True)
    info = R.cache_info()
    assert info["softmax_moments"].misses == 1 and info["softmax_moments"].hits == 0
    kernel_misses = info["softmax_kernel"].misses
    again = R.softmax_moments(1.2346, 300, True)  # same key to 3 significant digits
    assert again is first
    info = R.cache_info()
    assert info["softmax_moments"].hits == 1 and info["softmax_moments"].misses == 1
    assert info["softmax_kernel"].misses == kernel_misses  # nothing recomputed
    a = R.activation_moments("gelu", 0.77)
    b = R.activation_moments("gelu", 0.77)
    assert a == b and R.cache_info()["activation"].hits >= 1
    assert R.cache_info()["activation"].misses == 1


def test_apply_constraint_matches_library() -> None:
    from unit_scaling.constraints import apply_constraint

    for name in (None, "", "gmean", "hmean", "amean", "to_output_scale"):
        assert R.apply_constraint(name, 0.5, 0.125, 2.0) == pytest.approx(
            apply_constraint(name, 0.5, 0.125, 2.0))
    assert R.apply_constraint("to_grad_input_scale", 0.5, 0.125) == pytest.approx(
        apply_constraint("to_grad_input_scale", 0.5, 0.125))
    for name in ("to_left_grad_scale", "to_right_grad_scale"):
        assert R.apply_constraint(name, 0.5, 0.125, 2.0) == pytest.approx(
            apply_constraint(name, 0.5, 0.125, 2.0))
    with pytest.raises(ValueError):
        R.apply_constraint("nope", 1.0)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        R.activation_moments("tanh", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        R.softmax_moments(-1.0, 4)
    with pytest.raises(ValueError):
        R.attention_rule(1, 1, 1, 1, seq_len=8, q_len=4, head_dim=8, causal=True)
    with pytest.raises(ValueError):
        R.dropout_rule(1.0, 1.0, p=1.0)
    with pytest.raises(ValueError):
        R.sinusoidal_rms(7)
