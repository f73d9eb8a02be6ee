"""Issue 21's attention and feed-forward features in the torch model (GQA/MQA, decoupled
head_dim, qkv_bias, geglu, MoE, parallel residual under unit scaling), each checked against an
independent reference: transformers' eager attention and MoE modules with our weights copied
in, torch's ``scaled_dot_product_attention(enable_gqa=True)``, and the sizing module's counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unitscale_core import positional
from unitscale_core.config import ModelConfig
from unitscale_core.measure import measure
from unitscale_core.model import build_model
from unitscale_core.model.layers import Attention, FeedForward, MoE, PositionContext
from unitscale_core.model.ops import GEGLU_SCALE, make_ops, routed_weight_square
from unitscale_core.sizing import count_parameters

PARAMS = ("standard", "unit", "umup")
ARCHS = ("encoder", "decoder", "encoder-decoder")


def tiny(**kw) -> ModelConfig:
    base = dict(architecture="decoder", d_model=32, n_heads=4, d_ff=64, n_layers=2,
                vocab_size=50, max_len=16, seq_len=8, batch_size=2, positional="rope",
                dropout=0.0)
    return ModelConfig(**{**base, **kw})


def ids(cfg: ModelConfig, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len),
                         generator=torch.Generator().manual_seed(seed))


def run(model, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    return model(x, x) if cfg.architecture == "encoder-decoder" else model(x)


def causal_ctx(t: int, rope: tuple | None = None) -> PositionContext:
    return PositionContext(allowed=torch.ones(t, t, dtype=torch.bool).tril(), causal=True,
                           rope=rope)


def hf_attention(kind: str, cfg: ModelConfig):
    """transformers' Llama (bias on q, k, v and o) or Qwen 2 (bias on q, k, v only) attention,
    eager, for ``cfg``'s sizes."""
    if kind == "llama":
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaAttention as cls
        hf_cfg = LlamaConfig(attention_bias=cfg.bias)
    else:
        from transformers import Qwen2Config
        from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention as cls
        hf_cfg = Qwen2Config()
    hf_cfg.hidden_size = cfg.d_model
    hf_cfg.num_attention_heads = cfg.n_heads
    hf_cfg.num_key_value_heads = cfg.kv_heads
    hf_cfg.head_dim = cfg.head_size
    hf_cfg.attention_dropout = 0.0
    hf_cfg._attn_implementation = "eager"
    return cls(hf_cfg, layer_idx=0).eval()


def rotate_half_rows(w: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """Our interleaved rope layout (pairs 2i, 2i+1) → HF's rotate_half (pairs i, i + D/2):
    HF row i of a head is our row 2i, HF row i + D/2 our row 2i + 1."""
    perm = torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2)))
    return w.view(heads, d, *w.shape[1:])[:, perm].reshape(w.shape)


def copy_into_hf(ours: Attention, hf, cfg: ModelConfig, rope: bool) -> None:
    d = cfg.head_size
    with torch.no_grad():
        for a, b, heads in (("q", "q_proj", cfg.n_heads), ("k", "k_proj", cfg.kv_heads),
                            ("v", "v_proj", cfg.kv_heads), ("o", "o_proj", None)):
            src, dst = getattr(ours, a), getattr(hf, b)
            w, bias = src.weight, src.bias
            if rope and a in "qk":
                w = rotate_half_rows(w, heads, d)
                bias = None if bias is None else rotate_half_rows(bias, heads, d)
            dst.weight.copy_(w)
            assert (dst.bias is None) == (bias is None), (a, "bias presence differs")
            if bias is not None:
                dst.bias.copy_(bias)


@pytest.mark.parametrize("kind,kw", [
    ("llama", dict(n_kv_heads=2)),                               # GQA, group 2
    ("llama", dict(n_kv_heads=1, head_dim=16)),                  # MQA, n_heads·D = 64 ≠ 32
    ("llama", dict(n_kv_heads=4, head_dim=4, bias=False)),       # MHA, narrow heads
    ("qwen2", dict(n_kv_heads=2, bias=False, qkv_bias=True)),    # q/k/v biases only
])
@pytest.mark.parametrize("rope", [False, True])
def test_attention_equals_transformers_eager(kind, kw, rope):
    """Our standard Attention with GQA / head_dim / qkv_bias gives transformers' eager output
    and probabilities (one map per query head) within 1e-5, with rope (q/k rows permuted into
    HF's rotate_half layout) and without (cos 1, sin 0 for HF)."""
    cfg = tiny(**kw)
    torch.manual_seed(0)
    ours = Attention(cfg, make_ops("standard")).eval()
    with torch.no_grad():  # non-zero biases (the standard init is U(±1/√fan_in) already)
        for m in (ours.q, ours.k, ours.v, ours.o):
            if m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
    hf = hf_attention(kind, cfg)
    copy_into_hf(ours, hf, cfg, rope)
    b, t, d = 2, 7, cfg.head_size
    x = torch.randn(b, t, cfg.d_model)
    if rope:
        theta = torch.from_numpy(positional.rope_angles(t, d)).float()  # (T, D/2)
        ctx = causal_ctx(t, (theta.cos(), theta.sin()))
        emb = torch.cat((theta, theta), dim=-1)[None].expand(b, t, d)
        pos_emb = (emb.cos(), emb.sin())
    else:
        ctx = causal_ctx(t)
        pos_emb = (torch.ones(b, t, d), torch.zeros(b, t, d))
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None].expand(b, 1, t, t)
    ours.capture = True
    with torch.no_grad():
        y = ours(x, ctx)
        y_hf, p_hf = hf(x, position_embeddings=pos_emb, attention_mask=mask)
    assert ours.probs.shape == (b, cfg.n_heads, t, t)
    torch.testing.assert_close(ours.probs, p_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv,head_dim", [(2, None), (1, 12), (4, 6)])
def test_attention_equals_sdpa_with_enable_gqa(kv, head_dim):
    """Self- and cross-attention against ``F.scaled_dot_product_attention(enable_gqa=True)``
    on our own projections (standard parametrization, no positions)."""
    cfg = tiny(n_kv_heads=kv, head_dim=head_dim, positional="none")
    torch.manual_seed(3)
    att = Attention(cfg, make_ops("standard")).eval()
    x, mem = torch.randn(2, 5, cfg.d_model), torch.randn(2, 9, cfg.d_model)
    d = cfg.head_size

    def heads(z, n):
        return z.view(z.shape[0], z.shape[1], n, d).transpose(1, 2)

    for src, ctx, causal in ((x, causal_ctx(5), True), (mem, PositionContext(), False)):
        with torch.no_grad():
            got = att(x, ctx, None if src is x else src)
            ref = F.scaled_dot_product_attention(
                heads(att.q(x), cfg.n_heads), heads(att.k(src), kv), heads(att.v(src), kv),
                is_causal=causal, enable_gqa=True)
            ref = att.o(ref.transpose(1, 2).flatten(2))
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _tile_kv(gqa: torch.nn.Module, mha: torch.nn.Module, cfg: ModelConfig) -> None:
    """Give ``mha`` (n_kv_heads = n_heads) ``gqa``'s weights, each k/v head's rows repeated
    for its group of query heads: the same function, computed without the repeat."""
    g, d = cfg.n_heads // cfg.kv_heads, cfg.head_size
    src = dict(gqa.named_parameters())
    with torch.no_grad():
        for name, p in mha.named_parameters():
            w = src[name]
            if name.endswith((".attn.k.weight", ".attn.v.weight", ".attn.k.bias",
                              ".attn.v.bias")):
                w = w.view(cfg.kv_heads, 1, d, *w.shape[1:]).expand(
                    cfg.kv_heads, g, d, *w.shape[1:]).reshape(p.shape)
            p.copy_(w)


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("kv", [2, 1])
def test_gqa_is_unit_scaled_as_multi_head_attention_with_tied_kv(param, kv):
    """The unit-scaling claim of ``ops.repeat_kv``: a GQA model and the multi-head model with
    each k/v head's weights repeated for its group compute the same logits AND the same
    gradient at the token embeddings, in every parametrization (unit: the projection's gmean
    ``(C·H_kv·D)^-¼`` times the repeat's ``g^-¼`` is the multi-head ``(C·H·D)^-¼``; u-μP: the
    repeat is an exact copy both ways). Without the repeat's ``g^-¼`` the unit logits differ."""
    cfg = tiny(parametrization=param, n_kv_heads=kv, head_dim=16, qkv_bias=True)
    gqa = build_model(cfg)
    mha = build_model(cfg.replace(n_kv_heads=None))
    _tile_kv(gqa, mha, cfg)
    x = ids(cfg)
    outs = []
    for m in (gqa, mha):
        m.zero_grad()
        logits = m(x)
        m.loss(logits, ids(cfg, 2)).backward()
        outs.append((logits.detach(), m.tok_emb.weight.grad.clone(),
                     m.layers[0].attn.q.weight.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def _rms(cfg: ModelConfig, seeds: int = 3) -> dict[tuple[str, str], float]:
    """Geometric mean over seeds of each measured tensor's RMS."""
    acc: dict[tuple[str, str], list[float]] = {}
    for s in range(seeds):
        for r in measure(cfg.replace(seed=s)):
            acc.setdefault((r.name, r.kind), []).append(r.rms)
    return {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in acc.items() if min(v) > 0}


def test_gqa_keeps_unit_scale_under_unit():
    """Measured under ``unit`` (d 128, 8 heads, T 32, 3 seeds): with 8 → 2 kv heads the
    logits, the q gradients and the attention input's gradient stay within 25% of multi-head
    attention's, and the k/v projections' output and gradient grow by at most ``g^¼·1.25``
    (the gmean of a narrower linear: ``(C / H_kv·D)^¼`` forward)."""
    base = tiny(parametrization="unit", d_model=128, n_heads=8, d_ff=256, seq_len=32, max_len=32,
                batch_size=4, vocab_size=128)
    mha, gqa = _rms(base), _rms(base.replace(n_kv_heads=2))
    g = 4
    for key in (("layers.0.attn.scores", "activation"), ("layers.0.attn.q", "grad_activation"),
                ("layers.0.norm1", "grad_activation"), ("layers.1.norm1", "grad_activation")):
        assert abs(math.log2(gqa[key] / mha[key])) < math.log2(1.25), (key, gqa[key], mha[key])
    for key in (("layers.0.attn.k", "activation"), ("layers.0.attn.k", "grad_activation"),
                ("layers.0.attn.v", "grad_activation")):
        assert gqa[key] / mha[key] < g ** 0.25 * 1.25, (key, gqa[key], mha[key])
        assert 0.25 < gqa[key] < 4, key


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("param", PARAMS)
def test_gqa_head_dim_qkv_bias_build_count_and_train(arch, param):
    """Every architecture and parametrization builds GQA + decoupled head_dim + q/k/v biases
    without other biases; parameter count equals sizing's; the module shapes are the
    contract's; a backward pass gives finite gradients on every parameter."""
    cfg = tiny(architecture=arch, parametrization=param, n_kv_heads=2, head_dim=12, bias=False,
               qkv_bias=True)
    model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(cfg)["total"]
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    assert attn.q.weight.shape == (48, 32) and attn.q.bias.shape == (48,)
    assert attn.k.weight.shape == (24, 32) and attn.v.bias.shape == (24,)
    assert attn.o.weight.shape == (32, 48) and attn.o.bias is None
    x = ids(cfg)
    model.loss(run(model, cfg, x), x).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# -- GeGLU ---------------------------------------------------------------------------------------

def test_geglu_equals_gemma2_mlp():
    """Standard GeGLU FeedForward equals transformers' Gemma2MLP (gelu_pytorch_tanh gate)."""
    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2MLP

    cfg = tiny(activation="geglu", bias=False)
    torch.manual_seed(0)
    ffn = FeedForward(cfg, make_ops("standard"))
    hf = Gemma2MLP(Gemma2Config(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                                hidden_activation="gelu_pytorch_tanh"))
    with torch.no_grad():
        hf.gate_proj.weight.copy_(ffn.gate.weight)
        hf.up_proj.weight.copy_(ffn.up.weight)
        hf.down_proj.weight.copy_(ffn.down.weight)
        x = torch.randn(3, 5, cfg.d_model)
        torch.testing.assert_close(ffn(x), hf(x), atol=1e-6, rtol=1e-5)


def test_geglu_scale_is_the_gaussian_moment():
    """GEGLU_SCALE = 1/√E[gelu_tanh(g)²], g ~ N(0, 1), by Gauss–Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(120)
    g = torch.tensor(nodes)
    m2 = float((torch.tensor(weights / weights.sum()) * F.gelu(g, approximate="tanh") ** 2)
               .sum())
    assert GEGLU_SCALE == pytest.approx(m2 ** -0.5, rel=1e-6)


@pytest.mark.parametrize("param", ("unit", "umup"))
def test_unit_geglu_is_unit_both_ways(param):
    """On unit Gaussian up/gate and a unit output gradient the unit GeGLU op's output and both
    input gradients have RMS 1 within 3% (sampled, 2²⁰ draws), where the plain op's output
    is 0.65."""
    ops = make_ops(param)
    gen = torch.Generator().manual_seed(0)
    up, gate, delta = (torch.randn(1 << 20, generator=gen) for _ in range(3))
    up.requires_grad_(True)
    gate.requires_grad_(True)
    out = ops.geglu(up, gate)
    (out * delta).sum().backward()
    for t in (out.detach(), up.grad, gate.grad):
        assert float(t.pow(2).mean().sqrt()) == pytest.approx(1.0, abs=0.04)
    plain = make_ops("standard").geglu(up.detach(), gate.detach())
    assert float(plain.pow(2).mean().sqrt()) == pytest.approx(0.652, abs=0.01)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("param", PARAMS)
def test_geglu_builds_counts_and_trains(arch, param):
    cfg = tiny(architecture=arch, parametrization=param, activation="geglu")
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"]
    ffn = next(m for m in model.modules() if isinstance(m, FeedForward))
    assert ffn.gate.weight.shape == ffn.up.weight.shape == (cfg.d_ff, cfg.d_model)
    x = ids(cfg)
    model.loss(run(model, cfg, x), x).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# -- mixture of experts --------------------------------------------------------------------------

def moe_cfg(**kw) -> ModelConfig:
    return tiny(**{**dict(n_experts=4, experts_per_token=2, activation="swiglu", bias=False),
                   **kw})


@pytest.mark.parametrize("k", [1, 2, 4])
def test_moe_equals_transformers_mixtral_block(k):
    """Standard MoE equals transformers' MixtralSparseMoeBlock with our weights copied in
    (router → gate.weight, [gate; up] → gate_up_proj[e], down → down_proj[e]) within 1e-5,
    and so does its input gradient."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = moe_cfg(experts_per_token=k)
    torch.manual_seed(0)
    moe = MoE(cfg, make_ops("standard"))
    hf = MixtralSparseMoeBlock(MixtralConfig(
        hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_local_experts=cfg.n_experts,
        num_experts_per_tok=k, hidden_act="silu", router_jitter_noise=0.0)).eval()
    with torch.no_grad():
        hf.gate.weight.copy_(moe.router.weight)
        for e, ex in enumerate(moe.experts):
            hf.experts.gate_up_proj[e].copy_(torch.cat((ex.gate.weight, ex.up.weight)))
            hf.experts.down_proj[e].copy_(ex.down.weight)
    x = torch.randn(3, 7, cfg.d_model, requires_grad=True)
    x_hf = x.detach().clone().requires_grad_(True)
    y, y_hf = moe(x), hf(x_hf)
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_hf * g).sum().backward()
    torch.testing.assert_close(x.grad, x_hf.grad, atol=1e-5, rtol=1e-5)


def test_routed_weight_square_against_quadrature():
    """E[Σ p̂²] for 2 experts, both kept: p = σ(d), d = z₁ − z₂ ~ N(0, 2), so
    E[σ(d)² + σ(−d)²] by Gauss–Hermite; one expert per token: exactly 1."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    s = 1 / (1 + np.exp(-math.sqrt(2) * nodes))
    exact = float((weights / weights.sum() * (s ** 2 + (1 - s) ** 2)).sum())
    assert routed_weight_square(2, 2) == pytest.approx(exact, rel=0.01)
    assert routed_weight_square(8, 1) == 1.0
    assert 1 / 2 < routed_weight_square(8, 2) < 1


def _ffn_output_rms(cfg: ModelConfig) -> float:
    """RMS of layer 0's feed-forward sub-block output (ffn or moe), 3 seeds."""
    out = []
    for seed in range(3):
        model = build_model(cfg.replace(seed=seed))
        layer = model.layers[0]
        block = getattr(layer, layer.ffn_name)
        got: list[torch.Tensor] = []
        h = block.register_forward_hook(lambda _m, _i, o, got=got: got.append(o.detach()))
        with torch.no_grad():
            model(ids(cfg, seed))
        h.remove()
        out.append(float(got[0].pow(2).mean().sqrt()))
    return math.exp(sum(map(math.log, out)) / len(out))


@pytest.mark.parametrize("param", ("unit", "umup"))
@pytest.mark.parametrize("experts,k", [(4, 2), (8, 2), (8, 4)])
def test_moe_output_keeps_the_dense_feed_forwards_scale(param, experts, k):
    """The MoE output (p̂-weighted sum of k experts) has the RMS ``ops.moe_combine`` plans:
    the dense feed-forward output's under u-μP (forward scale ``m^-½``), ``k^¼`` times it
    under unit (gmean of ``m^-½`` and the gradient's ``(m/k)^-½``), within 10% (d 64, T 32,
    3 seeds); unscaled it would be ``√m`` (0.76 for 4 experts, top 2) times the dense one."""
    base = moe_cfg(parametrization=param, d_model=64, d_ff=128, seq_len=32, max_len=32,
                   batch_size=4, n_experts=1, experts_per_token=1)
    dense = _ffn_output_rms(base)
    moe = _ffn_output_rms(base.replace(n_experts=experts, experts_per_token=k))
    planned = k ** 0.25 if param == "unit" else 1.0
    assert abs(math.log(moe / dense / planned)) < math.log(1.10), (moe, dense, planned)
    assert math.sqrt(routed_weight_square(experts, k)) < 0.87


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("activation", ("gelu", "geglu"))
def test_moe_builds_counts_and_trains(arch, param, activation):
    """Module names of the contract (``moe.router``, ``moe.experts.{e}.up/gate/down``, no
    ``ffn``), parameter count == sizing's total, finite gradients on the router and every
    expert that got a token."""
    cfg = moe_cfg(architecture=arch, parametrization=param, activation=activation, bias=True)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"]
    names = {n for n, _ in model.named_modules()}
    pre = "decoder.layers.0" if arch == "encoder-decoder" else "layers.0"
    assert {f"{pre}.moe.router", f"{pre}.moe.experts.3.up", f"{pre}.moe.experts.3.down"} <= names
    assert (f"{pre}.moe.experts.0.gate" in names) == (activation == "geglu")
    assert f"{pre}.ffn" not in names and model.get_submodule(f"{pre}.moe.router").bias is None
    x = ids(cfg)
    model.loss(run(model, cfg, x), x).backward()
    router = model.get_submodule(f"{pre}.moe.router").weight
    assert router.grad is not None and torch.isfinite(router.grad).all()
    assert float(router.grad.abs().sum()) > 0  # top-2: the renormalised weights carry a grad
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_moe_measurement_names_and_unused_experts():
    """measure() names the router and each expert's modules in the layer scheme; an expert
    no token chose (16 experts, top 1, 4 tokens) has weight rows but no activation or
    gradient rows, and nothing crashes."""
    cfg = moe_cfg(parametrization="unit", n_experts=16, experts_per_token=1, batch_size=1,
                  seq_len=4)
    rows = measure(cfg)
    by = {(r.name, r.kind): r for r in rows}
    assert ("layers.0.moe.router", "activation") in by
    assert by[("layers.0.moe.router", "activation")].shape == (4, 16)
    used = {n.split(".")[4] for n, k in by if n.startswith("layers.0.moe.experts.")
            and k == "activation"}
    assert 1 <= len(used) <= 4
    unused = sorted(set(map(str, range(16))) - used)[0]
    name = f"layers.0.moe.experts.{unused}.up"
    assert (name + ".weight", "weight") in by
    assert (name, "activation") not in by and (name + ".weight", "grad_weight") not in by
    e = sorted(used)[0]
    assert (f"layers.0.moe.experts.{e}.up.weight", "grad_weight") in by
    assert all(math.isfinite(r.rms) for r in rows)


# -- the training lab ----------------------------------------------------------------------------

TRAINED = {
    "gqa": dict(n_kv_heads=2, head_dim=12, qkv_bias=True, bias=False),
    "mqa_geglu": dict(n_kv_heads=1, activation="geglu"),
    "moe": dict(n_experts=8, experts_per_token=2, activation="swiglu", n_kv_heads=2),
    # 8 tokens a step for 32 experts: most run on no token at step 1
    "moe_top1": dict(n_experts=32, experts_per_token=1, batch_size=1, seq_len=8),
}


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("kind", sorted(TRAINED))
def test_training_lab_trains_the_new_blocks(kind, param):
    """A few copy-task steps of each new block under each parametrization: finite losses
    that go down (with 4 × 16 tokens a step); the per-tensor rows name every expert of every
    layer (an expert step 1 did not run is still a row, NaN at a step it does not run)."""
    from unitscale_core.training import TrainingRun, TrainSettings

    cfg = tiny(**{**dict(vocab_size=64, seq_len=16, max_len=16, batch_size=4), **TRAINED[kind]})
    run = TrainingRun(cfg, TrainSettings(parametrization=param, task="copy", steps=6,
                                         log_every=1))
    run.run(6)
    assert run.diverged is None and all(math.isfinite(x) for x in run.losses)
    if kind != "moe_top1":  # (8 tokens a step: too few for the loss to fall in 6 steps)
        assert min(run.losses[-2:]) < run.losses[0]
    else:  # the rows of experts step 1 did not run are NaN there
        first = run.records[0].tensor_rms
        row = {key: i for i, key in enumerate(zip(run.tensor_names, run.tensor_kinds))}
        idle = [e for e in range(32)
                if math.isnan(first[row[(f"layers.0.moe.experts.{e}.up", "activation")]])]
        assert len(idle) >= 32 - 8
    if cfg.is_moe:
        acts = {n for n, k in zip(run.tensor_names, run.tensor_kinds) if k == "activation"}
        assert {f"layers.{i}.moe.experts.{e}.down" for i in range(2)
                for e in range(cfg.n_experts)} <= acts
        assert "layers.0.moe.router" in acts


# -- parallel residual ---------------------------------------------------------------------------

@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("taus", [(1.0, 1.0), (0.4, 0.7), (0.3, 0.5, 0.8)])
def test_parallel_block_weights_and_true_gradient(param, taus):
    """``EncoderLayer._parallel`` with linear branches: the output is
    ``Σ c_i f_i(x) + c_s x`` with ``c_i = τ_i/√(1+τ_i²)·Π_{j>i} 1/√(1+τ_j²)`` and
    ``c_s = Π 1/√(1+τ_j²)`` under unit/u-μP (``x + Σ f_i`` standard), ``Σ c² = 1``, and the
    input's gradient is the true gradient of that expression (each forward weight meets its
    own backward scale)."""
    cfg = tiny(parametrization=param)
    layer = build_model(cfg).layers[0]
    torch.manual_seed(0)
    ws = [torch.randn(cfg.d_model, cfg.d_model) / math.sqrt(cfg.d_model) for _ in taus]
    branches = [(torch.nn.Identity(), (lambda h, w=w: h @ w), t) for w, t in zip(ws, taus)]
    x = torch.randn(3, 5, cfg.d_model, requires_grad=True)
    y = layer._parallel(x, branches)
    if param == "standard":
        cs, cs_ = 1.0, [1.0] * len(taus)
    else:
        d = [math.sqrt(1 + t * t) for t in taus]
        cs = math.prod(1 / v for v in d)
        cs_ = [t / d[i] * math.prod(1 / v for v in d[i + 1:]) for i, t in enumerate(taus)]
        assert cs ** 2 + sum(c * c for c in cs_) == pytest.approx(1.0)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = cs * x_ref + sum(c * (x_ref @ w) for c, w in zip(cs_, ws))
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("param", ("unit", "umup"))
def test_parallel_stream_keeps_the_sequential_scale(param):
    """Under unit scaling the parallel block's stream (each layer's output) and the gradient
    at the embeddings stay within 25% of the sequential block's (d 64, 4 layers, 3 seeds)."""
    base = tiny(parametrization=param, d_model=64, d_ff=128, n_layers=4, seq_len=32,
                max_len=32, batch_size=4, vocab_size=128)
    seq, par = _rms(base), _rms(base.replace(parallel_residual=True))
    for key in [(f"layers.{i}", "activation") for i in range(4)] + [("embed",
                                                                     "grad_activation")]:
        assert abs(math.log2(par[key] / seq[key])) < math.log2(1.25), (key, par[key], seq[key])


def test_parallel_decoder_layer_adds_three_branches_of_the_same_input():
    """Encoder-decoder, standard: a decoder layer's output is
    x + attn(norm1 x) + cross_attn(cross_norm x, memory) + ffn(norm2 x)."""
    cfg = tiny(architecture="encoder-decoder", parallel_residual=True)
    model = build_model(cfg).double()
    x = ids(cfg)
    seen = []
    layer = model.decoder.layers[1]
    hook = layer.register_forward_hook(lambda _m, i, o: seen.append((i, o.detach())))
    model(x, x)
    hook.remove()
    (h, ctx, memory, cross), out = seen[0][0][:4], seen[0][1]
    with torch.no_grad():
        ref = (h + layer.attn(layer.norm1(h), ctx)
               + layer.cross_attn(layer.cross_norm(h), cross, memory)
               + layer.ffn(layer.norm2(h)))
    torch.testing.assert_close(out, ref)


# -- measurement names ---------------------------------------------------------------------------

def test_measure_names_the_new_tensors():
    """One measurement of a config with GQA, QK-norm, sandwich norms and MoE names every new
    tensor in the layer scheme, with the contract's shapes (k: kv_width; probs per query
    head; router logits per token)."""
    cfg = tiny(parametrization="umup", n_kv_heads=2, head_dim=12, qk_norm="head",
               norm_type="rmsnorm", norm="sandwich", n_experts=4, experts_per_token=2,
               activation="geglu", bias=False, seq_len=16, max_len=16, batch_size=2)
    by = {(r.name, r.kind): r for r in measure(cfg)}
    b, t = cfg.batch_size, cfg.seq_len
    assert by[("layers.0.attn.k", "activation")].shape == (b, t, 24)
    assert by[("layers.0.attn.q", "activation")].shape == (b, t, 48)
    assert by[("layers.0.attn.probs", "activation")].shape == (b, 4, t, t)
    assert by[("layers.1.moe.router", "activation")].shape == (b * t, 4)
    for name in ("layers.0.attn.q_norm", "layers.0.attn.k_norm", "layers.0.attn_out_norm",
                 "layers.1.ffn_out_norm", "layers.1.moe.router"):
        assert (name, "activation") in by and (name, "grad_activation") in by, name
    for name in ("layers.0.attn.q_norm.weight", "layers.1.moe.router.weight",
                 "layers.1.moe.experts.3.gate.weight"):
        assert (name, "weight") in by, name
    experts = {n for n, k in by if ".moe.experts." in n and k == "grad_weight"}
    assert experts and all(math.isfinite(by[(n, "grad_weight")].rms) for n in experts)
