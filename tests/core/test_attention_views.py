"""Attention summaries and configured-model capture (Abnar & Zuidema 2020 for rollout)."""

from __future__ import annotations

import numpy as np
import pytest

from unitscale_core import ModelConfig
from unitscale_core.attention_views import (
    configured_attentions,
    entropy,
    head_average,
    reduce_for_display,
    rollout,
    uniform_entropy,
)
from unitscale_core.cli import main

SMALL = dict(d_model=32, n_heads=4, d_ff=64, n_layers=2, vocab_size=500, max_len=16,
             seq_len=16)


def random_attention(layers=3, heads=2, t=5, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random((layers, heads, t, t))
    return (a / a.sum(-1, keepdims=True)).astype(np.float32)


def test_entropy_bounds():
    t = 7
    uniform = np.full((1, 1, t, t), 1 / t, dtype=np.float32)
    one_hot = np.broadcast_to(np.eye(t, dtype=np.float32), (1, 1, t, t))
    assert entropy(uniform)[0, 0] == pytest.approx(np.log(t), rel=1e-5)
    assert entropy(one_hot)[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert uniform_entropy(None, t) == pytest.approx(np.log(t))


def test_rollout_matches_a_direct_loop():
    att = random_attention()
    want = None
    for layer in range(att.shape[0]):
        a = 0.5 * np.eye(5) + 0.5 * att[layer].mean(0)
        a /= a.sum(-1, keepdims=True)
        want = a if want is None else a @ want
    np.testing.assert_allclose(rollout(att)[-1], want, rtol=1e-5)
    np.testing.assert_allclose(rollout(att).sum(-1), 1.0, rtol=1e-5)  # rows stay distributions


def test_head_average_and_reduction():
    att = random_attention(t=10)
    np.testing.assert_allclose(head_average(att), att.mean(1))
    reduced, factor = reduce_for_display(att[0, 0], 4)
    assert factor == 3 and reduced.shape == (4, 4)
    assert reduced[0, 0] == pytest.approx(att[0, 0, :3, :3].mean())


def test_configured_causal_model_and_truncation():
    cfg = ModelConfig(architecture="decoder", **SMALL)
    text = " ".join(["word"] * 40)
    r = configured_attentions(cfg, text)
    assert r.attentions.shape == (2, 4, 16, 16)
    assert r.truncated == 40 - 14  # [CLS] and [SEP] kept
    upper = np.triu(np.ones((16, 16), dtype=bool), 1)
    assert np.all(r.attentions[..., upper] == 0) and not r.allowed[upper].any()
    assert "folded" in r.note


def test_unit_scaling_changes_attention_entropy_at_init():
    """Standard init gives near-uniform attention (tiny logits); unit scaling's unit logits
    give peakier heads: lower entropy."""
    text = "the quick brown fox jumps over the lazy dog"
    std = configured_attentions(ModelConfig(parametrization="standard", **SMALL), text)
    unit = configured_attentions(ModelConfig(parametrization="unit", **SMALL), text)
    assert entropy(unit.attentions).mean() < entropy(std.attentions).mean()


def test_encoder_decoder_has_cross_attention():
    r = configured_attentions(ModelConfig(architecture="encoder-decoder", **SMALL), "a b c")
    assert r.cross_attentions.shape == r.attentions.shape
    assert r.encoder_attentions.shape[0] == 2


def test_cli_attention_npz(tmp_path, capsys):
    out = tmp_path / "att.npz"
    assert main(["attention", "--model", "minilm", "--text", "naïve café", "--out",
                 str(out)]) == 0
    data = np.load(out, allow_pickle=False)
    assert data["attentions"].dtype == np.float32 and data["attentions"].shape[:2] == (6, 12)
    assert list(data["tokens"])[0] == "[CLS]"


def test_cli_attention_user_errors(tmp_path, capsys):
    assert main(["attention", "--text", "x", "--out", str(tmp_path / "a.npz")]) == 2
    assert main(["attention", "--model", str(tmp_path), "--text", "x", "--out",
                 str(tmp_path / "a.npz")]) == 2
    err = capsys.readouterr().err
    assert "safetensors" in err and err.count("\n") == 2


def test_long_sequences_are_reduced_on_the_device_with_full_resolution_summaries():
    import torch
    import torch.nn.functional as F

    cfg = ModelConfig(**{**SMALL, "max_len": 300, "seq_len": 300})
    text = " ".join(["word"] * 298)
    full = configured_attentions(cfg, text)
    red = configured_attentions(cfg, text, max_side=64)
    assert full.attentions.shape == (2, 4, 300, 300)
    assert red.factor == 5 and red.attentions.shape == (2, 4, 60, 60)
    pooled = F.avg_pool2d(torch.from_numpy(full.attentions[1]), 5, ceil_mode=True).numpy()
    np.testing.assert_allclose(red.attentions[1], pooled, atol=1e-6)
    np.testing.assert_allclose(red.entropy, entropy(full.attentions), atol=1e-4)
    want = F.avg_pool2d(torch.from_numpy(rollout(full.attentions)[-1])[None], 5,
                        ceil_mode=True)[0].numpy()
    np.testing.assert_allclose(red.rollout[-1], want, atol=1e-5)


def test_configured_text_is_limited_by_the_model_not_the_tokenizer_source():
    """MiniLM's 512 positions do not cap a configured model with max_len 1024."""
    cfg = ModelConfig(**{**SMALL, "n_layers": 1, "max_len": 1024, "seq_len": 16})
    r = configured_attentions(cfg, " ".join(["word"] * 700), max_side=128)
    assert len(r.tokens) == 702 and r.truncated == 0
    assert r.attentions.shape[-1] == 117  # ceil(702 / 6)


def test_encoder_decoder_reduced_on_the_device():
    cfg = ModelConfig(**{**SMALL, "architecture": "encoder-decoder", "max_len": 200,
                         "seq_len": 16})
    text = " ".join(["word"] * 198)
    full = configured_attentions(cfg, text)
    red = configured_attentions(cfg, text, max_side=50)
    assert red.factor == 4
    assert red.cross_attentions.shape == (2, 4, 50, 50)
    assert red.summaries["cross"]["rollout"] is None
    np.testing.assert_allclose(red.summaries["encoder"]["entropy"],
                               entropy(full.encoder_attentions), atol=1e-4)
    np.testing.assert_allclose(red.summaries["cross"]["entropy"],
                               entropy(full.cross_attentions), atol=1e-4)
