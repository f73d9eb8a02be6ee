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
