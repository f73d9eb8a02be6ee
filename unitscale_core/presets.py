"""Named model shapes shipped in ``resources/presets`` (JSON configs)."""

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
}


def load_preset(name: str) -> ModelConfig:
    """The preset ``name`` (a key of PRESETS); ValueError for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not one of {', '.join(PRESETS)}")
    text = resources.files("unitscale_core.resources").joinpath("presets", f"{name}.json")
    return loads(text.read_text(encoding="utf-8"), "json", source=f"preset {name}")
