"""Checkpoints of issue 21: modern families and sharded safetensors folders.

Each family (gpt_neox, llama, mistral, qwen2, gemma2, olmo2, phi3, mixtral) is a small random
model that transformers builds and saves (safetensors); loaded by our loader into our own
modules, its attentions and logits must equal transformers' eager ``output_attentions``
within 1e-4 — or, while the torch model does not build one of the family's features, the
loader must refuse it with a ConfigError naming each such field.
A small random GPT-2 saved with a small ``max_shard_size`` is the sharded reference. Index
files that point outside the folder, at missing shards or at anything but safetensors are
refused by name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from unitscale_core import pretrained as P
from unitscale_core.config import ConfigError, quote
from unitscale_core.hf_config import from_hf
from unitscale_core.model import unsupported_fields
from unitscale_core.pretrained import PretrainedError

from .test_pretrained import GPT2_SIZES, TOL, _byte_level_tokenizer

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded_gpt2(tmp_path_factory):
    """A random GPT-2 saved in shards of at most 40 kB, and transformers' eager model."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        transformers = pytest.importorskip("transformers")
        transformers.logging.set_verbosity_error()
        folder = tmp_path_factory.mktemp("sharded") / "gpt2"
        config = transformers.GPT2Config(**GPT2_SIZES, initializer_range=0.2, bos_token_id=0,
                                         eos_token_id=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            ref = transformers.GPT2LMHeadModel(config)
        ref.save_pretrained(folder, safe_serialization=True, max_shard_size="40KB")
        _byte_level_tokenizer().save(str(folder / "tokenizer.json"))
        ref = transformers.GPT2LMHeadModel.from_pretrained(
            folder, attn_implementation="eager", local_files_only=True).eval()
        yield folder, ref


def test_sharded_checkpoint_loads_and_matches_transformers(sharded_gpt2):
    folder, ref = sharded_gpt2
    assert (folder / INDEX).is_file() and not (folder / "model.safetensors").exists()
    shards = set(json.loads((folder / INDEX).read_text())["weight_map"].values())
    assert len(shards) > 1
    loaded = P.load_checkpoint(folder)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 11]])
    ours = P.attention_probs(loaded, ids)
    with torch.no_grad():
        theirs = ref(ids, output_attentions=True).attentions
    np.testing.assert_allclose(ours, torch.cat(theirs).numpy(), atol=TOL, rtol=0)


@pytest.fixture
def shard_copy(sharded_gpt2, tmp_path) -> Path:
    return Path(shutil.copytree(sharded_gpt2[0], tmp_path / "copy"))


def _rewrite(folder: Path, change) -> None:
    index = json.loads((folder / INDEX).read_text())
    change(index)
    (folder / INDEX).write_text(json.dumps(index))


def _first(index: dict) -> str:
    return next(iter(index["weight_map"]))


def _refusal(folder: Path) -> str:
    with pytest.raises(PretrainedError) as info:
        P.load_checkpoint(folder)
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd.safetensors",
                                  "sub/model.safetensors", "..\\x.safetensors"])
def test_index_pointing_outside_the_folder_is_refused(shard_copy, name):
    _rewrite(shard_copy, lambda ix: ix["weight_map"].__setitem__(_first(ix), name))
    message = _refusal(shard_copy)
    assert quote(name) in message and "outside" in message


def test_shard_linked_outside_the_folder_is_refused(shard_copy, tmp_path):
    index = json.loads((shard_copy / INDEX).read_text())
    shard = index["weight_map"][_first(index)]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard_copy / shard, outside)
    os.symlink(outside, shard_copy / shard)
    message = _refusal(shard_copy)
    assert shard in message and "outside" in message


def test_missing_shard_is_refused_by_name(shard_copy):
    index = json.loads((shard_copy / INDEX).read_text())
    shard = index["weight_map"][_first(index)]
    (shard_copy / shard).unlink()
    message = _refusal(shard_copy)
    assert shard in message and "missing" in message


def test_pickled_shard_is_refused_unopened(shard_copy, monkeypatch):
    (shard_copy / "pytorch_model-00001-of-00002.bin").write_bytes(b"not opened")
    _rewrite(shard_copy, lambda ix: ix["weight_map"].__setitem__(
        _first(ix), "pytorch_model-00001-of-00002.bin"))
    opened = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    message = _refusal(shard_copy)
    assert "pytorch_model-00001-of-00002.bin" in message and "safetensors" in message
    assert not any(p.endswith(".bin") for p in opened)


def test_tensor_not_in_its_shard_is_refused(shard_copy):
    index = json.loads((shard_copy / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    _rewrite(shard_copy, lambda ix: ix["weight_map"].__setitem__(key, shards[1]))
    message = _refusal(shard_copy)
    assert key in message and shards[1] in message


@pytest.mark.parametrize("text", ["{nope", "[]", '{"weight_map": {}}', '{"weight_map": [1]}',
                                  '{"weight_map": {"a": 5}}'])
def test_malformed_index_is_a_one_line_refusal(shard_copy, text):
    (shard_copy / INDEX).write_text(text)
    assert INDEX in _refusal(shard_copy)


def test_single_file_is_preferred_over_an_index(shard_copy):
    from .test_pretrained import _write_tiny_gpt2

    single = _write_tiny_gpt2(shard_copy.parent / "single")
    (single / INDEX).write_text("{nope")  # not read when model.safetensors is there
    assert P.load_checkpoint(single).config.n_layers == 2


# -- GQA labels ---------------------------------------------------------------------------------

def test_head_labels_name_each_query_heads_kv_group():
    from unitscale_core.attention_views import head_label, kv_group, kv_summary

    assert [kv_group(h, 8, 2) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert head_label(5, 8, 2) == "head 5 · kv 1"
    assert head_label(5, 8, None) == head_label(5, 8, 8) == "head 5"
    assert head_label(3, 4, 1) == "head 3 · kv 0"  # multi-query attention
    assert kv_summary(8, 2) == "8 query heads share 2 K/V heads (kv 0: heads 0–3; kv 1: heads 4–7)"
    assert kv_summary(8, None) == ""


def test_cli_attention_names_the_kv_group_of_each_head(tmp_path, capsys):
    from unitscale_core import cli

    config = tmp_path / "gqa.json"
    config.write_text(json.dumps({"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
                                  "n_layers": 2, "vocab_size": 500, "max_len": 64,
                                  "seq_len": 16, "device": "cpu"}))
    out = tmp_path / "att.npz"
    assert cli.main(["attention", "--config", str(config), "--text", "a b c",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 query heads share 2 K/V heads (kv 0: heads 0–1; kv 1: heads 2–3)" in text
    with np.load(out) as data:
        assert data["kv_head"].tolist() == [0, 0, 1, 1]
        assert data["attentions"].shape[1] == 4  # one map per query head
    mha = tmp_path / "mha.json"
    mha.write_text(config.read_text().replace('"n_kv_heads": 2, ', ""))
    assert cli.main(["attention", "--config", str(mha), "--text", "a b c",
                     "--out", str(out)]) == 0
    assert "K/V" not in capsys.readouterr().out
    with np.load(out) as data:
        assert "kv_head" not in data


# -- modern families -----------------------------------------------------------------------------

VOCAB = 300  # the byte-level test tokenizer's alphabet needs ≥ 257 ids
#: Sizes every family shares: GQA (4 query heads over 2 K/V heads) where the family has it.
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2)
GQA = dict(num_key_value_heads=2)
#: family id → (config class, model class, the family's options). Each exercises what the
#: loader must map: NeoX's per-head fused qkv and partial rotary (parallel and sequential),
#: Llama's rope permutation under GQA with θ 5e5 (and Llama 3.1's rope scaling, whose
#: original context 16 puts one frequency in the smoothed band and the rest divided by 8;
#: linear scaling on Qwen 2), Mistral's window (max_len cut to 32),
#: Qwen 2's q/k/v biases, Gemma 2's head_dim ≠ d/h, 1 + w gains, √d embedding, query scalar
#: and both soft caps, OLMo 2's whole-projection q/k norms, Phi-3's fused qkv and gate_up
#: with partial rotary, Mixtral's experts.
FAMILIES = {
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.5)),
    "gpt_neox_sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                            dict(rotary_pct=0.25, use_parallel_residual=False,
                                 tie_word_embeddings=True)),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(GQA, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama_rope_llama3": ("LlamaConfig", "LlamaForCausalLM", dict(GQA, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(GQA, sliding_window=32)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(GQA, tie_word_embeddings=True)),
    "qwen2_rope_linear": ("Qwen2Config", "Qwen2ForCausalLM", dict(GQA, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(GQA, head_dim=24, query_pre_attn_scalar=20, sliding_window=32,
                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(GQA)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(GQA, pad_token_id=0, sliding_window=None, partial_rotary_factor=0.5)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(GQA, num_local_experts=4, num_experts_per_tok=2)),
}


@pytest.fixture(scope="module")
def hf_transformers():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        module = pytest.importorskip("transformers")
        module.logging.set_verbosity_error()
        yield module


@pytest.fixture(scope="module")
def saved_families(hf_transformers, tmp_path_factory):
    """family id → (folder, transformers' eager model read back from it), built lazily."""
    made: dict[str, tuple[Path, object]] = {}
    root = tmp_path_factory.mktemp("families")

    def get(family: str):
        if family not in made:
            made[family] = _save_family(hf_transformers, family, root / family)
        return made[family]

    return get


def _save_family(transformers, family: str, folder: Path):
    config_class, model_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(**COMMON, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sum(map(ord, family)))
        model = getattr(transformers, model_class)(config)
        with torch.no_grad():  # norm gains and biases away from 1 and 0 (Gemma's w from 0)
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    _byte_level_tokenizer(VOCAB).save(str(folder / "tokenizer.json"))
    ref = getattr(transformers, model_class).from_pretrained(
        folder, attn_implementation="eager", local_files_only=True).eval()
    return folder, ref


def _unbuilt(folder: Path) -> dict[str, str]:
    """The fields the torch model does not build yet for the saved family's config."""
    data = json.loads((folder / "config.json").read_text())
    return unsupported_fields(from_hf(data)[0])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_checkpoint_matches_transformers_or_is_refused_by_field(saved_families, family):
    folder, ref = saved_families(family)
    unbuilt = _unbuilt(folder)
    if unbuilt:  # the features the model lacks: a refusal naming each, never another model
        with pytest.raises(ConfigError) as info:
            P.load_checkpoint(folder)
        assert isinstance(info.value, PretrainedError)
        assert set(info.value.errors) == set(unbuilt)
        message = str(info.value)
        assert "\n" not in message and all(f in message for f in unbuilt)
        return
    loaded = P.load_checkpoint(folder)
    cfg = loaded.config
    assert loaded.kind == json.loads((folder / "config.json").read_text())["model_type"]
    for length in (1, 13, cfg.max_len):
        ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
        ours = P.attention_probs(loaded, ids)
        with torch.no_grad():
            out = ref(input_ids=ids, output_attentions=True)
            logits = loaded.model(ids)
        theirs = torch.stack([a[0] for a in out.attentions]).numpy()
        assert ours.shape == theirs.shape == (2, 4, length, length)
        np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
        torch.testing.assert_close(logits, out.logits, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_cli_attention_reads_a_family_checkpoint_folder(saved_families, family, tmp_path,
                                                        capsys):
    """``unitscale attention --model FOLDER``: one map per query head, each GQA head's K/V
    head named (llama: 4 query heads over 2 K/V heads), or one line naming the unbuilt fields."""
    from unitscale_core import cli

    folder, ref = saved_families(family)
    capsys.readouterr()  # (transformers' progress bars while saving)
    out = tmp_path / "att.npz"
    code = cli.main(["attention", "--model", str(folder), "--text", "hello world",
                     "--out", str(out)])
    captured = capsys.readouterr()
    unbuilt = _unbuilt(folder)
    if unbuilt:
        assert code == 2 and not out.exists()
        line = captured.err.strip()
        assert line.startswith(f"unitscale attention: error: config.json ({family})")
        assert "\n" not in line and all(f in line for f in unbuilt)
        return
    assert code == 0, captured.err
    loaded = P.load_checkpoint(folder)
    ids = P.encode(loaded, "hello world").ids
    with torch.no_grad():
        theirs = torch.stack([a[0] for a in ref(input_ids=ids, output_attentions=True)
                              .attentions]).numpy()
    with np.load(out) as data:
        np.testing.assert_allclose(data["attentions"], theirs, atol=TOL, rtol=0)
        assert "".join(data["tokens"].tolist()) == "hello world"
        kv = data["kv_head"].tolist() if "kv_head" in data else None
    if family == "llama":
        assert kv == [0, 0, 1, 1]
        assert "4 query heads share 2 K/V heads (kv 0: heads 0–1; kv 1: heads 2–3)" \
            in captured.out
    else:
        assert kv is None and "K/V" not in captured.out


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0},
                                  {"rope_type": "dynamic", "factor": 2.0}])
def test_rope_scaling_the_loader_does_not_compute_is_refused_by_name(saved_families, rope,
                                                                     tmp_path):
    folder = Path(shutil.copytree(saved_families("llama")[0], tmp_path / "scaled"))
    data = json.loads((folder / "config.json").read_text())
    data["rope_parameters"] = {**data["rope_parameters"], **rope}
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        P.load_checkpoint(folder)
    assert set(info.value.errors) == {"rope_parameters"}
    assert quote(rope["rope_type"]) in str(info.value) and "llama3" in str(info.value)


def test_llama3_rope_frequencies_equal_transformers(hf_transformers):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}  # Llama 3.2 1B's
    config = hf_transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32,
                                         rope_parameters=params)
    theirs, factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = P.rope_frequencies(P._rope_params({"rope_parameters": params}, "llama"), 64,
                              500000.0, 131072)
    assert factor == 1.0
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=1e-6, atol=0)
    plain = 500000.0 ** (-np.arange(0, 64, 2) / 64)
    assert (ours < plain * 0.999).any() and np.isclose(ours[0], plain[0], rtol=1e-6)


@pytest.fixture
def llama_copy(saved_families, tmp_path) -> Path:
    return Path(shutil.copytree(saved_families("llama")[0], tmp_path / "llama"))


def _edit_tensors(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_family_checkpoint_lacking_tensors_is_refused_by_name(llama_copy):
    _edit_tensors(llama_copy, lambda t: [t.pop("lm_head.weight"),
                                         t.pop("model.layers.1.self_attn.q_proj.weight")])
    message = _refusal(llama_copy)
    assert "lacks 2 tensors" in message
    assert "lm_head.weight" in message and "model.layers.1.self_attn.q_proj.weight" in message


def test_family_config_claiming_other_kv_heads_is_refused_by_shape(llama_copy):
    data = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**data, "num_key_value_heads": 4}))
    message = _refusal(llama_copy)
    assert "model.layers.0.self_attn.k_proj.weight" in message
    assert "[32, 64]" in message and "[64, 64]" in message


def test_family_checkpoint_beyond_free_memory_is_refused_before_allocating(llama_copy,
                                                                         monkeypatch):
    import unitscale_core.memory_budget as budget

    monkeypatch.setattr(budget, "available_memory", lambda device="cpu": (100_000, "host RAM"))
    built = []
    monkeypatch.setattr(torch.nn.Module, "to_empty",
                        lambda self, **kw: built.append(self) or self)
    from safetensors.torch import load_file

    message = _refusal(llama_copy)
    assert not built  # refused on the meta model's shapes, before any weight memory
    params = sum(t.numel() for t in load_file(str(llama_copy / "model.safetensors")).values())
    assert f"{params:,} parameters" in message and "host RAM" in message


def test_nonfinite_weights_in_a_family_checkpoint_are_refused(llama_copy):
    def poison(t):
        t["model.layers.0.self_attn.k_proj.weight"][0, 0] = float("nan")

    _edit_tensors(llama_copy, poison)
    message = _refusal(llama_copy)
    assert "model.layers.0.self_attn.k_proj.weight" in message and "NaN" in message


def test_sharded_bf16_gemma2_checkpoint_matches_transformers_in_fp32(hf_transformers, tmp_path):
    """Real checkpoints are bf16 and sharded: a Gemma 2 saved so (shards of ≤ 40 kB) loads
    in fp32 (1 + w computed from the bf16 w in fp32, as Gemma does) and matches transformers'
    fp32 model read from the same files."""
    folder, _ = _save_family(hf_transformers, "gemma2", tmp_path / "fp32")
    model = hf_transformers.Gemma2ForCausalLM.from_pretrained(folder, local_files_only=True)
    sharded = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(sharded, safe_serialization=True,
                                             max_shard_size="40KB")
    shutil.copy(folder / "tokenizer.json", sharded / "tokenizer.json")
    assert (sharded / INDEX).is_file()
    if _unbuilt(sharded):
        pytest.fail(f"gemma2 is expected to build: {_unbuilt(sharded)}")
    ref = hf_transformers.Gemma2ForCausalLM.from_pretrained(
        sharded, attn_implementation="eager", local_files_only=True, dtype=torch.float32).eval()
    loaded = P.load_checkpoint(sharded)
    assert next(loaded.model.parameters()).dtype == torch.float32
    ids = torch.randint(0, VOCAB, (1, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = ref(input_ids=ids, output_attentions=True)
        logits = loaded.model(ids)
    theirs = torch.stack([a[0] for a in out.attentions]).numpy()
    np.testing.assert_allclose(P.attention_probs(loaded, ids), theirs, atol=TOL, rtol=0)
    torch.testing.assert_close(logits, out.logits, atol=TOL, rtol=TOL)
