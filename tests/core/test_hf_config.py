"""Hugging Face config.json import: published configs against transformers' own models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unitscale_core.config import ConfigError
from unitscale_core.hf_config import from_hf
from unitscale_core.sizing import count_parameters, kv_cache_bytes_per_token

DATA = Path(__file__).parent / "data" / "hf_configs"
NAMES = sorted(p.stem for p in DATA.glob("*.json"))

#: Published totals (model cards / papers), independent of both codes.
PUBLISHED = {
    "llama-3-8b": 8_030_261_248, "llama-3.2-1b": 1_235_814_400,
    "mistral-7b-v0.1": 7_241_732_096, "qwen2.5-0.5b": 494_032_768,
    "pythia-160m": 162_322_944, "mixtral-8x7b": 46_702_792_704, "gpt2": 124_439_808,
}


def _hf(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def test_published_totals():
    for name, total in PUBLISHED.items():
        assert count_parameters(from_hf(_hf(name))[0])["total"] == total, name


def test_mixtral_active_parameters():
    assert count_parameters(from_hf(_hf("mixtral-8x7b"))[0])["active"] == 12_879_925_248


def test_llama3_8b_kv_cache_per_token_bf16():
    cfg = from_hf(_hf("llama-3-8b"))[0].replace(dtype="bf16")
    assert kv_cache_bytes_per_token(cfg) == 131_072  # 2 · 32 layers · 8 heads · 128 · 2 B


def _transformers_numel(data: dict) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    fields = {k: v for k, v in data.items() if k not in ("model_type", "architectures",
                                                         "transformers_version")}
    hf_cfg = transformers.AutoConfig.for_model(data["model_type"], **fields)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in NAMES if n != "bert-base-uncased"])
def test_count_equals_transformers_meta_model(name):
    data = _hf(name)
    assert count_parameters(from_hf(data)[0])["total"] == _transformers_numel(data)


def test_bert_differs_by_exactly_the_parts_it_warns_about():
    data = _hf("bert-base-uncased")
    cfg, warnings = from_hf(data)
    h, v = 768, 30522
    # token types + MLM transform (dense, LayerNorm) + output bias; BERT's embedding
    # LayerNorm has the size of the program's final norm, which stands in its place
    extra = 2 * h + (h * h + h + 2 * h) + v
    assert count_parameters(cfg)["total"] + extra == _transformers_numel(data)
    assert any("token-type" in w for w in warnings)


def test_fields_mapped():
    cfg = from_hf(_hf("gemma-2-2b"))[0]
    assert (cfg.norm, cfg.norm_type, cfg.activation, cfg.head_size, cfg.kv_heads) == (
        "sandwich", "rmsnorm", "geglu", 256, 4)
    assert (cfg.attn_softcap, cfg.logit_softcap, cfg.tie_embeddings) == (50.0, 30.0, True)
    olmo = from_hf(_hf("olmo-2-7b"))[0]
    assert (olmo.norm, olmo.qk_norm, olmo.n_kv_heads, olmo.rope_base) == (
        "branch_output", "all_heads", None, 500000.0)
    pythia = from_hf(_hf("pythia-160m"))[0]
    assert (pythia.parallel_residual, pythia.rotary_dims, pythia.norm_type) == (True, 16,
                                                                               "layernorm")
    qwen = from_hf(_hf("qwen2.5-0.5b"))[0]
    assert (qwen.has_qkv_bias, qwen.bias, qwen.rope_base) == (True, False, 1e6)
    mix = from_hf(_hf("mixtral-8x7b"))[0]
    assert (mix.n_experts, mix.experts_per_token) == (8, 2)
    assert from_hf(_hf("llama-3-8b"), seq_len=512, batch_size=3)[0].seq_len == 512


def test_warnings_per_field():
    assert from_hf(_hf("llama-3-8b"))[1] == []
    assert any("llama3" in w for w in from_hf(_hf("llama-3.2-1b"))[1])
    gemma = from_hf(_hf("gemma-2-2b"))[1]
    assert any("√hidden_size" in w for w in gemma)
    assert not any("sliding_window" in w for w in gemma)  # seq_len 2048 < 4096
    assert any("sliding_window=4096" in w for w in from_hf(_hf("gemma-2-2b"), seq_len=8192)[1])
    assert not any("sliding" in w for w in from_hf(_hf("mistral-7b-v0.1"))[1])
    assert any("sliding_window=4096" in w
               for w in from_hf(_hf("mistral-7b-v0.1"), seq_len=8192)[1])
    gemma_q = {**_hf("gemma-2-2b"), "query_pre_attn_scalar": 144}
    assert any("query_pre_attn_scalar=144" in w for w in from_hf(gemma_q)[1])


def test_refusals_name_the_key():
    with pytest.raises(ConfigError, match="model_type='falcon'"):
        from_hf({"model_type": "falcon", "hidden_size": 8})
    with pytest.raises(ConfigError, match="new_thing"):
        from_hf({**_hf("llama-3-8b"), "new_thing": 3})
    with pytest.raises(ConfigError, match="attention_bias"):
        from_hf({**_hf("llama-3-8b"), "attention_bias": True})
    with pytest.raises(ConfigError, match="hidden_act"):
        from_hf({**_hf("llama-3-8b"), "hidden_act": "relu2"})


def test_load_reads_a_hf_config_or_its_folder(tmp_path):
    from unitscale_core.config import load, load_with_warnings

    (tmp_path / "config.json").write_text((DATA / "llama-3.2-1b.json").read_text())
    cfg, warnings = load_with_warnings(tmp_path)
    assert (cfg.d_model, cfg.n_kv_heads, cfg.tie_embeddings) == (2048, 8, True)
    assert any("llama3" in w for w in warnings)
    assert load(tmp_path / "config.json") == cfg
    with pytest.raises(ConfigError, match="holding no config.json"):
        load(tmp_path / "sub" if (tmp_path / "sub").mkdir() is None else tmp_path)


def test_cli_params_accepts_a_hf_folder_and_warns_on_stderr(tmp_path, capsys):
    from unitscale_core.cli import main

    (tmp_path / "config.json").write_text((DATA / "llama-3.2-1b.json").read_text())
    assert main(["params", "--config", str(tmp_path)]) in (0, None)
    out, err = capsys.readouterr()
    assert "1,235,814,400" in out
    assert "warning: rope_scaling" in err


_SMALL = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96,
              vocab_size=100, max_position_embeddings=128)


@pytest.mark.parametrize(("model_type", "fields"), [
    ("llama", dict(num_key_value_heads=2)),
    ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    ("llama", dict(head_dim=32)),
    ("mistral", dict(num_key_value_heads=2, sliding_window=64)),
    ("mixtral", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    ("gemma2", dict(num_key_value_heads=2, head_dim=32)),
    ("olmo2", dict(num_key_value_heads=2)),
    ("phi3", dict(num_key_value_heads=2, pad_token_id=0)),
    ("gpt_neox", dict(rotary_pct=0.5)),
    ("gpt_neox", dict(use_parallel_residual=False, tie_word_embeddings=True)),
])
@pytest.mark.parametrize("diff", [True, False], ids=["saved", "full"])
def test_a_config_transformers_writes_imports_with_its_count(model_type, fields, diff):
    """A config.json as transformers itself writes it (save_pretrained's diff, or every key),
    off the published shapes: imported, and counted as transformers counts it. (transformers
    5 writes gemma2's use_bidirectional_attention=false, which was refused as unknown.)"""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **_SMALL, **fields)
    data = {**json.loads(hf_cfg.to_json_string(use_diff=diff)), "model_type": model_type}
    cfg, _ = from_hf(data)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_gemma2_bidirectional_attention_is_refused_by_name():
    with pytest.raises(ConfigError, match="use_bidirectional_attention=true"):
        from_hf({**_hf("gemma-2-2b"), "use_bidirectional_attention": True})
    assert from_hf({**_hf("gemma-2-2b"), "use_bidirectional_attention": False})[0] == \
        from_hf(_hf("gemma-2-2b"))[0]
