"""The training panel: up to three low-precision training runs side by side, live.

Each run (A, B, C) has its own parametrization, number format and loss-scaling switch; the
task, steps, learning rate and logging interval are shared, and the model is the app's current
config at Start. Training runs in the worker in *chunks* (:mod:`.training_jobs`): a job on
channel ``training.<slot>`` trains for about 0.3 s and returns the new ``StepRecord``\\ s; when
the result arrives the panel submits the next chunk unless the run is paused or stopped. The
worker is therefore free between chunks and the other panels' jobs interleave. Results whose
request id is not the slot's newest are dropped.

Views: loss per step for every run; for the run shown, a tensor × step heatmap of log₂ RMS
(0 = unit scale), the fraction of values lost to underflow per tensor kind, and the attention
model view (layers × heads) on the task's probe sequence, refreshed every N steps. Runs keep
going while the panel is hidden. Export: CSV of every record, PNG of the loss plot or the view.
"""

from __future__ import annotations

import csv
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMenu,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QSplitter,
    QStackedWidget,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from unitscale_core.atomic import atomic_open
from unitscale_core.config import PARAMETRIZATIONS, ModelConfig

from ..export import ask_save_path, note_exported
from ..widgets.training_plots import RUN_COLOURS, RUN_STYLES, LossPlot, export_scene_png
from ..widgets.training_views import (
    KINDS,
    UNDERFLOW_FORMATS,
    AttentionView,
    ScalesView,
    UnderflowView,
)
from ..worker import Worker
from .training_jobs import AttentionSnapshot, Chunk, RunInfo, create_run, run_attention, run_chunk

# Mirrors of unitscale_core.training's constants (importing it would import torch on the GUI
# thread at start-up); tests/ui/test_training_panel.py checks that they agree.
TASKS = ("lm", "copy", "reverse", "sort")
TRAIN_DTYPES = ("fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2")

SLOTS = 3
SLOT_NAMES = ("A", "B", "C")
CHANNEL = "training"  # runs use "training.0" … "training.2"
ATTENTION_CHANNEL = "training.attention"
DEFAULT_RUNS = (("standard", "fp8_e4m3"), ("unit", "fp8_e4m3"), ("standard", "fp32"))
REDRAW_MS = 250  # plots redraw at most this often while records stream in
#: Learning rates the lr field takes: Adam's usual range is 1e-5-1e-2; u-μP's optimal ones are
#: up to ~2^4 (Blake et al. 2024); far above that a run only diverges (1e30 gave NaN).
LR_RANGE = (1e-8, 100.0)
LR_SYNTAX = re.compile(r"[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?|[0-9]+\.([eE][-+]?[0-9]+)?")

TASK_HELP = {"lm": "next-token language modelling on the bundled text",
             "copy": "copy a random sequence", "reverse": "reverse a random sequence",
             "sort": "sort a random sequence"}
DTYPE_HELP = {"fp32": "FP32 throughout", "bf16": "bfloat16 weights and activations",
              "fp16": "float16 weights and activations (range 2⁻²⁴ … 65504)",
              "fp8_e4m3": "simulated FP8: matmul inputs E4M3 forward, E5M2 backward",
              "fp8_e5m2": "simulated FP8: matmul inputs E5M2 forward and backward"}
# run states
IDLE, STARTING, RUNNING, PAUSED, DONE, STOPPED, FAILED = (
    "idle", "starting", "running", "paused", "done", "stopped", "failed")
ACTIVE = (STARTING, RUNNING, PAUSED)


def run_label(name: str, parametrization: str, dtype: str, loss_scaling: bool) -> str:
    """The legend text of a run, e.g. ``A: unit · fp8_e4m3``."""
    text = f"{name}: {parametrization} · {dtype}"
    return text + " · loss scaling" if loss_scaling else text


@dataclass
class Slot:
    """One run's controls and state (GUI thread only)."""

    index: int
    enabled: QCheckBox
    param: QComboBox
    dtype: QComboBox
    scaling: QCheckBox
    progress: QProgressBar
    status: QLabel
    state: str = IDLE
    request: int | None = None  # the chunk/creation request in flight
    info: RunInfo | None = None
    records: list = field(default_factory=list)
    active_seconds: float = 0.0  # wall time spent running (pauses excluded), for the ETA
    running_since: float | None = None
    message: str = ""

    @property
    def name(self) -> str:
        return SLOT_NAMES[self.index]

    @property
    def channel(self) -> str:
        return f"{CHANNEL}.{self.index}"

    @property
    def label(self) -> str:
        if self.info is None:
            return run_label(self.name, self.param.currentData(), self.dtype.currentData(),
                             self.scaling.isChecked())
        return run_label(self.name, self.info.parametrization, self.info.dtype,
                         self.info.loss_scaling)


class TrainingPanel(QWidget):
    """Controls and runs on top; the loss plot on the left and the shown run's views on the
    right.

    Public: ``start()``, ``pause()``, ``resume()``, ``stop()``, ``shutdown()``,
    ``update_config``, ``slots`` (per-run state and ``records``), ``export_csv/
    export_loss_png/export_view_png``. ``progressed(slot)`` is emitted after a chunk's
    records are taken in, ``finished(slot)`` when a run ends, ``failed(message)`` on errors,
    ``attention_ready()`` after an attention snapshot is drawn.
    """

    progressed = Signal(int)
    finished = Signal(int)
    failed = Signal(str)
    attention_ready = Signal()

    def __init__(self, config: ModelConfig, worker: Worker, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("trainingPanel")
        self.config = config
        self.worker = worker
        self.run_config: ModelConfig | None = None  # the config the current runs were started on
        self.attention: AttentionSnapshot | None = None
        self._attention_request: int | None = None
        self._attention_slot: int | None = None
        self._attention_step = 0
        self._closing = False
        self._dirty = False

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.setSpacing(4)
        top = QHBoxLayout()
        top.addLayout(self._build_runs(), 3)
        top.addLayout(self._build_shared(), 2)
        layout.addLayout(top)
        layout.addLayout(self._build_buttons())
        self.status = QLabel(objectName="trainStatus")
        self.status.setWordWrap(True)
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.status)
        layout.addWidget(self._build_views(), 1)

        self._redraw_timer = QTimer(self, singleShot=True, interval=REDRAW_MS)
        self._redraw_timer.timeout.connect(self._redraw)
        self._eta_timer = QTimer(self, interval=1000)
        self._eta_timer.timeout.connect(self._update_progress)
        worker.finished_job.connect(self._on_result)
        worker.failed_job.connect(self._on_failure)
        worker.cancelled_job.connect(self._on_cancelled)
        # dequeued before it ran (Cancel / Esc, cancel() of all channels included): no polling
        worker.dropped_job.connect(self._on_cancelled)
        self.update_config(config)
        self._update_buttons()
        self._set_status("Press Start (Ctrl+Return) to train the enabled runs on the current "
                         "model config.")

    # -- construction --------------------------------------------------------------------------
    def _build_runs(self) -> QGridLayout:
        grid = QGridLayout()
        grid.setHorizontalSpacing(6)
        grid.setVerticalSpacing(2)
        for col, (text, tip) in enumerate((
                ("run", "Train this run when Start is pressed"),
                ("parametrization", "standard: PyTorch defaults; unit: Unit Scaling (Blake et "
                 "al. 2023); umup: u-μP (Blake et al. 2024), with its per-parameter learning "
                 "rates"),
                ("format", "Number format of the run (FP8 is simulated on matmul inputs)"),
                ("loss scale", "Dynamic loss scaling as torch's GradScaler does it: the "
                 "loss is multiplied by a scale S before backward (S halves when gradients "
                 "overflow and the update is skipped, doubles after 2000 good steps)"),
                ("progress", "Steps done of the run's total, and the estimated time left"),
                ("loss", "Loss of the run's last step (nats per token)"))):
            label = QLabel(f"<b>{text}</b>")
            label.setToolTip(tip)
            grid.addWidget(label, 0, col)
        self.slots: list[Slot] = []
        for i in range(SLOTS):
            param_default, dtype_default = DEFAULT_RUNS[i]
            enabled = QCheckBox(SLOT_NAMES[i], objectName=f"trainEnabled{i}", checked=True)
            enabled.setToolTip(f"Train run {SLOT_NAMES[i]} when Start is pressed")
            enabled.setStyleSheet(f"QCheckBox {{ color: {RUN_COLOURS[i]}; font-weight: bold }}")
            param = QComboBox(objectName=f"trainParam{i}")
            for p in PARAMETRIZATIONS:
                param.addItem(p, p)
            param.setCurrentIndex(param.findData(param_default))
            param.setToolTip(grid.itemAtPosition(0, 1).widget().toolTip())
            dtype = QComboBox(objectName=f"trainDtype{i}")
            for d in TRAIN_DTYPES:
                dtype.addItem(d, d)
                dtype.setItemData(dtype.count() - 1, DTYPE_HELP[d], Qt.ItemDataRole.ToolTipRole)
            dtype.setCurrentIndex(dtype.findData(dtype_default))
            dtype.setToolTip("Number format: " + "; ".join(f"{k}: {v}"
                                                          for k, v in DTYPE_HELP.items()))
            scaling = QCheckBox(objectName=f"trainScaling{i}")
            scaling.setToolTip(grid.itemAtPosition(0, 3).widget().toolTip())
            progress = QProgressBar(objectName=f"trainProgress{i}")
            progress.setRange(0, 1)
            progress.setValue(0)
            progress.setFormat("not started")
            progress.setMinimumWidth(
                progress.fontMetrics().horizontalAdvance(WIDEST_PROGRESS) + 16)
            status = QLabel(objectName=f"trainRunStatus{i}")
            status.setMinimumWidth(status.fontMetrics().horizontalAdvance("⚠ failed"))
            slot = Slot(i, enabled, param, dtype, scaling, progress, status)
            self.slots.append(slot)
            for col, w in enumerate((enabled, param, dtype, scaling, progress, status)):
                grid.addWidget(w, i + 1, col, alignment=Qt.AlignmentFlag.AlignCenter
                               if w is scaling else Qt.AlignmentFlag(0))
            for w in (enabled, scaling):
                w.toggled.connect(self._on_run_edited)
            for w in (param, dtype):
                w.currentIndexChanged.connect(self._on_run_edited)
        grid.setColumnStretch(4, 1)
        return grid

    def _build_shared(self) -> QGridLayout:
        grid = QGridLayout()
        grid.setHorizontalSpacing(6)
        grid.setVerticalSpacing(2)
        self.task = QComboBox(objectName="trainTask")
        for t in TASKS:
            self.task.addItem(t, t)
            self.task.setItemData(self.task.count() - 1, TASK_HELP[t],
                                  Qt.ItemDataRole.ToolTipRole)
        self.task.setToolTip("Task: " + "; ".join(f"{k}: {v}" for k, v in TASK_HELP.items()))
        self.steps = self._spin("trainSteps", 1, 1_000_000, 80, "Optimizer steps per run")
        self.lr = QLineEdit(objectName="trainLr", placeholderText="default")
        self.lr.setToolTip("Adam learning rate; blank: the parametrization's default. With "
                           "umup it is the base rate that u-μP's per-parameter rules scale.")
        self.log_every = self._spin("trainLogEvery", 1, 100_000, 1,
                                    "Record per-tensor RMS and underflow every this many "
                                    "steps (the loss is recorded every step)")
        self.attn_every = self._spin("trainAttnEvery", 0, 100_000, 10,
                                     "Refresh the attention view of the shown run every this "
                                     "many steps (0: only at the end)")
        rows = (("task", self.task, "steps", self.steps),
                ("lr", self.lr, "log every", self.log_every),
                (None, None, "attention every", self.attn_every))
        for r, (l1, w1, l2, w2) in enumerate(rows):
            for c, (text, widget) in enumerate(((l1, w1), (l2, w2))):
                if widget is None:
                    continue
                label = QLabel(text)
                label.setToolTip(widget.toolTip())
                grid.addWidget(label, r, 2 * c, Qt.AlignmentFlag.AlignRight)
                grid.addWidget(widget, r, 2 * c + 1)
        self.config_note = QLabel(objectName="trainConfigNote")
        self.config_note.setWordWrap(True)
        self.config_note.setToolTip("Runs use the model config current when Start was pressed; "
                                    "editing the model does not disturb running runs.")
        grid.addWidget(self.config_note, 3, 0, 1, 4)
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(3, 1)
        grid.setRowStretch(4, 1)
        return grid

    def _spin(self, name: str, lo: int, hi: int, value: int, tip: str) -> QSpinBox:
        spin = QSpinBox(objectName=name)
        spin.setRange(lo, hi)
        spin.setValue(value)
        spin.setToolTip(tip)
        spin.setGroupSeparatorShown(True)
        return spin

    def _build_buttons(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.start_button = QPushButton("Start", objectName="trainStart")
        self.start_button.setShortcut(QKeySequence("Ctrl+Return"))
        self.start_button.setToolTip("Start the enabled runs from scratch (Ctrl+Return)")
        self.start_button.clicked.connect(self.start)
        self.pause_button = QPushButton("Pause", objectName="trainPause")
        self.pause_button.setShortcut(QKeySequence("Ctrl+Space"))
        self.pause_button.setToolTip("Pause or resume the runs after the current chunk "
                                     "(Ctrl+Space)")
        self.pause_button.clicked.connect(self._toggle_pause)
        self.stop_button = QPushButton("Stop", objectName="trainStop")
        self.stop_button.setShortcut(QKeySequence("Ctrl+."))
        self.stop_button.setToolTip("End the runs; their curves stay until the next Start "
                                    "(Ctrl+.)")
        self.stop_button.clicked.connect(self.stop)
        for b in (self.start_button, self.pause_button, self.stop_button):
            row.addWidget(b)
        row.addSpacing(12)
        shown = QLabel("show run")
        self.shown = QComboBox(objectName="trainShown")
        self.shown.setToolTip("The run whose tensor scales, underflow and attention are shown")
        shown.setToolTip(self.shown.toolTip())
        for slot in self.slots:
            self.shown.addItem(slot.label, slot.index)
        self.shown.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.shown.setMinimumContentsLength(14)
        self.shown.currentIndexChanged.connect(self._on_shown)
        row.addWidget(shown)
        row.addWidget(self.shown, 1)
        self.log_loss = QCheckBox("log loss axis", objectName="trainLogLoss")
        self.log_loss.setToolTip("Draw the loss on a logarithmic axis (standard runs can start "
                                 "an order of magnitude above the others)")
        self.log_loss.toggled.connect(lambda on: self.loss_plot.set_log_y(on))
        row.addWidget(self.log_loss)
        self.export_button = QToolButton(objectName="trainExport", text="Export")
        self.export_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.export_button.setToolTip("Export every run's records (CSV) or a plot (PNG)")
        menu = QMenu(self.export_button)
        for text, slot, name, filt in (
                ("Records as CSV…", self.export_csv, "records.csv", "CSV table (*.csv)"),
                ("Loss plot as PNG…", self.export_loss_png, "loss plot.png",
                 "PNG image (*.png)"),
                ("Current view as PNG…", self.export_view_png, "view.png",
                 "PNG image (*.png)")):
            action = menu.addAction(text)
            action.triggered.connect(
                lambda _=False, f=slot, n=name, t=text, p=filt: self._export(f, t, n, p))
        self.export_button.setMenu(menu)
        row.addWidget(self.export_button)
        return row

    def _build_views(self) -> QSplitter:
        self.loss_plot = LossPlot()
        self.loss_plot.setObjectName("trainLossPlot")
        self.views = QTabWidget(objectName="trainViews")
        self.scales_view = ScalesView()
        self.underflow_view = UnderflowView()
        self.attention_view = AttentionView()
        self.views.addTab(self.scales_view, "Scales")
        self.views.addTab(self.underflow_view, "Underflow")
        self.views.addTab(self.attention_view, "Attention")
        corner = QStackedWidget()  # the current view's own controls, beside its tab
        for view in (self.scales_view, self.underflow_view):
            corner.addWidget(view.controls)
        corner.addWidget(QWidget())
        self.views.setCornerWidget(corner, Qt.Corner.TopRightCorner)
        self.views.currentChanged.connect(corner.setCurrentIndex)
        for index, tip in enumerate((
                "log₂ RMS of every tensor of the shown run on each logged step",
                "Share of values lost to underflow, per tensor kind, of the shown run",
                "The shown run's attention maps on the task's probe sequence, refreshed every "
                "N steps")):
            self.views.setTabToolTip(index, tip)
        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(self.loss_plot)
        splitter.addWidget(self.views)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 1)
        self.splitter = splitter
        return splitter

    # -- config --------------------------------------------------------------------------------
    def update_config(self, config: ModelConfig) -> None:
        """The app's config changed: used by the next Start; running runs are not touched."""
        self.config = config
        self._update_config_note()

    def _update_config_note(self) -> None:
        c = self.config
        text = (f"model: {c.architecture} · {c.n_layers} layers · d_model {c.d_model} · "
                f"{c.n_heads} heads · batch {c.batch_size}×{c.seq_len}")
        changed = self.run_config is not None and self.run_config != self.config \
            and self.is_active()
        if changed:
            text += " · changed: applies at the next Start"
        _set_label(self.config_note, text, None, "color: #b35900" if changed else "")

    # -- run control ---------------------------------------------------------------------------
    def _settings(self, slot: Slot) -> dict:
        """TrainSettings keyword arguments for ``slot`` (raises ValueError for the lr field)."""
        lr_text = self.lr.text().strip()
        lr = None
        if lr_text:
            shown = lr_text if len(lr_text) <= 40 else lr_text[:39] + "…"
            # ASCII number syntax only: float() also takes "٣" (3.0) and "1_0" (10)
            if not LR_SYNTAX.fullmatch(lr_text):
                raise ValueError(f"lr={shown!r} is not a number")
            lr = float(lr_text)
            if not (math.isfinite(lr) and LR_RANGE[0] <= lr <= LR_RANGE[1]):
                raise ValueError(f"lr={shown} must be between {LR_RANGE[0]:g} and "
                                 f"{LR_RANGE[1]:g} (a larger one diverges to NaN at once)")
        return dict(parametrization=slot.param.currentData(), dtype=slot.dtype.currentData(),
                    task=self.task.currentData(), steps=self.steps.value(), lr=lr,
                    loss_scaling=slot.scaling.isChecked(), log_every=self.log_every.value())

    def start(self) -> None:
        """Start every enabled run from scratch on the current config (ends running ones)."""
        if self._closing:
            return
        enabled = [s for s in self.slots if s.enabled.isChecked()]
        if not enabled:
            self._set_status("⚠ enable at least one run", error=True)
            return
        try:
            settings = {s.index: self._settings(s) for s in enabled}
        except ValueError as exc:
            self.lr.setStyleSheet("QLineEdit { border: 1px solid #d62728 }")
            self._fail(str(exc))
            return
        self.lr.setStyleSheet("")
        self.stop(quiet=True)
        self.run_config = self.config
        self.attention = None
        self._attention_step = 0
        self.loss_plot.clear_curves()
        for slot in self.slots:
            slot.records = []
            slot.info = None
            slot.active_seconds = 0.0
            slot.running_since = None
            slot.message = ""
            if slot.index in settings:
                slot.state = STARTING
                config = self.config
                kwargs = settings[slot.index]
                slot.request = self.worker.submit(
                    slot.channel, create_run, config, kwargs, self.worker.check_cancelled)
            else:
                slot.state = IDLE
                slot.request = None
        self._eta_timer.start()
        self._update_progress()
        self._update_buttons()
        self._clear_views()
        self._set_status(f"starting {len(enabled)} run(s): building models…")

    def pause(self) -> None:
        """Running runs stop after their current chunk (their models are kept)."""
        now = time.perf_counter()
        for slot in self.slots:
            if slot.state in (RUNNING, STARTING):
                slot.state = PAUSED
                self._stop_clock(slot, now)
        self._update_buttons()
        self._update_progress()
        self._set_status("paused — Resume continues where the runs stopped")

    def resume(self) -> None:
        """Paused runs continue (a paused run whose model was not built yet is built)."""
        if self._closing:
            return
        for slot in self.slots:
            if slot.state != PAUSED:
                continue
            slot.state = RUNNING if slot.info is not None else STARTING
            if slot.request is None:
                if slot.info is None:  # its creation was cancelled
                    slot.state = STOPPED
                    continue
                self._submit_chunk(slot)
            slot.running_since = time.perf_counter()
        self._update_buttons()
        self._update_progress()
        self._set_status("running")

    def stop(self, quiet: bool = False) -> None:
        """End every active run; records and curves stay until the next Start."""
        now = time.perf_counter()
        for slot in self.slots:
            if slot.state in ACTIVE:
                if slot.request is not None:
                    self.worker.cancel(slot.channel)
                slot.request = None
                slot.state = STOPPED
                self._stop_clock(slot, now)
        self.worker.cancel(ATTENTION_CHANNEL)
        self._attention_request = None
        self._eta_timer.stop()
        self._update_buttons()
        self._update_progress()
        if not quiet:
            self._set_status("stopped")

    def shutdown(self) -> None:
        """Stop everything and submit nothing more (the window is closing)."""
        self.stop(quiet=True)
        self._closing = True

    def _toggle_pause(self) -> None:
        if any(s.state == PAUSED for s in self.slots):
            self.resume()
        else:
            self.pause()

    def is_active(self) -> bool:
        return any(s.state in ACTIVE for s in self.slots)

    def _submit_chunk(self, slot: Slot) -> None:
        handle, known = slot.info.handle, len(slot.records)
        check = self.worker.check_cancelled
        slot.request = self.worker.submit(slot.channel, run_chunk, handle, known, check)

    @staticmethod
    def _stop_clock(slot: Slot, now: float) -> None:
        if slot.running_since is not None:
            slot.active_seconds += now - slot.running_since
            slot.running_since = None

    # -- worker results ------------------------------------------------------------------------
    def _slot_of(self, channel: str, request_id: int) -> Slot | None:
        """The slot whose in-flight request this is (None: another panel's, or stale)."""
        if not channel.startswith(CHANNEL + ".") or channel == ATTENTION_CHANNEL:
            return None
        for slot in self.slots:
            if slot.channel == channel and slot.request == request_id \
                    and self.worker.is_latest(channel, request_id):
                return slot
        return None

    def _on_result(self, channel: str, request_id: int, result) -> None:
        if channel == ATTENTION_CHANNEL:
            self._on_attention(request_id, result)
            return
        slot = self._slot_of(channel, request_id)
        if slot is None:
            return
        slot.request = None
        if isinstance(result, RunInfo):
            slot.info = result
            if slot.state == STARTING:
                slot.state = RUNNING
                slot.running_since = time.perf_counter()
                self._submit_chunk(slot)
            self._refresh_shown_labels()
            self._update_progress()
            self._set_status(f"run {slot.name}: model built in {result.seconds:.2f} s "
                             f"(lr {result.lr:g})")
            return
        if not isinstance(result, Chunk):
            return
        slot.records.extend(result.records)
        bad = next((r for r in result.records if not math.isfinite(r.loss)), None)
        if result.diverged is not None or bad is not None:
            self._stop_clock(slot, time.perf_counter())
            slot.state = FAILED
            # the trainer says why (step, learning rate, what to change); a record alone
            # only says where
            slot.message = result.diverged or (
                f"loss not finite at step {bad.step} "
                f"({'overflow' if math.isinf(bad.loss) else 'NaN'} in {slot.info.dtype}); "
                "run stopped")
            self._fail(f"run {slot.name}: {slot.message}")  # panel and status bar
            self.finished.emit(slot.index)
        elif result.done:
            self._stop_clock(slot, time.perf_counter())
            slot.state = DONE
            self.finished.emit(slot.index)
        elif slot.state == RUNNING and not self._closing:
            self._submit_chunk(slot)
        ended = slot.state in (DONE, FAILED)
        self._maybe_request_attention(slot, done=ended)
        if ended:  # the final state is drawn at once, not up to REDRAW_MS later
            self._redraw_timer.stop()
            self._redraw()
        else:
            self._schedule_redraw()
        self._update_progress()
        self._update_buttons()
        if not self.is_active():
            self._eta_timer.stop()
            if all(s.state in (DONE, IDLE) for s in self.slots):
                self._set_status(self._summary())
        self.progressed.emit(slot.index)

    def _on_failure(self, channel: str, request_id: int, message: str) -> None:
        if channel == ATTENTION_CHANNEL:
            if request_id == self._attention_request:
                self._attention_request = None
                self.attention_view.status.setText(f"⚠ attention: {message}")
                self.attention_view.status.show()
            return
        slot = self._slot_of(channel, request_id)
        if slot is None:
            return
        slot.request = None
        self._stop_clock(slot, time.perf_counter())
        slot.state = FAILED
        slot.message = message
        self._fail(f"run {slot.name}: {message}")
        self._update_progress()
        self._update_buttons()
        self.finished.emit(slot.index)

    def _on_cancelled(self, channel: str, request_id: int) -> None:
        """A request cancelled or dequeued from outside (the window's Cancel / Esc): a run
        pauses without losing its steps; an attention snapshot may be asked for again."""
        if channel == ATTENTION_CHANNEL:
            if request_id == self._attention_request:
                self._attention_request = None
            return
        slot = self._slot_of(channel, request_id)
        if slot is not None:
            self._dropped(slot)

    def _dropped(self, slot: Slot) -> None:
        slot.request = None
        if slot.state in (RUNNING, STARTING):
            self.pause()
            self._set_status("cancelled — press Resume to continue the runs")

    # -- attention -----------------------------------------------------------------------------
    def _shown_slot(self) -> Slot:
        return self.slots[self.shown.currentData() or 0]

    def _maybe_request_attention(self, slot: Slot, done: bool = False) -> None:
        """Ask for a snapshot of the shown run when its step crosses a multiple of "attention
        every" (or it ended, or none is drawn yet), unless one for it is already on its way.

        Re-submitting while one is queued or running would be worse than useless: the
        worker's latest-wins rule cancels a running request of the channel and sends a
        queued one to the back, behind the runs' next chunks, so with three runs the snapshot
        never got its turn ("attention never showed a head"). A request in flight computes
        the run's weights as they are when it runs, so it is never stale for its run."""
        if slot is not self._shown_slot() or slot.info is None or not slot.records:
            return
        if self._attention_request is not None and self._attention_slot == slot.index:
            return
        every = self.attn_every.value()
        step = slot.records[-1].step
        due = done or (every > 0 and step // every > self._attention_step // every)
        if self._attention_slot != slot.index or self.attention is None:
            due = True
        if due:
            self._request_attention(slot)

    def _request_attention(self, slot: Slot) -> None:
        if self._closing or slot.info is None:
            return
        self._attention_slot = slot.index
        self._attention_step = slot.records[-1].step if slot.records else 0
        self._attention_request = self.worker.submit(
            ATTENTION_CHANNEL, run_attention, slot.info.handle, self.worker.check_cancelled)

    def _on_attention(self, request_id: int, snapshot: AttentionSnapshot) -> None:
        if request_id != self._attention_request or \
                not self.worker.is_latest(ATTENTION_CHANNEL, request_id):
            return
        self._attention_request = None
        self.attention = snapshot
        self._draw_attention()
        self.attention_ready.emit()

    def _draw_attention(self) -> None:
        snap = self.attention
        if snap is None:
            return
        layers, heads = snap.thumbs.shape[:2]
        slot = self.slots[self._attention_slot]
        task = f"{slot.info.task} " if slot.info is not None else ""
        self.attention_view.show_snapshot(
            snap, f"run {slot.name} · step {snap.step} · {layers} layers × {heads} heads",
            f"run {slot.label}: self-attention on the {task}probe ({len(snap.tokens)} tokens) "
            f"at step {snap.step}, computed in {snap.seconds:.2f} s · click a head to enlarge")

    # -- drawing -------------------------------------------------------------------------------
    def _schedule_redraw(self) -> None:
        if not self._redraw_timer.isActive():
            self._redraw_timer.start()

    def _redraw(self) -> None:
        """The loss curves and the shown run's views. Hidden (another dock tab in front), the
        panel draws nothing and catches up when shown; the views draw only the tab on top
        (ScalesView/UnderflowView.show_run)."""
        if not self.isVisible():
            self._dirty = True
            return
        self._dirty = False
        for slot in self.slots:
            if not slot.records:
                self.loss_plot.remove_curve(slot.name)
                continue
            steps = [r.step for r in slot.records]
            losses = [r.loss for r in slot.records]
            width, alpha, z, style = RUN_STYLES[slot.index]
            self.loss_plot.set_curve(slot.name, slot.label, steps, losses,
                                     RUN_COLOURS[slot.index], width=width, alpha=alpha, z=z,
                                     style=style)
        self._draw_heatmap()
        self._draw_underflow()

    def showEvent(self, event) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        if self._dirty:
            self._redraw()

    def _clear_views(self) -> None:
        self.scales_view.clear()
        self.underflow_view.clear()
        self.attention_view.clear()

    def _draw_heatmap(self, *_args) -> None:
        slot = self._shown_slot()
        if slot.info is None:
            self.scales_view.clear()
            return
        self.scales_view.show_run(f"run {slot.label} · log₂ RMS per tensor",
                                  slot.info.tensor_names, slot.info.tensor_kinds, slot.records)

    def _draw_underflow(self, *_args) -> None:
        slot = self._shown_slot()
        self.underflow_view.show_run(slot.name, slot.info.dtype if slot.info else None,
                                     slot.records)

    def _on_shown(self, *_args) -> None:
        self._draw_heatmap()
        self._draw_underflow()
        slot = self._shown_slot()
        if slot.info is not None and slot.records:
            self._request_attention(slot)

    def _on_run_edited(self, *_args) -> None:
        if not self.is_active():
            self._refresh_shown_labels()

    def _refresh_shown_labels(self) -> None:
        for slot in self.slots:
            self.shown.setItemText(slot.index, slot.label)

    # -- progress and status -------------------------------------------------------------------
    def _update_progress(self) -> None:
        """Each run's bar (steps done of total, state, ETA) and last loss."""
        now = time.perf_counter()
        for slot in self.slots:
            bar = slot.progress
            total = slot.info.steps if slot.info is not None else self.steps.value()
            done = slot.records[-1].step if slot.records else 0
            if bar.maximum() != max(total, 1):
                bar.setRange(0, max(total, 1))
            if bar.value() != min(done, total):
                bar.setValue(min(done, total))
            state = {STARTING: "building model…", PAUSED: "paused", DONE: "done",
                     STOPPED: "stopped", FAILED: "failed"}.get(slot.state, "")
            if slot.state == RUNNING and done:
                seconds = slot.active_seconds + (now - slot.running_since
                                                 if slot.running_since else 0.0)
                state = f"{_duration(seconds / done * (total - done))} left"
            if slot.state == IDLE:
                text = "not started"
            elif slot.info is None:
                text = state
            else:
                text = f"{done} / {total}" + (f" · {state}" if state else "")
            if bar.format() != text:
                bar.setFormat(text)
            _set_tip(bar, slot.message or f"run {slot.label}: {text}")
            last = slot.records[-1] if slot.records else None
            if slot.message:
                _set_label(slot.status, "⚠ failed", slot.message, "color: #d62728")
            else:
                tip = "Loss of the last step (nats per token)"
                if last is not None and slot.info is not None and slot.info.loss_scaling:
                    tip += f"; loss scale {last.loss_scale:g}"
                _set_label(slot.status, "" if last is None else f"{last.loss:.3f}", tip, "")
        self._update_config_note()

    def _update_buttons(self) -> None:
        active = self.is_active()
        paused = any(s.state == PAUSED for s in self.slots)
        self.pause_button.setEnabled(active)
        self.pause_button.setText("Resume" if paused else "Pause")
        self.stop_button.setEnabled(active)
        self.start_button.setText("Restart" if active else "Start")
        editable = not active
        for slot in self.slots:
            for w in (slot.enabled, slot.param, slot.dtype, slot.scaling):
                w.setEnabled(editable)
        for w in (self.task, self.steps, self.lr, self.log_every):
            w.setEnabled(editable)

    def _set_status(self, text: str, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setToolTip(text)
        self.status.setStyleSheet("color: #d62728" if error else "")

    def _fail(self, message: str) -> None:
        self._set_status(f"⚠ {message}", error=True)
        window = self.window()
        if window is not self and hasattr(window, "statusBar"):
            window.statusBar().showMessage(f"training: {message}", 10_000)
        self.failed.emit(message)

    def _summary(self) -> str:
        parts = [f"{slot.name} {np.mean([r.loss for r in slot.records[-10:]]):.3f}"
                 for slot in self.slots if slot.records and slot.info is not None]
        return ("done · final loss (mean of the last 10 steps): " + " · ".join(parts)
                if parts else "")

    # -- export --------------------------------------------------------------------------------
    def csv_header(self) -> list[str]:
        head = ["run", "parametrization", "dtype", "loss_scaling", "task", "step", "loss",
                "loss_scale", "skipped"]
        head += [f"rms_{k}" for k in KINDS]
        head += [f"underflow_{k}_{f}" for k in KINDS for f in UNDERFLOW_FORMATS]
        return head

    def export_csv(self, path: str | Path) -> None:
        """Every run's records, one row per step: losses every step; kind RMS and underflow
        fractions (0–1) on logged steps, blank otherwise."""
        rows = [s for s in self.slots if s.records and s.info is not None]
        if not rows:
            raise ValueError("nothing to export yet: start a run first")
        with atomic_open(path, "w") as handle:
            out = csv.writer(handle, lineterminator="\n")
            out.writerow(self.csv_header())
            for slot in rows:
                info = slot.info
                for r in slot.records:
                    row = [slot.name, info.parametrization, info.dtype, int(info.loss_scaling),
                           info.task, r.step, repr(float(r.loss)), repr(float(r.loss_scale)),
                           int(bool(r.skipped))]
                    row += ["" if r.kind_rms is None else repr(float(r.kind_rms[k]))
                            for k in KINDS]
                    row += ["" if r.underflow is None else repr(float(r.underflow[k][f]))
                            for k in KINDS for f in UNDERFLOW_FORMATS]
                    out.writerow(row)

    def export_loss_png(self, path: str | Path) -> None:
        """The loss plot (every run, with its legend) as a PNG."""
        self.loss_plot.export_png(path)

    def export_view_png(self, path: str | Path) -> None:
        """The view on top (scales heatmap, underflow plot or attention) as a PNG."""
        index = self.views.currentIndex()
        if index == 0:
            export_scene_png(self.scales_view.heatmap.view.ci, path)
        elif index == 1:
            self.underflow_view.plot.export_png(path)
        else:
            export_scene_png(self.attention_view.model_view.ci, path)

    def _export(self, export, title: str, name: str, filt: str) -> None:
        """Ask where (the last export folder, a name saying training, what and which
        config: ``llama-3-8b-training-loss-plot.png``), then write."""
        what, suffix = name.rsplit(".", 1)
        path = ask_save_path(self, title, what, "." + suffix, filt)
        if path is None:
            return
        try:
            export(path)
        except (OSError, ValueError) as exc:
            self._fail(f"export failed: {exc}")
        else:
            note_exported(path)
            self._set_status(f"wrote {path}")


def _set_tip(widget: QWidget, tip: str) -> None:
    if widget.toolTip() != tip:
        widget.setToolTip(tip)


def _set_label(label: QLabel, text: str, tip: str | None, style: str) -> None:
    """Set what changed only: these run every second and after every chunk, and a style
    sheet, even an equal one, re-polishes the widget and re-lays its parent out."""
    if label.text() != text:
        label.setText(text)
    if tip is not None:
        _set_tip(label, tip)
    if label.styleSheet() != style:
        label.setStyleSheet(style)


def _duration(seconds: float) -> str:
    """A short clock reading for the progress bar: ``42 s``, ``7:05``, ``1:02:03``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}:{s:02d}"
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}"


#: The text a progress bar must show whole: runs up to 999 steps with under an hour left (the
#: bar neither wraps nor elides; longer runs get the column's spare width).
WIDEST_PROGRESS = "888 / 888 · 88:88 left"
