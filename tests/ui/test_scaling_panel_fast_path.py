"""A dtype or format change of the shown model takes the panel's fast path (the chart keeps
its markers and moves its bands, the table updates in place): it must leave the chart, the
table and the summary exactly as a fresh panel built with that dtype and format shows them."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import QEvent, QObject, QRect, Qt

from app.export import EXPORT_ROLE
from app.panels import scaling_panel
from app.panels.scaling_panel import ScalingPanel
from app.widgets.scale_table import COLUMNS
from app.worker import Worker
from unitscale_core import ModelConfig
from unitscale_core.tensors import REPORTED_FORMATS

#: deep enough that unit scaling's tokens collapse (noise rows, which the dtype moves) and
#: the panel predicts in the background; small enough to compare every cell
CFG = ModelConfig(architecture="decoder", d_model=64, n_heads=2, d_ff=256, n_layers=32,
                  seq_len=32, max_len=32, batch_size=2, vocab_size=500,
                  parametrization="unit")
LOG2 = COLUMNS.index("log₂")
ROLES = (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.ToolTipRole, EXPORT_ROLE)


@pytest.fixture
def worker():
    w = Worker()
    yield w
    w.stop()


def _panel(qtbot, worker, cfg: ModelConfig) -> ScalingPanel:
    panel = ScalingPanel(cfg, worker)
    qtbot.addWidget(panel)
    panel.resize(1100, 700)
    panel.show()
    qtbot.waitExposed(panel)
    panel.table.sortByColumn(LOG2, Qt.SortOrder.AscendingOrder)  # rows rearranged
    _settle(qtbot, panel)
    return panel


def _settle(qtbot, panel: ScalingPanel) -> None:
    qtbot.waitUntil(lambda: panel.prediction_current() and panel.summary_complete()
                    and panel.table_current(), timeout=60_000)
    qtbot.wait(20)  # the paint, and the view's auto range with it


def _chart(panel: ScalingPanel) -> dict:
    chart = panel.chart
    vb = chart.plot.getViewBox()
    line = chart.collapse_line
    return {
        "names": list(chart.names), "values": chart.values,
        "series": {k: (s.x.tolist(), s.y.tolist()) for k, s in chart._series.items()},
        "bands": [(b.getRegion(), b.brush.color().name(b.brush.color().NameFormat.HexArgb),
                   b.hoverBrush.color().name(b.hoverBrush.color().NameFormat.HexArgb),
                   b.toolTip(), b.zValue()) for b in chart.bands],
        "x_range": vb.viewRange()[0],
        "collapse": None if line is None else (line.value(), line.label.toPlainText()),
        "formulas": [chart.formula(n) for n in chart.names[::7]],
        "exported": [(r.name, r.kind, r.formats) for r in chart._shown[0]],
    }


def _table(panel: ScalingPanel) -> list:
    model = panel.model
    out = []
    for r in range(model.rowCount()):
        for c in range(model.columnCount()):
            index = model.index(r, c)
            bg = index.data(Qt.ItemDataRole.BackgroundRole)
            out.append((*(index.data(role) for role in ROLES),
                        None if bg is None else bg.color().name()))
    return out


def _shown(panel: ScalingPanel) -> tuple:
    return _chart(panel), _table(panel), panel.summary.text()


def test_format_and_dtype_changes_show_what_a_fresh_panel_shows(qtbot, worker, monkeypatch):
    panel = _panel(qtbot, worker, CFG)
    assert panel.model.noise  # the fast path has noise marks to move
    fresh_rows = _table(panel)
    for dtype, fmt in (("fp32", "fp16"), ("bf16", "fp16"), ("bf16", "fp8_e5m2"),
                       ("fp16", "fp8_e4m3")):
        if dtype != panel.config.dtype:
            panel.update_config(panel.config.replace(dtype=dtype))
        if fmt != panel.format.currentData():
            panel.format.setCurrentIndex(panel.format.findData(fmt))
        _settle(qtbot, panel)
        assert panel.chart.bands and len(panel.chart.bands) == 2
        # a fresh panel that starts in this format (its selector's first entry) and dtype
        monkeypatch.setattr(scaling_panel, "REPORTED_FORMATS",
                            (fmt, *(f for f in REPORTED_FORMATS if f != fmt)))
        fresh = _panel(qtbot, worker, CFG.replace(dtype=dtype))
        assert fresh.format.currentData() == fmt
        got, want = _shown(panel), _shown(fresh)
        assert got[0] == want[0]
        assert got[1] == want[1]
        assert got[2] == want[2]
        fresh.shutdown()
        fresh.close()
    assert _table(panel) != fresh_rows  # (the changes changed what the table shows)
    panel.shutdown()


def test_a_format_change_updates_the_table_in_place_and_keeps_the_selection(qtbot, worker):
    """No reset for another format of the same rows: the format's columns are reported
    changed (a view repaints those on screen), and a selected row stays selected."""
    panel = _panel(qtbot, worker, CFG)
    model = panel.model
    resets, changed = [], []
    model.modelReset.connect(lambda: resets.append(1))
    model.dataChanged.connect(lambda a, b, *_: changed.append((a.column(), b.column(),
                                                               a.row(), b.row())))
    panel.select_tensor("layers.3.attn.q")
    selected = panel.table.selectionModel().selectedRows()
    panel.format.setCurrentIndex(panel.format.findData("bf16"))
    _settle(qtbot, panel)
    assert not resets
    first, last = COLUMNS.index("underflow"), COLUMNS.index("status")
    assert (first, last, 0, model.rowCount() - 1) in changed
    assert panel.table.selectionModel().selectedRows() == selected
    status = model.index(selected[0].row(), COLUMNS.index("status")).data()
    assert status in ("fine", "at_risk", "lost", "zero")
    # sorted by a format's column, another format re-sorts: a reset
    panel.table.sortByColumn(COLUMNS.index("underflow"), Qt.SortOrder.AscendingOrder)
    panel.format.setCurrentIndex(panel.format.findData("fp8_e4m3"))
    _settle(qtbot, panel)
    assert resets
    values = [model.index(r, COLUMNS.index("underflow")).data(EXPORT_ROLE)
              for r in range(model.rowCount())]
    keys = [-np.inf if v is None else v for v in values]
    assert keys == sorted(keys)
    panel.shutdown()


class _Paints(QObject):
    """The rectangles of a widget's paint events."""

    def __init__(self, widget):
        super().__init__()
        self.rects: list[QRect] = []
        widget.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.Paint:
            self.rects.append(QRect(event.rect()))
        return False


def test_the_table_repaints_the_format_columns_when_they_are_on_screen(qtbot, worker):
    """The view repaints only the changed cells on screen: none while the format's columns
    are scrolled out of view, their cells once they are in it (and they show the format)."""
    panel = _panel(qtbot, worker, CFG)
    paints = _Paints(panel.table.viewport())
    status = COLUMNS.index("status")
    assert panel.table.columnViewportPosition(status) > panel.table.viewport().width()
    panel.format.setCurrentIndex(panel.format.findData("bf16"))
    _settle(qtbot, panel)
    assert not paints.rects  # nothing of it on screen
    panel.table.scrollTo(panel.model.index(0, status))
    qtbot.wait(50)
    x = panel.table.columnViewportPosition(status)
    assert 0 <= x < panel.table.viewport().width()
    paints.rects.clear()
    panel.format.setCurrentIndex(panel.format.findData("fp8_e5m2"))
    _settle(qtbot, panel)
    assert any(r.contains(x + 2, 2) for r in paints.rects)
    model = panel.model
    assert [model.index(r, status).data() for r in range(model.rowCount())] == \
        [model._column_values([row], "status")[0] for row in model.rows]
    assert model.format == "fp8_e5m2"
    panel.shutdown()
