"""Issue 21's norms in the torch model: RMSNorm (``norm_type``), sandwich / branch_output
placements (``norm``) and QK-norm (``qk_norm``), under standard, unit and u-μP.

References are independent of our code: ``torch.nn.functional.rms_norm`` and the formula
written out, and transformers' own layers (Llama's RMSNorm, Qwen 3's pre-norm layer with
per-head QK-norm, Gemma 2's sandwich layer, OLMo 2's branch-output layer with whole-projection
QK-norm) with their weights copied into ours.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from unitscale_core.config import ModelConfig
from unitscale_core.measure import measure
from unitscale_core.model import build_model, unsupported_fields
from unitscale_core.model.layers import (
    NORM_CLASSES,
    LayerNorm,
    PositionContext,
    RMSNorm,
    make_norm,
)
from unitscale_core.model.ops import make_ops
from unitscale_core.sizing import count_parameters

PARAMS = ("standard", "unit", "umup")
ARCHS = ("encoder", "decoder", "encoder-decoder")
NORMS = ("pre", "post", "sandwich", "branch_output")
QK = ("none", "head", "all_heads")


def tiny(**kw) -> ModelConfig:
    base = dict(d_model=32, n_heads=4, d_ff=64, n_layers=2, vocab_size=50, max_len=16,
                seq_len=8, batch_size=2, positional="rope")
    return ModelConfig(**{**base, **kw})


def run(model, cfg: ModelConfig) -> torch.Tensor:
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len),
                      generator=torch.Generator().manual_seed(3))
    logits = model(x, x) if cfg.architecture == "encoder-decoder" else model(x)
    return model.loss(logits, x)


# -- RMSNorm itself ---------------------------------------------------------------------------

@pytest.mark.parametrize("param", PARAMS)
def test_rms_norm_forward_equals_torch_and_the_formula(param):
    norm = RMSNorm(24, make_ops(param), eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = 3 * torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(0))
    hand = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (24,), norm.weight, 1e-6))
    assert [n for n, _ in norm.named_parameters()] == ["weight"]  # gain only, never a bias


def test_rms_norm_equals_llama_rms_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    theirs = LlamaRMSNorm(40, eps=1e-5)
    ours = RMSNorm(40, make_ops("standard"), eps=1e-5)
    with torch.no_grad():
        theirs.weight.normal_()
        ours.weight.copy_(theirs.weight)
    x = torch.randn(3, 9, 40)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_unit_scaled_rms_norm_has_unit_output_and_unit_gain_gradient():
    """Input of RMS 5 and a unit upstream gradient: every parametrization's output has RMS 1
    (gain 1); the gain's gradient (a sum over b = 4096 positions, RMS ≈ √b in standard) is
    exactly standard's · b^-½ under unit and u-μP (``unit_scaling.functional.rms_norm``), so
    RMS ≈ 1; the input gradient is the same in all three (1/rms(x) times a projection)."""
    gen = torch.Generator().manual_seed(1)
    x = 5 * torch.randn(64, 64, 256, generator=gen)
    up = torch.randn(64, 64, 256, generator=gen)
    b = 64 * 64
    grads = {}
    for param in PARAMS:
        norm = RMSNorm(256, make_ops(param))
        xi = x.clone().requires_grad_()
        y = norm(xi)
        (y * up).sum().backward()
        assert y.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)
        grads[param] = norm.weight.grad, xi.grad
    std_w, std_x = grads["standard"]
    assert std_w.pow(2).mean().sqrt().item() == pytest.approx(math.sqrt(b), rel=0.2)
    assert std_x.pow(2).mean().sqrt().item() == pytest.approx(0.2, rel=0.05)
    for param in ("unit", "umup"):
        w, gx = grads[param]
        torch.testing.assert_close(w, std_w / math.sqrt(b))
        assert w.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=0.2)
        torch.testing.assert_close(gx, std_x)


def test_make_norm_follows_norm_type_and_bias():
    ops = make_ops("standard")
    ln = make_norm(tiny(bias=True), ops)
    assert isinstance(ln, LayerNorm) and ln.bias is not None and ln.weight.shape == (32,)
    assert make_norm(tiny(bias=False), ops, 8).bias is None
    rms = make_norm(tiny(norm_type="rmsnorm", bias=True), ops, 8)
    assert isinstance(rms, RMSNorm) and rms.weight.shape == (8,)
    assert not hasattr(rms, "bias") or rms.bias is None
    assert set(NORM_CLASSES) == {LayerNorm, RMSNorm}


# -- structure, names and sizes ---------------------------------------------------------------

def test_norm_fields_are_built_not_refused():
    for norm_type, norm, qk in itertools.product(("layernorm", "rmsnorm"), NORMS, QK):
        cfg = tiny(norm_type=norm_type, norm=norm, qk_norm=qk)
        assert not unsupported_fields(cfg), (norm_type, norm, qk)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("norm", NORMS)
def test_module_names_follow_the_contract(arch, norm):
    cfg = tiny(architecture=arch, norm=norm, norm_type="rmsnorm", qk_norm="head")
    names = {n for n, _ in build_model(cfg).named_modules()}
    prefixes = ["layers.0"] if arch != "encoder-decoder" else ["encoder.layers.0",
                                                                "decoder.layers.0"]
    for p in prefixes:
        has_in = norm != "branch_output"
        has_out = norm in ("sandwich", "branch_output")
        assert (f"{p}.norm1" in names) == has_in and (f"{p}.norm2" in names) == has_in
        assert (f"{p}.attn_out_norm" in names) == has_out
        assert (f"{p}.ffn_out_norm" in names) == has_out
        assert f"{p}.attn.q_norm" in names and f"{p}.attn.k_norm" in names
    if arch == "encoder-decoder":
        p = "decoder.layers.0"
        assert (f"{p}.cross_norm" in names) == (norm != "branch_output")
        assert (f"{p}.cross_out_norm" in names) == (norm in ("sandwich", "branch_output"))
        assert f"{p}.cross_attn.q_norm" in names
        assert "encoder.layers.0.cross_out_norm" not in names
    final = ["norm"] if arch != "encoder-decoder" else ["encoder.norm", "decoder.norm"]
    assert set(final) <= names


def test_qk_norm_sizes_per_head_and_over_all_heads():
    m = build_model(tiny(qk_norm="head", norm_type="rmsnorm"))
    assert m.layers[0].attn.q_norm.weight.shape == (8,)  # d_head, shared by the 4 heads
    assert m.layers[0].attn.k_norm.weight.shape == (8,)
    m = build_model(tiny(qk_norm="all_heads", bias=True))  # layernorm with bias
    assert m.layers[0].attn.q_norm.weight.shape == (32,)  # n_heads · d_head
    assert m.layers[0].attn.q_norm.bias.shape == (32,)
    assert m.layers[0].attn.k_norm.weight.shape == (32,)


def test_qk_norm_all_heads_uses_the_kv_width_under_gqa():
    """OLMo 2's k_norm spans kv_heads·d_head (fewer than q_norm's under GQA)."""
    cfg = tiny(qk_norm="all_heads", norm_type="rmsnorm", n_kv_heads=2)
    if unsupported_fields(cfg):
        pytest.skip(f"GQA not built yet: {unsupported_fields(cfg)}")
    attn = build_model(cfg).layers[0].attn
    assert attn.q_norm.weight.shape == (32,) and attn.k_norm.weight.shape == (16,)


@pytest.mark.parametrize("arch", ARCHS)
def test_count_parameters_equals_the_model_for_every_norm_combination(arch):
    for norm_type, norm, qk, bias in itertools.product(("layernorm", "rmsnorm"), NORMS, QK,
                                                        (False, True)):
        cfg = tiny(architecture=arch, norm_type=norm_type, norm=norm, qk_norm=qk, bias=bias)
        numel = sum(p.numel() for p in build_model(cfg).parameters())
        assert count_parameters(cfg)["total"] == numel, (norm_type, norm, qk, bias)


# -- against transformers' own layers ---------------------------------------------------------

T, C, H = 6, 32, 4
D = C // H


def _pairs_from_halves(d: int) -> torch.Tensor:
    """Our rope rotates pairs (2i, 2i+1); HF's rotate_half rotates (i, i + d/2): our dim 2i is
    HF's dim i and our 2i+1 HF's i + d/2 (rows of q/k and per-dim gains permuted on copy)."""
    return torch.stack((torch.arange(d // 2), torch.arange(d // 2) + d // 2), 1).flatten()


def _rope_rows(n_heads: int) -> torch.Tensor:
    perm = _pairs_from_halves(D)
    return torch.cat([h * D + perm for h in range(n_heads)])


def _copy_layer(ours, theirs, norms: dict[str, str], qk: str | None) -> None:
    """HF layer → our EncoderLayer: projections (q/k rows in our rope layout) and norms."""
    rows = _rope_rows(H)
    with torch.no_grad():
        for p in theirs.parameters():  # non-trivial gains and weights
            p.normal_(0, 0.3 if p.dim() == 2 else 0.5)
        a, sa = ours.attn, theirs.self_attn
        a.q.weight.copy_(sa.q_proj.weight[rows])
        a.k.weight.copy_(sa.k_proj.weight[rows])
        a.v.weight.copy_(sa.v_proj.weight)
        a.o.weight.copy_(sa.o_proj.weight)
        f, mlp = ours.ffn, theirs.mlp
        f.gate.weight.copy_(mlp.gate_proj.weight)
        f.up.weight.copy_(mlp.up_proj.weight)
        f.down.weight.copy_(mlp.down_proj.weight)
        for mine, hf in norms.items():
            w = theirs.get_submodule(hf).weight
            if "Gemma" in type(theirs).__name__:
                w = 1 + w  # Gemma's RMSNorm multiplies by (1 + w)
            ours.get_submodule(mine).weight.copy_(w)
        if qk == "head":
            a.q_norm.weight.copy_(sa.q_norm.weight[_pairs_from_halves(D)])
            a.k_norm.weight.copy_(sa.k_norm.weight[_pairs_from_halves(D)])
        elif qk == "all_heads":
            a.q_norm.weight.copy_(sa.q_norm.weight[rows])
            a.k_norm.weight.copy_(sa.k_norm.weight[rows])


def _compare(hf_layer, rotary, cfg: ModelConfig, norms: dict[str, str]) -> None:
    model = build_model(cfg)
    ours = model.layers[0]
    ours.eval()
    hf_layer.eval()
    _copy_layer(ours, hf_layer, norms, cfg.qk_norm if cfg.qk_norm != "none" else None)
    x = torch.randn(2, T, C, generator=torch.Generator().manual_seed(5))
    pos = torch.arange(T)[None].expand(2, T)
    cos, sin = rotary(x, pos)
    mask = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        theirs = hf_layer(x, attention_mask=mask, position_ids=pos,
                          position_embeddings=(cos, sin))
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs
        ctx = model.pos.context(T, x.device, x.dtype)
        mine = ours(x, ctx)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def _hf_config(cls, **kw):
    cfg = cls(hidden_size=C, intermediate_size=64, num_attention_heads=H,
              num_key_value_heads=H, head_dim=D, rms_norm_eps=1e-6, vocab_size=50,
              max_position_embeddings=64, attention_bias=False, **kw)
    cfg._attn_implementation = "eager"
    return cfg


def _ours(**kw) -> ModelConfig:
    return ModelConfig(architecture="decoder", d_model=C, n_heads=H, d_ff=64, n_layers=1,
                       vocab_size=50, max_len=64, seq_len=T, batch_size=2, positional="rope",
                       rope_base=10000.0, activation="swiglu", bias=False,
                       norm_type="rmsnorm", **kw)


def test_pre_norm_rms_with_per_head_qk_norm_equals_qwen3_layer():
    from transformers import Qwen3Config
    from transformers.models.qwen3 import modeling_qwen3 as q3

    hf = _hf_config(Qwen3Config, rope_theta=10000.0)
    layer = q3.Qwen3DecoderLayer(hf, layer_idx=0)
    _compare(layer, q3.Qwen3RotaryEmbedding(hf), _ours(norm="pre", qk_norm="head"),
             {"norm1": "input_layernorm", "norm2": "post_attention_layernorm"})


def test_sandwich_norm_equals_gemma2_layer():
    from transformers import Gemma2Config
    from transformers.models.gemma2 import modeling_gemma2 as g2

    hf = _hf_config(Gemma2Config, hidden_activation="silu", query_pre_attn_scalar=D,
                    attn_logit_softcapping=None, sliding_window=64, rope_theta=10000.0)
    layer = g2.Gemma2DecoderLayer(hf, layer_idx=0)
    _compare(layer, g2.Gemma2RotaryEmbedding(hf), _ours(norm="sandwich"),
             {"norm1": "input_layernorm", "attn_out_norm": "post_attention_layernorm",
              "norm2": "pre_feedforward_layernorm", "ffn_out_norm": "post_feedforward_layernorm"})


def test_branch_output_norm_with_whole_projection_qk_norm_equals_olmo2_layer():
    from transformers import Olmo2Config
    from transformers.models.olmo2 import modeling_olmo2 as o2

    hf = _hf_config(Olmo2Config, rope_theta=10000.0)
    layer = o2.Olmo2DecoderLayer(hf, layer_idx=0)
    _compare(layer, o2.Olmo2RotaryEmbedding(hf), _ours(norm="branch_output", qk_norm="all_heads"),
             {"attn_out_norm": "post_attention_layernorm",
              "ffn_out_norm": "post_feedforward_layernorm"})


def test_branch_output_layer_has_no_input_norm_in_the_computation():
    """branch_output: x + out_norm(f(x)) — recomputed from the layer's own modules."""
    model = build_model(tiny(norm="branch_output", norm_type="rmsnorm", positional="none"))
    layer = model.layers[0]
    x = torch.randn(2, 8, 32)
    ctx = PositionContext()
    with torch.no_grad():
        h = x + layer.attn_out_norm(layer.attn(x, ctx))
        expect = h + layer.ffn_out_norm(layer.ffn(h))
        torch.testing.assert_close(layer(x, ctx), expect)


# -- unit scaling ----------------------------------------------------------------------------

def _outputs(model, cfg, names):
    out = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, o.detach()))
             for n, m in model.named_modules() if n in names]
    try:
        loss = run(model, cfg)
    finally:
        for h in hooks:
            h.remove()
    return out, loss


@pytest.mark.parametrize("param", ("unit", "umup"))
@pytest.mark.parametrize("norm", ("sandwich", "branch_output"))
@pytest.mark.parametrize("arch", ARCHS)
def test_unit_scaled_output_norms_keep_branches_and_stream_unit(param, norm, arch):
    """Under unit / u-μP with RMSNorm and QK-norm: each output norm's output has RMS 1 (the
    branch the τ-weighted add assumes), the residual stream stays within a factor 2 of unit
    RMS, and every parameter gets a finite, non-zero gradient."""
    cfg = tiny(architecture=arch, norm=norm, norm_type="rmsnorm", qk_norm="all_heads",
               parametrization=param, d_model=64, n_heads=4, d_ff=128, n_layers=3,
               seq_len=16, batch_size=4)
    model = build_model(cfg)
    stack = "layers" if arch != "encoder-decoder" else "decoder.layers"
    names = {f"{stack}.{i}{s}" for i in range(3) for s in ("", ".attn_out_norm",
                                                               ".ffn_out_norm")}
    out, loss = _outputs(model, cfg, names)
    assert len(out) == len(names)
    loss.backward()
    for name, y in out.items():
        rms = y.pow(2).mean().sqrt().item()
        if name.endswith("out_norm"):
            assert rms == pytest.approx(1.0, rel=1e-3), name
        else:
            assert 0.5 < rms < 2.0, (name, rms)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_standard_branch_output_stream_grows_where_unit_keeps_it():
    """The contrast that makes the previous test able to fail: OLMo 2's placement adds
    unit-RMS branches unweighted under standard, so the stream's RMS grows with depth."""
    cfg = tiny(norm="branch_output", norm_type="rmsnorm", n_layers=6, d_model=64, seq_len=16)
    model = build_model(cfg)
    out, _ = _outputs(model, cfg, {"layers.5"})
    assert out["layers.5"].pow(2).mean().sqrt().item() > 2.0


# -- measurement names ------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", ("layernorm", "rmsnorm"))
@pytest.mark.parametrize("norm", ("sandwich", "branch_output"))
def test_measurement_reports_the_new_norms(norm_type, norm):
    """measure() names the new modules in the existing scheme: activation and gradient rows
    for each norm's output, weight and grad_weight rows for its gain (``….weight``)."""
    cfg = tiny(norm=norm, norm_type=norm_type, qk_norm="head", seq_len=8, batch_size=2)
    rows = {(r.name, r.kind) for r in measure(cfg)}
    present = ["layers.0.attn_out_norm", "layers.0.ffn_out_norm", "layers.0.attn.q_norm",
               "layers.0.attn.k_norm", "layers.1.ffn_out_norm", "norm"]
    if norm == "sandwich":
        present += ["layers.0.norm1", "layers.0.norm2"]
    for name in present:
        for kind in ("activation", "grad_activation"):
            assert (name, kind) in rows, (name, kind)
        for kind in ("weight", "grad_weight"):
            assert (f"{name}.weight", kind) in rows, (name, kind)
    if norm == "branch_output":
        assert not any(n.startswith(("layers.0.norm1", "layers.0.norm2")) for n, _ in rows)


@pytest.mark.parametrize("norm_type", ("layernorm", "rmsnorm"))
def test_umup_tags_every_norm_gain_as_norm(norm_type):
    """u-μP's optimiser scales a norm gain's learning rate as a ``norm`` parameter, not as a
    weight matrix: every gain of the new norms (output norms, QK-norms) is tagged so."""
    from unitscale_core.training import mup_tags

    cfg = tiny(norm="sandwich", norm_type=norm_type, qk_norm="all_heads", parametrization="umup")
    model = build_model(cfg)
    gains = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, NORM_CLASSES)}
    assert {"layers.0.attn_out_norm.weight", "layers.0.attn.q_norm.weight",
            "norm.weight"} <= gains
    tags = mup_tags(cfg, model)
    wrong = {g for g in gains if tags[g][0] != "norm"}
    assert not wrong, wrong


@pytest.mark.parametrize("param", PARAMS)
def test_rmsnorm_sandwich_qk_norm_model_learns(param):
    """A few optimiser steps on one batch lower the loss under each parametrization (the new
    modules are trained, not only built)."""
    cfg = tiny(norm="sandwich", norm_type="rmsnorm", qk_norm="head", parametrization=param)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss = run(model, cfg)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert run(model, cfg).item() < first - 0.3
