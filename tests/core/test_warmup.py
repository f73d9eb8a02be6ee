"""The start-up warm-up: which model it measures."""

from __future__ import annotations

from unitscale_core import ModelConfig, count_parameters
from unitscale_core.warmup import WARM_UP_MAX_PARAMS, warm_up, warm_up_config


def test_a_small_config_is_warmed_up_as_itself():
    cfg = ModelConfig(d_model=64, n_heads=2, d_ff=128, n_layers=2, vocab_size=256,
                      seq_len=32, batch_size=4, positional="rope", parametrization="unit")
    used = warm_up_config(cfg)
    # sequence length and batch size do not change the (cached) model
    assert used == cfg.replace(seq_len=8, batch_size=1)


def test_a_large_config_is_warmed_up_through_a_tiny_model_of_its_kind():
    cfg = ModelConfig(architecture="encoder-decoder", d_model=2048, n_heads=16, d_ff=8192,
                      n_layers=24, n_decoder_layers=12, positional="alibi", activation="swiglu",
                      parametrization="umup", norm="post", dtype="bf16")
    assert count_parameters(cfg)["total"] > WARM_UP_MAX_PARAMS
    used = warm_up_config(cfg)
    assert count_parameters(used)["total"] < 100_000
    for field in ("architecture", "positional", "activation", "parametrization", "norm",
                  "dtype", "device", "attention"):
        assert getattr(used, field) == getattr(cfg, field)
    assert used.n_decoder_layers == 1


def test_warm_up_measures_and_captures_attention(monkeypatch):
    from unitscale_core import attention_views, measure

    calls = []
    monkeypatch.setattr(measure, "measure", lambda c, **kw: calls.append(("measure", c)))
    monkeypatch.setattr(attention_views, "configured_attentions",
                        lambda c, text, **kw: calls.append(("attention", c)))
    cfg = ModelConfig(d_model=64, n_heads=2, d_ff=128, n_layers=2, vocab_size=256)
    used = warm_up(cfg)
    assert calls == [("measure", used), ("attention", used)]
