"""The scale table's cells: exact zeros are zero (not lost), no false 100%, no "-0.00"."""

from __future__ import annotations

import math

import pytest
from PySide6.QtCore import Qt

from app.widgets.scale_table import COLUMNS, STATUS_COLOURS, ScaleTableModel
from unitscale_core import ModelConfig
from unitscale_core.scaling.formats import gaussian_format_table
from unitscale_core.scaling.predict import predict, status_counts
from unitscale_core.tensors import TensorRow

SMALL = ModelConfig(d_model=64, n_heads=4, d_ff=128, n_layers=2, vocab_size=256, max_len=64,
                    seq_len=32, batch_size=4)
FMT = "fp8_e4m3"


def _text(model: ScaleTableModel, r: int, column: str) -> str:
    return model.index(r, COLUMNS.index(column)).data(Qt.ItemDataRole.DisplayRole)


def _row(name: str, rms: float) -> TensorRow:
    table = gaussian_format_table([rms], FMT)
    return TensorRow(name, "weight", rms, formats={FMT: {k: float(v[0]) for k, v in
                                                        table.items()}})


def test_exactly_zero_tensors_are_zero_not_lost(qtbot):
    rows = predict(SMALL, formats=(FMT,))
    zeros = [r for r in rows if r.rms == 0]
    assert any(r.name.endswith("norm1.bias") for r in zeros)  # LayerNorm biases at init
    model = ScaleTableModel()
    model.set_rows(rows, fmt=FMT)
    for zero in zeros:
        r = model.rows.index(zero)
        assert model.value(r, "status") == "zero"
        assert _text(model, r, "status") == "zero"
        assert (_text(model, r, "underflow"), _text(model, r, "overflow")) == ("0%", "0%")
        assert _text(model, r, "↑ headroom") == _text(model, r, "↓ headroom") == "—"
        background = model.index(r, COLUMNS.index("status")).data(
            Qt.ItemDataRole.BackgroundRole)
        assert background.color().name() == STATUS_COLOURS["zero"]
    statuses = [model.value(r, "status") for r in range(model.rowCount())]
    counts = status_counts(SMALL, FMT)
    assert counts["zero"] == len(zeros) == statuses.count("zero")
    assert counts["lost"] == statuses.count("lost")  # the zeros are not among the lost
    # sorted by underflow, the zeros sit with the tensors that lose nothing
    model.sort(COLUMNS.index("underflow"))
    first = [model.value(r, "underflow") for r in range(len(zeros))]
    assert first == [0.0] * len(zeros)


def test_shares_never_round_to_100_and_no_negative_zero(qtbot):
    # z = 3.3 at fp8_e4m3's underflow threshold: all but erfc(3.3) ≈ 3e-6 round to zero
    tiny = 2.0**-10 / (3.3 * math.sqrt(2))
    near_one = 0.99995  # log2 ≈ -7e-5, which .2f writes as "-0.00"
    model = ScaleTableModel()
    model.set_rows([_row("tiny", tiny), _row("unit", near_one)], fmt=FMT)
    underflow = model.value(0, "underflow")
    assert 0.99999 < underflow < 1.0
    assert _text(model, 0, "underflow") == ">99.9%"
    assert _text(model, 0, "status") == "lost"
    assert math.log2(near_one) < 0
    assert _text(model, 1, "log₂") == "0.00"
    assert _text(model, 1, "overflow") == "0%"  # an exact 0.0 stays "0%"


@pytest.mark.parametrize("rms", [1e-300, 1e-6, 0.5, 3.0, 1e5])
def test_table_percent_cells_keep_three_significant_digits(qtbot, rms):
    model = ScaleTableModel()
    model.set_rows([_row("x", rms)], fmt=FMT)
    value = model.value(0, "underflow")
    text = _text(model, 0, "underflow")
    if text[0] not in "<>":
        assert float(text[:-1]) == pytest.approx(100 * value, rel=5e-3)


def test_summary_share_is_not_rounded_up_to_100(qtbot, make_window):
    """One tensor of the default model's 259 off by 4×: "258/259 (>99%)", never "(100%)";
    the zero tensors agree (measured zero) and are not counted lost."""
    win = make_window(ModelConfig())
    panel = win.scaling_panel
    cfg = panel.shown_config()
    predicted = list(panel.predicted)
    measured = [TensorRow(r.name, r.kind, r.rms * (4.0 if i == 7 else 1.0))
                for i, r in enumerate(predicted)]
    assert panel.show_measured(cfg, measured)
    qtbot.waitUntil(lambda: "within 25%" in panel.summary.text(), timeout=10_000)
    n = len(predicted)
    assert n > 200
    text = panel.summary.text()
    assert f"{n - 1}/{n} tensors (>99%) within 25%" in text and "(100%)" not in text
    counts = status_counts(cfg, panel.format.currentData())
    assert counts["zero"] > 0 and f"{counts['lost']} lost" in text


def test_report_measured_table_has_no_negative_zero():
    from app.report import measured_table

    predicted = [TensorRow("x", "activation", 1.0)]
    measured = [TensorRow("x", "activation", 0.99995)]  # log2 ≈ -7e-5
    table = measured_table(predicted, measured)
    assert table.cells[0][3] == "0.00" and table.cells[0][5] == "0.00"
    assert table.values[0][3] < 0  # the exact value keeps its sign
