"""Pretrained checkpoints in our model classes: MiniLM and GPT-2 against transformers, refusals.

transformers is used only as the reference, from local folders (HF_HUB_OFFLINE=1): the bundled
all-MiniLM-L6-v2 and a small random GPT-2 saved to a temporary folder.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from unitscale_core import pretrained as P
from unitscale_core.pretrained import PretrainedError

TOL = 1e-4
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention heads look at other tokens in the sentence.",
    "naïve café — 東京 🚀",
    "Unit scaling keeps every tensor near unit variance.",
    "hello world, hello tokens, hello heads",
]
GPT2_SIZES = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=64)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
    """transformers, imported with the hub switched off (the references are local folders)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        module = pytest.importorskip("transformers")
        module.logging.set_verbosity_error()
        yield module


def _byte_level_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A GPT-2-style byte-level BPE tokenizer trained on a few sentences (vocab ≤ 300)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    assert tok.get_vocab_size() <= vocab_size
    return tok


def _gpt2_config(**extra) -> dict:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "n_inner": None,
            **GPT2_SIZES, **extra}


def _write_tiny_gpt2(folder: Path) -> Path:
    """A valid GPT-2 folder written without transformers (names without a prefix)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    c, v, t, n = GPT2_SIZES["n_embd"], GPT2_SIZES["vocab_size"], GPT2_SIZES["n_positions"], 2

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    tensors = {"wte.weight": r(v, c), "wpe.weight": r(t, c), "ln_f.weight": 1 + r(c),
               "ln_f.bias": r(c)}
    for i in range(n):
        tensors |= {
            f"h.{i}.ln_1.weight": 1 + r(c), f"h.{i}.ln_1.bias": r(c),
            f"h.{i}.attn.c_attn.weight": r(c, 3 * c), f"h.{i}.attn.c_attn.bias": r(3 * c),
            f"h.{i}.attn.c_proj.weight": r(c, c), f"h.{i}.attn.c_proj.bias": r(c),
            f"h.{i}.ln_2.weight": 1 + r(c), f"h.{i}.ln_2.bias": r(c),
            f"h.{i}.mlp.c_fc.weight": r(c, 4 * c), f"h.{i}.mlp.c_fc.bias": r(4 * c),
            f"h.{i}.mlp.c_proj.weight": r(4 * c, c), f"h.{i}.mlp.c_proj.bias": r(c),
        }
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(_gpt2_config()), encoding="utf-8")
    _byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return _write_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "gpt2")


@pytest.fixture
def broken(tiny_gpt2, tmp_path) -> Path:
    """A fresh copy of the tiny GPT-2 folder, to damage."""
    return Path(shutil.copytree(tiny_gpt2, tmp_path / "broken"))


@pytest.fixture(scope="module")
def minilm_pair(transformers):
    pt = P.minilm()
    ref = transformers.AutoModel.from_pretrained(pt.folder, attn_implementation="eager",
                                                 local_files_only=True).eval()
    return pt, ref


@pytest.fixture(scope="module")
def gpt2_pair(transformers, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    config = transformers.GPT2Config(**GPT2_SIZES, initializer_range=0.2, bos_token_id=0,
                                     eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = transformers.GPT2LMHeadModel(config)
    ref.save_pretrained(folder)  # safetensors, names prefixed "transformer."
    _byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    ref = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager",
                                                       local_files_only=True).eval()
    return P.load_checkpoint(folder), ref


def _one_line_error(folder: Path) -> str:
    with pytest.raises(PretrainedError) as info:
        P.load_checkpoint(folder)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# -- MiniLM ----------------------------------------------------------------------------------

MINILM_TEXTS = [
    "Hello world",
    "naïve café — 東京 🚀",
    "",
    "Attention heatmaps show which earlier words each token looks at, layer by layer and "
    "head by head, in a real pretrained sentence-embedding model loaded from safetensors.",
]


def test_minilm_config_and_model():
    pt = P.minilm()
    assert pt is P.minilm()  # cached
    cfg = pt.config
    assert (pt.kind, cfg.architecture, cfg.norm, cfg.positional) == ("bert", "encoder", "post",
                                                                     "learned")
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers) == (384, 12, 1536, 6)
    assert (cfg.vocab_size, cfg.max_len, cfg.seq_len, cfg.batch_size) == (30522, 512, 128, 1)
    assert not pt.model.training
    assert isinstance(pt.model.norm, torch.nn.Identity)
    assert pt.model.head.weight is pt.model.tok_emb.weight
    assert {m.eps for m in pt.model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-12}


@pytest.mark.parametrize("text", MINILM_TEXTS)
def test_minilm_attentions_match_transformers(minilm_pair, text):
    pt, ref = minilm_pair
    probs, tokens, truncated = P.attentions(pt, text)
    enc = P.encode(pt, text)
    with torch.no_grad():
        out = ref(input_ids=enc.ids, output_attentions=True)
    expected = torch.cat(out.attentions).numpy()  # (L, H, T, T)
    assert probs.dtype == np.float32 and probs.shape == expected.shape
    assert probs.shape == (6, 12, len(tokens), len(tokens))
    assert np.abs(probs - expected).max() < TOL
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and truncated == 0
    if text == "":
        assert tokens == ["[CLS]", "[SEP]"]
    with torch.no_grad():
        hidden = P.hidden_states(pt.model, enc.ids)
    assert (hidden - out.last_hidden_state).abs().max().item() < TOL
    # capture is switched off again
    assert all(not m.capture and m.probs is None and m.probs_out is None
               for _, m in pt.model.attention_modules())


def test_minilm_truncates_to_its_positions_and_keeps_specials():
    pt = P.minilm()
    enc = P.encode(pt, "word " * 600)  # 600 word tokens + [CLS] [SEP] > 512 positions
    assert enc.ids.shape == (1, 512) and enc.truncated == 600 - 510
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    probs, tokens, truncated = P.attentions(pt, "word " * 600)
    assert probs.shape == (6, 12, 512, 512) and truncated == 90
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    short = P.encode(pt, "one two three four five", max_tokens=5)
    assert short.tokens == ["[CLS]", "one", "two", "three", "[SEP]"] and short.truncated == 2


# -- GPT-2 -----------------------------------------------------------------------------------


def test_gpt2_config_and_model(gpt2_pair):
    pt, _ = gpt2_pair
    cfg = pt.config
    assert (pt.kind, cfg.architecture, cfg.norm, cfg.attention) == ("gpt2", "decoder", "pre",
                                                                    "causal")
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers) == (64, 4, 256, 2)
    assert (cfg.vocab_size, cfg.max_len, cfg.seq_len) == (300, 64, 64)
    assert pt.model.ops.gelu_approximate == "tanh"
    assert all(m.ops is pt.model.ops for m in pt.model.modules() if hasattr(m, "ops"))
    assert {m.eps for m in pt.model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    assert not pt.model.training


def _compare_gpt2(pt, ref, ids: torch.Tensor, probs: np.ndarray) -> None:
    with torch.no_grad():
        out = ref(input_ids=ids, output_attentions=True)
        logits = pt.model(ids)
    expected = torch.cat(out.attentions).numpy()
    assert probs.shape == expected.shape == (2, 4, ids.shape[1], ids.shape[1])
    assert np.abs(probs - expected).max() < TOL
    assert (logits - out.logits).abs().max().item() < TOL


@pytest.mark.parametrize("length", [1, 17, 64])
def test_gpt2_attentions_and_logits_match_transformers(gpt2_pair, length):
    pt, ref = gpt2_pair
    ids = torch.randint(0, 300, (1, length), generator=torch.Generator().manual_seed(length))
    _compare_gpt2(pt, ref, ids, P.attention_probs(pt, ids))


@pytest.mark.parametrize("text", SENTENCES[:3])
def test_gpt2_text_attentions_match_transformers(gpt2_pair, text):
    pt, ref = gpt2_pair
    probs, tokens, truncated = P.attentions(pt, text)
    enc = P.encode(pt, text)
    _compare_gpt2(pt, ref, enc.ids, probs)
    assert truncated == 0 and len(tokens) == enc.ids.shape[1]
    assert np.all(np.triu(probs, k=1) == 0)  # causal: no query sees a later key


def test_gpt2_byte_level_labels_read_as_text(tiny_gpt2):
    pt = P.load_checkpoint(tiny_gpt2)
    enc = P.encode(pt, "hello world")
    assert "".join(enc.tokens) == "hello world"
    assert any(t.startswith(" ") for t in enc.tokens)  # "Ġworld" shown as " world"
    probs, tokens, truncated = P.attentions(pt, "")
    assert probs.shape == (2, 4, 0, 0) and tokens == [] and truncated == 0


def test_gpt2_truncates_to_n_positions(tiny_gpt2):
    pt = P.load_checkpoint(tiny_gpt2)
    text = " ".join(SENTENCES * 3)
    n = len(Tokenizer.from_file(str(tiny_gpt2 / "tokenizer.json")).encode(text).ids)
    assert n > 64
    probs, tokens, truncated = P.attentions(pt, text)
    assert probs.shape == (2, 4, 64, 64) and len(tokens) == 64 and truncated == n - 64


# -- refusals --------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader ran the file's code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_folder_is_refused_unopened(tmp_path, monkeypatch):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(str(probe))))  # the payload really runs code…
    assert probe.exists()
    marker = tmp_path / "pwned"
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    (folder / "config.json").write_text(json.dumps(_gpt2_config()), encoding="utf-8")

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle loader was called")

    for target in (pickle, "load"), (pickle, "loads"), (torch, "load"):
        monkeypatch.setattr(*target, forbidden)
    message = _one_line_error(folder)
    assert "safetensors" in message and "pytorch_model.bin" in message
    assert not marker.exists()


def test_missing_config(broken):
    (broken / "config.json").unlink()
    assert "config.json" in _one_line_error(broken)


def test_config_not_json(broken):
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    message = _one_line_error(broken)
    assert "config.json" in message and "JSON" in message


def test_unsupported_model_type(broken):
    config = {"model_type": "falcon", "architectures": ["FalconForCausalLM"]}
    (broken / "config.json").write_text(json.dumps(config), encoding="utf-8")
    message = _one_line_error(broken)
    assert "'falcon'" in message and "FalconForCausalLM" in message
    assert "'llama'" in message  # the message lists what does load


def test_unsupported_activation(broken):
    config = _gpt2_config(activation_function="silu")
    (broken / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert "'silu'" in _one_line_error(broken)


def test_missing_weights_file(broken):
    (broken / "model.safetensors").unlink()
    assert "model.safetensors" in _one_line_error(broken)


def test_missing_tensor(broken):
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["h.1.attn.c_attn.weight"], tensors["h.1.mlp.c_fc.bias"]
    save_file(tensors, str(broken / "model.safetensors"))
    message = _one_line_error(broken)
    assert "lacks 2 tensors" in message
    assert "h.1.attn.c_attn.weight" in message and "h.1.mlp.c_fc.bias" in message


def test_wrong_shape(broken):
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["wpe.weight"] = tensors["wpe.weight"][:32].contiguous()
    save_file(tensors, str(broken / "model.safetensors"))
    message = _one_line_error(broken)
    assert "wpe.weight" in message and "[32, 64]" in message and "[64, 64]" in message


@pytest.mark.parametrize("damage", ["half", "garbage"])
def test_truncated_or_corrupt_safetensors(broken, damage):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "half" else b"not a safetensors file")
    message = _one_line_error(broken)
    assert "model.safetensors" in message and "safetensors file" in message


def test_missing_tokenizer(broken):
    (broken / "tokenizer.json").unlink()
    assert "tokenizer.json" in _one_line_error(broken)


def test_not_a_folder(tmp_path):
    assert "not a folder" in _one_line_error(tmp_path / "nowhere")
