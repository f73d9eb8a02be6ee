"""The training panel's per-run views: tensor scales over steps, underflow, attention.

Each view draws plain data handed to it (StepRecord lists, numpy attention maps); none of
them touches torch or the worker. ``ScalesView`` reuses :class:`~app.widgets.heatmap.Heatmap`;
``AttentionView`` reuses the attention panel's ``ModelView`` and ``TokenAxis``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFontMetrics
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QSizePolicy,
    QSplitter,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from ..panels.attention_panel import MASKED_COLOUR, ModelView, TokenAxis, _tick_font
from .heatmap import Heatmap
from .training_plots import KIND_COLOURS, KIND_LABELS, UnderflowPlot

KINDS = ("activation", "weight", "grad_activation", "grad_weight")
UNDERFLOW_FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp16")
KIND_SHORT = {"activation": "act", "weight": "w", "grad_activation": "∇act",
              "grad_weight": "∇w"}
HEATMAP_CMAP = "CET-D1"  # diverging: blue below unit scale, white at 1, red above
#: What each kind of tensor is rounded to when training in a format (fp32 and bf16 are absent:
#: nothing underflows at these scales, their smallest subnormals being 2⁻¹⁴⁹ and 2⁻¹³³).
OWN_FORMATS = {
    "fp8_e4m3": {"activation": "fp8_e4m3", "weight": "fp8_e4m3",
                 "grad_activation": "fp8_e5m2", "grad_weight": "fp8_e5m2"},
    "fp8_e5m2": dict.fromkeys(KINDS, "fp8_e5m2"),
    "fp16": dict.fromkeys(KINDS, "fp16"),
}
FP8_IF_CAST = OWN_FORMATS["fp8_e4m3"]


def own_formats(dtype: str) -> dict[str, str] | None:
    """Kind → the format its values are rounded to when training in ``dtype`` (None for
    fp32/bf16)."""
    return OWN_FORMATS.get(dtype)


def _short(token: str, n: int = 10) -> str:
    token = token.replace("\n", "⏎").replace("\t", "⇥")
    if not token.strip():
        token = repr(token)
    return token if len(token) <= n else token[: n - 1] + "…"


def black_colorbar(heatmap: Heatmap, label: str) -> None:
    axis = heatmap.colorbar.axis
    axis.setTextPen("k")
    axis.setPen("k")
    axis.setStyle(tickFont=_tick_font())
    axis.setWidth(None)  # room for the label
    axis.enableAutoSIPrefix(False)
    axis.setLabel(label, color="k")


def _ticks(labels: Sequence[str], pixels: float) -> list[tuple[float, str]]:
    """Every k-th label, k chosen so that the labels fit in ``pixels``."""
    line = QFontMetrics(_tick_font()).height()
    n = len(labels)
    step = max(1, math.ceil(n * line * 1.05 / max(pixels, 40.0)))
    return [(i + 0.5, labels[i]) for i in range(0, n, step)]


PLACEHOLDER_SCALES = ("Start a run to see the log₂ RMS of each of its tensors, step by step "
                      "(0 is unit scale)")
PLACEHOLDER_UNDERFLOW = ("Start a run to see the share of its values that each number format "
                         "would flush to zero")
PLACEHOLDER_ATTENTION = ("Start a run to see its attention maps (every layer × head on the "
                         "task's probe sequence)")


def _placeholder(name: str, text: str) -> QLabel:
    """A centred grey message shown where a view has nothing to draw yet."""
    label = QLabel(text, objectName=name)
    label.setAlignment(Qt.AlignmentFlag.AlignCenter)
    label.setWordWrap(True)
    label.setStyleSheet("color: #666; background: white; padding: 12px")
    return label


def _draw_when_shown(view: QWidget, draw) -> None:
    """``draw()`` now if ``view`` is on screen, else mark it stale for its showEvent."""
    if view.isVisible():
        view._stale = False
        draw()
    else:
        view._stale = True


def _draw_if_stale(view: QWidget, draw) -> None:
    if getattr(view, "_stale", False):
        view._stale = False
        draw()


def _corner_controls(text: str, combo: QComboBox) -> QWidget:
    """A label and its combo box, for the panel to show in its tab bar's corner."""
    bar = QHBoxLayout()
    bar.setContentsMargins(0, 0, 4, 0)
    label = QLabel(text)
    label.setToolTip(combo.toolTip())
    bar.addWidget(label)
    bar.addWidget(combo)
    controls = QWidget()
    controls.setLayout(bar)
    return controls


class ScalesView(QWidget):
    """Tensor × step heatmap of log₂ RMS for one run, rows filtered by kind."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 2, 0, 0)
        self.kind = QComboBox(objectName="trainKindFilter")
        self.kind.addItem("all kinds", "")
        for kind in KINDS:
            self.kind.addItem(KIND_LABELS[kind], kind)
        self.kind.setToolTip("Tensor kinds shown as rows")
        self.kind.currentIndexChanged.connect(self._draw)
        self.controls = _corner_controls("rows", self.kind)
        self.heatmap = Heatmap(cmap=HEATMAP_CMAP)
        self.heatmap.setObjectName("trainHeatmap")
        self.axis = TokenAxis("left")
        self.heatmap.plot.setAxisItems({"left": self.axis})
        self.heatmap.plot.vb.sigResized.connect(self._update_ticks)
        self.heatmap.plot.vb.setBackgroundColor(MASKED_COLOUR)
        self.heatmap.setToolTip("log₂ of each tensor's RMS (root mean square over all its "
                                "elements) on each logged step: 0 is unit scale, −8 is 256× "
                                "smaller. Grey: RMS 0. Hover a cell for its value.")
        black_colorbar(self.heatmap, "log₂ RMS")
        self.placeholder = _placeholder("trainScalesPlaceholder", PLACEHOLDER_SCALES)
        self.pages = QStackedWidget()
        self.pages.addWidget(self.placeholder)
        self.pages.addWidget(self.heatmap)
        box.addWidget(self.pages, 1)
        self._title = ""
        self._shown_title: str | None = None
        self._names: list[str] = []
        self._kinds: list[str] = []
        self._records: list = []
        self._labels: list[str] = []
        self._labels_key: tuple | None = None
        self._drawn_ticks: tuple | None = None
        self.steps: list[int] = []
        self.data = np.zeros((0, 0), np.float32)

    def show_run(self, title: str, names: list[str], kinds: list[str], records: list) -> None:
        """Draw ``records`` (StepRecords; those with ``tensor_rms`` are columns) — now if the
        view is on screen, else when it is shown (a hidden tab costs the GUI thread nothing
        while records stream in)."""
        self._title, self._names, self._kinds, self._records = title, names, kinds, records
        _draw_when_shown(self, self._draw)

    def clear(self) -> None:
        self.show_run("", [], [], [])

    def showEvent(self, event) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        _draw_if_stale(self, self._draw)

    def rows(self) -> list[int]:
        """Indices into the run's tensor list of the rows drawn."""
        kind = self.kind.currentData()
        return [i for i, k in enumerate(self._kinds) if not kind or k == kind]

    def _draw(self, *_args) -> None:
        logged = [r for r in self._records if r.tensor_rms is not None]
        rows = self.rows()
        self.steps = [r.step for r in logged]
        if not logged or not rows:
            self.data = np.zeros((len(rows), 0), np.float32)
            # a message instead of an empty grey map with a meaningless axis
            self.placeholder.setText(
                PLACEHOLDER_SCALES if not self._names else
                "no tensor of this kind" if not rows else
                "the first logged step's statistics appear here")
            self.pages.setCurrentWidget(self.placeholder)
            self._labels, self._labels_key, self._drawn_ticks = [], None, None
            return
        self.pages.setCurrentWidget(self.heatmap)
        rms = np.stack([np.asarray(r.tensor_rms, np.float64) for r in logged], axis=1)[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            self.data = np.where(rms > 0, np.log2(rms), np.nan).astype(np.float32)
        finite = self.data[np.isfinite(self.data)]
        span = max(4.0, math.ceil(float(np.abs(finite).max()))) if finite.size else 4.0
        names = [self._names[i] for i in rows]
        kinds = [self._kinds[i] for i in rows]
        data, steps = self.data, self.steps

        def describe(r: int, c: int, _v: float) -> str:
            value = float(data[r, c])
            head = f"{names[r]} ({kinds[r]}), step {steps[c]}"
            if not math.isfinite(value):
                return f"{head}: RMS 0"
            return f"{head}: RMS {2.0 ** value:.3g} (log₂ {value:+.2f})"

        # x in column units (column c spans [c, c+1]) with the step ticks at the centres
        # (_update_ticks): in step units the default axis put tick k on the left edge of the
        # column of step k+1 (the image spans [0, last step], a column's left edge is step−1)
        self.heatmap.set_matrix(self.data, levels=(-span, span), formatter=describe,
                                xlabel="step")
        if self._title != self._shown_title:  # a new title re-lays the plot out
            self.heatmap.plot.setTitle(self._title, color="k", size="9pt")
            self._shown_title = self._title
        key = (id(self._names), tuple(rows))
        if key != self._labels_key:  # the same rows keep their labels and drawn ticks
            self._labels = [f"{n} {KIND_SHORT.get(k, k)}" for n, k in zip(names, kinds)]
            self._labels_key = key
            self._drawn_ticks = None
        self._update_ticks()

    def _update_ticks(self, *_args) -> None:
        vb = self.heatmap.plot.vb
        pixels, width = vb.height(), vb.width()
        key = (len(self._labels), id(self._labels), round(pixels), tuple(self.steps),
               round(width))
        if self._drawn_ticks == key:
            return
        self._drawn_ticks = key
        self.axis.set_tokens(_ticks(self._labels, pixels))
        self.heatmap.plot.getAxis("bottom").setTicks([self.step_ticks(width), []])

    def step_ticks(self, pixels: float) -> list[tuple[float, str]]:
        """(x, "k") at the centre c + 0.5 of the column c of each labelled step k: every
        j-th column, j chosen so the labels (widest + a gap) fit in ``pixels``."""
        if not self.steps:
            return []
        metrics = QFontMetrics(self.heatmap.plot.getAxis("bottom").style["tickFont"]
                               or _tick_font())
        label = max(metrics.horizontalAdvance(str(s)) for s in self.steps) + 12
        n = len(self.steps)
        every = max(1, math.ceil(n * label / max(pixels, 40.0)))
        return [(c + 0.5, str(self.steps[c])) for c in range(0, n, every)]

    def labels(self) -> list[str]:
        """Row labels (tensor name and kind) of the rows drawn, all of them."""
        return list(self._labels)


class UnderflowView(QWidget):
    """Per kind, the % of nonzero values a format would flush to zero, over logged steps."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 2, 0, 0)
        self.format = QComboBox(objectName="trainUnderflowFormat")
        self.format.addItem("the run's format", "own")
        for f in UNDERFLOW_FORMATS:
            self.format.addItem(f, f)
        self.format.setToolTip("Whose underflow: the run's own format (FP8 runs: E4M3 or E5M2 "
                               "forward, E5M2 for gradients; fp32/bf16 runs: what FP8 would "
                               "lose), or one format for every kind")
        self.format.currentIndexChanged.connect(self._draw)
        self.controls = _corner_controls("format", self.format)
        self.plot = UnderflowPlot()
        self.plot.setObjectName("trainUnderflowPlot")
        self.placeholder = _placeholder("trainUnderflowPlaceholder", PLACEHOLDER_UNDERFLOW)
        self.pages = QStackedWidget()
        self.pages.addWidget(self.placeholder)
        self.pages.addWidget(self.plot)
        box.addWidget(self.pages, 1)
        self._name, self._dtype, self._records = "", None, []

    def show_run(self, name: str, dtype: str | None, records: list) -> None:
        """Draw ``records`` now if the view is on screen, else when it is shown."""
        self._name, self._dtype, self._records = name, dtype, records
        _draw_when_shown(self, self._draw)

    def clear(self) -> None:
        self.show_run("", None, [])

    def showEvent(self, event) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        _draw_if_stale(self, self._draw)

    def formats(self) -> tuple[dict[str, str], str]:
        """(kind → format drawn, a note for the title)."""
        choice = self.format.currentData()
        if choice != "own":
            return dict.fromkeys(KINDS, choice), choice
        own = own_formats(self._dtype) if self._dtype else None
        if own is None:
            note = f"if cast to FP8 (the run is {self._dtype})" if self._dtype else ""
            return FP8_IF_CAST, note
        return own, self._dtype

    def _draw(self, *_args) -> None:
        formats, note = self.formats()
        title = f"run {self._name}: values lost to underflow" if self._name else "underflow"
        self.plot.plot_item.setTitle(f"{title} · {note}" if note else title, color="k",
                                     size="9pt")
        logged = [r for r in self._records if r.underflow is not None]
        if not logged:
            self.plot.clear_curves()
            self.placeholder.setText(PLACEHOLDER_UNDERFLOW if not self._records else
                                     "the first logged step's statistics appear here")
            self.pages.setCurrentWidget(self.placeholder)
            return
        self.pages.setCurrentWidget(self.plot)
        steps = [r.step for r in logged]
        for kind in KINDS:
            fmt = formats[kind]
            values = [100.0 * r.underflow[kind][fmt] for r in logged]
            self.plot.set_curve(kind, f"{KIND_LABELS[kind]} ({fmt})", steps, values,
                                KIND_COLOURS[kind])


class AttentionView(QWidget):
    """Layers × heads thumbnails of one run's self-attention, and the clicked head enlarged."""

    head_selected = Signal(int, int)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 2, 0, 0)
        self.status = QLabel(objectName="trainAttentionStatus")
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        box.addWidget(self.status)
        split = QSplitter(Qt.Orientation.Horizontal)
        self.model_view = ModelView(self.select)
        self.model_view.setObjectName("trainModelView")
        self.model_view.setToolTip("Every layer × head's self-attention on the task's probe "
                                   "sequence (queries down, keys across; grey: masked by the "
                                   "attention pattern). Click a head to enlarge it.")
        self.head_view = Heatmap(cmap="viridis")
        self.head_view.setObjectName("trainHeadView")
        self.query_axis, self.key_axis = TokenAxis("left"), TokenAxis("bottom")
        self.head_view.plot.setAxisItems({"left": self.query_axis, "bottom": self.key_axis})
        self.head_view.plot.vb.setBackgroundColor(MASKED_COLOUR)
        self.head_view.plot.vb.sigResized.connect(self._update_ticks)
        black_colorbar(self.head_view, "weight")
        split.addWidget(self.model_view)
        split.addWidget(self.head_view)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        self.placeholder = _placeholder("trainAttentionPlaceholder", PLACEHOLDER_ATTENTION)
        self.pages = QStackedWidget()
        self.pages.addWidget(self.placeholder)
        self.pages.addWidget(split)
        box.addWidget(self.pages, 1)
        self.snapshot = None
        self.head = (0, 0)
        self._title = ""
        self._tick_key: tuple | None = None
        self.clear()

    def clear(self) -> None:
        self.snapshot = None
        self.model_view.clear()
        self.model_view.set_shape(0, 0)
        self.head_view.set_matrix(np.full((1, 1), np.nan, np.float32))
        self.head_view.plot.setTitle("")
        self.query_axis.set_tokens([])
        self.key_axis.set_tokens([])
        self.status.setText("")
        self.status.hide()  # the placeholder says it all
        self.pages.setCurrentWidget(self.placeholder)

    def show_snapshot(self, snapshot, title: str, status: str) -> None:
        """Draw an ``AttentionSnapshot`` (thumbs and maps, NaN where masked)."""
        self.snapshot, self._title = snapshot, title
        self.status.setText(status)
        self.status.setToolTip(status)
        self.status.show()
        self.pages.setCurrentIndex(1)
        self._draw()

    def select(self, layer: int, head: int) -> None:
        self.head = (layer, head)
        self._draw()
        self.head_selected.emit(layer, head)

    def _draw(self) -> None:
        snap = self.snapshot
        if snap is None:
            return
        layers, heads = snap.thumbs.shape[:2]
        layer, head = min(self.head[0], layers - 1), min(self.head[1], heads - 1)
        self.head = (layer, head)
        self.model_view.set_maps(snap.thumbs, lambda _d: (0.0, 1.0))
        self.model_view.set_title(self._title)
        self.model_view.highlight(layer, head)
        f, tokens, att = snap.factor, snap.tokens, snap.att

        def describe(r: int, c: int, _v: float) -> str:
            value = att[layer, head, min(r // f, att.shape[-2] - 1), min(c // f, att.shape[-1] - 1)]
            where = f"query '{tokens[r]}' ({r}) → key '{tokens[c]}' ({c})"
            return f"{where}: masked" if np.isnan(value) else f"{where}: weight {value:.3g}"

        n = len(tokens)
        coords = None
        if f > 1:
            coords = np.minimum(np.arange(att.shape[-1]) * f, n - 1)
            coords[-1] = n - 1
        self.head_view.set_matrix(att[layer, head], levels=(0.0, 1.0), row_coords=coords,
                                  col_coords=coords, formatter=describe, xlabel="key",
                                  ylabel="query")
        self.head_view.plot.setTitle(f"layer {layer}, head {head}", color="k", size="9pt")
        self._tick_key = None
        self._update_ticks()

    def _update_ticks(self, *_args) -> None:
        if self.snapshot is None:
            return
        vb = self.head_view.plot.vb
        key = (id(self.snapshot), round(vb.width()), round(vb.height()))
        if self._tick_key == key:
            return
        self._tick_key = key
        labels = [_short(t) for t in self.snapshot.tokens]
        self.query_axis.set_tokens(_ticks(labels, vb.height()))
        self.key_axis.set_tokens(_ticks(labels, vb.width()))
