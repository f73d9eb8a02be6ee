"""Named model shapes shipped in ``resources/presets`` (JSON configs).

The modern presets (Llama-3-8B … Mixtral-8x7B) are ``to_file_dict(from_hf(config.json)[0])``
of each model's published ``config.json`` (the same files are the test fixtures in
``tests/core/data/hf_configs``), so their parameter counts equal transformers' own; what the
import could not compute faithfully is kept in :data:`PRESET_NOTES`.
"""

from __future__ import annotations

from importlib import resources

from .config import ModelConfig, loads

#: File stem -> label shown to users, in menu order.
PRESETS: dict[str, str] = {
    "tiny": "Tiny (CPU-friendly default)",
    "gpt2-small": "GPT-2 small (124M)",
    "bert-base": "BERT-base-like (110M)",
    "minilm-l6": "all-MiniLM-L6-v2 shape (bundled model)",
    "t5-small-like": "T5-small-like encoder-decoder",
    "llama-3-8b": "Llama-3-8B (8.03B)",
    "llama-3.2-1b": "Llama-3.2-1B (1.24B)",
    "mistral-7b-v0.1": "Mistral-7B-v0.1 (7.24B)",
    "qwen2.5-0.5b": "Qwen2.5-0.5B (494M)",
    "gemma-2-2b": "Gemma-2-2B (2.61B)",
    "olmo-2-7b": "OLMo-2-7B (OLMo-2-1124-7B, 7.30B)",
    "pythia-160m": "Pythia-160M (162M)",
    "phi-3-mini-4k": "Phi-3-mini-4k-instruct (3.82B)",
    "mixtral-8x7b": "Mixtral-8x7B (46.7B, 12.9B active)",
}

#: Preset -> what the program computes differently from the published model (the warning
#: lines ``hf_config.from_hf`` gives for its config.json at the preset's seq_len); presets
#: not listed are computed as published.
PRESET_NOTES: dict[str, tuple[str, ...]] = {
    "llama-3.2-1b": (
        "rope_scaling: rope_type='llama3' rescales the rope frequencies; the program uses "
        "plain rope (θ = rope_theta), exact only for positions before the original context",),
    "gemma-2-2b": (
        "gemma2 multiplies the token embedding by √hidden_size = 48; the program does not",),
    "phi-3-mini-4k": (
        "sliding_window=2047: all layers attend only to the last 2047 positions, but the "
        "program computes full causal attention at seq_len=2048",),
}


def load_preset(name: str) -> ModelConfig:
    """The preset ``name`` (a key of PRESETS); ValueError for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not one of {', '.join(PRESETS)}")
    text = resources.files("unitscale_core.resources").joinpath("presets", f"{name}.json")
    return loads(text.read_text(encoding="utf-8"), "json", source=f"preset {name}")


def preset_notes(name: str) -> tuple[str, ...]:
    """What preset ``name`` computes differently from the published model (empty: nothing);
    ValueError for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not one of {', '.join(PRESETS)}")
    return PRESET_NOTES.get(name, ())
