"""Malformed checkpoint folders: every one refused with a one-line ValueError, nothing else.

Generated from a tiny valid GPT-2 and a tiny valid BERT folder (see test_reliability): files
missing, pickles only, special files, damaged JSON, damaged safetensors headers and data,
wrong shapes and dtypes, NaN weights, huge / negative / fractional / wrong-typed config
values, layer counts the file does not hold, tokenizers that do not belong. Each case loads
in a thread that must finish (no hang); loading, or the first attention map of a loaded
folder, must raise a ``ValueError`` subclass whose message is one short line.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from unitscale_core import pretrained as P

from .test_reliability import _bert_folder, _gpt2_folder, _load_in_thread

Mutation = Callable[[Path], Path]
CASES: list[tuple[str, str, Mutation]] = []  # (id, kind, mutation -> the folder to load)
KINDS = ("gpt2", "bert")
SIZE_KEYS = {"gpt2": ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions", "n_inner"),
             "bert": ("num_hidden_layers", "num_attention_heads", "hidden_size",
                      "intermediate_size", "vocab_size", "max_position_embeddings")}
LAYER_KEY = {"gpt2": "n_layer", "bert": "num_hidden_layers"}
EPS_KEY = {"gpt2": "layer_norm_epsilon", "bert": "layer_norm_eps"}
A_LAYER_TENSOR = {"gpt2": "h.0.attn.c_proj.weight",
                  "bert": "encoder.layer.0.attention.output.dense.weight"}


def case(name: str, kinds: tuple[str, ...] = KINDS):
    def register(fn: Callable[[Path, str], Path | None]):
        for kind in kinds:
            def mutate(folder: Path, fn=fn, kind=kind) -> Path:
                return fn(folder, kind) or folder
            CASES.append((f"{kind}-{name}", kind, mutate))
        return fn
    return register


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def _set_config(folder: Path, hf: dict) -> None:
    (folder / "config.json").write_text(json.dumps(hf), encoding="utf-8")


def _replace(folder: Path, name: str, content: bytes | str | None = None,
             special: str | None = None) -> None:
    path = folder / name
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if special == "dir":
        path.mkdir()
    elif special == "fifo":
        os.mkfifo(path)
    elif special == "zero":
        path.symlink_to("/dev/zero")
    elif special == "sparse":  # huge by size, nothing written
        with open(path, "wb") as handle:
            handle.truncate(300 << 20)
    elif content is not None:
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _save_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(folder / "model.safetensors"))


# -- files ---------------------------------------------------------------------------------------

for _name in ("config.json", "model.safetensors", "tokenizer.json"):
    case(f"missing-{_name}")(lambda f, k, n=_name: _replace(f, n))

for _name in ("pytorch_model.bin", "model.pt", "model.ckpt"):
    def _pickle_only(folder: Path, kind: str, name: str = _name) -> None:
        _replace(folder, "model.safetensors")
        (folder / name).write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    case(f"pickle-only-{_name}")(_pickle_only)


@case("sharded-index-only")
def _sharded(folder: Path, kind: str) -> None:
    _replace(folder, "model.safetensors")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')


_BAD_JSON = {"not-json": "{nope", "empty": "", "array": "[1, 2]", "string": '"text"',
             "null": "null", "deep": "[" * 100_000 + "]" * 100_000,
             "5000-digit-int": '{"n_layer": 1' + "0" * 5000 + "}"}
for _label, _text in _BAD_JSON.items():
    case(f"config-{_label}")(lambda f, k, t=_text: _replace(f, "config.json", t))
case("config-not-utf8")(lambda f, k: _replace(f, "config.json", b"\xff\xfe{\x00"))
case("config-2MiB")(lambda f, k: _replace(f, "config.json", " " * (2 << 20) + "{}"))
for _special in ("dir", "fifo", "zero", "sparse"):
    case(f"config-{_special}")(lambda f, k, s=_special: _replace(f, "config.json", special=s))

for _label, _text in {"garbage": "garbage", "empty": "", "empty-object": "{}",
                      "array": "[]"}.items():
    case(f"tokenizer-{_label}")(lambda f, k, t=_text: _replace(f, "tokenizer.json", t))
case("tokenizer-not-utf8")(lambda f, k: _replace(f, "tokenizer.json", b"\xff\xfe\x00"))
for _special in ("dir", "fifo", "zero", "sparse"):
    case(f"tokenizer-{_special}")(lambda f, k, s=_special: _replace(f, "tokenizer.json",
                                                                   special=s))


# -- safetensors -------------------------------------------------------------------------------

def _raw(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


_DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda raw: b"",
    "4-bytes": lambda raw: raw[:4],
    "header-length-huge": lambda raw: (2**62).to_bytes(8, "little") + raw[8:],
    "header-length-past-end": lambda raw: (len(raw)).to_bytes(8, "little") + raw[8:],
    "header-not-json": lambda raw: raw[:8] + b"!" * (int.from_bytes(raw[:8], "little"))
    + raw[8 + int.from_bytes(raw[:8], "little"):],
    "half": lambda raw: raw[: len(raw) // 2],
    "header-only": lambda raw: raw[: 8 + int.from_bytes(raw[:8], "little")],
    "one-byte-short": lambda raw: raw[:-1],
}
for _label, _damage in _DAMAGES.items():
    case(f"weights-{_label}")(lambda f, k, d=_damage: _replace(f, "model.safetensors",
                                                              d(_raw(f))))
for _special in ("dir", "fifo", "zero"):
    case(f"weights-{_special}")(lambda f, k, s=_special: _replace(f, "model.safetensors",
                                                                 special=s))


def _edit_tensor(folder: Path, kind: str, change: Callable[[torch.Tensor], torch.Tensor]):
    tensors = _tensors(folder)
    key = A_LAYER_TENSOR[kind]
    tensors[key] = change(tensors[key]).contiguous()
    _save_tensors(folder, tensors)


@case("tensor-missing")
def _missing_tensor(folder: Path, kind: str) -> None:
    tensors = _tensors(folder)
    del tensors[A_LAYER_TENSOR[kind]]
    _save_tensors(folder, tensors)


@case("tensor-embedding-missing")
def _missing_embedding(folder: Path, kind: str) -> None:
    tensors = _tensors(folder)
    del tensors["wte.weight" if kind == "gpt2" else "embeddings.word_embeddings.weight"]
    _save_tensors(folder, tensors)


_TENSOR_CHANGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "wrong-shape": lambda t: t[:, :-1],
    "transposed-shape": lambda t: torch.zeros(t.shape[1], t.shape[0] + 1),
    "1-d": lambda t: t.reshape(-1),
    "int32": lambda t: t.to(torch.int32),
    "bool": lambda t: t > 0,
    "nan": lambda t: t.index_fill(0, torch.tensor([0]), float("nan")),
    "inf": lambda t: t.index_fill(0, torch.tensor([0]), float("inf")),
    "float16-inf": lambda t: (t * 1e6).to(torch.float16),
}
for _label, _change in _TENSOR_CHANGES.items():
    case(f"tensor-{_label}")(lambda f, k, c=_change: _edit_tensor(f, k, c))


# -- config.json values --------------------------------------------------------------------------

_SIZE_VALUES = {"0": 0, "-1": -1, "1e401": 10**401, "frac": 1.5, "text": "8", "list": [8],
                "1e7": 10**7, "2e70": 2**70, "bool": True}
for _kind in KINDS:
    for _key in SIZE_KEYS[_kind]:
        for _label, _value in _SIZE_VALUES.items():
            def _set_size(folder: Path, kind: str, key: str = _key, value=_value) -> None:
                hf = _config(folder)
                hf[key] = value
                _set_config(folder, hf)
            case(f"{_key}-{_label}", (_kind,))(_set_size)
        if _key != "n_inner":  # (n_inner absent means 4 × n_embd: valid)
            case(f"{_key}-absent", (_kind,))(
                lambda f, k, key=_key: _set_config(f, {a: b for a, b in _config(f).items()
                                                       if a != key}))

_NUMBER_VALUES = {"1e401": 10**401, "-1": -1, "1e300": 1e300, "text": "x", "nan": float("nan")}
for _kind, _keys in {"gpt2": ("layer_norm_epsilon",),
                     "bert": ("layer_norm_eps", "type_vocab_size")}.items():
    for _key in _keys:
        for _label, _value in _NUMBER_VALUES.items():
            case(f"{_key}-{_label}", (_kind,))(
                lambda f, k, key=_key, v=_value: _set_config(f, {**_config(f), key: v}))
for _label, _value in {"0": 0, "3": 3, "frac": 1.5}.items():
    case(f"type_vocab_size-{_label}", ("bert",))(
        lambda f, k, v=_value: _set_config(f, {**_config(f), "type_vocab_size": v}))

for _label, _value in {"unknown": "swish", "number": 5, "list": ["gelu"]}.items():
    case(f"activation-{_label}")(
        lambda f, k, v=_value: _set_config(f, {**_config(f), ("activation_function" if k == "gpt2"
                                                              else "hidden_act"): v}))
for _label, _value in {"llama": "llama", "number": 5, "list": ["bert"], "huge": "x" * 10**6,
                       "null": None}.items():
    case(f"model_type-{_label}", ("gpt2",))(
        lambda f, k, v=_value: _set_config(f, {**_config(f), "model_type": v}))
for _key, _value in {"position_embedding_type": "relative_key", "is_decoder": True,
                     "add_cross_attention": True}.items():
    case(f"{_key}", ("bert",))(lambda f, k, key=_key, v=_value:
                               _set_config(f, {**_config(f), key: v}))
for _key, _value in {"scale_attn_weights": False, "scale_attn_by_inverse_layer_idx": True,
                     "add_cross_attention": True, "tie_word_embeddings": False}.items():
    case(f"{_key}", ("gpt2",))(lambda f, k, key=_key, v=_value:
                               _set_config(f, {**_config(f), key: v}))
for _layers in (2, 1000, 200_000):
    case(f"claims-{_layers}-layers")(
        lambda f, k, n=_layers: _set_config(f, {**_config(f), LAYER_KEY[k]: n}))


@case("tokenizer-ids-beyond-vocab")
def _big_tokenizer(folder: Path, kind: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 999}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


case("folder-is-a-file")(lambda f, k: (shutil.rmtree(f), f.write_text("x"))[0])
case("folder-missing")(lambda f, k: shutil.rmtree(f))


# -- the test ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("good")
    folders = {"gpt2": _gpt2_folder(root / "gpt2"), "bert": _bert_folder(root / "bert")}
    for folder in folders.values():
        P.attentions(P.load_checkpoint(folder), "a b c")  # the undamaged folders work
    return folders


def test_at_least_71_cases():
    assert len(CASES) >= 71, len(CASES)
    assert len({name for name, _, _ in CASES}) == len(CASES)


def _load_and_run(folder: Path) -> None:
    P.attentions(P.load_checkpoint(folder), "a b c")


@pytest.mark.parametrize(("name", "kind", "mutate"), CASES, ids=[c[0] for c in CASES])
def test_malformed_checkpoint_is_a_one_line_value_error(good_folders, tmp_path, name, kind,
                                                        mutate):
    if any(s in name for s in ("fifo",)) and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    folder = Path(shutil.copytree(good_folders[kind], tmp_path / kind))
    target = mutate(folder)
    done, exc = _load_in_thread(_load_and_run, target)
    assert done, f"{name}: loading did not finish"
    assert exc is not None, f"{name}: the malformed folder loaded and ran"
    assert isinstance(exc, ValueError), f"{name}: {type(exc).__name__}: {exc}"
    message = str(exc)
    assert message and "\n" not in message and len(message) < 500, (name, message[:600])
