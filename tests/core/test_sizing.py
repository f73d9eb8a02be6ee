"""Sizing against published figures and against the built torch model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unitscale_core import ModelConfig, build_model, count_parameters
from unitscale_core.config import ACTIVATIONS, ARCHITECTURES, NORMS, POSITIONALS, ConfigError
from unitscale_core.model import unsupported_fields
from unitscale_core.presets import load_preset
from unitscale_core.sizing import (
    activation_bytes,
    flops_per_token,
    format_bytes,
    kv_cache_bytes,
    training_memory,
)

GPT2_SMALL = dict(architecture="decoder", d_model=768, n_heads=12, d_ff=3072, n_layers=12,
                  vocab_size=50257, max_len=1024, seq_len=1024, positional="learned",
                  norm="pre", activation="gelu", bias=True, tie_embeddings=True)


def test_gpt2_small_published_count():
    assert count_parameters(ModelConfig(**GPT2_SMALL))["total"] == 124_439_808
    assert count_parameters(load_preset("gpt2-small"))["total"] == 124_439_808


def test_gpt2_medium_published_count():
    cfg = ModelConfig(**{**GPT2_SMALL, "d_model": 1024, "n_heads": 16, "d_ff": 4096,
                         "n_layers": 24})
    assert count_parameters(cfg)["total"] == 354_823_168


def test_gpt2_small_matches_transformers():
    """Independent reference: Hugging Face's GPT2LMHeadModel with GPT-2 small's shape."""
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):  # shapes only: 124 M fp32 weights took 12 s to initialise
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    # GPT2LMHeadModel.parameters() yields the tied wte/lm_head weight once.
    assert sum(p.numel() for p in hf.parameters()) == 124_439_808


def test_components_sum_to_total():
    report = count_parameters(ModelConfig(architecture="encoder-decoder", tie_embeddings=False))
    assert sum(report["components"].values()) == report["total"]


def test_korthikanti_activation_formula():
    """Per layer sbh(34 + 5as/h) bytes at 16 bits, dropout, f = 4h (Korthikanti 2022 eq. 1)."""
    s, b, h, a, layers, v = 2048, 4, 1024, 16, 3, 1000
    cfg = ModelConfig(d_model=h, n_heads=a, d_ff=4 * h, n_layers=layers, seq_len=s, max_len=s,
                      batch_size=b, dtype="bf16", dropout=0.1, vocab_size=v)
    per_layer = s * b * h * (34 + 5 * a * s / h)
    extra = 2 * s * b * h + 4 * s * b * v  # final norm input + fp32 logits
    assert activation_bytes(cfg) == layers * per_layer + extra


def _saved_for_backward(cfg: ModelConfig) -> int:
    """Bytes the standard model keeps for backward in one training step: every tensor
    autograd saves (forward and the fp32 cross-entropy), each storage once, weights left out."""
    model = build_model(cfg)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    ids = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len),
                        generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    return sum(saved.values())


_ACT = dict(d_model=128, n_heads=8, d_ff=512, n_layers=2, vocab_size=64, max_len=256,
            seq_len=128, batch_size=4, positional="rope", bias=False, tie_embeddings=False)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("fields", [
    {}, {"norm_type": "rmsnorm"}, {"n_kv_heads": 2}, {"activation": "swiglu"},
    {"activation": "geglu"}, {"qk_norm": "head"}, {"qk_norm": "all_heads", "norm_type": "rmsnorm"},
    {"norm": "sandwich"}, {"norm": "branch_output"}, {"parallel_residual": True},
    {"head_dim": 32}, {"attn_softcap": 50.0, "logit_softcap": 30.0}, {"rotary_fraction": 0.25},
    {"n_experts": 4, "experts_per_token": 2, "activation": "swiglu"},
    {"n_experts": 8, "experts_per_token": 2, "norm_type": "rmsnorm", "n_kv_heads": 2},
], ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()) or "classic")
def test_activation_bytes_match_what_the_model_saves_for_backward(fields, dtype):
    """Issue 21's fields against the bytes the model actually keeps (saved-tensor hooks): the
    estimate is within 0-5% below (LayerNorm statistics, rope tables, index tensors are left
    out). Before the fields were checked: GQA +9% (K and V are kept repeated to the query
    heads), RMSNorm in bf16 +33% (fp32 input and output kept), soft caps +36% (the tanh's
    output), MoE +10% (gathered rows and unweighted outputs), parallel residual -1.5% (the
    two norms share one input)."""
    cfg = ModelConfig(**_ACT, **fields, dtype=dtype)
    refused = unsupported_fields(cfg)
    if refused:
        pytest.skip(f"the torch model does not build {sorted(refused)} yet")
    ratio = _saved_for_backward(cfg) / activation_bytes(cfg)
    assert 1.0 <= ratio <= 1.05, ratio


def test_mixed_precision_adam_is_16_bytes_per_parameter():
    cfg = ModelConfig(dtype="fp16")
    n = count_parameters(cfg)["total"]
    mem = training_memory(cfg)
    assert mem["weights"] + mem["gradients"] + mem["optimizer"] == 16 * n


def test_flops_kaplan():
    cfg = ModelConfig(**GPT2_SMALL)
    n_matmul = 12 * (4 * 768**2 + 4 * 768 + 2 * 768 * 3072 + 3072 + 768) + 50257 * 768
    f = flops_per_token(cfg)
    assert f["forward"] == 2 * n_matmul + 2 * 12 * 1024 * 768
    assert f["training"] == 3 * f["forward"]


def test_kv_cache():
    cfg = ModelConfig(**GPT2_SMALL, dtype="fp16", batch_size=1)
    assert kv_cache_bytes(cfg) == 2 * 12 * 1024 * 768 * 2  # 37.7 MB, the usual GPT-2 figure
    assert kv_cache_bytes(cfg.replace(architecture="encoder")) == 0


def test_gpt3_answers_without_building():
    cfg = ModelConfig(d_model=12288, n_heads=96, d_ff=49152, n_layers=96, vocab_size=50257,
                      max_len=2048, seq_len=2048, batch_size=1)
    total = count_parameters(cfg)["total"]
    assert 174e9 < total < 176e9  # "175B" (Brown et al. 2020, Table 2.1)


def test_format_bytes():
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(10**400).endswith("EiB")


def _numel(cfg: ModelConfig) -> int:
    return sum(p.numel() for p in build_model(cfg).parameters())


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("positional", POSITIONALS)
def test_count_equals_model_every_architecture_and_position(arch, positional):
    cfg = ModelConfig(architecture=arch, positional=positional, d_model=32, n_heads=4, d_ff=48,
                      n_layers=2, vocab_size=97, max_len=40, seq_len=16)
    assert count_parameters(cfg)["total"] == _numel(cfg)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(ARCHITECTURES), positional=st.sampled_from(POSITIONALS),
    norm=st.sampled_from(NORMS), activation=st.sampled_from(ACTIVATIONS),
    bias=st.booleans(), tie=st.booleans(), heads=st.integers(1, 4), head_dim=st.integers(1, 6),
    d_ff=st.integers(1, 40), layers=st.integers(1, 3), dec=st.one_of(st.none(), st.integers(1, 3)),
    vocab=st.integers(2, 60), max_len=st.integers(1, 30),
)
def test_count_equals_model_random(arch, positional, norm, activation, bias, tie, heads,
                                   head_dim, d_ff, layers, dec, vocab, max_len):
    head_dim *= 2  # rope needs even head sizes; sinusoidal an even d_model
    cfg = ModelConfig(architecture=arch, positional=positional, norm=norm, activation=activation,
                      bias=bias, tie_embeddings=tie, n_heads=heads, d_model=heads * head_dim,
                      d_ff=d_ff, n_layers=layers, n_decoder_layers=dec, vocab_size=vocab,
                      max_len=max_len, seq_len=max_len)
    if unsupported_fields(cfg):  # not built by the torch model yet: refused by name
        with pytest.raises(ConfigError) as info:
            build_model(cfg)
        assert set(info.value.errors) == set(unsupported_fields(cfg))
        return
    assert count_parameters(cfg)["total"] == _numel(cfg)


def test_built_model_runs_forward_and_backward():
    for arch in ARCHITECTURES:
        cfg = ModelConfig(architecture=arch, d_model=32, n_heads=4, d_ff=64, n_layers=2,
                          vocab_size=50, seq_len=12, max_len=16, positional="rope")
        model = build_model(cfg)
        idx = torch.randint(0, 50, (2, 12))
        logits = model(idx, idx) if arch == "encoder-decoder" else model(idx)
        assert logits.shape == (2, 12, 50)
        model.loss(logits, idx).backward()
        assert all(p.grad is not None for p in model.parameters())
