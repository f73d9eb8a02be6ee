"""The positional panel: live heatmaps of sinusoidal, learned, T5, RoPE and ALiBi positions.

Linked to the config (``positional``, ``d_model``, ``max_len``, ``n_heads``) while "follow the
model" is ticked; any control of its own overrides that. Up to ``SYNC_LIMIT`` positions it
recomputes in the GUI thread (a few ms); longer ranges go to the worker, latest wins.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QSpinBox,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from unitscale_core.config import ModelConfig
from unitscale_core.positional import PositionalError
from unitscale_core.positional_views import (
    KINDS,
    SYNC_LIMIT,
    VIEW_LABELS,
    ViewResult,
    ViewSpec,
    compute_view,
    model_position_table,
)
from unitscale_core.sizing import RELATIVE_BUCKETS, RELATIVE_MAX_DISTANCE

from ..export import (
    Figure,
    Item,
    attach_context_menu,
    export_button,
    save_npy,
    save_png,
    svg_bytes,
    write_bytes,
)
from ..widgets.controls_state import restore_controls, save_controls
from ..widgets.heatmap import Heatmap
from ..worker import Worker

MAX_LENGTH = 16384
TABLE_DEBOUNCE_MS = 250  # a still config for this long before the model's table is built
CHANNEL = "positional"
TABLE_CHANNEL = "positional-table"
KIND_LABELS = {
    "sinusoidal": "Sinusoidal (Vaswani et al.)",
    "learned": "Learned table",
    "relative": "Relative (T5 buckets)",
    "rope": "RoPE (rotary)",
    "alibi": "ALiBi (linear bias)",
}
MASKED_COLOUR = "#cfcfcf"  # cells a causal model masks (NaN), as the attention panel draws them
#: The model's own frequency base (sinusoidal and RoPE: ``positional.sinusoidal``'s default).
MODEL_BASE = 10000.0
CURVE_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf"]


def _format(value_label: str, row_name: str, col_name: str, integer: bool = False):
    def fmt(row: int, col: int, value: float) -> str:
        where = f"{row_name} {row}, {col_name} {col}"
        if value != value:  # NaN: a cell a causal model masks
            return f"{where}: masked (the key comes after the query)"
        return f"{where}: {value_label} = {value:.0f}" if integer else \
            f"{where}: {value_label} = {value:.4g}"
    return fmt


def integer_ticks(lo: int, hi: int, most: int = 8) -> list[tuple[float, str]]:
    """Colour-bar ticks at integers ``lo … hi``: every one, or every k-th (k = 1, 2, 5, 10,
    …) so that at most ``most`` are labelled, always including ``lo``."""
    span = max(hi - lo, 0)
    steps = (m * 10**e for e in itertools.count() for m in (1, 2, 5))
    step = next(k for k in steps if span / k <= most - 1)
    return [(float(v), str(v)) for v in range(lo, hi + 1, step)]


class SchemeView(QWidget):
    """One scheme's matrix (heatmap) or curves (plot), with its note underneath."""

    def __init__(self, name: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName(name)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.stack = QStackedWidget()
        self.heatmap = Heatmap()
        self.heatmap.setObjectName(f"{name}Heatmap")
        self.heatmap.plot.vb.setBackgroundColor(MASKED_COLOUR)  # NaN cells are transparent
        self.curves = pg.PlotWidget(background="w")
        self.curves.setObjectName(f"{name}Curves")
        self.curves.getPlotItem().setMenuEnabled(False)  # right click: the export menu
        self.curves.addLegend(offset=(-10, 10), labelTextColor="k")
        self.curves.showGrid(x=True, y=True, alpha=0.3)
        self.stack.addWidget(self.heatmap)
        self.stack.addWidget(self.curves)
        self.note = QLabel(objectName=f"{name}Note")
        self.note.setWordWrap(True)
        layout.addWidget(self.stack, 1)
        layout.addWidget(self.note)
        self.result: ViewResult | None = None

    def figure(self, key: str, label: str) -> Figure:
        """What is shown (heatmap or curves) as an export item; NPY: :meth:`array`."""
        def widget():
            return self.heatmap.view if self.stack.currentWidget() is self.heatmap \
                else self.curves

        return Figure(key, label, widget, data=self.array)

    def array(self) -> np.ndarray:
        """The data shown: the matrix, or the curves stacked ``[n_curves, n]``."""
        result = self.result
        if result is None:
            raise PositionalError("nothing to export: the view shows an error")
        if result.matrix is not None:
            return np.asarray(result.matrix)
        return np.stack([np.asarray(c.y, dtype=np.float64) for c in result.curves])

    def show_result(self, result: ViewResult, view: str) -> None:
        self.result = result
        self.note.setText(result.note)
        if result.matrix is not None:
            self.stack.setCurrentWidget(self.heatmap)
            self.heatmap.set_colormap(result.cmap)
            rows = "query position" if "query" in result.ylabel else "position"
            cols = result.xlabel.replace(" j", "").replace(" i", "")
            levels, ticks = None, None
            if result.integer:  # ordinals: each integer at the middle of its colour step
                finite = result.matrix[np.isfinite(result.matrix)]
                lo, hi = (int(finite.min()), int(finite.max())) if finite.size else (0, 1)
                levels, ticks = (lo - 0.5, hi + 0.5), integer_ticks(lo, hi)
            self.heatmap.set_matrix(
                result.matrix, title=result.title, xlabel=result.xlabel, ylabel=result.ylabel,
                row_coords=result.row_coords, col_coords=result.col_coords,
                symmetric=result.symmetric, robust=result.robust, levels=levels,
                formatter=_format(result.value_label, rows, cols, result.integer))
            self.heatmap.colorbar.axis.setTicks(None if ticks is None else [ticks, []])
            return
        self.stack.setCurrentWidget(self.curves)
        plot = self.curves.getPlotItem()
        plot.clear()
        plot.setTitle(result.title, color="k")
        plot.setLabel("bottom", result.xlabel, color="k")
        plot.setLabel("left", result.ylabel, color="k")
        for i, curve in enumerate(result.curves[:24]):
            pen = pg.mkPen(CURVE_COLOURS[i % len(CURVE_COLOURS)], width=2)
            plot.plot(curve.x, curve.y, pen=pen, name=curve.name)

    def show_error(self, message: str) -> None:
        self.result = None
        self.note.setText(f"⚠ {message}")
        self.heatmap.set_matrix(np.zeros((1, 1)), title="")
        self.stack.setCurrentWidget(self.heatmap)


class PositionalPanel(QWidget):
    """Controls on top, one or two scheme views below (side by side when comparing)."""

    computed = Signal()  # emitted after views show a new result (tests, screenshots)

    def __init__(self, config: ModelConfig, worker: Worker, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("positionalPanel")
        self.worker = worker
        self.config = config
        self._updating = False
        self._request_id = 0
        self._table_id = 0
        self._model_table: tuple[ModelConfig, np.ndarray] | None = None
        self._table_wanted = False  # the model's table, to build when the panel is shown
        # whether its dock's tab is selected (set_active); None: not in a dock, so isVisible.
        # A widget behind another dock's tab still reports isVisible() True.
        self._active: bool | None = None
        # a model build cannot be cancelled: it starts once the config has been still for a
        # moment, not on every step of a spin box (nor right before the window closes)
        self._table_timer = QTimer(self, singleShot=True, interval=TABLE_DEBOUNCE_MS)
        self._table_timer.timeout.connect(self._build_table)
        self._table_key: ModelConfig | None = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)

        controls = QGridLayout()
        self.follow = QCheckBox("follow the model", objectName="posFollow", checked=True)
        self.follow.toggled.connect(self._on_follow)
        self.follow.setToolTip("Show the model's own positions: its scheme, max_len, d_model "
                               "(RoPE: the rotated dims of a head) and heads, its T5 buckets "
                               "(32, max distance 128), base (RoPE: rope_base; else 10000), "
                               "its causal or bidirectional attention, and for a learned "
                               "table the configured model's own table at initialisation. "
                               "Changing any of these here stops following.")
        self.kind = self._combo("posKind", [(KIND_LABELS[k], k) for k in KINDS],
                                "Positional scheme to show")
        self.compare = self._combo("posCompare", [("(no comparison)", None)] +
                                   [(KIND_LABELS[k], k) for k in KINDS],
                                   "Show a second scheme side by side, same sizes and view")
        self.view = self._combo("posView", [(label, v) for v, label in VIEW_LABELS.items()],
                                "Encoding: position × dimension. Similarity: between positions "
                                "(what the scheme knows about distance). Per-head bias: ALiBi "
                                "and T5 logit biases. Score vs distance: curves.")
        self.length = self._spin("posLength", 1, MAX_LENGTH, "Positions shown (max_len)")
        self.d_model = self._spin("posDModel", 2, 8192, "Encoding width (sinusoidal, random "
                                  "learned) or rotated size (RoPE: the head size d_model/heads)")
        self.heads = self._spin("posHeads", 1, 256, "Heads (ALiBi slopes)")
        self.head = self._spin("posHead", 0, 255, "Head shown by the per-head bias view")
        self.buckets = self._spin("posBuckets", 2, 1024, "T5 buckets (num_buckets)")
        self.max_distance = self._spin("posMaxDistance", 2, 100000, "T5 max_distance")
        self.bidirectional = QCheckBox("bidirectional", objectName="posBidirectional",
                                       checked=True)
        self.bidirectional.setToolTip("Bidirectional attention (an encoder): T5's buckets "
                                      "in both directions. Off: a causal model — T5's causal "
                                      "buckets, and for ALiBi and T5 the keys after the query "
                                      "drawn masked (grey)")
        self.bidirectional.toggled.connect(self._on_control)
        self.base = QDoubleSpinBox(objectName="posBase")
        self.base.setRange(1.5, 1e12)  # rope_base goes up to 1e12
        self.base.setDecimals(1)
        self.base.setKeyboardTracking(False)
        self.base.setToolTip("Base of the frequencies θᵢ = base^(−2i/d) (sinusoidal, RoPE)")
        self.base.valueChanged.connect(self._on_control)
        self.learned_source = self._combo(
            "posLearnedSource", [("all-MiniLM-L6-v2 checkpoint", "minilm"),
                                 ("configured model (at init)", "model")],
            "Learned table: the bundled checkpoint's trained positions, or the configured "
            "model's own table at initialisation (built in the worker)")

        rows = [
            ("scheme", self.kind), ("compare with", self.compare), ("view", self.view),
            ("positions", self.length), ("d_model", self.d_model), ("heads", self.heads),
            ("head", self.head), ("base", self.base), ("buckets", self.buckets),
            ("max distance", self.max_distance), ("learned source", self.learned_source),
        ]
        controls.addWidget(self.follow, 0, 0, 1, 2)
        controls.addWidget(self.bidirectional, 0, 2, 1, 2)
        for i, (label, widget) in enumerate(rows):
            r, c = 1 + i // 3, (i % 3) * 2
            lab = QLabel(label)
            lab.setToolTip(widget.toolTip())
            controls.addWidget(lab, r, c, Qt.AlignmentFlag.AlignRight)
            controls.addWidget(widget, r, c + 1)
        layout.addLayout(controls)

        buttons = QHBoxLayout()
        self.status = QLabel(objectName="posStatus")
        buttons.addWidget(self.status, 1)
        buttons.addWidget(export_button(self, "posExport", self.export_items))
        layout.addLayout(buttons)

        views = QHBoxLayout()
        self.primary = SchemeView("posPrimary")
        self.secondary = SchemeView("posSecondary")
        self.secondary.hide()
        views.addWidget(self.primary, 1)
        views.addWidget(self.secondary, 1)
        layout.addLayout(views, 1)
        for view in (self.primary, self.secondary):
            attach_context_menu(view.heatmap.view, self, self.export_items)
            attach_context_menu(view.curves, self, self.export_items)

        worker.finished_job.connect(self._on_result)
        worker.failed_job.connect(self._on_failure)
        self._set_defaults()
        self.update_config(config)

    # -- controls ------------------------------------------------------------------------------
    def _combo(self, name: str, items, tip: str) -> QComboBox:
        box = QComboBox(objectName=name)
        for label, data in items:
            box.addItem(label, data)
        box.setToolTip(tip)
        box.currentIndexChanged.connect(self._on_control)
        return box

    def _spin(self, name: str, lo: int, hi: int, tip: str) -> QSpinBox:
        spin = QSpinBox(objectName=name)
        spin.setRange(lo, hi)
        spin.setKeyboardTracking(False)
        spin.setToolTip(tip)
        spin.valueChanged.connect(self._on_control)
        return spin

    def _set_defaults(self) -> None:
        self._updating = True
        d = ViewSpec()
        self.base.setValue(d.base)
        self.buckets.setValue(d.buckets)
        self.max_distance.setValue(d.max_distance)
        self._updating = False

    def spec(self, kind: str | None = None) -> ViewSpec:
        """The current controls as a ViewSpec (for ``kind``, default the primary scheme)."""
        kind = kind or self.kind.currentData()
        return ViewSpec(kind=kind, view=self.view.currentData(), length=self.length.value(),
                        d_model=self.d_model.value(), n_heads=self.heads.value(),
                        head=self.head.value(), base=self.base.value(),
                        buckets=self.buckets.value(), max_distance=self.max_distance.value(),
                        bidirectional=self.bidirectional.isChecked(),
                        learned_source=self.learned_source.currentData(),
                        seed=self.config.seed)

    def update_config(self, config: ModelConfig) -> None:
        """Take the model's scheme and sizes when following it, then recompute."""
        self.config = config
        if self.follow.isChecked():
            self._updating = True
            if config.positional in KINDS:
                self.kind.setCurrentIndex(self.kind.findData(config.positional))
            self.length.setValue(min(config.max_len, MAX_LENGTH))
            self.d_model.setValue(min(model_width(config), self.d_model.maximum()))
            self.heads.setValue(min(config.n_heads, self.heads.maximum()))
            self.bidirectional.setChecked(config.architecture == "encoder")
            # the model's own constants (model/transformer.py), and its own learned table
            self.base.setValue(model_base(config))
            self.buckets.setValue(RELATIVE_BUCKETS)
            self.max_distance.setValue(RELATIVE_MAX_DISTANCE)
            self.learned_source.setCurrentIndex(self.learned_source.findData("model"))
            self._updating = False
            self._model_note = ("the model uses no positions; showing the last scheme"
                                if config.positional == "none" else "")
        self.recompute()

    def _on_follow(self, on: bool) -> None:
        if on and not self._updating:  # ticked again: take the model's scheme and sizes
            self.update_config(self.config)

    def _on_control(self, *_args) -> None:
        if self._updating:
            return
        sender = self.sender()
        if sender is not None and sender is not self.follow and sender in (
                self.kind, self.length, self.d_model, self.heads, self.bidirectional,
                self.base, self.buckets, self.max_distance, self.learned_source):
            self.follow.setChecked(False)  # no longer what the model uses
        self.recompute()

    # -- compute -------------------------------------------------------------------------------
    def _specs(self) -> list[ViewSpec]:
        specs = [self.spec()]
        other = self.compare.currentData()
        if other is not None:
            specs.append(self.spec(other))
        return specs

    def _table(self, specs: list[ViewSpec]) -> np.ndarray | None:
        """The configured model's learned table when a view needs it; None while the worker
        builds it (the request goes out here)."""
        if not any(s.kind == "learned" and s.learned_source == "model" for s in specs):
            return None
        key = self.config.replace(parametrization="standard", dtype="fp32", device="cpu")
        if self._model_table is not None and self._model_table[0] == key:
            return self._model_table[1]
        if not self._on_screen():  # a hidden tab costs nothing (GPT-2 small: ~1 s of the worker)
            self._table_wanted = True
            return None
        self._table_wanted = False
        self.status.setText("building the configured model in the worker…")
        self._table_key = key
        self._table_timer.start()
        return None

    def _build_table(self) -> None:
        if not self._on_screen():  # hidden again within the debounce
            self._table_wanted = True  # asked for again when the panel is shown
            return
        key = self._table_key
        self._table_id = self.worker.submit(
            TABLE_CHANNEL, lambda: (key, model_position_table(key)))

    def recompute(self) -> None:
        """Recompute now (moderate sizes) or in the worker (long ranges)."""
        self.head.setMaximum(max(0, self.heads.value() - 1))
        specs = self._specs()
        self.secondary.setVisible(len(specs) > 1)
        table = self._table(specs)
        if table is None and (self._table_id or self._table_wanted
                              or self._table_timer.isActive()) and any(
                s.kind == "learned" and s.learned_source == "model" for s in specs):
            return  # shown when the table arrives (asked for when the panel is shown)
        if self.length.value() <= SYNC_LIMIT:
            self._request_id = 0
            self.worker.cancel(CHANNEL)
            self._show([_safe_compute(s, table) for s in specs])
        else:
            self.status.setText(f"computing {self.length.value()} positions in the worker…")
            self._request_id = self.worker.submit(
                CHANNEL, lambda: [_safe_compute(s, table) for s in specs])

    def model_table(self) -> np.ndarray | None:
        """The configured model's learned table as last built (None before that)."""
        return None if self._model_table is None else self._model_table[1]

    def _on_screen(self) -> bool:
        return self._active if self._active is not None else self.isVisible()

    def set_active(self, active: bool) -> None:
        """Whether the panel is on screen (its dock's tab selected); a model table wanted
        while hidden is asked for when it becomes active. Connected to
        ``QDockWidget.visibilityChanged``."""
        self._active = active
        if active and self._table_wanted:
            QTimer.singleShot(0, self.recompute)

    def showEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        if self._table_wanted and self._on_screen():
            QTimer.singleShot(0, self.recompute)

    def _on_result(self, channel: str, request_id: int, results) -> None:
        if channel == TABLE_CHANNEL and request_id == self._table_id:
            self._model_table = results
            self._table_id = 0
            self.recompute()
        elif channel == CHANNEL and request_id == self._request_id:
            self._show(results)

    def _on_failure(self, channel: str, request_id: int, message: str) -> None:
        if channel == TABLE_CHANNEL and request_id == self._table_id:
            self._table_id = 0
            self.primary.show_error(message)
            self.status.setText(f"⚠ {message}")
        elif channel == CHANNEL and request_id == self._request_id:
            self.status.setText(f"⚠ {message}")

    def _show(self, results: list[ViewResult | str]) -> None:
        view = self.view.currentData()
        for target, result in zip((self.primary, self.secondary), results):
            if isinstance(result, str):
                target.show_error(result)
            else:
                target.show_result(result, view)
        note = getattr(self, "_model_note", "")
        self.status.setText(note or f"{self.length.value()} positions")
        self.computed.emit()

    # -- export --------------------------------------------------------------------------------
    def export_items(self) -> list[Item]:
        """The primary view (and the comparison, when shown): PNG, SVG, data as NPY."""
        items = [self.primary.figure("positional", "positional view")]
        if self.secondary.isVisibleTo(self):
            items.append(self.secondary.figure("positionalCompare", "comparison view"))
        return items

    def export_png(self, path: str | Path, scale: float = 2.0) -> None:
        """The primary view (heatmap or curves) as a PNG image."""
        save_png(self.primary.figure("positional", "").widget(), path, scale)

    def export_svg(self, path: str | Path) -> None:
        write_bytes(path, svg_bytes(self.primary.figure("positional", "").widget()))

    def export_npy(self, path: str | Path) -> None:
        """The primary view's data: the matrix shown, or the curves stacked ``[n_curves, n]``."""
        save_npy(self.primary.array(), path)

    # -- state ---------------------------------------------------------------------------------
    def _state_controls(self) -> list[QWidget]:
        own = [self.compare, self.view, self.base, self.buckets, self.max_distance,
               self.learned_source]
        # while following the model, the scheme and sizes come from the config
        sized = [self.kind, self.length, self.d_model, self.heads, self.bidirectional]
        return [self.follow, *own, *(sized if not self.follow.isChecked() else []), self.head]

    def state(self) -> dict[str, Any]:
        """The panel's choices: follow, scheme, comparison, view, sizes and T5/RoPE knobs."""
        return save_controls(self._state_controls())

    def restore_state(self, state: Any) -> list[str]:
        """Apply :meth:`state`'s output and recompute once; returns what was skipped."""
        self._updating = True
        try:
            problems = []
            if isinstance(state, dict) and "posFollow" in state:  # decides the controls saved
                reason = restore_controls([self.follow], {"posFollow": state["posFollow"]})
                problems += reason
            if isinstance(state, dict):
                self.head.setMaximum(255)  # the head's range follows heads: set after them
                rest = {k: v for k, v in state.items() if k != "posFollow"}
                controls = [w for w in self._state_controls() if w is not self.follow]
                problems += restore_controls(controls, rest)
            else:
                problems += restore_controls([], state)
        finally:
            self._updating = False
        if self.follow.isChecked():
            self.update_config(self.config)
        else:
            self.recompute()
        return problems


def spec_for_config(config: ModelConfig, base: ViewSpec | None = None) -> ViewSpec | None:
    """What the panel shows while following ``config`` (its scheme, max_len, width, heads,
    attention direction, T5 buckets, base and, for a learned table, its own table at
    initialisation: ``learned_source="model"``, which :func:`compute_view` needs passed in as
    ``model_position_table(config)``); the view and head from ``base`` (default the panel's
    defaults); None when the model uses no positions."""
    if config.positional not in KINDS:
        return None
    return dataclasses.replace(
        base or ViewSpec(), kind=config.positional, length=min(config.max_len, MAX_LENGTH),
        d_model=max(2, min(model_width(config), 8192)), n_heads=min(config.n_heads, 256),
        bidirectional=config.architecture == "encoder", seed=config.seed,
        base=model_base(config),
        buckets=RELATIVE_BUCKETS, max_distance=RELATIVE_MAX_DISTANCE, learned_source="model")


def model_width(config: ModelConfig) -> int:
    """The width the model's positions span: RoPE rotates the first ``rotary_dims`` dims of
    each head (all of the head size unless rotary_fraction < 1); the other schemes span
    d_model."""
    return config.rotary_dims if config.positional == "rope" else config.d_model


def model_base(config: ModelConfig) -> float:
    """The model's frequency base: RoPE's configured θ (``rope_base``), the sinusoidal
    encoding's fixed 10000."""
    return float(config.rope_base) if config.positional == "rope" else MODEL_BASE


def _safe_compute(spec: ViewSpec, table: np.ndarray | None = None) -> ViewResult | str:
    """The view, or the one-line reason it cannot be drawn (e.g. odd d_model for RoPE)."""
    try:
        return compute_view(spec, table)
    except (PositionalError, ValueError) as exc:
        return str(exc)
