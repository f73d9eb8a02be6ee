"""Issue 21 fields in the torch model: rope_base, partial rotary, soft caps and the parallel
block checked against independent references, and a config using every new field builds (the
others are tested in test_model_norms.py and test_model_attention_ffn.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unitscale_core import positional
from unitscale_core.config import ModelConfig
from unitscale_core.model import build_model, unsupported_fields
from unitscale_core.model.layers import apply_rope
from unitscale_core.sizing import count_parameters

PARAMS = ("standard", "unit", "umup")


def tiny(**kw) -> ModelConfig:
    base = dict(d_model=32, n_heads=4, d_ff=64, n_layers=2, vocab_size=50, max_len=16,
                seq_len=8, batch_size=2, positional="rope")
    return ModelConfig(**{**base, **kw})


def ids(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len),
                         generator=torch.Generator().manual_seed(1))


def scores_of(model, x) -> list[torch.Tensor]:
    """The ``attn.scores`` tap of every layer."""
    out = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: out.append(o.detach()))
             for n, m in model.named_modules() if n.endswith("attn.scores")]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, logits


# -- every issue-21 field is built ---------------------------------------------------------

EVERY_FIELD = dict(norm_type="rmsnorm", norm="pre", n_kv_heads=2, head_dim=12, qk_norm="head",
                   parallel_residual=True, rotary_fraction=0.5, rope_base=5e5,
                   activation="geglu", n_experts=4, experts_per_token=2, bias=False,
                   qkv_bias=True, attn_softcap=50.0, logit_softcap=30.0)


@pytest.mark.parametrize("arch", ["encoder", "decoder", "encoder-decoder"])
@pytest.mark.parametrize("param", PARAMS)
def test_a_config_using_every_new_field_builds(arch, param):
    """Nothing is refused any more (unsupported_fields is empty) and the model's size is
    sizing's, in every architecture and parametrization."""
    cfg = tiny(architecture=arch, parametrization=param, **EVERY_FIELD)
    assert unsupported_fields(cfg) == {}
    model = build_model(cfg)
    assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_default_meaning_values_build():
    """n_kv_heads = n_heads, head_dim = d_model / n_heads and qkv_bias = bias are the model
    without those fields."""
    a = build_model(tiny())
    b = build_model(tiny(n_kv_heads=4, head_dim=8, qkv_bias=True))
    x = ids(tiny())
    torch.testing.assert_close(a(x), b(x))


# -- rope_base and partial rotary ------------------------------------------------------------

def test_partial_rope_equals_numpy_reference():
    """apply_rope on the first R dims equals positional.rope_rotate (numpy) on those dims,
    the rest passing through."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 16, generator=g, dtype=torch.float64)
    r, base = 4, 500000.0
    theta = torch.from_numpy(positional.rope_angles(10, r, base))
    got = apply_rope(x, theta.cos(), theta.sin())
    ref = positional.rope_rotate(x[..., :r].numpy(), np.arange(10), base)
    np.testing.assert_allclose(got[..., :r].numpy(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[..., r:], x[..., r:], rtol=0, atol=0)


@pytest.mark.parametrize("parametrization", PARAMS)
def test_rope_base_and_fraction_change_the_scores_as_the_reference(parametrization):
    """The model's attention logits with rotary_fraction 0.5 and θ = 5e5 equal
    q_rot · k_rotᵀ · m recomputed from the q, k projections with the numpy rope."""
    cfg = tiny(parametrization=parametrization, rotary_fraction=0.5, rope_base=5e5,
               n_layers=1, dropout=0.0)
    model = build_model(cfg).double()
    x = ids(cfg)
    proj = {}
    hooks = [getattr(model.layers[0].attn, n).register_forward_hook(
        lambda _m, _i, o, n=n: proj.__setitem__(n, o.detach())) for n in ("q", "k")]
    scores, _ = scores_of(model, x)
    for h in hooks:
        h.remove()
    d, r = cfg.head_size, cfg.rotary_dims
    assert r == 4

    def rotated(t):
        t = t.view(cfg.batch_size, cfg.seq_len, cfg.n_heads, d).transpose(1, 2).numpy()
        rot = positional.rope_rotate(t[..., :r], np.arange(cfg.seq_len), cfg.rope_base)
        return np.concatenate([rot, t[..., r:]], axis=-1)

    q, k = rotated(proj["q"]), rotated(proj["k"])
    m = 1 / d if parametrization == "umup" else d ** -0.5
    ref = q @ np.swapaxes(k, -1, -2) * m
    np.testing.assert_allclose(scores[0].numpy(), ref, rtol=1e-10, atol=1e-10)
    # and the base is not ignored: 10000 gives other logits
    other, _ = scores_of(build_model(cfg.replace(rope_base=10000.0)).double(), x)
    assert not torch.allclose(other[0], scores[0])


# -- soft caps -------------------------------------------------------------------------------

@pytest.mark.parametrize("parametrization", PARAMS)
def test_attention_softcap_is_c_tanh_of_the_uncapped_logits(parametrization):
    cfg = tiny(parametrization=parametrization, n_layers=1)
    c = 0.5  # small enough that tanh bends the logits
    x = ids(cfg)
    raw, _ = scores_of(build_model(cfg), x)
    capped, _ = scores_of(build_model(cfg.replace(attn_softcap=c)), x)
    torch.testing.assert_close(capped[0], c * torch.tanh(raw[0] / c))
    assert capped[0].abs().max() < c
    assert not torch.allclose(capped[0], raw[0], atol=1e-3)


@pytest.mark.parametrize("parametrization", PARAMS)
def test_logit_softcap_is_c_tanh_of_the_head(parametrization):
    cfg = tiny(parametrization=parametrization)
    c = 0.3
    x = ids(cfg)
    raw = build_model(cfg)(x)
    model = build_model(cfg.replace(logit_softcap=c))
    capped = model(x)
    torch.testing.assert_close(capped, c * torch.tanh(raw / c))
    loss = model.loss(capped, ids(cfg))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("parametrization", PARAMS)
@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_new_fields_forward_backward_and_count(parametrization, arch):
    cfg = tiny(parametrization=parametrization, architecture=arch, rotary_fraction=0.25,
               rope_base=5e5, attn_softcap=50.0, logit_softcap=30.0)
    model = build_model(cfg)
    x = ids(cfg)
    logits = model(x, x) if arch == "encoder-decoder" else model(x)
    assert logits.shape == (cfg.batch_size, cfg.seq_len, cfg.vocab_size)
    model.loss(logits, x).backward()
    assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())


# -- parallel residual -----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_parallel_residual_is_x_plus_both_branches_of_the_same_input(arch):
    """Each layer's output is x + attn(norm1(x)) + ffn(norm2(x)) (GPT-NeoX), recomputed
    from the layer's own sub-modules on the layer's input; the sequential block differs."""
    cfg = tiny(parallel_residual=True, architecture=arch)
    model = build_model(cfg).double()
    x = ids(cfg)
    seen = []
    hook = model.layers[1].register_forward_hook(
        lambda _m, i, o: seen.append((i[0].detach(), i[1], o.detach())))
    model(x)
    hook.remove()
    h, ctx, out = seen[0]
    layer = model.layers[1]
    with torch.no_grad():
        ref = h + layer.attn(layer.norm1(h), ctx) + layer.ffn(layer.norm2(h))
        layer.parallel = False
        sequential = layer(h, ctx)
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(sequential, out)
    assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())


# -- the training lab --------------------------------------------------------------------------

@pytest.mark.parametrize("parametrization", PARAMS)
def test_modern_fields_train(parametrization):
    """15 copy-task steps of a NeoX-like decoder (partial rotary, θ = 5e5, soft caps, parallel
    block): the loss of the last 3 steps is 0.3 nats below the first 3's."""
    from unitscale_core.training import TrainingRun, TrainSettings

    cfg = ModelConfig(d_model=32, n_heads=2, d_ff=64, n_layers=2, vocab_size=256, max_len=64,
                      seq_len=32, batch_size=4, positional="rope", rotary_fraction=0.25,
                      rope_base=5e5, attn_softcap=50.0, logit_softcap=30.0,
                      parallel_residual=True)
    run = TrainingRun(cfg, TrainSettings(parametrization=parametrization, task="copy",
                                         steps=15, log_every=5))
    run.run(15)
    first, last = np.mean(run.losses[:3]), np.mean(run.losses[-3:])
    assert last < first - 0.3, (parametrization, first, last)
    assert "layers.0.attn.scores" in run.tensor_names


#: The other families the issue names, small: Llama (RMSNorm, GQA, QK-norm per head, SwiGLU,
#: θ 5e5), Gemma 2 (sandwich norms, GeGLU, head_dim ≠ d/H, MQA, caps, tied), Mixtral (4
#: experts top 2, GQA)
TRAINED_FAMILIES = {
    "llama": dict(norm_type="rmsnorm", n_kv_heads=1, qk_norm="head", activation="swiglu",
                  bias=False, tie_embeddings=False, rope_base=5e5),
    "gemma": dict(norm_type="rmsnorm", norm="sandwich", activation="geglu", head_dim=24,
                  n_kv_heads=1, attn_softcap=50.0, logit_softcap=30.0, bias=False),
    "mixtral": dict(norm_type="rmsnorm", n_kv_heads=1, activation="swiglu", n_experts=4,
                    experts_per_token=2, bias=False, tie_embeddings=False),
}


@pytest.mark.parametrize("family", list(TRAINED_FAMILIES))
@pytest.mark.parametrize("parametrization", PARAMS)
def test_modern_families_train(parametrization, family):
    """20 copy-task steps of each family learn (last 3 steps' loss 0.3 nats below the first
    3's) under every parametrization; u-μP's optimizer tags every parameter (router, experts,
    QK-norm gains, output norms) and the run records the family's own tensors."""
    from unitscale_core.training import TrainingRun, TrainSettings, mup_tags

    cfg = ModelConfig(d_model=32, n_heads=2, d_ff=64, n_layers=2, vocab_size=256, max_len=64,
                      seq_len=32, batch_size=4, positional="rope", **TRAINED_FAMILIES[family])
    run = TrainingRun(cfg, TrainSettings(parametrization=parametrization, task="copy",
                                         steps=20, log_every=5))
    run.run(20)
    first, last = np.mean(run.losses[:3]), np.mean(run.losses[-3:])
    assert last < first - 0.3, (parametrization, family, first, last)
    own = {"llama": "layers.0.attn.q_norm", "gemma": "layers.0.attn_out_norm",
           "mixtral": "layers.0.moe.router"}[family]
    assert own in run.tensor_names, sorted(run.tensor_names)[:20]
    model = build_model(cfg.replace(parametrization=parametrization))
    tags = mup_tags(cfg, model)
    assert set(tags) == {n for n, _ in model.named_parameters()}
    norms = [n for n in tags if "norm" in n]
    assert norms and all(tags[n][0] == "norm" for n in norms), norms
