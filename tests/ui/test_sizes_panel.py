"""The sizes panel: each formula's symbols name the rows whose numbers it uses."""

from __future__ import annotations

import re

import pytest

from app.panels.sizes_panel import ROWS, SizesPanel
from unitscale_core import ModelConfig
from unitscale_core.sizing import BYTES_PER_ELEMENT

SMALL = dict(d_model=64, n_heads=4, d_ff=128, n_layers=2, vocab_size=256, max_len=64,
             seq_len=32, batch_size=4)


def _exact(panel: SizesPanel) -> dict[str, int]:
    return {ROWS[r][1].strip(): int(panel.table.item(r, 2).text().replace(",", ""))
            for r in range(panel.table.rowCount())}


def _symbol_rows(panel: SizesPanel) -> dict[str, int]:
    """``{"N": value, …}`` for every row labelled "… (X)"."""
    out = {}
    for label, value in _exact(panel).items():
        found = re.search(r"\((\w)\)$", label)
        if found:
            out[found.group(1)] = value
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_memory_formulas_use_the_rows_they_name(qtbot, dtype):
    """"Memory: weights = p · X": X is the row labelled (X), and p · X is the shown bytes.
    (It said p · N under "Non-embedding (N)" while computing with all parameters.)"""
    cfg = ModelConfig(**SMALL, dtype=dtype)
    panel = SizesPanel(cfg)
    qtbot.addWidget(panel)
    exact, symbols = _exact(panel), _symbol_rows(panel)
    p = BYTES_PER_ELEMENT[dtype]
    formulas = {label.strip(): formula for _, label, _, formula in ROWS}
    for label in ("Memory: weights", "Memory: gradients"):
        symbol = re.match(r"p · (\w)\b", formulas[label]).group(1)
        assert symbol in symbols, f"{label}: {symbol} is not a row's symbol"
        assert exact[label] == p * symbols[symbol]
    adam = re.match(r"8·(\w) .*\+ 4·(\w)", formulas["Memory: Adam state"])
    n = symbols[adam.group(1)]
    assert adam.group(1) == adam.group(2)
    assert exact["Memory: Adam state"] == 8 * n + (0 if dtype == "fp32" else 4 * n)
    assert symbols["P"] == exact["Parameters (P)"] != symbols["N"]  # the total, not N


def test_mixtral_active_params_both_flops_conventions_and_gqa_kv(qtbot):
    """Mixtral-8x7B imported from its published config.json: total and active parameters
    (model card: 46.7 B / 12.9 B), PaLM's attention term twice Kaplan's, KV per token with
    8 of 32 heads caching (2 · 32 layers · 8 · 128 · 2 B)."""
    import json
    from pathlib import Path

    from unitscale_core.hf_config import from_hf

    data = json.loads((Path(__file__).parents[1] / "core" / "data" / "hf_configs"
                       / "mixtral-8x7b.json").read_text())
    panel = SizesPanel(from_hf(data)[0].replace(dtype="bf16"))
    qtbot.addWidget(panel)
    exact = _exact(panel)
    assert exact["Parameters (P)"] == 46_702_792_704
    assert exact["active per token (MoE)"] == 12_879_925_248
    assert exact["KV cache per token"] == 131_072
    palm, kaplan = exact["of which attention (PaLM)"], exact["of which attention"]
    assert palm == 2 * kaplan == 4 * 32 * 2048 * 4096
    assert (exact["FLOPs / token, forward (PaLM, headline)"] - exact["FLOPs / token, forward"]
            == kaplan)
    tooltips = {ROWS[r][1].strip(): panel.table.item(r, 0).toolTip()
                for r in range(panel.table.rowCount())}
    assert "12·L_attn·s·a·d" in tooltips["FLOPs / token, training (PaLM, headline)"]
