"""ModelConfig: validation messages, file round-trips, and hostile input."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unitscale_core import ModelConfig
from unitscale_core.config import (
    CHOICES,
    FIELD_NAMES,
    MAX_MEMORY_BYTES,
    ConfigError,
    backup_path,
    dumps_json,
    dumps_toml,
    from_dict,
    load,
    loads,
    save,
)
from unitscale_core.presets import PRESETS, load_preset


def test_defaults_are_valid_and_exported():
    cfg = ModelConfig()
    assert cfg.d_model % cfg.n_heads == 0
    assert set(cfg.to_dict()) == set(FIELD_NAMES)


def test_indivisible_heads_names_both_fields():
    with pytest.raises(ConfigError) as err:
        ModelConfig(d_model=100, n_heads=12)
    assert str(err.value) == "d_model=100 is not divisible by n_heads=12"
    assert set(err.value.errors) == {"d_model"}


def test_every_offending_field_is_named():
    with pytest.raises(ConfigError) as err:
        ModelConfig(d_model=0, n_layers=-3, architecture="rnn", dropout=1.5, bias="yes")
    assert set(err.value.errors) == {"d_model", "n_layers", "architecture", "dropout", "bias"}
    msg = str(err.value)
    assert "d_model=0 must be positive" in msg
    assert "n_layers=-3 must be positive" in msg
    assert "architecture='rnn' is not one of encoder, decoder, encoder-decoder" in msg
    assert "dropout=1.5" in msg and "bias='yes' must be true or false" in msg


def test_seq_len_above_max_len():
    with pytest.raises(ConfigError, match="seq_len=1024 is above max_len=512") as err:
        ModelConfig(seq_len=1024, max_len=512)
    assert set(err.value.errors) == {"seq_len"}


def test_rope_needs_even_head_size():
    with pytest.raises(ConfigError, match="odd head size 3") as err:
        ModelConfig(positional="rope", d_model=12, n_heads=4)
    assert "d_model" in err.value.errors


@pytest.mark.parametrize("value", [1.5, True, "8", None])
def test_integer_fields_reject_non_integers(value):
    with pytest.raises(ConfigError, match="n_heads=.* must be a whole number"):
        ModelConfig(n_heads=value)


def test_absurd_size_is_refused_with_its_memory_estimate():
    with pytest.raises(ConfigError) as err:
        ModelConfig(d_model=2**24, n_heads=1, d_ff=2**26, n_layers=1000)
    (field, reason), = err.value.errors.items()
    assert field in {"d_model", "d_ff", "n_layers"}
    assert "training memory estimate" in reason and "PiB" in reason


def test_gpt3_sized_config_is_accepted():
    cfg = ModelConfig(d_model=12288, n_heads=96, d_ff=49152, n_layers=96, vocab_size=50257,
                      max_len=2048, seq_len=2048, batch_size=1)
    from unitscale_core.sizing import training_memory

    assert training_memory(cfg)["total"] < MAX_MEMORY_BYTES


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_round_trip(tmp_path, suffix):
    cfg = ModelConfig(architecture="encoder-decoder", n_decoder_layers=3, positional="alibi",
                      attention="local", window=16, dropout=0.25, bias=False, dtype="fp8_e4m3")
    path = tmp_path / f"model{suffix}"
    save(cfg, path)
    assert load(path) == cfg
    save(cfg.replace(seed=7), path)  # second save keeps the first as a backup
    assert load(path).seed == 7
    assert load(backup_path(path)) == cfg
    assert backup_path(path).name == f"model.bak{suffix}"


def test_none_is_omitted_in_toml_and_null_in_json():
    cfg = ModelConfig()
    assert "n_decoder_layers" not in dumps_toml(cfg)
    assert json.loads(dumps_json(cfg))["n_decoder_layers"] is None
    assert json.loads(dumps_json(cfg))["schema_version"] == 1


def test_unknown_key_is_rejected_by_name_with_suggestion():
    with pytest.raises(ConfigError) as err:
        from_dict({"schema_version": 1, "d_modle": 64})
    assert err.value.errors == {"d_modle": "unknown key 'd_modle' (did you mean 'd_model'?)"}


def test_future_schema_version_is_refused():
    with pytest.raises(ConfigError, match="schema_version=2 is not supported"):
        from_dict({"schema_version": 2})


@pytest.mark.parametrize(("text", "fmt"), [
    ('{"d_model": 64,', "json"), ("d_model = = 3", "toml"), ("[1, 2]", "json"),
    ("\x00\x01", "json"),
])
def test_broken_files_give_one_line(text, fmt):
    with pytest.raises(ConfigError) as err:
        loads(text, fmt, source="x")
    assert "\n" not in str(err.value)


def test_wrong_suffix_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must end in .json or .toml"):
        load(tmp_path / "model.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.json")


def test_binary_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "model.json"
    blob = bytes(range(256))
    path.write_bytes(blob)
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(path)
    assert path.read_bytes() == blob


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_load(name):
    assert isinstance(load_preset(name), ModelConfig)


_values = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from([c for cs in CHOICES.values() for c in cs]),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(list(FIELD_NAMES) + ["bogus", "schema_version"]),
                       _values, max_size=8))
def test_any_mapping_loads_or_fails_with_a_named_field(data):
    try:
        cfg = from_dict(data)
    except ConfigError as exc:
        assert exc.errors and all(isinstance(k, str) for k in exc.errors)
        assert all(reason for reason in exc.errors.values())
    else:
        assert from_dict(json.loads(dumps_json(cfg))) == cfg


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_loads_or_fails_cleanly(text):
    for fmt in ("json", "toml"):
        try:
            loads(text, fmt)
        except ConfigError:
            pass
