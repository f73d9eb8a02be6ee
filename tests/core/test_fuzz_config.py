"""Fuzzing the config: construction, ``replace``, dictionaries, JSON and TOML text.

Validation only (no model runs, no predictions), so thousands of examples take seconds.
Each input either gives a valid config that survives a JSON and a TOML round trip, or a
:class:`ConfigError` whose every reason is one short line naming its field or the file —
never another exception (OverflowError, TypeError, RecursionError, …).

Examples per run (``derandomize=True``: the same draws every run): construction 2,400,
replace on presets 1,200, from_dict 1,200, JSON/TOML text 600, bytes 200 — 5,600 in all.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unitscale_core import ModelConfig
from unitscale_core.config import (
    CHOICES,
    FIELD_NAMES,
    QUOTE_CHARS,
    ConfigError,
    dumps_json,
    dumps_toml,
    from_dict,
    loads,
)
from unitscale_core.presets import PRESETS, load_preset


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


#: The longest reason allowed: a field name, a short quote of its value and the rule.
MAX_REASON = 400

_choice_values = st.sampled_from(sorted({c for cs in CHOICES.values() for c in cs}))
_ints = st.one_of(
    st.integers(-3, 3), st.integers(1, 5000), st.integers(-2**64, 2**64),
    st.sampled_from([2**53, 2**53 + 1, 2**63, 1023, 1024, 1025, 10**6, 10**12]),
    st.integers(10**300, 10**500), st.integers(-10**500, -10**300),
)
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.floats(0, 1), st.sampled_from([0.0, -0.0, 0.5, 1.0, 1 - 1e-16, 1e308]))
_strings = st.one_of(st.text(max_size=12), _choice_values,
                     st.integers(1, 4).map(lambda k: "é" * (10 ** k)))
_scalars = st.one_of(st.none(), st.booleans(), _ints, _floats, _strings,
                     st.binary(max_size=6), st.complex_numbers(max_magnitude=1e6))
# (flat containers: hypothesis spends its time drawing deep ones, not the code on testing them)
_values = st.one_of(_scalars, st.lists(_scalars, max_size=2), st.tuples(_scalars),
                    st.dictionaries(st.text(max_size=3), _scalars, max_size=1))


def _check_error(exc: ConfigError, allowed_keys: set[str] | None = None) -> None:
    assert exc.errors, "a ConfigError with no reasons"
    for key, reason in exc.errors.items():
        assert isinstance(reason, str) and reason and "\n" not in reason, (key, reason)
        assert len(reason) <= MAX_REASON, (key, len(reason), reason[:200])
        assert len(str(key)) <= 2 * QUOTE_CHARS, key
        assert str(key) in reason or repr(str(key)) in reason or \
            key in ("file", "config", "path"), (key, reason)
        if allowed_keys is not None:
            assert key in allowed_keys, (key, reason)


def _check_valid(cfg: ModelConfig) -> None:
    assert loads(dumps_json(cfg), "json") == cfg
    assert loads(dumps_toml(cfg), "toml") == cfg


@_settings(2400)
@given(st.dictionaries(st.sampled_from(FIELD_NAMES), _values, max_size=5))
def test_construction_with_any_values(kwargs):
    try:
        cfg = ModelConfig(**kwargs)
    except ConfigError as exc:
        _check_error(exc, set(FIELD_NAMES))
    else:
        _check_valid(cfg)


_plausible = st.fixed_dictionaries({}, optional={
    "d_model": st.sampled_from([1, 2, 8, 63, 64, 768, 4096, 10**5, 10**9]),
    "n_heads": st.sampled_from([1, 2, 3, 12, 64, 10**6]),
    "d_ff": st.sampled_from([1, 7, 3072, 10**7]),
    "n_layers": st.sampled_from([1, 12, 96, 1024, 1025, 10**5]),
    "n_decoder_layers": st.sampled_from([None, 1, 6, 1024, 1025]),
    "vocab_size": st.sampled_from([1, 2, 50257, 10**7, 10**12]),
    "max_len": st.sampled_from([1, 512, 2048, 10**6, 2**53, 2**53 + 1]),
    "seq_len": st.sampled_from([1, 128, 1024, 10**6]),
    "batch_size": st.sampled_from([1, 8, 4096, 10**9]),
    "window": st.sampled_from([1, 64, 10**9, 2**53 + 1, 10**400]),
    "dropout": st.sampled_from([0, 0.1, 0.999, 1, -0.0, 10**401, math.nan]),
    "seed": st.sampled_from([0, 1, 2**63 - 1, 2**63, -1]),
    **{name: st.sampled_from(choices) for name, choices in CHOICES.items()},
})


@_settings(1200)
@given(preset=st.sampled_from(sorted(PRESETS)), changes=_plausible)
def test_replace_on_presets_with_plausible_and_extreme_sizes(preset, changes):
    base = load_preset(preset)
    try:
        cfg = base.replace(**changes)
    except ConfigError as exc:
        _check_error(exc, set(FIELD_NAMES))
    else:
        _check_valid(cfg)
        assert cfg.n_layers <= 1024 and cfg.decoder_layers <= 1024


_keys = st.one_of(st.sampled_from([*FIELD_NAMES, "schema_version"]),
                  st.text(max_size=8), st.integers(1, 3).map(lambda k: "k" * 10 ** (k + 1)))


@_settings(1200)
@given(st.dictionaries(_keys, _values, max_size=5))
def test_from_dict_with_any_keys(data):
    try:
        cfg = from_dict(data)
    except ConfigError as exc:
        _check_error(exc)
    else:
        _check_valid(cfg)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                         ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return '""'


_json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), _ints.filter(lambda n: abs(n) < 10**4000), _floats,
              _strings),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=4), inner, max_size=2)),
    max_leaves=5)


@_settings(600)
@given(doc=st.dictionaries(_keys, _json_like, max_size=5), fmt=st.sampled_from(["json", "toml"]),
       damage=st.sampled_from(["", "cut", "nest", "dup"]))
def test_loader_text_json_and_toml(doc, fmt, damage):
    if fmt == "json":
        text = json.dumps(doc, allow_nan=True)
    else:
        text = "\n".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in doc.items())
    if damage == "cut":
        text = text[: len(text) // 2]
    elif damage == "nest":
        text = ("[" * 5000 + "]" * 5000) if fmt == "json" else "a = " + "[" * 5000 + "]" * 5000
    elif damage == "dup" and text:
        text = text + ("\n" if fmt == "toml" else "") + text
    try:
        cfg = loads(text, fmt, source="fuzz." + fmt)
    except ConfigError as exc:
        _check_error(exc)
        for key, reason in exc.errors.items():
            if key == "file":
                assert "fuzz." + fmt in reason
    else:
        _check_valid(cfg)


@_settings(200)
@given(raw=st.binary(max_size=200), fmt=st.sampled_from(["json", "toml"]))
def test_loader_any_decoded_bytes(raw, fmt):
    try:
        loads(raw.decode("utf-8", "replace"), fmt, source="bytes." + fmt)
    except ConfigError as exc:
        _check_error(exc)
