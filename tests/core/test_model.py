"""The torch model: shapes, attention patterns, capture, and the seed's forward arguments."""

from __future__ import annotations

import pytest
import torch

from unitscale_core import ModelConfig, build_model
from unitscale_core.config import ATTENTIONS, POSITIONALS
from unitscale_core.model import allowed

SMALL = dict(d_model=32, n_heads=4, d_ff=64, n_layers=2, vocab_size=61, max_len=32, seq_len=24)


def expected_allowed(t: int, pattern: str, window: int, causal: bool) -> torch.Tensor:
    """Independent, loop-based statement of each pattern (Child et al. 2019 for strided)."""
    out = torch.zeros(t, t, dtype=torch.bool)
    for i in range(t):
        for j in range(t):
            d = i - j
            ok = {"full": True, "causal": d >= 0, "local": abs(d) < window,
                  "strided": abs(d) < window or d % window == 0}[pattern]
            out[i, j] = ok and (d >= 0 or not (causal or pattern == "causal"))
    return out


@pytest.mark.parametrize("pattern", ATTENTIONS)
@pytest.mark.parametrize("causal", [False, True])
def test_mask_matrix(pattern, causal):
    got = allowed(13, 13, pattern, 4, causal)
    want = expected_allowed(13, pattern, 4, causal)
    if got is None:
        assert want.all()
    else:
        assert torch.equal(got, want)


def _capture(model):
    for _, m in model.attention_modules():
        m.capture = True


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
@pytest.mark.parametrize("pattern", ATTENTIONS)
def test_no_attention_outside_the_pattern(arch, pattern):
    cfg = ModelConfig(architecture=arch, attention=pattern, window=5, **SMALL)
    model = build_model(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    plain = model(idx)
    _capture(model)
    captured = model(idx)
    assert torch.equal(plain, captured)  # capturing does not change outputs
    want = expected_allowed(cfg.seq_len, pattern, 5, causal=arch == "decoder")
    for name, m in model.attention_modules():
        probs = m.probs  # (B, H, T, T)
        assert probs.shape == (2, 4, cfg.seq_len, cfg.seq_len), name
        assert torch.all(probs[..., ~want] == 0), name
        assert torch.allclose(probs.sum(-1), torch.ones(()))


def test_encoder_decoder_shapes_and_cross_attention():
    cfg = ModelConfig(architecture="encoder-decoder", n_decoder_layers=3, **SMALL)
    model = build_model(cfg).eval()
    _capture(model)
    src = torch.randint(0, 61, (2, 20))
    tgt = torch.randint(0, 61, (2, 24))
    assert model(src, tgt).shape == (2, 24, 61)
    names = [n for n, _ in model.attention_modules()]
    assert names[:2] == ["encoder.layers.0.attn", "encoder.layers.1.attn"]
    assert "decoder.layers.2.cross_attn" in names and len(names) == 2 + 3 * 2
    cross = dict(model.attention_modules())["decoder.layers.0.cross_attn"].probs
    assert cross.shape == (2, 4, 24, 20)
    decoder_self = dict(model.attention_modules())["decoder.layers.0.attn"].probs
    assert torch.all(decoder_self[..., torch.ones(24, 24).triu(1).bool()] == 0)


def test_key_padding_mask_blocks_padded_keys():
    cfg = ModelConfig(architecture="encoder", attention="full", **SMALL)
    model = build_model(cfg).eval()
    _capture(model)
    idx = torch.randint(0, 61, (2, 10))
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 7:] = True
    model(idx, src_key_padding_mask=pad)
    probs = model.layers[0].attn.probs
    assert torch.all(probs[1, :, :, 7:] == 0) and torch.all(probs[0, :, :, 7:] > 0)


def test_explicit_mask_overrides_the_pattern():
    cfg = ModelConfig(architecture="encoder", attention="full", **SMALL)
    model = build_model(cfg).eval()
    _capture(model)
    blocked = torch.ones(8, 8).triu(1).bool()  # PyTorch convention: True = not allowed
    model(torch.randint(0, 61, (1, 8)), mask=blocked)
    assert torch.all(model.layers[0].attn.probs[..., blocked] == 0)


@pytest.mark.parametrize("positional", POSITIONALS)
def test_every_positional_kind_runs_and_depends_on_position(positional):
    """With one repeated token, queries and keys are equal at every position, so attention is
    uniform exactly when the model has no position information."""
    cfg = ModelConfig(architecture="encoder", attention="full", positional=positional, **SMALL)
    model = build_model(cfg).eval()
    _capture(model)
    model(torch.full((1, 6), 5))
    probs = model.layers[0].attn.probs
    uniform = torch.allclose(probs, torch.full_like(probs, 1 / 6), atol=1e-6)
    assert uniform == (positional == "none")


def test_dtypes():
    model = build_model(ModelConfig(dtype="bf16", **SMALL))
    assert next(model.parameters()).dtype == torch.bfloat16


def test_same_seed_same_weights_and_rng_untouched():
    state = torch.random.get_rng_state()
    a = build_model(ModelConfig(**SMALL))
    b = build_model(ModelConfig(**SMALL))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("param", ["unit", "umup"])
@pytest.mark.parametrize("arch", ["encoder", "decoder", "encoder-decoder"])
def test_unit_scaled_models_run(param, arch):
    cfg = ModelConfig(parametrization=param, architecture=arch, **SMALL)
    model = build_model(cfg)
    idx = torch.randint(0, 61, (2, 24))
    logits = model(idx, idx) if arch == "encoder-decoder" else model(idx)
    loss = model.loss(logits, idx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_attention_probs_can_be_written_into_a_callers_array():
    """``probs_out``: without gradients the softmax writes the maps into the given array (the
    output unchanged); when gradients are needed it is left alone."""
    cfg = ModelConfig(architecture="encoder", d_model=32, n_heads=2, d_ff=64, n_layers=2,
                      vocab_size=64, max_len=16, seq_len=8, batch_size=1, attention="full")
    model = build_model(cfg, device=torch.device("cpu")).eval()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(ids)
    modules = [m for _, m in model.attention_modules()]
    out = torch.full((len(modules), 1, 2, 8, 8), -1.0)
    for layer, m in enumerate(modules):
        m.capture, m.probs_out = True, out[layer]
    with torch.no_grad():
        written = model(ids)
    assert torch.equal(plain, written)
    assert all(m.probs.data_ptr() == out[layer].data_ptr() for layer, m in enumerate(modules))
    assert torch.allclose(out.sum(-1), torch.ones(len(modules), 1, 2, 8))
    out.fill_(-1.0)
    model(ids).sum().backward()  # with gradients: the maps are the layers' own
    assert (out == -1.0).all()
    assert all(m.probs.data_ptr() != out[layer].data_ptr() for layer, m in enumerate(modules))
