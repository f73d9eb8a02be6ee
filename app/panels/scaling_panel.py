"""The scaling panel: predicted (and measured) RMS of every tensor, and format headroom.

Live on every valid config: the prediction is analytic and recomputes in the GUI thread. The
"Measure" action runs one real forward+backward pass in the worker and overlays it; the
auto-measure toggle does that on every change for small configs. A second tab holds the seed
document's own formula.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PySide6.QtCore import QItemSelectionModel, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSplitter,
    QTableView,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from unitscale_core.config import PARAMETRIZATIONS, ModelConfig
from unitscale_core.scaling.predict import is_predicted, predict, status_counts
from unitscale_core.sizing import count_parameters
from unitscale_core.tensors import REPORTED_FORMATS, TensorRow

from ..export import (
    Figure,
    Item,
    Table,
    TableData,
    attach_context_menu,
    export_button,
    save_table,
    table_from_model,
)
from ..widgets.controls_state import restore_controls, save_controls
from ..widgets.scale_chart import ScaleChart
from ..widgets.scale_table import ScaleFilterProxy, ScaleTableModel
from ..worker import Worker
from .seed_formula_tab import SeedFormulaTab

CHANNEL = "measure"
#: Auto-measure only configs this small (parameters), so typing stays smooth on a CPU.
AUTO_MEASURE_MAX_PARAMS = 20_000_000
FOLLOW = "follow the model"
#: With more tensors than this (~24 layers: a prediction costs ~3 µs per tensor), the other
#: parametrizations' summary counts are predicted in later idle slices, one per slice, so a
#: change stays within a frame.
DEFER_SUMMARY_ROWS = 1500


def agreement(predicted: list[TensorRow], measured: list[TensorRow]) -> tuple[int, int]:
    """(rows within 25%, rows compared): |log2(pred/meas)| ≤ 0.32; a predicted exact zero
    agrees with a measured value below 1e-6 (the key bias's gradient)."""
    meas = {(r.name, r.kind): r.rms for r in measured}
    ok = total = 0
    for r in predicted:
        m = meas.get((r.name, r.kind))
        if m is None or not math.isfinite(m):
            continue
        total += 1
        if r.rms == 0:
            ok += m < 1e-6
        elif m > 0 and abs(math.log2(r.rms / m)) <= 0.32:
            ok += 1
    return ok, total


class ScalingPanel(QWidget):
    """Chart and table of one parametrization's tensors, a format selector and a summary."""

    computed = Signal()
    measured_ready = Signal()

    def __init__(self, config: ModelConfig, worker: Worker, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("scalingPanel")
        self.worker = worker
        self.config = config
        self.predicted: list[TensorRow] = []
        self.measured: list[TensorRow] = []
        self._measure_id = 0
        self._measured_for: ModelConfig | None = None
        self._defer_others = False  # other parametrizations' counts wait for the idle loop
        self._summary_pending = False

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        self.tabs = QTabWidget(objectName="scalingTabs")
        layout.addWidget(self.tabs)
        scales = QWidget()
        self.tabs.addTab(scales, "Scales")
        self.seed_tab = SeedFormulaTab()
        self.tabs.addTab(self.seed_tab, "Seed formula")

        box = QVBoxLayout(scales)
        box.setContentsMargins(0, 4, 0, 0)
        controls = QHBoxLayout()
        self.param = QComboBox(objectName="scaleParam")
        self.param.addItem(FOLLOW, None)
        for p in PARAMETRIZATIONS:
            self.param.addItem(p, p)
        self.param.setToolTip("Parametrization shown: the model's, or another for comparison")
        self.format = QComboBox(objectName="scaleFormat")
        for name in REPORTED_FORMATS:
            self.format.addItem(name, name)
        self.format.setToolTip("Number format whose range is drawn and whose headroom is "
                               "colour-coded")
        self.filter = QLineEdit(objectName="scaleFilter", placeholderText="filter tensors…")
        self.kind = QComboBox(objectName="scaleKind")
        for label, kind in (("all kinds", ""), ("activations", "activation"),
                            ("weights", "weight"), ("activation grads", "grad_activation"),
                            ("weight grads", "grad_weight")):
            self.kind.addItem(label, kind)
        self.measure_button = QPushButton("Measure", objectName="measureButton")
        self.measure_button.setToolTip("Run one forward+backward pass in the worker and "
                                       "overlay the measured RMS (Ctrl+M)")
        self.measure_button.setShortcut("Ctrl+M")
        self.auto = QCheckBox("auto-measure small configs", objectName="autoMeasure")
        self.auto.setToolTip(f"Measure on every change while the model has at most "
                             f"{AUTO_MEASURE_MAX_PARAMS:,} parameters")
        for w in (QLabel("parametrization"), self.param, QLabel("format"), self.format,
                  self.filter, self.kind, self.measure_button, self.auto):
            controls.addWidget(w)
        controls.addWidget(export_button(self, "scalingExport", self.export_items))
        box.addLayout(controls)
        self.summary = QLabel(objectName="scaleSummary")
        self.summary.setWordWrap(True)
        box.addWidget(self.summary)

        split = QSplitter(Qt.Orientation.Horizontal, objectName="scaleSplitter")
        self.splitter = split
        self.chart = ScaleChart()
        self.chart.setObjectName("scaleChart")
        self.model = ScaleTableModel(self)
        self.proxy = ScaleFilterProxy(self)
        self.proxy.setSourceModel(self.model)
        self.table = QTableView(objectName="scaleTable")
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(-1, Qt.SortOrder.AscendingOrder)  # op-graph order until sorted
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(20)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.setColumnWidth(0, 210)
        split.addWidget(self.chart)
        split.addWidget(self.table)
        split.setSizes([420, 640])
        box.addWidget(split, 1)
        attach_context_menu(self.chart.plot_widget, self, self.export_items)
        attach_context_menu(self.table, self, self.export_items)

        self.param.currentIndexChanged.connect(self.recompute)
        self.format.currentIndexChanged.connect(self._on_format)
        self.filter.textChanged.connect(self._on_filter)
        self.kind.currentIndexChanged.connect(self._on_filter)
        self.measure_button.clicked.connect(self.measure)
        self.auto.toggled.connect(lambda on: on and self._maybe_auto_measure())
        self.chart.picked.connect(self.select_tensor)
        worker.finished_job.connect(self._on_result)
        worker.failed_job.connect(self._on_failure)
        worker.cancelled_job.connect(self._on_cancelled)
        self.chart.set_formats([self.format.currentData()])
        self.update_config(config)

    # -- config and prediction -----------------------------------------------------------------
    def shown_config(self) -> ModelConfig:
        """The model's config with the parametrization chosen here (if any)."""
        chosen = self.param.currentData()
        return self.config if chosen in (None, self.config.parametrization) else \
            self.config.replace(parametrization=chosen)

    def update_config(self, config: ModelConfig) -> None:
        self.config = config
        self.recompute()
        self._maybe_auto_measure()

    def recompute(self) -> None:
        """Predict the shown config (synchronously: milliseconds) and redraw."""
        cfg = self.shown_config()
        self.predicted = predict(cfg, formats=(self.format.currentData(),))
        self._defer_others = len(self.predicted) > DEFER_SUMMARY_ROWS
        if self._measured_for != cfg:
            self.measured = []
        self._redraw()
        self.computed.emit()

    def _redraw(self) -> None:
        fmt = self.format.currentData()
        self.chart.set_rows(self.predicted, self.measured)
        self.model.set_rows(self.predicted, self.measured, fmt)
        self.summary.setText(self.summary_text())

    def summary_text(self) -> str:
        """Per parametrization: how many tensors the chosen format loses (more than half
        underflows or overflows) or puts at risk (see the table's status column); agreement
        with the measurement when there is one.

        The shown parametrization's counts come with its prediction. Another one's are
        filled in from the idle loop when its prediction is not cached and the model is large
        (a 96-layer model takes most of a frame per prediction): "…" until then.
        """
        fmt = self.format.currentData()
        shown = self.shown_config()
        parts = []
        for p in PARAMETRIZATIONS:
            cfg = shown.replace(parametrization=p)
            if p != shown.parametrization and self._defer_others and \
                    not is_predicted(cfg, (fmt,)):
                parts.append(f"<b>{p}</b>: …")
                self._schedule_summary()
                continue
            counts = status_counts(cfg, fmt)
            parts.append(f"<b>{p}</b>: {counts['lost']} lost, {counts['at_risk']} at risk")
        text = f"{fmt}, of {len(self.predicted)} tensors — " + " · ".join(parts)
        if self.measured:
            ok, total = agreement(self.predicted, self.measured)
            text += (f"<br>measured: {ok}/{total} tensors ({100 * ok / max(total, 1):.0f}%) "
                     "within 25% of the prediction")
        return text

    def summary_complete(self) -> bool:
        """True when the summary counts every parametrization (none deferred)."""
        return "…" not in self.summary.text()

    def _schedule_summary(self) -> None:
        if not self._summary_pending:
            self._summary_pending = True
            QTimer.singleShot(0, self._fill_summary)

    def _fill_summary(self) -> None:
        """Predict one deferred parametrization (one frame's work), then show the summary."""
        self._summary_pending = False
        fmt, shown = self.format.currentData(), self.shown_config()
        for p in PARAMETRIZATIONS:
            cfg = shown.replace(parametrization=p)
            if not is_predicted(cfg, (fmt,)):
                predict(cfg, formats=(fmt,))
                break
        self.summary.setText(self.summary_text())

    def _on_format(self) -> None:
        self.chart.set_formats([self.format.currentData()])
        self.recompute()  # rows carry headroom for the shown format only

    def _on_filter(self) -> None:
        self.proxy.set_filter(self.filter.text(), self.kind.currentData())

    def select_tensor(self, name: str) -> None:
        """Select (and scroll to) the first table row of tensor ``name``."""
        for r in range(self.proxy.rowCount()):
            index = self.proxy.index(r, 0)
            if index.data() == name:
                self.table.selectionModel().select(
                    index, QItemSelectionModel.SelectionFlag.ClearAndSelect
                    | QItemSelectionModel.SelectionFlag.Rows)
                self.table.scrollTo(index)
                return

    # -- measurement ---------------------------------------------------------------------------
    def measure(self) -> int:
        """Ask the worker for a measurement of the shown config; returns the request id."""
        from unitscale_core.measure import measure

        cfg = self.shown_config()
        worker = self.worker
        self._measure_id = worker.submit(CHANNEL, lambda: (cfg, measure(
            cfg, check_cancelled=worker.check_cancelled)))
        self.measure_button.setEnabled(False)
        return self._measure_id

    def _maybe_auto_measure(self) -> None:
        if self.auto.isChecked() and \
                count_parameters(self.config)["total"] <= AUTO_MEASURE_MAX_PARAMS:
            self.measure()

    def _on_result(self, channel: str, request_id: int, result) -> None:
        if channel != CHANNEL or request_id != self._measure_id:
            return  # stale: a newer request is pending or done
        cfg, rows = result
        self.measure_button.setEnabled(True)
        self.show_measured(cfg, rows)

    def show_measured(self, cfg: ModelConfig, rows: list[TensorRow]) -> bool:
        """Overlay a measurement of ``cfg``; ignored (False) when ``cfg`` is not shown now."""
        if cfg != self.shown_config():
            return False
        self.measured, self._measured_for = rows, cfg
        self._redraw()
        self.measured_ready.emit()
        return True

    def _on_failure(self, channel: str, request_id: int, message: str) -> None:
        if channel == CHANNEL and request_id == self._measure_id:
            self.measure_button.setEnabled(True)
            self.summary.setText(self.summary_text() + f"<br>⚠ measurement failed: {message}")

    def _on_cancelled(self, channel: str, request_id: int) -> None:
        if channel == CHANNEL and request_id == self._measure_id:
            self.measure_button.setEnabled(True)

    # -- export --------------------------------------------------------------------------------
    def table_data(self) -> TableData:
        """The table as shown (filtered, sorted); CSV values are the exact numbers."""
        return table_from_model(self.proxy)

    def export_csv(self, path: str | Path) -> None:
        """The table as CSV (``.md``: Markdown), written atomically."""
        save_table(self.table_data(), path)

    def export_items(self) -> list[Item]:
        plot = self.chart.plot_widget
        return [Figure("scaleChart", "scale chart", lambda: plot),
                Table("scales", "scale table", self.table_data)]

    # -- state ---------------------------------------------------------------------------------
    def _state_controls(self) -> list[QWidget]:
        seeds = list(self.seed_tab.inputs.values())
        return [self.param, self.format, self.kind, self.filter, self.auto, self.tabs,
                self.splitter, *seeds]

    def state(self) -> dict[str, Any]:
        """The panel's choices (parametrization, format, filters, tab, seed-formula inputs)."""
        return save_controls(self._state_controls())

    def restore_state(self, state: Any) -> list[str]:
        """Apply :meth:`state`'s output; returns what could not be restored and why."""
        return restore_controls(self._state_controls(), state)
