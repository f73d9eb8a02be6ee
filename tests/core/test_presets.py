"""Presets of issue 21's modern models: each is its published config.json as imported, with
transformers' own parameter count, and every part of the program builds it or refuses the
fields it does not compute yet by name (never a crash)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unitscale_core.config import FIELD_NAMES, to_file_dict
from unitscale_core.hf_config import from_hf
from unitscale_core.model import unsupported_fields
from unitscale_core.presets import PRESET_NOTES, PRESETS, load_preset, preset_notes
from unitscale_core.scaling.predict import unpredicted_features
from unitscale_core.sizing import count_parameters, flops_per_token, kv_cache_bytes_per_token

from .test_hf_config import _transformers_numel

DATA = Path(__file__).parent / "data" / "hf_configs"
#: Preset key -> its fixture (the published config.json) in tests/core/data/hf_configs.
MODERN = ["llama-3-8b", "llama-3.2-1b", "mistral-7b-v0.1", "qwen2.5-0.5b", "gemma-2-2b",
          "olmo-2-7b", "pythia-160m", "phi-3-mini-4k", "mixtral-8x7b"]
#: Published totals (model cards, the issue), independent of both codes.
PUBLISHED = {"llama-3-8b": 8_030_261_248, "llama-3.2-1b": 1_235_814_400,
             "mistral-7b-v0.1": 7_241_732_096, "qwen2.5-0.5b": 494_032_768,
             "pythia-160m": 162_322_944, "mixtral-8x7b": 46_702_792_704}


def _hf(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def test_modern_presets_are_listed_after_the_old_ones_in_menu_order():
    keys = list(PRESETS)
    assert keys[:5] == ["tiny", "gpt2-small", "bert-base", "minilm-l6", "t5-small-like"]
    assert keys[5:] == MODERN


@pytest.mark.parametrize("name", MODERN)
def test_preset_is_its_published_config_imported(name):
    """The file is to_file_dict(from_hf(config.json)) and its notes are the import's warnings."""
    cfg, warnings = from_hf(_hf(name))
    assert load_preset(name) == cfg
    assert to_file_dict(load_preset(name)) == to_file_dict(cfg)
    assert list(preset_notes(name)) == warnings


@pytest.mark.parametrize("name", MODERN)
def test_preset_count_equals_transformers_meta_model(name):
    assert count_parameters(load_preset(name))["total"] == _transformers_numel(_hf(name))


def test_preset_counts_equal_published_totals():
    for name, total in PUBLISHED.items():
        assert count_parameters(load_preset(name))["total"] == total, name
    mixtral = count_parameters(load_preset("mixtral-8x7b"))
    assert mixtral["active"] == 12_879_925_248
    assert kv_cache_bytes_per_token(load_preset("llama-3-8b").replace(dtype="bf16")) == 131_072


def test_labels_state_the_published_size():
    """The menu's "(8.03B)" etc. is the count rounded, so a label cannot drift from the file."""
    for name in MODERN:
        total = count_parameters(load_preset(name))["total"]
        size = f"{total / 1e9:.2f}B" if total >= 1e9 else f"{total / 1e6:.0f}M"
        if name == "mixtral-8x7b":
            active = count_parameters(load_preset(name))["active"]
            size = f"{total / 1e9:.1f}B, {active / 1e9:.1f}B active"
        assert size in PRESETS[name], (name, size)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_sized_and_refused_only_by_field_name(name):
    """Sizes always compute; the torch model and the predictor either take the preset or name
    config fields they refuse (other parts are built against this list)."""
    cfg = load_preset(name)
    assert count_parameters(cfg)["total"] > 0
    assert flops_per_token(cfg)["training_palm"] > 0
    for refused in (unsupported_fields(cfg), unpredicted_features(cfg)):
        assert set(refused) <= set(FIELD_NAMES), refused


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_model_built_on_meta_has_the_sized_count(name):
    """The contract "sizing equals the model" on the real shapes: each preset the torch model
    builds is built on the meta device (no memory) and its parameters counted; one it does not
    build yet is refused naming exactly unsupported_fields' fields."""
    torch = pytest.importorskip("torch")
    from unitscale_core.config import ConfigError
    from unitscale_core.model import build_model

    cfg = load_preset(name)
    refused = unsupported_fields(cfg)
    if refused:
        with pytest.raises(ConfigError) as caught:
            build_model(cfg, device="meta")
        assert set(caught.value.errors) == set(refused)
        return
    with torch.device("meta"):
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"]


def test_preset_notes_unknown_name():
    with pytest.raises(ValueError, match="preset='nope'"):
        preset_notes("nope")
    assert set(PRESET_NOTES) <= set(PRESETS)
