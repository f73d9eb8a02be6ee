"""pytest-qt: the scaling panel follows the config, measures in the worker, and the seed tab."""

from __future__ import annotations

import html
import math
import time

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QLabel, QSpinBox, QWidget

from app.export import EXPORT_ROLE
from app.main_window import MainWindow
from app.panels.scaling_panel import agreement, scattered_disagreements
from app.widgets.scale_table import COLUMNS, STATUS_COLOURS, row_status
from unitscale_core.formatting import percent
from unitscale_core.measure import measure, one_seed_ceiling
from unitscale_core.scaling.predict import predict
from unitscale_core.tensors import TensorRow

SMALL = dict(d_model=64, n_heads=4, d_ff=128, n_layers=2, vocab_size=256, max_len=64,
             seq_len=32, batch_size=4)


@pytest.fixture
def window(make_window):
    from unitscale_core import ModelConfig

    return make_window(ModelConfig(**SMALL))


def panel_of(win):
    panel = win.findChild(QWidget, "scalingPanel")
    assert panel is win.scaling_panel
    return panel


def chart_names(panel):
    return list(panel.chart.names)


def test_chart_and_table_follow_d_model_and_layers(qtbot, window):
    panel = panel_of(window)
    before_rows = panel.model.rowCount()
    before_q = panel.chart.values["pred_fwd"]["layers.0.attn.q.weight"]
    window.model_panel.findChild(QSpinBox, "n_layers").setValue(3)
    assert "layers.2.attn.q" in chart_names(panel)
    assert panel.model.rowCount() > before_rows
    window.model_panel.findChild(QSpinBox, "d_model").setValue(128)
    after_q = panel.chart.values["pred_fwd"]["layers.0.attn.q.weight"]
    assert after_q == pytest.approx(before_q / 2**0.5, rel=1e-6)  # 1/√(3·fan_in)
    names = {panel.model.rows[i].name for i in range(panel.model.rowCount())}
    assert names == {r.name for r in predict(window.config)}


def test_parametrization_selector_changes_prediction(qtbot, window):
    panel = panel_of(window)
    param = panel.findChild(QComboBox, "scaleParam")
    param.setCurrentIndex(param.findData("unit"))
    assert panel.chart.values["pred_fwd"]["layers.0.attn.q.weight"] == pytest.approx(1.0)
    assert panel.shown_config().parametrization == "unit"
    assert window.config.parametrization == "standard"  # the model's config is untouched
    # following the model again: the config's own parametrization
    param.setCurrentIndex(0)
    window.model_panel.findChild(QComboBox, "parametrization").setCurrentText("umup")
    assert panel.shown_config().parametrization == "umup"


def test_summary_warns_where_a_unit_scaled_stack_collapses(qtbot, make_window):
    """A 32-layer stack: unit scaling's tokens collapse below fp32 resolution (the warning
    names the LayerNorm the predictor finds, and the unit chart marks its row), u-μP's and
    the standard model's do not; in bf16 the collapse comes earlier."""
    from unitscale_core import ModelConfig
    from unitscale_core.scaling.predict import stream_collapse

    cfg = ModelConfig(architecture="decoder", d_model=64, n_heads=2, d_ff=256, n_layers=32,
                      seq_len=32, max_len=32, batch_size=2, vocab_size=500)
    win = make_window(cfg)
    panel = panel_of(win)
    qtbot.waitUntil(panel.summary_complete, timeout=30_000)
    text = panel.findChild(QLabel, "scaleSummary").text()
    collapse = stream_collapse(cfg.replace(parametrization="unit"))
    assert f"⚠ <b>unit</b>: tokens' own parts fall below fp32 resolution from " \
        f"{collapse.norm}" in html.unescape(text)
    assert "<b>umup</b>: tokens" not in text and "<b>standard</b>: tokens" not in text
    assert panel.chart.collapse_line is None  # the chart shows the standard model
    param = panel.findChild(QComboBox, "scaleParam")
    param.setCurrentIndex(param.findData("unit"))
    qtbot.waitUntil(lambda: panel.chart.collapse_line is not None, timeout=30_000)
    line = panel.chart.collapse_line
    assert line.value() == panel.chart.names.index(collapse.norm) - 0.5
    assert "fp32" in line.label.toPlainText()
    panel.fill_table()
    model = panel.model
    marked = [i for i, r in enumerate(model.rows) if (r.name, r.kind) in model.noise]
    assert marked and all(model.rows[i].kind.startswith("grad") for i in marked)
    first = model.index(marked[0], 0)
    assert first.data().endswith("⚠")
    assert "rounding noise" in first.data(Qt.ItemDataRole.ToolTipRole)
    clean = next(i for i, r in enumerate(model.rows) if r.name == "layers.0.attn.q")
    assert not model.index(clean, 0).data().endswith("⚠")
    win.model_panel.findChild(QComboBox, "dtype").setCurrentText("bf16")
    qtbot.waitUntil(lambda: "bf16 resolution" in panel.summary.text(), timeout=30_000)
    assert stream_collapse(win.config.replace(parametrization="unit")).norm in \
        panel.summary.text()


def _row_counts(cfg, fmt):
    """Lost and at-risk tensors counted row by row with the table's own status rule."""
    statuses = [row_status(r, fmt) for r in predict(cfg, formats=(fmt,))]
    return statuses.count("lost"), statuses.count("at_risk")


def test_summary_counts_each_parametrization(qtbot, window):
    panel = panel_of(window)
    text = panel.findChild(QLabel, "scaleSummary").text()
    for p in ("standard", "unit", "umup"):
        lost, risk = _row_counts(window.config.replace(parametrization=p), "fp8_e4m3")
        assert f"<b>{p}</b>: {lost} lost, {risk} at risk" in text
    fmt = panel.findChild(QComboBox, "scaleFormat")
    fmt.setCurrentIndex(fmt.findData("fp16"))
    assert panel.summary.text().startswith("fp16")


def test_large_model_summary_fills_in_after_the_frame(qtbot, window):
    """A deep model is predicted in the background, its other parametrizations after it."""
    from unitscale_core.scaling.predict import clear_cache

    clear_cache()
    deep = window.config.replace(n_layers=40)
    window.set_config(deep)
    panel = panel_of(window)
    assert panel.busy.text() == "predicting…" and not panel.summary_complete()
    qtbot.waitUntil(panel.prediction_current, timeout=20_000)
    assert len(panel.predicted) > 1500
    qtbot.waitUntil(panel.summary_complete, timeout=20_000)
    for p in ("standard", "unit", "umup"):
        lost, risk = _row_counts(deep.replace(parametrization=p), "fp8_e4m3")
        assert f"<b>{p}</b>: {lost} lost, {risk} at risk" in panel.summary.text()


def test_large_model_table_follows_in_the_next_slice(qtbot, window):
    """A deep model's chart shows the prediction when it arrives; the table follows an idle
    slice later, or at once when something reads it."""
    from unitscale_core.scaling.predict import clear_cache

    clear_cache()
    panel = panel_of(window)
    deep = window.config.replace(n_layers=40)
    table_when_shown = []
    panel.computed.connect(lambda: table_when_shown.append(panel.table_current()))
    with qtbot.waitSignal(panel.computed, timeout=20_000):
        window.set_config(deep)
    assert "layers.39.attn.q" in chart_names(panel)
    assert table_when_shown == [False]  # left to the next slice
    qtbot.waitUntil(panel.table_current, timeout=20_000)
    assert [(r.name, r.kind) for r in panel.model.rows] == \
        [(r.name, r.kind) for r in predict(deep, formats=("fp8_e4m3",))]
    deeper = deep.replace(n_layers=41)
    window.set_config(deeper)
    assert not panel.prediction_current()  # on its way in the background
    panel.select_tensor("layers.40.ffn.down")  # reads the table: brings it up to date first
    assert panel.prediction_current() and panel.table_current()
    rows = panel.table.selectionModel().selectedRows()
    assert rows and rows[0].data() == "layers.40.ffn.down"
    assert len(panel.table_data().cells) == len(predict(deeper, formats=("fp8_e4m3",)))


BIG = dict(d_model=512, n_heads=8, d_ff=2048, n_layers=48, vocab_size=8192, max_len=512,
           seq_len=512, batch_size=2)


def _slow_predict(monkeypatch, seconds=0.3):
    """Make every uncached prediction take at least ``seconds`` (in whichever thread)."""
    from unitscale_core.scaling import predict as P

    real = P._prediction

    def slow(cfg, formats, should_stop=None):
        if not P.is_predicted(cfg, formats):  # a new pass
            time.sleep(seconds)
        return real(cfg, formats, should_stop)

    monkeypatch.setattr(P, "_prediction", slow)


def test_big_config_change_returns_at_once_and_the_prediction_follows(qtbot, window,
                                                                      monkeypatch):
    from unitscale_core import ModelConfig
    from unitscale_core.scaling.predict import clear_cache

    clear_cache()
    _slow_predict(monkeypatch)
    panel = panel_of(window)
    small_names = chart_names(panel)
    big = ModelConfig(**BIG)
    t0 = time.perf_counter()
    window.set_config(big)
    assert time.perf_counter() - t0 < 0.2  # the GUI thread did not predict
    assert not panel.prediction_current()
    assert chart_names(panel) == small_names  # the previous prediction stays on screen
    assert panel.busy.text() == "predicting…" and "48 layers" in panel.busy.toolTip()
    assert not panel.summary_complete()
    qtbot.waitUntil(panel.prediction_current, timeout=20_000)
    assert "layers.47.attn.q" in chart_names(panel)
    qtbot.waitUntil(lambda: panel.table_current() and panel.summary_complete(),
                    timeout=20_000)
    fmt = panel.format.currentData()
    assert [(r.name, r.rms) for r in panel.model.rows] == \
        [(r.name, r.rms) for r in predict(big, formats=(fmt,))]
    assert panel.busy.text() == ""
    for p in ("standard", "unit", "umup"):
        lost, risk = _row_counts(big.replace(parametrization=p), fmt)
        assert f"<b>{p}</b>: {lost} lost, {risk} at risk" in panel.summary.text()


def test_big_config_format_and_dtype_changes_reuse_its_passes(qtbot, window, monkeypatch):
    """Once a deep model is predicted, another format or dtype is shown in the same call
    (no background prediction): the rows and every summary count come from its passes."""
    from unitscale_core import ModelConfig
    from unitscale_core.scaling.predict import clear_cache

    clear_cache()
    _slow_predict(monkeypatch)
    panel = panel_of(window)
    big = ModelConfig(**BIG)
    window.set_config(big)
    qtbot.waitUntil(lambda: panel.prediction_current() and panel.summary_complete(),
                    timeout=20_000)
    panel.format.setCurrentIndex(panel.format.findData("bf16"))
    assert panel.prediction_current() and panel.summary_complete()
    assert panel.busy.text() == "" and not panel.predictions.busy()
    window.set_config(big.replace(dtype="fp16"))
    assert panel.prediction_current() and panel.summary_complete()
    assert panel.predicted_config().dtype == "fp16"
    panel.fill_table()
    assert [(r.name, r.rms) for r in panel.model.rows] == \
        [(r.name, r.rms) for r in predict(big, formats=("bf16",))]
    for p in ("standard", "unit", "umup"):
        lost, risk = _row_counts(big.replace(parametrization=p), "bf16")
        assert f"<b>{p}</b>: {lost} lost, {risk} at risk" in panel.summary.text()


def test_chart_keeps_the_rows_in_view_for_the_same_model(qtbot, window):
    """Scrolled down a deep model's chart, another dtype, format or parametrization keeps
    those rows in view; another model starts again from the first rows."""
    panel = panel_of(window)
    deep = window.config.replace(n_layers=20)
    window.set_config(deep)
    qtbot.waitUntil(panel.prediction_current, timeout=20_000)
    plot = panel.chart.plot
    plot.setYRange(300, 340, padding=0)
    rows_in_view = plot.viewRange()[1]
    window.set_config(deep.replace(dtype="bf16"))
    panel.format.setCurrentIndex(panel.format.findData("fp16"))
    panel.param.setCurrentIndex(panel.param.findData("unit"))
    qtbot.waitUntil(panel.prediction_current, timeout=20_000)
    assert panel.predicted_config().parametrization == "unit"
    assert plot.viewRange()[1] == pytest.approx(rows_in_view)
    window.set_config(deep.replace(n_layers=21))
    qtbot.waitUntil(panel.prediction_current, timeout=20_000)
    assert plot.viewRange()[1][0] < 0


def test_rapid_big_changes_end_with_the_last_prediction(qtbot, window, monkeypatch):
    """Results for configs replaced meanwhile are dropped; the last config's is shown."""
    from unitscale_core import ModelConfig
    from unitscale_core.scaling.predict import clear_cache

    clear_cache()
    _slow_predict(monkeypatch, 0.1)
    panel = panel_of(window)
    applied = []
    panel.computed.connect(lambda: applied.append(panel.predicted_config()))
    configs = [ModelConfig(**BIG).replace(n_layers=n) for n in range(20, 31)]
    for cfg in configs:
        window.set_config(cfg)
        qtbot.wait(15)  # some results arrive mid-stream, most are overtaken
    qtbot.waitUntil(lambda: panel.prediction_current() and panel.summary_complete(),
                    timeout=30_000)
    final = configs[-1]
    assert applied[-1] == final and panel.predicted_config() == final
    assert len(applied) < len(configs)  # stale ones never reached the chart
    assert all(c in configs for c in applied)
    assert "layers.29.ffn.down" in chart_names(panel)
    assert {(r.name, r.kind): r.rms for r in panel.predicted} == \
        {(r.name, r.kind): r.rms for r in predict(final, formats=(panel.format.currentData(),))}
    qtbot.wait(300)  # nothing older arrives later
    assert panel.predicted_config() == final


def test_close_during_background_prediction_is_clean(qtbot, monkeypatch):
    from unitscale_core import ModelConfig
    from unitscale_core.scaling.predict import clear_cache

    clear_cache()
    _slow_predict(monkeypatch, 0.5)
    win = MainWindow(ModelConfig(**SMALL))
    qtbot.addWidget(win)
    win.show()
    win.set_config(ModelConfig(**BIG))
    panel = win.scaling_panel
    qtbot.waitUntil(panel.predictions.busy)
    assert panel.predictions.isRunning()
    t0 = time.perf_counter()
    with qtbot.assertNotEmitted(panel.computed, wait=100):
        win.close()
    assert time.perf_counter() - t0 < 2.0
    assert not panel.predictions.isRunning()
    panel.update_config(ModelConfig(**BIG).replace(n_layers=47))  # after shutdown: inert
    assert not panel.predictions.isRunning()


def test_close_during_a_long_prediction_does_not_wait_for_it(qtbot):
    """A prediction that would run for seconds gives up at its next sub-block when the
    window closes (and one op of an extreme config that cannot stop is left to its daemon
    thread): closing takes well under the 2 s the worker is allowed."""
    from unitscale_core import ModelConfig
    from unitscale_core.scaling import predict as P

    P.clear_cache()
    real = P._Predictor.block_fwd

    def slow_block(self, *args, **kwargs):
        time.sleep(0.05)  # 96 layers × 2 sub-blocks: ~10 s in all
        return real(self, *args, **kwargs)

    win = MainWindow(ModelConfig(**SMALL))
    qtbot.addWidget(win)
    win.show()
    P._Predictor.block_fwd = slow_block
    try:
        win.set_config(ModelConfig(**BIG).replace(n_layers=96))
        panel = win.scaling_panel
        qtbot.waitUntil(panel.predictions.busy)
        qtbot.wait(200)
        t0 = time.perf_counter()
        win.close()
        assert time.perf_counter() - t0 < 1.0
        qtbot.waitUntil(lambda: not panel.predictions.isRunning(), timeout=1000)
    finally:
        P._Predictor.block_fwd = real


def test_table_sorts_and_keeps_its_order_across_changes(qtbot, window):
    panel = panel_of(window)
    rms_col, name_col = COLUMNS.index("predicted RMS"), COLUMNS.index("tensor")

    def column(c):
        return [panel.model.index(r, c).data(Qt.ItemDataRole.UserRole)
                for r in range(panel.model.rowCount())]

    panel.select_tensor("layers.1.ffn.down")
    panel.table.sortByColumn(rms_col, Qt.SortOrder.DescendingOrder)
    assert column(rms_col) == sorted(column(rms_col), reverse=True)
    rows = panel.table.selectionModel().selectedRows()  # the selection follows its row
    assert rows and rows[0].data() == "layers.1.ffn.down"
    panel.table.sortByColumn(name_col, Qt.SortOrder.AscendingOrder)
    assert column(name_col) == sorted(column(name_col))
    status_col = COLUMNS.index("status")
    panel.table.sortByColumn(status_col, Qt.SortOrder.AscendingOrder)
    assert column(status_col) == sorted(column(status_col))
    panel.table.sortByColumn(rms_col, Qt.SortOrder.AscendingOrder)
    window.model_panel.findChild(QSpinBox, "n_layers").setValue(3)  # a reset keeps the order
    assert "layers.2.attn.q" in column(name_col)
    assert column(rms_col) == sorted(column(rms_col))
    panel.table.sortByColumn(-1, Qt.SortOrder.AscendingOrder)  # op-graph order again
    assert [(r.name, r.kind) for r in panel.model.rows] == \
        [(r.name, r.kind) for r in predict(window.config, formats=("fp8_e4m3",))]


def test_table_cells_text_colour_and_exact_value(qtbot, window):
    panel = panel_of(window)
    model = panel.model
    status_col, under_col = COLUMNS.index("status"), COLUMNS.index("underflow")
    for r in range(model.rowCount()):
        row = model.rows[r]
        status = model.index(r, status_col).data()
        assert status == row_status(row, "fp8_e4m3")
        brush = model.index(r, status_col).data(Qt.ItemDataRole.BackgroundRole)
        assert (brush is not None) == (status in STATUS_COLOURS)
        # an exactly zero tensor loses nothing (its Gaussian-limit fraction reads 1)
        under = 0.0 if row.rms == 0 else row.formats["fp8_e4m3"]["underflow"]
        assert model.index(r, under_col).data(EXPORT_ROLE) == under
        assert model.index(r, under_col).data() == percent(under, significant=3)
    assert model.index(0, 0).data(Qt.ItemDataRole.FontRole) is None
    assert model.index(0, 0).data(Qt.ItemDataRole.ToolTipRole).startswith(model.rows[0].name)


class _Event:
    """Enough of a pyqtgraph mouse event for a marker series."""

    def __init__(self, pos, exit=False):
        self._pos, self.exit, self.accepted = pos, exit, None

    def pos(self):
        return self._pos

    def button(self):
        return Qt.MouseButton.LeftButton

    def accept(self):
        self.accepted = True

    def ignore(self):
        self.accepted = False


def test_chart_markers_hover_and_click(qtbot, window):
    import math

    from PySide6.QtCore import QPointF

    panel = panel_of(window)
    chart = panel.chart
    name = "layers.1.ffn.down"
    item = chart._series["pred_fwd"]
    at = QPointF(math.log2(chart.values["pred_fwd"][name]), chart.names.index(name) - 0.18)
    assert item.points_at(at).size
    item.hoverEvent(_Event(at))
    tip = chart.plot.getViewBox().toolTip()
    assert tip.startswith(name) and "forward" in tip and chart.formula(name) in tip
    item.hoverEvent(_Event(at, exit=True))
    assert chart.plot.getViewBox().toolTip() == ""
    with qtbot.waitSignal(chart.picked) as picked:
        click = _Event(at)
        item.mouseClickEvent(click)
    assert click.accepted and picked.args == [name]
    rows = panel.table.selectionModel().selectedRows()
    assert rows and rows[0].data() == name
    miss = _Event(QPointF(at.x() + 40, at.y()))
    item.mouseClickEvent(miss)
    assert miss.accepted is False


def test_a_new_summary_repaints_the_label_alone(qtbot, window):
    """The summary's new text must not re-lay out (and so repaint) the whole panel; a text
    that needs another line makes room for it."""
    panel = panel_of(window)
    label = panel.summary
    one_line = label.height()
    label.setText(label.text().split("<br>")[0] + " (again)")
    qtbot.wait(10)
    assert label.height() == one_line
    label.setText(label.text() + "<br>a second line")
    qtbot.waitUntil(lambda: label.height() > one_line)
    assert label.heightForWidth(label.width()) <= label.height()


def test_filter_and_kind(qtbot, window):
    panel = panel_of(window)
    panel.filter.setText("ffn.up")
    kinds = {panel.proxy.index(r, 1).data() for r in range(panel.proxy.rowCount())}
    assert panel.proxy.rowCount() > 0 and kinds <= {"activation", "weight", "grad_activation",
                                                     "grad_weight"}
    panel.kind.setCurrentIndex(panel.kind.findData("grad_weight"))
    assert all(panel.proxy.index(r, 1).data() == "grad_weight"
               for r in range(panel.proxy.rowCount()))


def test_clicking_a_chart_point_selects_its_row(qtbot, window):
    panel = panel_of(window)
    panel.chart.picked.emit("layers.1.ffn.down")
    rows = panel.table.selectionModel().selectedRows()
    assert rows and rows[0].data() == "layers.1.ffn.down"


def test_hover_text_names_value_and_formula(qtbot, window):
    panel = panel_of(window)
    text = panel.chart.describe("layers.0.attn.q")
    assert text.startswith("layers.0.attn.q") and "forward" in text and "√" in text


def test_measure_overlays_measurement(qtbot, window):
    panel = panel_of(window)
    with qtbot.waitSignal(panel.measured_ready, timeout=60_000):
        panel.findChild(QWidget, "measureButton").click()
    assert panel.measured
    col = COLUMNS.index("measured RMS")
    assert panel.model.index(0, col).data()  # filled in
    assert "within 25%" in panel.summary.text()
    assert panel.chart.values["meas_fwd"]


def test_measure_over_seeds_overlays_their_geometric_mean(qtbot, window):
    """× 3 seeds: the overlay is measure_seeds' combination (seeds s, s+1, s+2), the summary
    says so, and progress comes per seed."""
    from unitscale_core.measure import measure_seeds

    panel = panel_of(window)
    panel.findChild(QSpinBox, "measureSeeds").setValue(3)
    texts = []
    window.worker.progress.connect(lambda ch, rid, f, text: texts.append(text))
    with qtbot.waitSignal(panel.measured_ready, timeout=60_000):
        panel.findChild(QWidget, "measureButton").click()
    want = {(r.name, r.kind): r.rms for r in measure_seeds(panel.shown_config(), 3)}
    got = {(r.name, r.kind): r.rms for r in panel.measured}
    assert got == pytest.approx(want, rel=1e-6)
    assert "measured (geometric mean of 3 seeds):" in panel.summary.text()
    assert "measured 3 of 3 seeds" in texts
    # how each tensor varied: a line through its marker, a column, the summary
    singles = [{(r.name, r.kind): r.rms for r in measure(panel.shown_config().replace(seed=s))}
               for s in range(panel.shown_config().seed, panel.shown_config().seed + 3)]
    name = "layers.0.attn.q"
    low, high = panel.chart.ranges["meas_fwd"][name]
    draws = [m[(name, "activation")] for m in singles]
    assert (low, high) == pytest.approx((min(draws), max(draws)), rel=1e-9)
    assert len(panel.chart._ranges["meas_fwd"].xData) == 2 * len(panel.chart.ranges["meas_fwd"])
    assert "draws over the seeds" in panel.chart.describe(name)
    panel.fill_table()
    col = COLUMNS.index("± seeds")
    row = panel.model.row_of(name)
    assert panel.model.value(row, "± seeds") == pytest.approx(
        float(np.std(np.log2(draws))), rel=1e-6)
    tip = panel.model.data(panel.model.index(row, col), Qt.ItemDataRole.ToolTipRole)
    assert "over the seeds:" in tip
    ok, total = agreement(panel.predicted, panel.measured)
    lucky = scattered_disagreements(panel.predicted, panel.measured, panel.spread)
    if ok < total:
        assert f"of the {total - ok} outside, {lucky} scatter" in panel.summary.text()
    ceiling = one_seed_ceiling(panel.spread.values())
    assert f"would be within 25% for ~{100 * ceiling:.0f}%" in panel.summary.text()


def test_one_seed_ceiling_is_the_gaussian_share_within_tolerance():
    """2Φ(0.32/s) − 1 per tensor (1 where the draws agree), averaged: at s = 0.32 a draw is
    within one standard deviation of the typical value, 68.3% of the time."""
    from unitscale_core.measure import SeedSpread

    assert one_seed_ceiling([SeedSpread(1, 1, 0.0)]) == 1.0
    assert one_seed_ceiling([SeedSpread(1, 2, 0.32)]) == pytest.approx(0.682689, abs=1e-6)
    assert one_seed_ceiling([SeedSpread(1, 2, 0.32), SeedSpread(1, 1, 0.0)]) == pytest.approx(
        (0.682689 + 1.0) / 2, abs=1e-6)
    assert one_seed_ceiling([SeedSpread(1, 9, 0.8)]) == pytest.approx(0.310843, abs=1e-6)
    assert one_seed_ceiling([]) == 1.0


def test_scattered_disagreements_count_only_rows_outside_that_vary():
    from unitscale_core.measure import SeedSpread

    pred = [TensorRow("a", "activation", 1.0), TensorRow("b", "activation", 1.0),
            TensorRow("c", "activation", 1.0)]
    meas = [TensorRow("a", "activation", 2.0), TensorRow("b", "activation", 2.0),
            TensorRow("c", "activation", 1.1)]
    spread = {("a", "activation"): SeedSpread(1.0, 4.0, 0.8),
              ("b", "activation"): SeedSpread(1.9, 2.1, 0.05),
              ("c", "activation"): SeedSpread(0.5, 2.0, 0.9)}
    assert agreement(pred, meas) == (1, 3)
    assert scattered_disagreements(pred, meas, spread) == 1  # a: outside and scattered


def test_stale_measurement_is_dropped(qtbot, window):
    panel = panel_of(window)
    first = panel.measure()
    window.model_panel.findChild(QSpinBox, "n_layers").setValue(3)
    second = panel.measure()
    assert second != first
    with qtbot.waitSignal(panel.measured_ready, timeout=60_000):
        pass
    names = {r.name for r in panel.measured}
    assert "layers.2" in names  # the result shown is for the newest config


def test_seed_tab_shows_the_seed_example_with_warning(qtbot, window):
    panel = panel_of(window)
    panel.tabs.setCurrentWidget(panel.seed_tab)
    result = panel.findChild(QLabel, "seedResult").text()
    assert "-0.891386" in result and "-8.914e+05" in result
    assert "negative" in panel.findChild(QLabel, "seedWarning").text()
    alpha = panel.findChild(QDoubleSpinBox, "seed_alpha")
    alpha.setValue(1.0)
    assert "alpha" in panel.findChild(QLabel, "seedWarning").text()
    alpha.setValue(0.9)
    assert float(result.split()[2]) != float(panel.seed_tab.result.text().split()[2])


def test_close_while_measuring_exits_quickly(qtbot):
    from unitscale_core import ModelConfig

    win = MainWindow(ModelConfig(d_model=256, n_heads=4, d_ff=1024, n_layers=8,
                                 vocab_size=4096, seq_len=256, max_len=256, batch_size=8))
    qtbot.addWidget(win)
    win.show()
    with qtbot.waitSignal(win.worker.started_job, timeout=10_000):
        win.scaling_panel.measure()
    assert win.busy.isVisible() and win.cancel_button.isVisible()
    t0 = time.perf_counter()
    win.close()
    assert time.perf_counter() - t0 < 2.0
    assert not win.worker.isRunning()


def test_summary_holder_grows_at_once_and_shrinks_once_the_text_stays_short(qtbot):
    """More lines are shown at once; fewer only after LabelHolder.SHRINK_MS without a longer
    text, so a line that comes and goes while the user edits does not relayout the panel."""
    from app.widgets.label_holder import LabelHolder

    label = QLabel()
    label.setWordWrap(True)
    holder = LabelHolder(label)
    qtbot.addWidget(holder)
    holder.resize(300, 20)
    holder.show()
    label.setText("one line")
    qtbot.waitUntil(lambda: holder.height() == label.heightForWidth(300))
    one = holder.height()
    label.setText("a much longer text that needs several lines at this width " * 3)
    qtbot.waitUntil(lambda: holder.height() > one)
    tall = holder.height()
    label.setText("one line")
    qtbot.wait(LabelHolder.SHRINK_MS // 3)
    assert holder.height() == tall  # not yet
    qtbot.waitUntil(lambda: holder.height() == one, timeout=3 * LabelHolder.SHRINK_MS)


def test_chart_names_as_many_rows_as_fit_and_every_row_zoomed_in(qtbot, window):
    """The tensor axis labels one row per ~18 px of the visible rows: a few rows in view,
    each has its name; the whole model in view, a spread of them."""
    panel = panel_of(window)
    axis = panel.chart.plot.getAxis("left")
    names = panel.chart.names
    height = axis.geometry().height()
    ticks = axis.tickValues(0, len(names) - 1, height)
    (step, rows), = ticks
    assert step == math.ceil((len(names) - 1) * axis.LABEL_PX / height)
    assert rows[0] == 0 and all(b - a == step for a, b in zip(rows, rows[1:]))
    (step, rows), = axis.tickValues(10, 14, 400)  # zoomed in (400 px): every row named
    assert step == 1 and rows == [10, 11, 12, 13, 14]
    assert axis.tickStrings(rows, 1, 1) == names[10:15]
    (step, rows), = axis.tickValues(14, 10, 400)  # (the y axis is inverted)
    assert rows == [10, 11, 12, 13, 14]
    (step, rows), = axis.tickValues(10, 14, 40)  # 40 px: every other row
    assert step == 2 and rows == [10, 12, 14]


def _wheel(qtbot, widget, steps: int) -> None:
    from PySide6.QtCore import QPoint, QPointF
    from PySide6.QtGui import QWheelEvent
    from PySide6.QtWidgets import QApplication

    viewport = widget.viewport()
    pos = QPointF(viewport.width() / 2, viewport.height() / 2)
    event = QWheelEvent(pos, viewport.mapToGlobal(pos), QPoint(0, 0), QPoint(0, 120 * steps),
                        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier,
                        Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(viewport, event)
    qtbot.wait(20)


def test_wheel_zooms_the_rows_only_and_names_every_row_shown(qtbot, window):
    """The wheel zooms the tensor axis; log₂ RMS keeps its range (zooming both made a smear
    from -200 to 300). Zoomed in, every row in view has its name."""
    panel = panel_of(window)
    window.resize(1366, 768)
    qtbot.wait(50)
    plot = panel.chart.plot
    x_before, y_before = plot.viewRange()
    _wheel(qtbot, panel.chart.plot_widget, 3)  # zoom in
    x_in, y_in = plot.viewRange()
    # (the data's range; the markers' padding in pixels moves it a little as the name
    # axis widens for longer names)
    assert x_in == pytest.approx(x_before, abs=0.3)
    assert (y_in[1] - y_in[0]) < 0.8 * (y_before[1] - y_before[0])
    _wheel(qtbot, panel.chart.plot_widget, -8)  # and out
    x_out, y_out = plot.viewRange()
    assert x_out == pytest.approx(x_before, abs=0.3)
    assert (y_out[1] - y_out[0]) > (y_in[1] - y_in[0])
    _wheel(qtbot, panel.chart.plot_widget, 12)  # far in: the limit keeps two rows at least
    y0, y1 = plot.viewRange()[1]
    assert y1 - y0 >= 2 - 1e-9
    axis = plot.getAxis("left")
    (step, rows), = axis.tickValues(y0, y1, plot.getViewBox().height())
    visible = [i for i in range(len(panel.chart.names)) if y0 <= i <= y1]
    assert step == 1 and rows == visible
    assert axis.tickStrings(rows, 1, 1) == [panel.chart.names[i] for i in visible]


def test_chart_png_is_the_whole_chart_with_a_title(qtbot, window, tmp_path):
    """Zoomed in, the exported chart still shows every row, under a title naming the config;
    past the row limit it shows the rows in view and says so."""
    from PySide6.QtGui import QImage

    from app import export
    from app.widgets import scale_chart

    panel = panel_of(window)
    panel.chart.plot.setYRange(3, 8, padding=0)  # zoomed in on the screen
    figure = next(f for f in panel.export_items() if f.key == "scaleChart")
    path = tmp_path / "chart.png"
    export.save_item(figure, path)
    widget = figure.widget()
    plot = panel.chart.exported.plot
    n = len(panel.chart.names)
    assert plot.viewRange()[1] == pytest.approx([-0.5, n - 0.5])
    title = plot.titleLabel.text
    cfg = window.config
    for part in (f"d_model {cfg.d_model}", f"{cfg.n_layers} layers", cfg.parametrization,
                 "fp8_e4m3", cfg.dtype):
        assert part in title
    assert QImage(str(path)).height() == 2 * widget.height() >= \
        2 * scale_chart.EXPORT_ROW_PX * n
    axis = plot.getAxis("left")
    (step, _rows), = axis.tickValues(-0.5, n - 0.5, plot.getViewBox().height())
    assert step == 1  # every row named in the file
    assert panel.chart.plot.viewRange()[1] == pytest.approx([3, 8])  # the screen's view stays
    param = panel.findChild(QComboBox, "scaleParam")
    param.setCurrentIndex(param.findData("umup"))
    assert " · umup · " in panel.chart_title()
    # a preset is named
    from unitscale_core.presets import load_preset

    window.set_config(load_preset("gpt2-small"))
    qtbot.waitUntil(panel.prediction_current, timeout=20_000)
    assert panel.chart_title().startswith("GPT-2 small (124M): decoder, 12 layers")
    window.set_config(window.config.replace(d_model=64, n_heads=4, d_ff=128, n_layers=20,
                                            vocab_size=256, seq_len=32, batch_size=2))
    qtbot.waitUntil(panel.prediction_current, timeout=20_000)
    assert not panel.chart_title().startswith("GPT-2")
    n = len(panel.chart.names)
    assert n > scale_chart.EXPORT_MAX_ROWS
    panel.chart.plot.setYRange(10, 40, padding=0)
    figure = next(f for f in panel.export_items() if f.key == "scaleChart")
    figure.widget()
    exported = panel.chart.exported.plot
    assert f"rows 11–41 of {n}, as in the view" in exported.titleLabel.text
    assert exported.viewRange()[1] == pytest.approx([9.5, 40.5])


def test_hover_text_of_an_exactly_zero_tensor_reads_zero_not_nan(qtbot):
    """A zero tensor (LayerNorm bias at init) has no log₂: hover says zero, never 'log₂ nan'."""
    from app.widgets.scale_chart import ScaleChart

    chart = ScaleChart()
    qtbot.addWidget(chart)
    chart.values = {"meas_fwd": {"layers.0.norm1.bias": 0.0, "layers.0.attn.q": 0.5}}
    chart.ranges = {"meas_fwd": {"layers.0.norm1.bias": (0.0, 0.0)}}
    zero = chart.describe("layers.0.norm1.bias")
    assert "nan" not in zero and "0 (exactly zero)" in zero
    assert "log₂ -1.00" in chart.describe("layers.0.attn.q")
