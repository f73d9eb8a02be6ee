"""The scaling panel: predicted (and measured) RMS of every tensor, and format headroom.

Live on every valid config: the prediction is analytic. A small config's recomputes in the GUI
thread; a deep one's (more than ``ASYNC_LAYERS`` layers, several frames' work) in a background
thread while the panel keeps the previous prediction on screen and says it is updating. The
"Measure" action runs one real forward+backward pass in the worker and overlays it; the
auto-measure toggle does that on every change for small configs. A second tab holds the seed
document's own formula.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QEvent, QItemSelectionModel, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QStackedWidget,
    QTabBar,
    QTableView,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from unitscale_core.config import PARAMETRIZATIONS, ModelConfig
from unitscale_core.formatting import percent
from unitscale_core.memory_budget import (
    Budget,
    count_by_kind,
    describe_changed,
    measurement_memory,
)
from unitscale_core.presets import PRESETS, load_preset
from unitscale_core.scaling.collapse import Collapse, noise_rows
from unitscale_core.scaling.predict import (
    is_predicted,
    pass_key,
    predict,
    status_counts,
    stream_collapse,
    unpredicted_features,
)
from unitscale_core.sizing import count_parameters, format_bytes
from unitscale_core.tensors import AGREEMENT_LOG2, REPORTED_FORMATS, TensorRow

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
from ..prediction_thread import PredictionThread
from ..widgets.controls_state import restore_controls, save_controls
from ..widgets.label_holder import LabelHolder
from ..widgets.scale_chart import ScaleChart
from ..widgets.scale_overview import ScaleOverview
from ..widgets.scale_table import ScaleTableModel
from ..widgets.stale_banner import StaleBanner
from ..worker import Worker
from .seed_formula_tab import SeedFormulaTab

if TYPE_CHECKING:
    from unitscale_core.measure import SeedSpread

CHANNEL = "measure"
#: Auto-measure only configs this small (parameters), so typing stays smooth on a CPU.
AUTO_MEASURE_MAX_PARAMS = 20_000_000
#: |log2(predicted/measured)| within which a tensor agrees (25%), as the table colours it
TOLERANCE_LOG2 = AGREEMENT_LOG2
FOLLOW = "follow the model"
#: With more tensors than this (~24 layers), a new prediction draws the chart and the summary
#: line in its own frame and leaves the table (a 96-layer model's reset and repaint take
#: ~5 ms) to the next idle slice; the other parametrizations' summary counts are asked of the
#: background thread once that table has painted.
DEFER_ROWS = 1500
#: A config with more layers than this (encoder and decoder together) whose prediction is not
#: cached is predicted in a background thread, as are the other parametrizations' summary
#: counts: a prediction costs ~0.75 ms per layer on 2 CPU cores (8 layers ~6 ms, which with
#: the redraw still fits a frame; 24 ~18 ms; 96 ~75 ms).
ASYNC_LAYERS = 8
#: After a refilled table, the summary's background predictions start once it has painted, or
#: after this long (a hidden table does not paint).
PAINT_GRACE_MS = 100


_PRESET_CONFIGS: dict[str, ModelConfig] = {}


def preset_of(cfg: ModelConfig) -> str:
    """The label of the preset ``cfg`` is (in any parametrization, dtype, device or seed),
    else ""."""
    if not _PRESET_CONFIGS:
        _PRESET_CONFIGS.update({PRESETS[k]: load_preset(k) for k in PRESETS})
    for label, preset in _PRESET_CONFIGS.items():
        if preset.replace(parametrization=cfg.parametrization, dtype=cfg.dtype,
                          device=cfg.device, seed=cfg.seed) == cfg:
            return label
    return ""


def prediction_layers(cfg: ModelConfig) -> int:
    """Layers a prediction of ``cfg`` walks through (its cost is about proportional)."""
    return cfg.encoder_layers + cfg.decoder_layers


def refusal_text(cfg: ModelConfig) -> str:
    """The summary for a config the predictor cannot predict yet ("" when it can): each
    field it has no rule for, named with the reason; the chart stays empty rather than
    showing a prediction that ignores them."""
    refused = unpredicted_features(cfg)
    if not refused:
        return ""
    return ("⚠ not predicted: " + html.escape("; ".join(refused.values()))
            + "<br>Sizes, the model editor and validation still apply to this config.")


def slow_to_predict(cfg: ModelConfig) -> bool:
    """True when predicting ``cfg`` would not fit in a frame (see ``ASYNC_LAYERS``)."""
    return prediction_layers(cfg) > ASYNC_LAYERS


def _matched(predicted: list[TensorRow], measured: list[TensorRow]
             ) -> Iterator[tuple[TensorRow, float]]:
    """Each predicted row with its finite measured RMS (rows not measured are left out)."""
    meas = {(r.name, r.kind): r.rms for r in measured}
    for r in predicted:
        m = meas.get((r.name, r.kind))
        if m is not None and math.isfinite(m):
            yield r, m


def scattered_disagreements(predicted: list[TensorRow], measured: list[TensorRow],
                            spread: dict[tuple[str, str], SeedSpread]) -> int:
    """How many tensors outside the tolerance (:func:`agreement`) vary between seeds by more
    than it (log2 std of their draws > 0.32): disagreements the luck of the draw can explain,
    where more seeds would tell."""
    out = 0
    for r, m in _matched(predicted, measured):
        s = spread.get((r.name, r.kind))
        if s is None or r.rms <= 0 or m <= 0:
            continue
        if abs(math.log2(r.rms / m)) > TOLERANCE_LOG2 and s.log2_std > TOLERANCE_LOG2:
            out += 1
    return out


def agreement(predicted: list[TensorRow], measured: list[TensorRow]) -> tuple[int, int]:
    """(rows within 25%, rows compared): |log2(pred/meas)| ≤ 0.32; a predicted exact zero
    agrees with a measured value below 1e-6 (the key bias's gradient)."""
    ok = total = 0
    for r, m in _matched(predicted, measured):
        total += 1
        if r.rms == 0:
            ok += m < 1e-6
        elif m > 0 and abs(math.log2(r.rms / m)) <= TOLERANCE_LOG2:
            ok += 1
    return ok, total


@dataclass
class Measured:
    """A measurement for the overlay of ``config`` (the shown config): ``run`` is what was
    measured (``config`` itself, or a smaller batch × sequence of it that fits in memory,
    whose ``left_out`` rows, those whose RMS depends on batch × sequence, are not shown)."""

    config: ModelConfig
    run: ModelConfig
    seeds: int
    rows: list[TensorRow]
    spread: dict
    left_out: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class OverBudget:
    """A measurement of ``config`` refused before it ran: ``budget`` (both numbers, and the
    smaller batch × sequence that fits), and per kind the tensors that would change there."""

    config: ModelConfig
    budget: Budget
    changed: dict[str, int]


def measure_job(worker: Worker, cfg: ModelConfig, run: ModelConfig, seeds: int,
                check_memory: bool = True) -> Measured | OverBudget:
    """The worker's measurement of ``run`` for the overlay of ``cfg``: first its estimated
    peak memory against what is free on its device (``unitscale_core.memory_budget``; over
    it, an :class:`OverBudget` comes back instead, unless ``check_memory`` is off), then the
    passes, each reporting its layers, forward then backward, and stopping within a layer
    when cancelled."""
    from unitscale_core.measure import measure_seeds_with_spread, measurement_budget
    from unitscale_core.memory_budget import changed_rows

    if check_memory:
        budget = measurement_budget(run, seeds)
        if not budget.fits:
            smaller = budget.smaller
            changed = count_by_kind(changed_rows(cfg, smaller)) if smaller is not None else {}
            return OverBudget(cfg, budget, changed)
    rows, spread = measure_seeds_with_spread(run, seeds, check_cancelled=worker.check_cancelled,
                                             report=worker.report)
    left_out = changed_rows(cfg, run) if run != cfg else []
    return Measured(cfg, run, seeds, rows, spread, left_out)


class ScaleTableView(QTableView):
    """The scale table's view: a change of many rows repaints only the cells of it on
    screen. Qt repaints the whole viewport for a ``dataChanged`` of more rows than it shows
    (another format's columns, all 5,779 rows of a 96-layer model: ~4.5 ms, even when those
    columns are scrolled out of view)."""

    def dataChanged(self, top_left, bottom_right, roles=()) -> None:  # noqa: N802 (Qt's)
        model, viewport = self.model(), self.viewport()
        header = self.horizontalHeader()
        if model is None or not top_left.isValid() or not bottom_right.isValid() or \
                header.sectionsMoved() or self.verticalHeader().sectionsMoved():
            super().dataChanged(top_left, bottom_right, roles)
            return
        rows = (self.rowAt(0), self.rowAt(viewport.height() - 1))
        columns = (self.columnAt(0), self.columnAt(viewport.width() - 1))
        last_row, last_column = model.rowCount() - 1, model.columnCount() - 1
        r0 = max(top_left.row(), rows[0] if rows[0] >= 0 else 0)
        r1 = min(bottom_right.row(), rows[1] if rows[1] >= 0 else last_row)
        c0 = max(top_left.column(), columns[0] if columns[0] >= 0 else 0)
        c1 = min(bottom_right.column(), columns[1] if columns[1] >= 0 else last_column)
        if r0 > r1 or c0 > c1:
            return  # nothing of it on screen (the view asks for cells as it shows them)
        super().dataChanged(model.index(r0, c0), model.index(r1, c1), roles)


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
        #: per (name, kind), how a measurement over several seeds varied (else empty)
        self.spread: dict[tuple[str, str], SeedSpread] = {}
        self._measure_id = 0
        self._measured_for: ModelConfig | None = None
        self._measured_seeds = 1  # initialisations the measurement shown is combined over
        self._deferring = False  # a large model: the table and other counts wait for idle
        #: the pending table refill is of the same pass as the table's rows (see _redraw)
        self._same_values = False
        self._table_pending = False  # the table still shows older rows than the chart
        self._idle_pending = False  # an idle slice is scheduled
        self._summary_wanted = False  # the summary waits for background predictions
        self._summary_after_paint = False  # … asked for once the refilled table is painted
        # (config, formats) of the rows shown, and of those wanted now: they differ while a
        # background prediction is on its way
        self._predicted_for: tuple[ModelConfig, tuple[str, ...]] | None = None
        self._wanted: tuple[ModelConfig, tuple[str, ...]] | None = None
        self._summary_body = ""  # the summary of the prediction shown
        self.predictions = PredictionThread(self)
        self.predictions.ready.connect(self._on_predicted, Qt.ConnectionType.QueuedConnection)
        self.predictions.failed.connect(self._on_predict_failed,
                                        Qt.ConnectionType.QueuedConnection)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        self.stale = StaleBanner("scaleStale")  # the model panel's draft is invalid
        layout.addWidget(self.stale)
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
        self.seeds = QSpinBox(objectName="measureSeeds", minimum=1, maximum=16, value=1,
                              suffix=" seed")
        self.seeds.valueChanged.connect(
            lambda n: self.seeds.setSuffix(" seed" if n == 1 else " seeds"))
        self.seeds.setToolTip(
            "Measure over this many initialisations (the config's seed, seed + 1, …) and "
            "overlay each tensor's geometric-mean RMS, exp(mean log rms): the typical draw, "
            "with a line through it from the lowest to the highest. One draw of a deep or "
            "strongly correlated stack scatters ±1–2 log₂")
        self.auto = QCheckBox("auto-measure small configs", objectName="autoMeasure")
        self.auto.setToolTip(f"Measure on every change while the model has at most "
                             f"{AUTO_MEASURE_MAX_PARAMS:,} parameters")
        for w in (QLabel("parametrization"), self.param, QLabel("format"), self.format,
                  self.measure_button, self.seeds, self.auto):
            controls.addWidget(w)
        controls.addStretch(1)
        controls.addWidget(export_button(self, "scalingExport", self.export_items))
        box.addLayout(controls)
        # a second row for what is shown (one row of everything made the panel ~1060 px
        # wide at the least, more than a 1366-px screen leaves beside the model editor)
        self.view_choice = QTabBar(objectName="scaleView")
        self.view_choice.addTab("List")
        self.view_choice.addTab("Overview")
        self.view_choice.setTabToolTip(0, "Every tensor, one row each: chart and table")
        self.view_choice.setTabToolTip(
            1, "Layers × tensor roles, coloured by log₂ RMS, lost and at-risk cells marked: "
               "which layers and roles fall out of the format, at a glance; click a cell to "
               "open its tensor in the list")
        self.view_choice.setDrawBase(False)
        self.view_choice.setExpanding(False)
        view_row = QHBoxLayout()
        view_row.addWidget(self.view_choice)
        for w in (self.filter, self.kind):
            view_row.addWidget(w)
        box.addLayout(view_row)
        self.summary = QLabel(objectName="scaleSummary")
        self.summary.setWordWrap(True)
        self.summary.setToolTip(
            "Per parametrization, in the chosen format: lost = more than half of a Gaussian "
            "of the tensor's RMS underflows or overflows; at risk = overflow > 1e-6, "
            "underflow > 1e-3 or subnormal > 10%.\n⚠ collapse: from that LayerNorm on, what "
            "tells a token from its neighbours beyond its position (a relative √s, s = its "
            "own share of the stream's variance) is below the unit roundoff ε of the "
            "model's dtype, so the query/key gradients, which weigh keys and values centred "
            "on the attention weights, are rounding noise there. The point moves a few "
            "layers with the seed.")
        box.addWidget(LabelHolder(self.summary))  # a new summary repaints the label alone
        self._build_measure_status(box)
        self.busy = QLabel(objectName="predictBusy")
        self.busy.setStyleSheet("color: palette(mid); font-style: italic;")
        busy = LabelHolder(self.busy)  # outside the layout's reach, at a fixed width
        self.busy.setText("predicting…")
        busy.setFixedWidth(self.busy.sizeHint().width() + 4)
        self.busy.setText("")
        controls.insertWidget(controls.count() - 1, busy)

        split = QSplitter(Qt.Orientation.Horizontal, objectName="scaleSplitter")
        self.splitter = split
        self.chart = ScaleChart()
        self.chart.setObjectName("scaleChart")
        self.model = ScaleTableModel(self)  # filters and sorts itself: no proxy to re-sort
        self.proxy = self.model  # the rows as shown (filtered, sorted), e.g. for export
        self.table = ScaleTableView(objectName="scaleTable")
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
        self.table.viewport().installEventFilter(self)
        split.setSizes([560, 500])  # the chart and its legend first
        self.overview = ScaleOverview()
        self.overview.setObjectName("scaleOverview")
        self.overview_group = QComboBox(objectName="overviewGroup")
        self.overview_group.addItem("activations and their gradients", "activations")
        self.overview_group.addItem("weights and their gradients", "weights")
        self.overview_group.setToolTip("Which tensors the overview shows")
        self.overview_group.hide()
        view_row.addWidget(self.overview_group, 1)
        self.views = QStackedWidget(objectName="scaleViews")
        self.views.addWidget(split)
        self.views.addWidget(self.overview)
        box.addWidget(self.views, 1)
        attach_context_menu(self.chart.plot_widget, self, self.export_items)
        attach_context_menu(self.table, self, self.export_items)

        self.param.currentIndexChanged.connect(self.recompute)
        self.format.currentIndexChanged.connect(self._on_format)
        self.filter.textChanged.connect(self._on_filter)
        self.kind.currentIndexChanged.connect(self._on_filter)
        self.measure_button.clicked.connect(lambda: self.measure())  # (not its checked flag)
        self.auto.toggled.connect(lambda on: on and self._maybe_auto_measure())
        self.chart.picked.connect(self.select_tensor)
        self.view_choice.currentChanged.connect(self._on_view)
        self.overview_group.currentIndexChanged.connect(
            lambda: self.overview.set_group(self.overview_group.currentData()))
        self.overview.picked.connect(self.open_tensor)
        worker.finished_job.connect(self._on_result)
        worker.failed_job.connect(self._on_failure)
        worker.cancelled_job.connect(self._on_cancelled)
        worker.progress.connect(self._on_progress)
        worker.dropped_job.connect(self._on_cancelled)  # cancelled before it started
        self.chart.set_formats([self.format.currentData()])
        self.update_config(config)

    # -- config and prediction -----------------------------------------------------------------
    def shown_config(self) -> ModelConfig:
        """The model's config with the parametrization chosen here (if any)."""
        chosen = self.param.currentData()
        return self.config if chosen in (None, self.config.parametrization) else \
            self.config.replace(parametrization=chosen)

    def set_stale(self, reason: str) -> None:
        """Say that the chart and table are the last valid config's while the model panel's
        draft is invalid ("": they are the draft's again)."""
        self.stale.set_reason(reason)

    def update_config(self, config: ModelConfig) -> None:
        self.config = config
        self.budget_box.hide()  # an offer for the previous config
        self.recompute()
        self._maybe_auto_measure()

    def recompute(self) -> None:
        """Predict the shown config and redraw: at once when cached or small, else in the
        background (the previous prediction stays on screen, a label says "predicting";
        :meth:`prediction_current` tells when it has arrived)."""
        cfg = self.shown_config()
        formats = (self.format.currentData(),)
        key = self._wanted = (cfg, formats)
        if unpredicted_features(cfg):  # named in the summary; nothing to compute
            self.predictions.cancel_pending()
            self._apply_prediction(key, [])
            return
        cached = is_predicted(cfg, formats)
        if slow_to_predict(cfg):  # this one (unless cached) and the summary's others
            # this one alone: the other parametrizations' summary counts are asked for once
            # it is drawn and painted (they would compete with that for the GIL)
            self.predictions.request([] if cached else [key])
            if not cached:
                self._show_busy()  # the previous prediction stays until this one arrives
                return
        else:
            self.predictions.cancel_pending()
        self._apply_prediction(key, self._reused_rows(key) or self._predict_now(cfg, formats))

    def _same_pass(self, key: tuple[ModelConfig, tuple[str, ...]]) -> bool:
        """True when ``key``'s rows come from the predictor pass of the rows shown (another
        dtype, seed or device: :data:`~unitscale_core.scaling.predict.UNPREDICTED_FIELDS`),
        so they have the same names, kinds, RMS and formulas (the chart's markers stay)."""
        shown = self._predicted_for
        return bool(self.predicted) and shown is not None and \
            pass_key(shown[0]) == pass_key(key[0])

    def _reused_rows(self, key: tuple[ModelConfig, tuple[str, ...]]) -> list[TensorRow]:
        """The rows shown when ``key`` would get equal rows from ``predict`` (the same pass
        and formats: another dtype changes only where the tokens collapse), else []:
        ~5 ms of copying a 96-layer model's rows saved on the GUI thread."""
        if self._predicted_for is not None and self._predicted_for[1] == key[1] and \
                self._same_pass(key) and not unpredicted_features(key[0]):
            return self.predicted
        return []

    @staticmethod
    def _predict_now(cfg: ModelConfig, formats: tuple[str, ...]) -> list[TensorRow]:
        """``predict`` here, or no rows for a config using a field the predictor has no rule
        for yet (the summary names the fields: :func:`refusal_text`)."""
        if unpredicted_features(cfg):
            return []
        return predict(cfg, formats=formats)

    def prediction_current(self) -> bool:
        """True when the chart shows the prediction of the shown config and format."""
        return self._predicted_for == self._wanted

    def predicted_config(self) -> ModelConfig | None:
        """The config whose prediction the chart shows (None before the first arrives)."""
        return None if self._predicted_for is None else self._predicted_for[0]

    def wait_for_prediction(self) -> None:
        """Bring the shown prediction up to date now (computing it here if it has not
        arrived): for whatever reads the rows (selection, export)."""
        if not self.prediction_current() and self._wanted is not None:
            cfg, formats = self._wanted
            self._apply_prediction(self._wanted, self._predict_now(cfg, formats))

    def _apply_prediction(self, key: tuple[ModelConfig, tuple[str, ...]],
                          rows: list[TensorRow]) -> None:
        same = bool(rows) and self._same_pass(key)
        self.predicted, self._predicted_for = rows, key
        self._deferring = len(rows) > DEFER_ROWS
        if self._measured_for != key[0] and (self.measured or self.spread):
            self.measured = []  # (kept when already empty: the chart sees the same overlay)
            self.spread = {}
        self._redraw(same_values=same)
        self._show_busy()
        self.computed.emit()

    def _on_predicted(self, cfg: ModelConfig, formats: tuple[str, ...],
                      rows: list[TensorRow]) -> None:
        """A background prediction: shown when it is the wanted one, a summary count when it
        is another parametrization of it, else dropped (stale)."""
        wanted = self._wanted
        if wanted is None or formats != wanted[1]:
            return
        if cfg == wanted[0]:
            if not self.prediction_current():
                self._apply_prediction(wanted, rows)
        elif cfg.replace(parametrization=wanted[0].parametrization) == wanted[0] and \
                self.prediction_current():
            self._show_summary()

    def _on_predict_failed(self, cfg: ModelConfig, formats: tuple[str, ...],
                           message: str) -> None:
        if self._wanted is not None and formats == self._wanted[1] and \
                cfg.replace(parametrization=self._wanted[0].parametrization) == \
                self._wanted[0]:
            self.summary.setText(f"⚠ prediction of {cfg.parametrization} failed: {message}"
                                 + (f"<br>{self._summary_body}" if self._summary_body else ""))
            if cfg == self._wanted[0]:
                self.busy.setText("failed")

    def shutdown(self) -> None:
        """Stop the background predictions: a running one stops at its next sub-block; one
        op of an extreme config can take seconds, so this waits at most 1 s (the thread is
        a daemon and ends with the process)."""
        self.predictions.stop(timeout_ms=1000)

    def _shown_collapse(self) -> Collapse | None:
        """Where the shown prediction's tokens collapse below its dtype (None: nowhere)."""
        if not self._predicted_for or unpredicted_features(self._predicted_for[0]):
            return None
        return stream_collapse(self._predicted_for[0])

    def _redraw(self, same_values: bool = False) -> None:
        """Chart, overview, table (now or in the next idle slice) and summary of the rows
        shown; ``same_values``: they come from the pass of the rows shown before (another
        dtype or format), so the chart keeps its markers and the table updates the columns
        that changed."""
        self._same_values = same_values and (self._same_values or not self._table_pending)
        self.chart.set_rows(self.predicted, self.measured, self.spread, same_values)
        self.overview.set_rows(self.predicted, self.format.currentData())  # (drawn if shown)
        self.chart.set_collapse(self._shown_collapse())
        self._table_pending = True
        if self._deferring:
            self._schedule_idle()  # the table follows in the next slice
        else:
            self.fill_table()
        self._show_summary()

    def _show_summary(self) -> None:
        """The summary of the prediction shown (kept while a newer one is on its way)."""
        if self.prediction_current():
            self._summary_body = self.summary_text()
            self.summary.setText(self._summary_body)

    def _show_busy(self) -> None:
        """Say whether a newer prediction is on its way (in a label of fixed size: a new
        text repaints that label alone, and the summary keeps its lines)."""
        if self.prediction_current():
            self.busy.setText("")
            self.busy.setToolTip("")
        else:
            layers = prediction_layers(self._wanted[0])
            self.busy.setText("predicting…")
            self.busy.setToolTip(f"Predicting {layers} layers in the background; the chart "
                                 "shows the previous config until it arrives")

    def fill_table(self) -> None:
        """Bring the table up to the rows the chart shows (nothing to do when it is).

        For a large model a change leaves this to the next idle slice; whatever reads the
        table (selection, export) calls it first.
        """
        if self._table_pending:
            self._table_pending = False
            collapse = self._shown_collapse()
            same, self._same_values = self._same_values, False
            self.model.set_rows(
                self.predicted, self.measured, self.format.currentData(),
                noise_rows(((r.name, r.kind) for r in self.predicted), collapse),
                collapse.describe() if collapse is not None else "", self.spread,
                same_values=same)

    def table_current(self) -> bool:
        """True when the table shows the rows the chart shows."""
        return not self._table_pending

    def summary_text(self) -> str:
        """Per parametrization: how many tensors the chosen format loses (more than half
        underflows or overflows) or puts at risk (see the table's status column); where a
        stack's tokens collapse below the resolution of the model's dtype
        (:mod:`unitscale_core.scaling.collapse`); agreement with the measurement when there
        is one.

        The shown parametrization's counts come with its prediction. Another one's are
        predicted in the background when not cached and the model is deep (several frames'
        work each, see ``ASYNC_LAYERS``): "…" until they arrive.
        """
        fmt = self.format.currentData()
        shown = self.shown_config()
        refused = refusal_text(shown)
        if refused:
            return refused
        parts, warnings = [], []
        for p in PARAMETRIZATIONS:
            cfg = shown.replace(parametrization=p)
            if unpredicted_features(cfg):
                parts.append(f"<b>{p}</b>: not predicted")
                continue
            if (slow_to_predict(cfg) or self._deferring) and not is_predicted(cfg, (fmt,)):
                parts.append(f"<b>{p}</b>: …")
                self._summary_wanted = True
                self._schedule_idle()  # asked for after this frame's paint
                continue
            counts = status_counts(cfg, fmt)
            parts.append(f"<b>{p}</b>: {counts['lost']} lost, {counts['at_risk']} at risk")
            collapse = stream_collapse(cfg)  # from the same cached prediction
            if collapse is not None:
                warnings.append(f"⚠ <b>{p}</b>: {html.escape(collapse.describe())}")
        text = f"{fmt}, of {len(self.predicted)} tensors — " + " · ".join(parts)
        if warnings:
            text += "<br>" + "<br>".join(warnings)
        if self.measured:
            ok, total = agreement(self.predicted, self.measured)
            over = f" (geometric mean of {self._measured_seeds} seeds)" \
                if self._measured_seeds > 1 else ""
            run = self._measured_run
            if run is not None:
                over += (f" at batch × sequence {run.batch_size} × {run.seq_len} to fit in "
                         f"memory, leaving out the {self._left_out} tensors whose RMS "
                         f"depends on it")
            text += (f"<br>measured{over}: {ok}/{total} tensors "
                     f"({percent(ok / max(total, 1))}) within 25% of the prediction")
            if self.spread and ok < total:
                lucky = scattered_disagreements(self.predicted, self.measured, self.spread)
                text += (f"; of the {total - ok} outside, {lucky} scatter more than that "
                         f"between seeds (log₂ std > {TOLERANCE_LOG2})")
            if self.spread:
                # (measure imports torch; with a measurement shown it is loaded already)
                from unitscale_core.measure import one_seed_ceiling
                ceiling = one_seed_ceiling(self.spread.values(), TOLERANCE_LOG2)
                share = percent(ceiling)
                about = "" if share[0] in "<>" else "~"
                text += (f"; at one seed even an exact prediction of the typical draw would "
                         f"be within 25% for {about}{share}")
        return text

    def summary_complete(self) -> bool:
        """True when the summary counts every parametrization of the shown config (none
        deferred, no newer prediction on its way)."""
        return self.prediction_current() and "…" not in self.summary.text()

    def _schedule_idle(self) -> None:
        if not self._idle_pending:
            self._idle_pending = True
            QTimer.singleShot(0, self._idle_slice)

    def _idle_slice(self) -> None:
        """One piece of deferred work: the table when it waits, then the request for the
        summary's missing counts (predicted in the background thread).

        Each piece schedules the next only when it is done, so the paint that a piece asks
        for comes before the next piece (and before a background prediction competes with
        the GUI thread for the GIL).
        """
        self._idle_pending = False
        if self._table_pending:
            self.fill_table()
            if self._summary_wanted:  # after the table's paint (or a frame's grace at most)
                self._summary_wanted = False
                self._summary_after_paint = True
                QTimer.singleShot(PAINT_GRACE_MS, self._summary_due)
        elif self._summary_wanted:
            self._summary_wanted = False
            self._request_summary()

    def _summary_due(self) -> None:
        if self._summary_after_paint:
            self._summary_after_paint = False
            self._request_summary()

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt's name)
        """The table's paint after a refill: now ask for the summary's counts (a background
        prediction during that paint would slow it several times over: the table's
        ``data()`` calls would wait for the GIL)."""
        if event.type() == QEvent.Type.Paint and self._summary_after_paint and \
                obj is self.table.viewport():
            QTimer.singleShot(0, self._summary_due)
        return False

    def _request_summary(self) -> None:
        """Ask the background thread for the summary counts still missing (a no-op for those
        already pending: the request lists the same keys)."""
        fmt, shown = self.format.currentData(), self.shown_config()
        if not self.prediction_current():
            return  # asked for again once the shown prediction has arrived
        keys = [(shown.replace(parametrization=p), (fmt,)) for p in PARAMETRIZATIONS]
        self.predictions.request([k for k in keys if not is_predicted(*k)])

    def _on_format(self) -> None:
        self.chart.set_formats([self.format.currentData()])
        self.recompute()  # rows carry headroom for the shown format only

    def _on_filter(self) -> None:
        self.model.set_filter(self.filter.text(), self.kind.currentData())

    def _on_view(self, index: int) -> None:
        """List (chart and table) or Overview."""
        self.views.setCurrentIndex(index)
        overview = index == 1
        self.filter.setVisible(not overview)
        self.kind.setVisible(not overview)
        self.overview_group.setVisible(overview)

    def show_list(self) -> None:
        self.view_choice.setCurrentIndex(0)

    def show_overview(self) -> None:
        self.view_choice.setCurrentIndex(1)

    def open_tensor(self, name: str, kind: str) -> None:
        """Open a tensor picked in the overview in the list: the chart scrolls to its row and
        marks it, the table selects its row of that kind (clearing a filter that hid it)."""
        self.show_list()
        self.wait_for_prediction()
        self.fill_table()
        if self.model.row_of(name) < 0:  # filtered out: show every tensor again
            self.filter.clear()
            self.kind.setCurrentIndex(0)
        self.chart.show_row(name)
        rows = self.model.rows
        r = next((i for i, row in enumerate(rows) if row.name == name and row.kind == kind),
                 self.model.row_of(name))
        self._select_row(r)

    def _select_row(self, r: int) -> None:
        if r >= 0:
            index = self.model.index(r, 0)
            self.table.selectionModel().select(
                index, QItemSelectionModel.SelectionFlag.ClearAndSelect
                | QItemSelectionModel.SelectionFlag.Rows)
            self.table.scrollTo(index)

    def select_tensor(self, name: str) -> None:
        """Select (and scroll to) the first table row of tensor ``name``."""
        self.wait_for_prediction()
        self.fill_table()
        self._select_row(self.model.row_of(name))

    # -- measurement ---------------------------------------------------------------------------
    def _build_measure_status(self, box: QVBoxLayout) -> None:
        """A row under the summary, shown only while it has something to say: the running
        measurement's progress and Cancel, or, when one would not fit in memory, both
        numbers and the two ways on."""
        self.measure_status = QWidget(objectName="measureStatus")
        row = QHBoxLayout(self.measure_status)
        row.setContentsMargins(0, 0, 0, 0)
        self.measure_progress = QLabel(objectName="measureProgress")
        self.measure_cancel = QPushButton("Cancel", objectName="measureCancel")
        self.measure_cancel.setToolTip("Stop the measurement (within a layer)")
        self.measure_cancel.clicked.connect(lambda: self.worker.cancel(CHANNEL))
        self.budget_box = QWidget(objectName="memoryBudgetBox")
        budget_row = QHBoxLayout(self.budget_box)
        budget_row.setContentsMargins(0, 0, 0, 0)
        self.budget_label = QLabel(objectName="memoryBudget")
        self.budget_label.setWordWrap(True)
        self.measure_smaller = QPushButton(objectName="measureSmaller")
        self.measure_anyway = QPushButton("Measure anyway", objectName="measureAnyway")
        self.measure_anyway.setToolTip("Measure the config as it is, whatever the estimate "
                                       "(the machine may start swapping or run out)")
        budget_row.addWidget(self.budget_label, 1)
        budget_row.addWidget(self.measure_smaller)
        budget_row.addWidget(self.measure_anyway)
        row.addWidget(self.measure_progress, 1)
        row.addWidget(self.measure_cancel)
        row.addWidget(self.budget_box, 1)
        self.measure_smaller.clicked.connect(self._measure_smaller)
        self.measure_anyway.clicked.connect(lambda: self.measure(check_memory=False))
        self._offer: OverBudget | None = None
        self._measured_run: ModelConfig | None = None  # a smaller batch × sequence shown
        self._left_out = 0
        self.budget_box.hide()
        self.measure_status.hide()
        box.addWidget(self.measure_status)

    def _show_status(self, progress: str | None) -> None:
        """Progress text (None: no measurement running) and the row's visibility."""
        running = progress is not None
        self.measure_progress.setText(progress or "")
        self.measure_progress.setVisible(running)
        self.measure_cancel.setVisible(running)
        self.measure_status.setVisible(running or not self.budget_box.isHidden())

    def measure(self, rows_of: ModelConfig | None = None, check_memory: bool = True) -> int:
        """Ask the worker for a measurement of the shown config (over the chosen number of
        seeds); returns the request id. The worker first compares its estimated peak memory
        with what is free, and when it would not fit, the panel says so and offers a
        smaller batch × sequence or to go on anyway (``check_memory=False``); ``rows_of``
        measures that smaller batch × sequence of the shown config instead."""
        cfg = self.shown_config()
        run = cfg if rows_of is None else rows_of
        self._measure_id = self.worker.submit(CHANNEL, measure_job, self.worker, cfg, run,
                                              self.seeds.value(), check_memory)
        self.measure_button.setEnabled(False)
        self.budget_box.hide()
        self._show_status("measuring…")
        return self._measure_id

    def _measure_smaller(self) -> None:
        offer = self._offer
        if offer is not None and offer.budget.smaller is not None and \
                offer.config == self.shown_config():
            self.measure(rows_of=offer.budget.smaller)

    def _maybe_auto_measure(self) -> None:
        if self.auto.isChecked() and \
                count_parameters(self.config)["total"] <= AUTO_MEASURE_MAX_PARAMS:
            self.measure()

    def _on_progress(self, channel: str, request_id: int, fraction: float, text: str) -> None:
        if channel == CHANNEL and request_id == self._measure_id:
            self._show_status(f"measuring… {text} ({percent(fraction)})")

    def _on_result(self, channel: str, request_id: int, result) -> None:
        if channel != CHANNEL or request_id != self._measure_id:
            return  # stale: a newer request is pending or done
        self.measure_button.setEnabled(True)
        if isinstance(result, OverBudget):
            self._show_offer(result)
            return
        self._show_status(None)
        left_out = set(result.left_out)
        rows = [r for r in result.rows if (r.name, r.kind) not in left_out]
        self.show_measured(result.config, rows, result.seeds, result.spread,
                           run=result.run if result.run != result.config else None,
                           left_out=len(left_out))

    def _show_offer(self, result: OverBudget) -> None:
        """Over the memory budget: both numbers, and the two ways on."""
        self._offer = result
        budget, smaller = result.budget, result.budget.smaller
        text = f"⚠ {html.escape(budget.describe())}."
        # A run whose weights and gradients alone exceed what is free cannot finish: the
        # system would swap for minutes, then kill the program and the user's session with
        # it. The GUI does not offer it (the CLI's --ignore-memory-budget still can).
        self.measure_anyway.setEnabled(smaller is not None)
        self.measure_anyway.setToolTip(
            "Measure the config as it is, whatever the estimate (the machine may start "
            "swapping or run out)" if smaller is not None else
            "Not offered: the weights and their gradients alone need more than is free, so "
            "the run could not finish. Measure fewer layers or a narrower width instead")
        if smaller is None:
            text += (" Even batch 1 × sequence 1 would not fit: the weights and their "
                     "gradients alone are too many. Measure fewer layers or a narrower "
                     "width instead (the predictor covers this size).")
        else:
            size = f"{smaller.batch_size} × {smaller.seq_len}"
            need = format_bytes(measurement_memory(smaller, budget.memory.resident > 0,
                                                   budget.seeds).needed)
            text += (f" At batch × sequence {size} (about {need}) the prediction changes "
                     f"for {describe_changed(result.changed)}: their RMS depends on the "
                     f"rows the loss averages and the weight gradients sum over, so those "
                     f"are left out of the comparison.")
            self.measure_smaller.setText(f"Measure at {size}")
            self.measure_smaller.setToolTip(
                f"Measure batch {smaller.batch_size} × sequence {smaller.seq_len} instead "
                f"of {budget.config.batch_size} × {budget.config.seq_len}")
        self.measure_smaller.setVisible(smaller is not None)
        self.budget_label.setText(text)
        self.budget_box.show()
        self._show_status(None)

    def show_measured(self, cfg: ModelConfig, rows: list[TensorRow], seeds: int = 1,
                      spread: dict[tuple[str, str], SeedSpread] | None = None,
                      run: ModelConfig | None = None, left_out: int = 0) -> bool:
        """Overlay a measurement of ``cfg`` (over ``seeds`` initialisations, combined by
        ``measure_seeds``, with each tensor's ``spread`` over them; ``run``: measured at
        this smaller batch × sequence instead, ``left_out`` rows not shown); ignored
        (False) when ``cfg`` is not shown now."""
        if cfg != self.shown_config():
            return False
        self.measured, self._measured_for, self._measured_seeds = rows, cfg, seeds
        self._measured_run, self._left_out = run, left_out
        self.spread = spread if seeds > 1 and spread else {}
        if self.prediction_current():  # else drawn with the prediction when it arrives
            self._redraw()
        self.measured_ready.emit()
        return True

    def _on_failure(self, channel: str, request_id: int, message: str) -> None:
        if channel == CHANNEL and request_id == self._measure_id:
            self.measure_button.setEnabled(True)
            self._show_status(None)
            self._show_summary()
            self.summary.setText(self.summary.text() + f"<br>⚠ measurement failed: {message}")

    def _on_cancelled(self, channel: str, request_id: int) -> None:
        if channel == CHANNEL and request_id == self._measure_id:
            self.measure_button.setEnabled(True)
            self._show_status(None)
            self._show_summary()  # say so: a silent cancel looked like nothing had happened
            self.summary.setText(self.summary.text() + "<br>measurement cancelled")

    # -- export --------------------------------------------------------------------------------
    def table_data(self) -> TableData:
        """The table as shown (filtered, sorted); CSV values are the exact numbers."""
        self.wait_for_prediction()
        self.fill_table()
        return table_from_model(self.proxy)

    def export_csv(self, path: str | Path) -> None:
        """The table as CSV (``.md``: Markdown), written atomically."""
        save_table(self.table_data(), path)

    def chart_title(self) -> str:
        """The exported chart's title line: the model (its preset, when it is one, and its
        dimensions), the parametrization shown, the dtype and the format whose range is
        shaded."""
        cfg = self.shown_config()
        arch = cfg.architecture
        layers = (f"{cfg.encoder_layers}+{cfg.decoder_layers} layers"
                  if arch == "encoder-decoder" else f"{cfg.n_layers} layers")
        dims = (f"{arch}, {layers}, d_model {cfg.d_model}, {cfg.n_heads} heads, "
                f"d_ff {cfg.d_ff}, {cfg.seq_len} tokens × batch {cfg.batch_size}")
        preset = preset_of(cfg)
        what = "predicted and measured" if self.measured else "predicted"
        return (f"{preset + ': ' if preset else ''}{dims} · {cfg.parametrization} · "
                f"{cfg.dtype} · log₂ RMS ({what}), {self.format.currentData()} range shaded")

    def export_items(self) -> list[Item]:
        items: list[Item] = [
            Figure("scaleChart", "scale chart", lambda: self.chart.export_view(
                self.chart_title())),
            Table("scales", "scale table", self.table_data)]
        if self.views.currentWidget() is self.overview:
            self.overview.refresh()
            items.insert(0, Figure("scaleOverview", "scale overview",
                                   lambda: self.overview.view,
                                   data=lambda: self.overview.values))
        return items

    # -- state ---------------------------------------------------------------------------------
    def _state_controls(self) -> list[QWidget]:
        seeds = list(self.seed_tab.inputs.values())
        return [self.param, self.format, self.kind, self.filter, self.seeds, self.auto,
                self.tabs, self.splitter, self.view_choice, self.overview_group, *seeds]

    def state(self) -> dict[str, Any]:
        """The panel's choices (parametrization, format, filters, tab, seed-formula inputs)."""
        return save_controls(self._state_controls())

    def restore_state(self, state: Any) -> list[str]:
        """Apply :meth:`state`'s output; returns what could not be restored and why."""
        return restore_controls(self._state_controls(), state)
