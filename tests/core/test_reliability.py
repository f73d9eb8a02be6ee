"""Reliability: hostile config input, extreme configs, malformed checkpoints, kill during save.

Property tests are bounded (small ``max_examples``, ``derandomize=True``: the same draws every
run, so CI cannot fail on a new one) and each input either works or fails with a
``ValueError`` naming the field or the file — never another exception.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from unitscale_core import ModelConfig
from unitscale_core import pretrained as P
from unitscale_core.config import (
    ACTIVATIONS,
    ARCHITECTURES,
    ATTENTIONS,
    CHOICES,
    DEVICES,
    DTYPES,
    FIELD_NAMES,
    NORMS,
    PARAMETRIZATIONS,
    POSITIONALS,
    ConfigError,
    dumps_json,
    dumps_toml,
    load,
    loads,
    save,
)
from unitscale_core.pretrained import PretrainedError
from unitscale_core.scaling.predict import predict
from unitscale_core.sizing import size_report

from .test_pretrained import _one_line_error

BOUNDED = settings(max_examples=60, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                          HealthCheck.function_scoped_fixture])
FILE_KEYS = ("file", "config", "path")


def _assert_names_field_or_file(exc: ConfigError, source: str | None = None) -> None:
    """Every reason is one line and names its field (``d_model=…``, ``unknown key 'x'``) or,
    for file-level problems, the file."""
    assert exc.errors, "a ConfigError with no reasons"
    for key, reason in exc.errors.items():
        assert reason and "\n" not in reason
        if key in FILE_KEYS:
            assert source is None or source in reason, (key, reason)
        else:
            assert str(key) in reason or repr(key) in reason, (key, reason)


# -- ModelConfig construction and the loader ------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2, 2**70),
    st.integers(10**300, 10**400), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.binary(max_size=4),
    st.sampled_from([c for cs in CHOICES.values() for c in cs]),
)
_nested = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)


@BOUNDED
@given(st.dictionaries(st.sampled_from(FIELD_NAMES), _nested, max_size=6))
def test_model_config_construction_is_valid_or_a_named_config_error(kwargs):
    try:
        cfg = ModelConfig(**kwargs)
    except ConfigError as exc:
        _assert_names_field_or_file(exc)
        assert set(exc.errors) <= set(FIELD_NAMES)
    else:
        assert loads(dumps_json(cfg), "json") == cfg


_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10, 2**80), st.floats(allow_nan=False),
              st.text(max_size=10), st.sampled_from([c for cs in CHOICES.values() for c in cs])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)
_documents = st.one_of(
    st.dictionaries(st.sampled_from([*FIELD_NAMES, "schema_version", "bogus"]), _json_values,
                    max_size=6),
    _json_values,
)


def _toml_value(value) -> str:
    """A TOML rendering of a JSON-like value (lists and tables inline)."""
    if value is None:
        return '""'  # TOML has no null
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


@BOUNDED
@given(doc=_documents, fmt=st.sampled_from(["json", "toml"]))
def test_loader_documents_load_or_name_the_field_or_file(doc, fmt, tmp_path_factory):
    if fmt == "json":
        text = json.dumps(doc)
    elif isinstance(doc, dict):
        text = "\n".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in doc.items())
    else:
        text = f"value = {_toml_value(doc)}"
    path = tmp_path_factory.mktemp("cfg") / f"model.{fmt}"
    path.write_text(text, encoding="utf-8")
    for attempt in (lambda: loads(text, fmt, source=path.name), lambda: load(path)):
        try:
            cfg = attempt()
        except ConfigError as exc:
            _assert_names_field_or_file(exc, path.name)
        else:
            assert isinstance(cfg, ModelConfig)


@BOUNDED
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8")),
       suffix=st.sampled_from([".json", ".toml"]))
def test_loader_any_bytes_load_or_fail_naming_the_file(raw, suffix, tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / f"weird{suffix}"
    path.write_bytes(raw)
    try:
        load(path)
    except ConfigError as exc:
        _assert_names_field_or_file(exc, path.name)
    assert path.read_bytes() == raw  # a failed load never touches the file


@pytest.mark.parametrize("text", [
    '{"d_model": 1' + "0" * 5000 + "}",  # beyond Python's int-string limit
    '{"d_model": 1' + "0" * 400 + "}",  # beyond a float: sizing overflows
    '{"architecture": "encoder-decoder", "n_decoder_layers": 1' + "0" * 300 + "}",
    "[1, 2]", '"text"', "null",
])
def test_extreme_numbers_and_non_tables_are_named(text):
    with pytest.raises(ConfigError) as info:
        loads(text, "json", source="big.json")
    _assert_names_field_or_file(info.value, "big.json")
    if "n_decoder_layers" in text:  # the field that is too big is the one blamed
        assert list(info.value.errors) == ["n_decoder_layers"]


# -- predictor and sizing on extreme valid configs --------------------------------------------

@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(
    arch=st.sampled_from(ARCHITECTURES), positional=st.sampled_from(POSITIONALS),
    attention=st.sampled_from(ATTENTIONS), norm=st.sampled_from(NORMS),
    activation=st.sampled_from(ACTIVATIONS), param=st.sampled_from(PARAMETRIZATIONS),
    dtype=st.sampled_from(DTYPES), device=st.sampled_from(DEVICES),
    heads=st.sampled_from([1, 2, 3, 96, 1024]), head_dim=st.sampled_from([1, 2, 64, 128, 4096]),
    d_ff=st.sampled_from([1, 7, 4096, 2**20]), layers=st.sampled_from([1, 2, 96, 300]),
    dec=st.sampled_from([None, 1, 200]), vocab=st.sampled_from([1, 2, 50257, 2**22]),
    seq=st.sampled_from([1, 2, 2048, 16384]), batch=st.sampled_from([1, 3, 4096]),
    window=st.sampled_from([1, 64, 10**9]), dropout=st.sampled_from([0.0, 0.5, 0.999]),
    bias=st.booleans(), tie=st.booleans(),
)
def test_predict_and_size_report_never_raise_on_extreme_valid_configs(
        arch, positional, attention, norm, activation, param, dtype, device, heads, head_dim,
        d_ff, layers, dec, vocab, seq, batch, window, dropout, bias, tie):
    try:
        cfg = ModelConfig(architecture=arch, positional=positional, attention=attention,
                          norm=norm, activation=activation, parametrization=param, dtype=dtype,
                          device=device, n_heads=heads, d_model=heads * head_dim, d_ff=d_ff,
                          n_layers=layers, n_decoder_layers=dec, vocab_size=vocab, seq_len=seq,
                          max_len=seq, batch_size=batch, window=window, dropout=dropout,
                          bias=bias, tie_embeddings=tie)
    except ConfigError as exc:  # e.g. beyond the memory bound, odd rope head size
        _assert_names_field_or_file(exc)
        assume(False)
    report = size_report(cfg)
    assert report
    rows = predict(cfg)
    assert rows
    for r in rows:
        assert r.rms >= 0 and not math.isnan(r.rms), (r.name, r.kind, r.rms)


def test_vocabulary_of_one_token_is_refused_by_name():
    """predict() needs two tokens (the loss of a one-token vocabulary is identically 0);
    the config refuses it by name instead of letting the predictor raise later."""
    with pytest.raises(ConfigError) as info:
        ModelConfig(vocab_size=1)
    assert list(info.value.errors) == ["vocab_size"]


@pytest.mark.xfail(strict=True, reason="known: at d_model 8 each LayerNorm's backward raises "
                   "the expected gradient variance by E[1/v]·σ² ≈ (d−2)/(d−3) = 1.2 (inverse "
                   "chi-square), ×1.44 a layer, so the predicted expectation overflows by 4096 "
                   "layers while a measured tensor of a few tokens follows the typical value, "
                   "which decays; at d_model ≥ 64 the factor is < 1.02. Strict: passes once "
                   "fixed")
def test_predict_4096_unit_layers_stays_finite():
    cfg = ModelConfig(n_layers=4096, seq_len=1, max_len=1, positional="none", attention="full",
                      parametrization="unit", d_model=8, n_heads=2, d_ff=16, vocab_size=50)
    assert not [r.name for r in predict(cfg) if math.isnan(r.rms)]


# -- malformed checkpoints -------------------------------------------------------------------

GPT2 = dict(n_layer=1, n_head=2, n_embd=8, vocab_size=20, n_positions=16)


def _gpt2_folder(folder: Path) -> Path:
    """A tiny valid GPT-2 folder (1 layer, width 8): config, safetensors and a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    c, v, t = GPT2["n_embd"], GPT2["vocab_size"], GPT2["n_positions"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    tensors = {"wte.weight": r(v, c), "wpe.weight": r(t, c), "ln_f.weight": 1 + r(c),
               "ln_f.bias": r(c), "h.0.ln_1.weight": 1 + r(c), "h.0.ln_1.bias": r(c),
               "h.0.attn.c_attn.weight": r(c, 3 * c), "h.0.attn.c_attn.bias": r(3 * c),
               "h.0.attn.c_proj.weight": r(c, c), "h.0.attn.c_proj.bias": r(c),
               "h.0.ln_2.weight": 1 + r(c), "h.0.ln_2.bias": r(c),
               "h.0.mlp.c_fc.weight": r(c, 4 * c), "h.0.mlp.c_fc.bias": r(4 * c),
               "h.0.mlp.c_proj.weight": r(4 * c, c), "h.0.mlp.c_proj.bias": r(c)}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", **GPT2}),
                                        encoding="utf-8")
    vocab = {chr(97 + i): i for i in range(v)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def good_gpt2(tmp_path_factory) -> Path:
    folder = _gpt2_folder(tmp_path_factory.mktemp("ok") / "gpt2")
    P.load_checkpoint(folder)  # the undamaged folder loads
    return folder


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 0.999), flips=st.lists(st.integers(0, 10**6), max_size=3))
def test_truncated_or_damaged_safetensors_are_refused(good_gpt2, tmp_path_factory, cut, flips):
    import shutil

    folder = Path(shutil.copytree(good_gpt2, tmp_path_factory.mktemp("cut") / "gpt2"))
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    for f in flips:  # damage the JSON header (lengths, offsets, dtypes, names)
        raw[8 + f % (header_end - 8)] ^= 0x5A
    raw = raw[:max(1, int(len(raw) * cut))] if cut > 0 else raw
    assume(bytes(raw) != good_gpt2.joinpath("model.safetensors").read_bytes())
    weights.write_bytes(bytes(raw))
    try:
        pt = P.load_checkpoint(folder)
    except PretrainedError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:  # a flip that left a valid file (e.g. inside a name we ignore) must still load right
        assert pt.config.n_layers == 1


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(drop=st.lists(st.sampled_from(["model_type", *GPT2]), max_size=3, unique=True),
       garbage=st.dictionaries(st.sampled_from(["n_layer", "n_head", "n_embd", "vocab_size",
                                                "n_positions", "n_inner",
                                                "layer_norm_epsilon", "activation_function"]),
                               _json_values, max_size=2))
def test_missing_or_malformed_config_keys_are_refused(good_gpt2, tmp_path_factory, drop,
                                                      garbage):
    import shutil

    folder = Path(shutil.copytree(good_gpt2, tmp_path_factory.mktemp("cfg") / "gpt2"))
    hf = {"model_type": "gpt2", **GPT2}
    for key in drop:
        hf.pop(key)
    hf.update(garbage)
    (folder / "config.json").write_text(json.dumps(hf), encoding="utf-8")
    try:
        P.load_checkpoint(folder)
    except PretrainedError as exc:
        message = str(exc)
        assert message and "\n" not in message
        if drop and not garbage:
            assert any(k in message for k in drop)


def test_wrong_shapes_are_refused_before_any_weight_is_copied(good_gpt2, tmp_path):
    import shutil

    folder = Path(shutil.copytree(good_gpt2, tmp_path / "gpt2"))
    hf = {"model_type": "gpt2", **GPT2, "n_embd": 16, "n_head": 2}  # the file holds width 8
    (folder / "config.json").write_text(json.dumps(hf), encoding="utf-8")
    assert "shape" in _one_line_error(folder)


class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
def test_pickles_are_refused_without_running(good_gpt2, tmp_path, name):
    """A pickle alone (``pytorch_model.bin``), or one disguised as ``model.safetensors``, is
    refused with a message, and its payload never runs (the marker file never appears)."""
    import shutil

    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(str(probe))))  # the payload really runs code…
    assert probe.exists()
    folder = Path(shutil.copytree(good_gpt2, tmp_path / "gpt2"))
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (folder / name).write_bytes(pickle.dumps(_Payload(str(marker))))
    message = _one_line_error(folder)
    assert "safetensors" in message
    assert not marker.exists()


# -- kill during save ------------------------------------------------------------------------

SAVER = r"""
import sys
from unitscale_core import ModelConfig
from unitscale_core.config import save
path = sys.argv[1]
configs = [ModelConfig(d_model=64 * k, n_heads=4, d_ff=256 * k, seed=k) for k in (1, 2)]
print("ready", flush=True)
i = 0
while True:
    save(configs[i % 2], path)
    i += 1
"""


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_kill_during_save_leaves_old_or_new_file(tmp_path, suffix):
    """SIGKILL a process saving in a loop at random moments: the file is always one complete
    version, its backup too, and no temporary files pile up (each kill may leave at most the
    one temporary the writer had open; the next save in the same folder sweeps none — so we
    count them)."""
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("no SIGKILL on this platform")
    path = tmp_path / f"model{suffix}"
    versions = {ModelConfig(d_model=64 * k, n_heads=4, d_ff=256 * k, seed=k) for k in (1, 2)}
    dump = dumps_json if suffix == ".json" else dumps_toml
    texts = {dump(c) for c in versions}
    save(ModelConfig(d_model=64, n_heads=4, d_ff=256, seed=1), path)
    rng = random.Random(7)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    kills = 6
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        assert path.read_text(encoding="utf-8") in texts
        assert load(path) in versions
        backup = path.with_name(f"model.bak{suffix}")
        if backup.exists():
            text = backup.read_text(encoding="utf-8")
            assert text == "" or text in texts  # a backup is copied in place, not atomically
    temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) <= kills, temps
