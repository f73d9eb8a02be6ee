"""The scaling panel: predicted (and measured) RMS of every tensor, and format headroom.

Live on every valid config: the prediction is analytic and recomputes in the GUI thread. The
"Measure" action runs one real forward+backward pass in the worker and overlays it; the
auto-measure toggle does that on every change for small configs. A second tab holds the seed
document's own formula.
"""

from __future__ import annotations

import math
from pathlib import Path

from PySide6.QtCore import QItemSelectionModel, Qt, Signal
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
from unitscale_core.scaling.predict import predict
from unitscale_core.sizing import count_parameters
from unitscale_core.tensors import REPORTED_FORMATS, TensorRow

from ..widgets.scale_chart import ScaleChart
from ..widgets.scale_table import COLUMNS, ScaleFilterProxy, ScaleTableModel, row_status
from ..worker import Worker
from .seed_formula_tab import SeedFormulaTab

CHANNEL = "measure"
#: Auto-measure only configs this small (parameters), so typing stays smooth on a CPU.
AUTO_MEASURE_MAX_PARAMS = 20_000_000
FOLLOW = "follow the model"


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
        box.addLayout(controls)
        self.summary = QLabel(objectName="scaleSummary")
        self.summary.setWordWrap(True)
        box.addWidget(self.summary)

        split = QSplitter(Qt.Orientation.Horizontal)
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
        with the measurement when there is one."""
        fmt = self.format.currentData()
        parts = []
        for p in PARAMETRIZATIONS:
            rows = self.predicted if p == self.shown_config().parametrization else predict(
                self.shown_config().replace(parametrization=p), formats=(fmt,))
            statuses = [row_status(r, fmt) for r in rows]
            lost = statuses.count("lost")
            risk = statuses.count("at_risk")
            parts.append(f"<b>{p}</b>: {lost} lost, {risk} at risk")
        text = f"{fmt}, of {len(self.predicted)} tensors — " + " · ".join(parts)
        if self.measured:
            ok, total = agreement(self.predicted, self.measured)
            text += (f"<br>measured: {ok}/{total} tensors ({100 * ok / max(total, 1):.0f}%) "
                     "within 25% of the prediction")
        return text

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
        if cfg != self.shown_config():
            return
        self.measured, self._measured_for = rows, cfg
        self._redraw()
        self.measured_ready.emit()

    def _on_failure(self, channel: str, request_id: int, message: str) -> None:
        if channel == CHANNEL and request_id == self._measure_id:
            self.measure_button.setEnabled(True)
            self.summary.setText(self.summary_text() + f"<br>⚠ measurement failed: {message}")

    def _on_cancelled(self, channel: str, request_id: int) -> None:
        if channel == CHANNEL and request_id == self._measure_id:
            self.measure_button.setEnabled(True)

    # -- export --------------------------------------------------------------------------------
    def table_rows(self) -> list[list[str]]:
        """The table as shown (filtered, sorted), header first."""
        out = [list(COLUMNS)]
        for r in range(self.proxy.rowCount()):
            out.append([str(self.proxy.index(r, c).data() or "") for c in range(len(COLUMNS))])
        return out

    def export_csv(self, path: str | Path) -> None:
        import csv

        from unitscale_core.atomic import atomic_open

        with atomic_open(path, "w") as handle:
            csv.writer(handle).writerows(self.table_rows())
