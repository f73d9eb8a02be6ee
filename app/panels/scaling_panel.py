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

from PySide6.QtCore import QEvent, QItemSelectionModel, QSize, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
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
from ..widgets.scale_table import ScaleTableModel
from ..worker import Worker
from .seed_formula_tab import SeedFormulaTab

CHANNEL = "measure"
#: Auto-measure only configs this small (parameters), so typing stays smooth on a CPU.
AUTO_MEASURE_MAX_PARAMS = 20_000_000
FOLLOW = "follow the model"
#: With more tensors than this (~24 layers: a prediction costs ~3 µs per tensor), a change
#: draws the chart and the summary line in its own frame and leaves the rest to later idle
#: slices, one piece per slice: the table first (a 96-layer model's reset and repaint take
#: ~5 ms), then the other parametrizations' summary counts (a prediction each).
DEFER_ROWS = 1500


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


class LabelHolder(QWidget):
    """Holds a word-wrapped label outside any layout, at the height its text needs.

    A label in a layout invalidates it on every new text; the request climbs to the tab
    widget, which then repaints the whole panel (table and chart included), twice, on every
    config change. Here the label's request stops at this widget, which changes its own
    (fixed) height, and so asks its layout, only when the text needs more or fewer lines.
    """

    def __init__(self, label: QLabel, parent: QWidget | None = None):
        super().__init__(parent)
        self.label = label
        label.setParent(self)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
        self._fit()

    def _fit(self) -> None:
        wraps = self.label.wordWrap() and self.width() > 0  # (not laid out yet: one line)
        height = self.label.heightForWidth(self.width()) if wraps else -1
        if height < 0:
            height = self.label.sizeHint().height()
        if height != self.minimumHeight() or height != self.maximumHeight():
            self.setFixedHeight(height)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(self.label.sizeHint().width(), self.minimumHeight())

    def minimumSizeHint(self) -> QSize:  # noqa: N802
        return QSize(0, self.minimumHeight())

    def event(self, event: QEvent) -> bool:
        if event.type() == QEvent.Type.LayoutRequest:  # the label's text or font changed
            self._fit()
        return super().event(event)

    def resizeEvent(self, event) -> None:  # noqa: N802
        self.label.setGeometry(self.rect())
        self._fit()


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
        self._deferring = False  # a large model: the table and other counts wait for idle
        self._table_pending = False  # the table still shows older rows than the chart
        self._idle_pending = False  # an idle slice is scheduled

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
        box.addWidget(LabelHolder(self.summary))  # a new summary repaints the label alone

        split = QSplitter(Qt.Orientation.Horizontal, objectName="scaleSplitter")
        self.splitter = split
        self.chart = ScaleChart()
        self.chart.setObjectName("scaleChart")
        self.model = ScaleTableModel(self)  # filters and sorts itself: no proxy to re-sort
        self.proxy = self.model  # the rows as shown (filtered, sorted), e.g. for export
        self.table = QTableView(objectName="scaleTable")
        self.table.setModel(self.model)
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
        self._deferring = len(self.predicted) > DEFER_ROWS
        if self._measured_for != cfg:
            self.measured = []
        self._redraw()
        self.computed.emit()

    def _redraw(self) -> None:
        self.chart.set_rows(self.predicted, self.measured)
        self._table_pending = True
        if self._deferring:
            self._schedule_idle()  # the table follows in the next slice
        else:
            self.fill_table()
        self.summary.setText(self.summary_text())

    def fill_table(self) -> None:
        """Bring the table up to the rows the chart shows (nothing to do when it is).

        For a large model a change leaves this to the next idle slice; whatever reads the
        table (selection, export) calls it first.
        """
        if self._table_pending:
            self._table_pending = False
            self.model.set_rows(self.predicted, self.measured, self.format.currentData())

    def table_current(self) -> bool:
        """True when the table shows the rows the chart shows."""
        return not self._table_pending

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
            if p != shown.parametrization and self._deferring and \
                    not is_predicted(cfg, (fmt,)):
                parts.append(f"<b>{p}</b>: …")
                self._schedule_idle()
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

    def _schedule_idle(self) -> None:
        if not self._idle_pending:
            self._idle_pending = True
            QTimer.singleShot(0, self._idle_slice)

    def _idle_slice(self) -> None:
        """One piece of deferred work: the table when it waits, else one summary count.

        Each piece schedules the next only when it is done, so the paint that a piece asks
        for comes before the next piece.
        """
        self._idle_pending = False
        if self._table_pending:
            self.fill_table()
            if not self.summary_complete():
                self._schedule_idle()
        else:
            self._fill_summary()

    def _fill_summary(self) -> None:
        """Predict one deferred parametrization (one frame's work), then show the summary."""
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
        self.model.set_filter(self.filter.text(), self.kind.currentData())

    def select_tensor(self, name: str) -> None:
        """Select (and scroll to) the first table row of tensor ``name``."""
        self.fill_table()
        r = self.model.row_of(name)
        if r >= 0:
            index = self.model.index(r, 0)
            self.table.selectionModel().select(
                index, QItemSelectionModel.SelectionFlag.ClearAndSelect
                | QItemSelectionModel.SelectionFlag.Rows)
            self.table.scrollTo(index)

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
        self.fill_table()
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
