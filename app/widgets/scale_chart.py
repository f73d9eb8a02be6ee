"""A log2 scale chart: one row per tensor, forward and backward scale side by side.

Like ``unit_scaling.analysis.plot`` (tensors down the y axis in op-graph order, log2 RMS along
x), but live: number-format ranges are drawn as bands behind the points, hovering a point names
the tensor, its value and its formula, and clicking one emits ``picked(name)``.

Markers: filled = predicted, hollow = measured; blue = forward (activation or weight), red =
backward (its gradient).

A 96-layer model has ~5800 markers. Each series is a :class:`MarkerSeries` (two arrays, one
pre-rendered symbol) rather than a ``pg.ScatterPlotItem``, which keeps a record, a style and an
atlas key per point and builds them in Python on every ``setData`` (about 10 ms here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyqtgraph as pg
from pyqtgraph.graphicsItems.LegendItem import ItemSample
from pyqtgraph.graphicsItems.ScatterPlotItem import drawSymbol
from PySide6.QtCore import QCoreApplication, QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QFont, QFontMetricsF, QImage, QPaintEngine, QPainter, QPixmap
from PySide6.QtWidgets import QGraphicsView, QVBoxLayout, QWidget

from unitscale_core.scaling.collapse import Collapse
from unitscale_core.scaling.formats import FORMATS
from unitscale_core.tensors import TensorRow

if TYPE_CHECKING:
    from unitscale_core.measure import SeedSpread

try:  # drawPixmapFragments from a numpy array, as pyqtgraph's ScatterPlotItem draws
    from pyqtgraph.Qt.internals import PrimitiveArray
except ImportError:  # pragma: no cover - older pyqtgraph: one drawPixmap per marker
    PrimitiveArray = None
if PrimitiveArray is not None and not hasattr(PrimitiveArray, "drawargs"):  # pragma: no cover
    PrimitiveArray = None

FORWARD_COLOUR = "#1f5fbf"
BACKWARD_COLOUR = "#c62828"
COLLAPSE_COLOUR = "#6a1b9a"
BAND_COLOURS = {"fp8_e4m3": "#2e7d32", "fp8_e5m2": "#6a1b9a", "fp16": "#ef6c00",
                "bf16": "#00838f", "fp32": "#546e7a"}
FORWARD_KINDS = {"activation": "grad_activation", "weight": "grad_weight"}
#: A file of the chart shows every row up to this many (a 96-layer model's 2,900 would make
#: an image ~60,000 px tall); more: the rows in view.
EXPORT_MAX_ROWS = 400
EXPORT_ROW_PX = 20  # ≥ NameAxis.LABEL_PX: every row named
EXPORT_MARGIN_PX = 150  # the title, the x axis and the legend
EXPORT_MIN_WIDTH = 900
EXPORT_TITLE_PT = 10
#: The title row's room beside the text: pyqtgraph's own title row is 30 px for one line.
EXPORT_TITLE_PAD_PX = 12


def _log2(x: float) -> float:
    return math.log2(x) if x > 0 and math.isfinite(x) else math.nan


def _value_text(x: float) -> str:
    """A hover value with its log₂: exactly zero has no log (log₂ 0 = −∞), so it reads as zero,
    which every format represents, rather than "log₂ nan"."""
    if x == 0:
        return "0 (exactly zero)"
    if not math.isfinite(x):
        return f"{x:.4g}"
    return f"{x:.4g} (log₂ {_log2(x):.2f})"


class MarkerSeries(pg.GraphicsObject):
    """Points ``(x, y)`` all drawn with one symbol of a fixed size in pixels.

    New points are two arrays (``setData``); a paint stamps one pre-rendered pixmap at the
    points in view. Hovering points shows ``tip(x, y)`` of each (three at most) as the view's
    tool tip; clicking one emits ``sigClicked(self, QPointF)`` with the point's position.
    ``opts`` carries the style, as a scatter item's does, for the legend.
    """

    sigClicked = Signal(object, object)

    def __init__(self, symbol: str, size: float, pen, brush, name: str, tip=None):
        super().__init__()
        self.opts = {"symbol": symbol, "size": size, "pen": pg.mkPen(pen),
                     "brush": pg.mkBrush(brush), "name": name, "antialias": True}
        self.tip = tip
        self.x = np.empty(0)
        self.y = np.empty(0)
        self._bounds: list[tuple[float, float] | None] = [None, None]
        self._pixmaps: dict[float, QPixmap] = {}  # device pixel ratio → rendered symbol
        self._fragments = PrimitiveArray(QPainter.PixmapFragment, 10) if PrimitiveArray else None
        self._tip_shown = False

    def name(self) -> str:
        return self.opts["name"]

    def setData(self, x: np.ndarray, y: np.ndarray) -> None:  # noqa: N802 (pyqtgraph's name)
        self.prepareGeometryChange()
        self.x = np.asarray(x, dtype=np.float64)
        self.y = np.asarray(y, dtype=np.float64)
        self._bounds = [None, None]
        self.informViewBoundsChanged()
        self.update()

    # -- geometry (what the view box auto-ranges on) --------------------------------------
    def dataBounds(self, ax: int, frac: float = 1.0, orthoRange=None):  # noqa: N802, N803
        d, other = (self.x, self.y) if ax == 0 else (self.y, self.x)
        full = orthoRange is None and frac >= 1.0
        if full and self._bounds[ax] is not None:
            return self._bounds[ax]
        if orthoRange is not None:
            d = d[(other >= orthoRange[0]) & (other <= orthoRange[1])]
        d = d[np.isfinite(d)]
        if not d.size:
            return (None, None)
        if frac >= 1.0:
            bounds = (float(d.min()), float(d.max()))
        else:
            bounds = tuple(np.percentile(d, [50 * (1 - frac), 50 * (1 + frac)]))
        if full:
            self._bounds[ax] = bounds
        return bounds

    def pixelPadding(self) -> float:  # noqa: N802
        return self._half_width()

    def _half_width(self) -> float:
        return 0.5 * (self.opts["size"] + self.opts["pen"].widthF()) + 1

    def boundingRect(self) -> QRectF:  # noqa: N802
        (x0, x1), (y0, y1) = self.dataBounds(0), self.dataBounds(1)
        if x0 is None or y0 is None:
            return QRectF()
        px, py = self._pixel_size()
        pad = self._half_width()
        return QRectF(x0 - pad * px, y0 - pad * py, x1 - x0 + 2 * pad * px,
                      y1 - y0 + 2 * pad * py)

    def _pixel_size(self) -> tuple[float, float]:
        """One screen pixel's width and height in data units (0 before the item is shown)."""
        try:
            px, py = self.pixelVectors()
        except OverflowError:
            return 0.0, 0.0
        return (0.0 if px is None else px.length()), (0.0 if py is None else py.length())

    def viewTransformChanged(self) -> None:  # noqa: N802 (the padding is in pixels)
        self.prepareGeometryChange()
        super().viewTransformChanged()

    # -- drawing --------------------------------------------------------------------------
    def _symbol(self, dpr: float) -> QPixmap:
        """The symbol drawn once, antialiased, at ``dpr`` device pixels per pixel."""
        pixmap = self._pixmaps.get(dpr)
        if pixmap is None:
            o = self.opts
            side = math.ceil(dpr * (o["size"] + max(math.ceil(o["pen"].widthF()), 1)))
            image = QImage(side, side, QImage.Format.Format_ARGB32_Premultiplied)
            image.setDevicePixelRatio(dpr)
            image.fill(Qt.GlobalColor.transparent)
            p = QPainter(image)
            try:
                p.setRenderHint(QPainter.RenderHint.Antialiasing)
                p.translate(0.5 * side / dpr, 0.5 * side / dpr)
                drawSymbol(p, o["symbol"], o["size"], o["pen"], o["brush"])
            finally:
                p.end()
            pixmap = self._pixmaps[dpr] = QPixmap.fromImage(image)
        return pixmap

    def _in(self, rect: QRectF | None, pad_px: float) -> np.ndarray:
        """Mask of the points within ``pad_px`` screen pixels of ``rect`` (data units)."""
        if rect is None:
            return np.isfinite(self.x) & np.isfinite(self.y)
        px, py = self._pixel_size()
        return ((self.x >= rect.left() - pad_px * px) & (self.x <= rect.right() + pad_px * px)
                & (self.y >= rect.top() - pad_px * py) & (self.y <= rect.bottom() + pad_px * py))

    def paint(self, p: QPainter, *args) -> None:
        if not self.x.size:
            return
        mask = self._in(self.viewRect(), self._half_width())
        if not mask.any():
            return
        t = p.transform()  # item → device; markers keep their size in pixels
        x, y = self.x[mask], self.y[mask]
        dx = t.m11() * x + t.m21() * y + t.m31()
        dy = t.m12() * x + t.m22() * y + t.m32()
        ok = np.isfinite(dx) & np.isfinite(dy)
        dx, dy = np.clip(dx[ok], -2**30, 2**30), np.clip(dy[ok], -2**30, 2**30)
        device = p.device()
        dpr = device.devicePixelRatioF() if device is not None else 1.0
        p.resetTransform()
        engine = p.paintEngine()
        if engine is not None and engine.type() == QPaintEngine.Type.SVG:  # vectors for SVG
            o = self.opts
            p.setRenderHint(QPainter.RenderHint.Antialiasing)
            for cx, cy in zip(dx.tolist(), dy.tolist()):
                p.resetTransform()
                p.translate(cx, cy)
                drawSymbol(p, o["symbol"], o["size"], o["pen"], o["brush"])
            return
        pixmap = self._symbol(dpr)
        w, h = pixmap.width(), pixmap.height()
        if self._fragments is not None:
            self._fragments.resize(dx.size)
            frags = self._fragments.ndarray()
            frags[:, 0], frags[:, 1] = dx, dy  # centre of each target
            frags[:, 2:6] = (0, 0, w, h)  # the whole pixmap
            frags[:, 6:10] = (1 / dpr, 1 / dpr, 0.0, 1.0)  # scale x/y, rotation, opacity
            p.drawPixmapFragments(*self._fragments.drawargs(), pixmap)
        else:  # pragma: no cover
            hw, hh = 0.5 * w / dpr, 0.5 * h / dpr
            for cx, cy in zip(dx.tolist(), dy.tolist()):
                p.drawPixmap(QPointF(cx - hw, cy - hh), pixmap)

    # -- interaction ----------------------------------------------------------------------
    def points_at(self, pos: QPointF) -> np.ndarray:
        """Indices of the points whose marker covers ``pos`` (item coordinates), nearest
        first."""
        if not self.x.size:
            return np.empty(0, dtype=np.int64)
        px, py = self._pixel_size()
        half = 0.5 * self.opts["size"]
        ddx, ddy = np.abs(self.x - pos.x()), np.abs(self.y - pos.y())
        hit = np.flatnonzero((ddx <= half * px) & (ddy <= half * py))
        if hit.size > 1:
            dist = (ddx[hit] / max(px, 1e-300)) ** 2 + (ddy[hit] / max(py, 1e-300)) ** 2
            hit = hit[np.argsort(dist, kind="stable")]
        return hit

    def mouseClickEvent(self, ev) -> None:  # noqa: N802
        if ev.button() != Qt.MouseButton.LeftButton:
            ev.ignore()
            return
        hit = self.points_at(ev.pos())
        if hit.size:
            ev.accept()
            self.sigClicked.emit(self, QPointF(self.x[hit[0]], self.y[hit[0]]))
        else:
            ev.ignore()

    def hoverEvent(self, ev) -> None:  # noqa: N802
        view = self.getViewBox()
        if view is None or self.tip is None:
            return
        hit = np.empty(0, dtype=np.int64) if ev.exit else self.points_at(ev.pos())
        if hit.size:
            tips = [self.tip(float(self.x[i]), float(self.y[i])) for i in hit[:3]]
            if hit.size > 3:
                tips.append(f"({hit.size - 3} others...)")
            view.setToolTip("\n\n".join(tips))
            self._tip_shown = True
        elif self._tip_shown:  # clear our own tip once, leaving other items' tips alone
            view.setToolTip("")
            self._tip_shown = False


class MarkerSample(ItemSample):
    """A legend entry for a :class:`MarkerSeries`: its symbol (no line)."""

    def paint(self, p: QPainter, *args) -> None:
        if not isinstance(self.item, MarkerSeries) or not self.item.isVisible():
            super().paint(p, *args)
            return
        o = self.item.opts
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        p.translate(10, 10)
        drawSymbol(p, o["symbol"], o["size"], o["pen"], o["brush"])


class ClippedAxis(pg.AxisItem):
    """An axis that clips its painting (tick lines, grid, labels) to its own bounds.

    Qt's raster engine draws translucent cosmetic lines, such as the grid, some 30× slower
    when the painter has no clip, or a clip of several rectangles, than inside one rectangle:
    the x grid's ~40 lines cost ~4 ms of every chart paint, ~0.1 ms clipped. A full repaint of
    a graphics view sets no clip; the chart's view repaints one rectangle at a time so that
    other repaints clip to one.
    """

    def paint(self, p: QPainter, *args) -> None:
        p.setClipRect(self.boundingRect(), Qt.ClipOperation.IntersectClip)
        super().paint(p, *args)


class NameAxis(ClippedAxis):
    """The chart's tensor axis: row ``i`` is ``names[i]``, labelled at every ``step``-th row
    where ``step`` keeps one label per :data:`LABEL_PX` pixels of the visible rows — so
    zooming in names every row (a fixed list named every 50th row of a 96-layer model at any
    zoom). Multiples of ``step``, so labels stay put while the view pans. ``setTicks``
    (the report's every-row chart) still overrides it."""

    LABEL_PX = 18

    def __init__(self, orientation: str):
        super().__init__(orientation)
        self.names: list[str] = []

    def set_names(self, names: list[str]) -> None:
        self.names = names
        self.picture = None  # drawn afresh
        self.update()

    def tickValues(self, minVal, maxVal, size):  # noqa: N802, N803 (pyqtgraph's names)
        minVal, maxVal = sorted((minVal, maxVal))  # (the chart's y axis is inverted)
        lo, hi = max(0, math.ceil(minVal)), min(len(self.names) - 1, math.floor(maxVal))
        if hi < lo or size <= 0:
            return []
        step = max(1, math.ceil((maxVal - minVal) * self.LABEL_PX / size))
        return [(step, list(range(lo + (-lo) % step, hi + 1, step)))]

    def tickStrings(self, values, scale, spacing):  # noqa: N802 (pyqtgraph's name)
        names = self.names
        return [names[int(v)] if 0 <= int(v) < len(names) else "" for v in values]


class ScaleChart(QWidget):
    """Tensors (rows) × log2 RMS, with format bands."""

    picked = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.plot_widget = pg.PlotWidget(
            background="w", axisItems={"left": NameAxis("left"), "bottom": ClippedAxis("bottom")})
        # one rectangle per repaint: a clip made of several (pyqtgraph's default, minimal
        # update) sends the grid's translucent lines down the slow path too (see ClippedAxis)
        self.plot_widget.setViewportUpdateMode(
            QGraphicsView.ViewportUpdateMode.BoundingRectViewportUpdate)
        layout.addWidget(self.plot_widget)
        self.plot = self.plot_widget.getPlotItem()
        self.plot.invertY(True)
        self.plot.showGrid(x=True, y=False, alpha=0.25)
        self.plot.setLabel("bottom", "log₂ RMS", color="k")
        self.plot.setMenuEnabled(False)
        # the wheel and a drag zoom and pan the rows only; x follows the data (zooming both
        # made a smear from -200 to 300 on x)
        self.plot.setMouseEnabled(x=False, y=True)
        for axis in ("left", "bottom"):
            self.plot.getAxis(axis).setTextPen("k")
            self.plot.getAxis(axis).setPen("k")
        # below the axis, in the plot's own layout: inside the view it hid the last rows
        legend = pg.LegendItem(labelTextColor="k", colCount=2, sampleType=MarkerSample)
        self.plot.layout.addItem(legend, 4, 1)
        self.legend = legend
        self.bands: list[pg.LinearRegionItem] = []
        self.names: list[str] = []
        #: forward rows by name, for their formulas (rendered on hover only); None: made from
        #: the rows shown when first asked
        self._formula_rows: dict[str, TensorRow] | None = {}
        self._series: dict[str, MarkerSeries] = {}
        for key, colour, symbol, filled, label in (
            ("pred_fwd", FORWARD_COLOUR, "o", True, "forward (predicted)"),
            ("pred_bwd", BACKWARD_COLOUR, "t1", True, "backward (predicted)"),
            ("meas_fwd", FORWARD_COLOUR, "o", False, "forward (measured)"),
            ("meas_bwd", BACKWARD_COLOUR, "t1", False, "backward (measured)"),
        ):
            brush = pg.mkBrush(colour) if filled else pg.mkBrush(None)
            pen = pg.mkPen(colour, width=1.5)
            item = MarkerSeries(symbol, 9 if filled else 13, pen, brush, label, tip=self._tip)
            item.sigClicked.connect(self._on_click)
            self.plot.addItem(item)
            legend.addItem(item, label)  # not a pyqtgraph data item, so added by hand
            self._series[key] = item
        # a measurement over several seeds: each tensor's range of draws, a line through
        # its hollow marker (connected in pairs: one segment per tensor)
        self._ranges: dict[str, pg.PlotCurveItem] = {}
        for key, colour in (("meas_fwd", FORWARD_COLOUR), ("meas_bwd", BACKWARD_COLOUR)):
            item = pg.PlotCurveItem(connect="pairs", pen=pg.mkPen(colour, width=1.2))
            item.setZValue(-1)  # under the markers
            self.plot.addItem(item)
            self._ranges[key] = item
        self.values: dict[str, dict[str, float]] = {}
        #: "meas_fwd"/"meas_bwd" → name → (lowest, highest) draw over the seeds
        self.ranges: dict[str, dict[str, tuple[float, float]]] = {}
        self.collapse_line: pg.InfiniteLine | None = None
        self.marked: pg.LinearRegionItem | None = None  # the row opened from the overview
        self.marked_name = ""
        self._shown: tuple = ([], None, None)  # set_rows' arguments
        self._collapse: Collapse | None = None
        self._format_names: list[str] = []
        self.exported: ScaleChart | None = None  # the last export_view
        self._fit_rows = False
        self._fit_range: tuple[float, float] = (0.0, 0.0)
        vb = self.plot.getViewBox()
        vb.sigResized.connect(self._refit)
        vb.sigRangeChangedManually.connect(lambda *_: setattr(self, "_fit_rows", False))

    # -- data ----------------------------------------------------------------------------------
    def set_rows(self, predicted: Sequence[TensorRow],
                 measured: Sequence[TensorRow] | None = None,
                 spread: Mapping[tuple[str, str], SeedSpread] | None = None,
                 same_values: bool = False) -> None:
        """Show predictions (and measurements, matched by name and kind; ``spread``: of a
        measurement over several seeds, each tensor's lowest and highest draw, drawn as a
        line through its measured marker). The rows in view stay in view when the tensors
        are the same ones (another dtype, format or parametrization of the same model); a new
        model scrolls back to the first rows.

        ``same_values``: the caller knows ``predicted`` has the names, kinds, RMS and
        formulas of the rows shown (another dtype or format of one predictor pass: only the
        headroom, which the chart does not draw, differs); with the same ``measured`` and
        ``spread`` objects the markers stay as they are and only the rows are swapped in
        (for hover and export): microseconds instead of ~2 ms."""
        shown_measured, shown_spread = self._shown[1], self._shown[2]
        self._shown = (predicted, measured, spread)  # for export_view
        if same_values and measured is shown_measured and spread is shown_spread and \
                self.names:
            self._formula_rows = None  # from the new rows, when a hover first asks
            return
        forward = {r.name: r for r in predicted if r.kind in FORWARD_KINDS}
        same_rows = list(forward) == self.names
        self.names = list(forward)
        index = {name: i for i, name in enumerate(self.names)}
        self._formula_rows = forward  # formulas render on hover only
        values = self.values = {"pred_fwd": {}, "pred_bwd": {}, "meas_fwd": {}, "meas_bwd": {}}
        for prefix, rows in (("pred", predicted), ("meas", measured or [])):
            fwd, bwd = values[f"{prefix}_fwd"], values[f"{prefix}_bwd"]
            for row in rows:
                if row.name in index:
                    (fwd if row.kind in FORWARD_KINDS else bwd)[row.name] = row.rms
        for key, item in self._series.items():
            data = values[key]
            ys = np.fromiter(map(index.__getitem__, data), dtype=np.float64, count=len(data))
            with np.errstate(divide="ignore", invalid="ignore"):
                xs = np.log2(np.fromiter(data.values(), dtype=np.float64, count=len(data)))
            ok = np.isfinite(xs)
            # side by side: forward just above the row's line, backward just below; a
            # point's row is its y rounded, which hover and click map back to the name
            offset = -0.18 if key.endswith("fwd") else 0.18
            item.setData(xs[ok], ys[ok] + offset)
        self._set_ranges(measured or [], spread or {}, index)
        self.plot.enableAutoRange(x=True)
        if same_rows:
            return
        if self.marked is not None:  # another model: its rows are others
            self.plot.removeItem(self.marked)
            self.marked, self.marked_name = None, ""
        self.plot.getAxis("left").set_names(self.names)
        self.plot.setLimits(yMin=-1, yMax=max(len(self.names), 1) + 1, minYRange=2)
        self.plot.setYRange(-0.5, min(len(self.names), self.rows_that_fit()) - 0.5,
                            padding=0)
        self._fit_rows = True  # until the view is moved: refitted when it is resized
        self._fit_range = tuple(self.plot.getViewBox().viewRange()[1])

    def _refit(self, *_args) -> None:
        """A new model's first view, resized (laid out, or the window resized): as many
        rows from the top as can all be named. A view scrolled or zoomed since stays."""
        if not (self._fit_rows and self.names):
            return
        vb = self.plot.getViewBox()
        if not np.allclose(vb.viewRange()[1], self._fit_range):
            self._fit_rows = False
            return
        top = max(-0.5, self._fit_range[0])
        self.plot.setYRange(top, top + min(len(self.names), self.rows_that_fit()), padding=0)
        self._fit_range = tuple(vb.viewRange()[1])

    def export_view(self, title: str) -> QWidget:
        """A chart for a file: every row (each named, :data:`EXPORT_ROW_PX` apart) under a
        title line, or, past :data:`EXPORT_MAX_ROWS` rows, the rows in view with the title
        saying which. Laid out off screen at its size; replaces the previous one."""
        if self.exported is not None:
            self.exported.deleteLater()
        # a window of its own (never on screen) that goes with this chart
        chart = self.exported = ScaleChart(self)
        chart.setWindowFlags(Qt.WindowType.Window)
        chart.set_rows(*self._shown)
        chart.set_formats(self._format_names)
        chart.set_collapse(self._collapse)
        n = max(len(self.names), 1)
        if n <= EXPORT_MAX_ROWS:
            lo, hi = 0, n - 1
        else:
            y0, y1 = self.plot.getViewBox().viewRange()[1]
            lo, hi = max(0, math.ceil(y0)), min(n - 1, math.floor(y1))
            title += f" — rows {lo + 1}–{hi + 1} of {n}, as in the view"
        width = max(self.width(), EXPORT_MIN_WIDTH)
        font = QFont(chart.font())
        font.setPointSize(EXPORT_TITLE_PT)
        lines = wrap_title(title, QFontMetricsF(font), width - 4 * EXPORT_TITLE_PAD_PX)
        # one line of the file's title per row of text: a single line ran past the image's
        # edge (at 900 px the format and "range shaded" were cut off)
        chart.plot.setTitle("<br>".join(map(_html_escape, lines)), color="k",
                            size=f"{EXPORT_TITLE_PT}pt")
        extra = math.ceil(QFontMetricsF(font).lineSpacing() * len(lines)) + EXPORT_TITLE_PAD_PX
        title_px = max(30, extra)
        chart.plot.titleLabel.setMaximumHeight(title_px)
        chart.plot.layout.setRowFixedHeight(0, title_px)
        chart.plot.setYRange(lo - 0.5, hi + 0.5, padding=0)
        chart.setAttribute(Qt.WidgetAttribute.WA_DontShowOnScreen, True)
        chart.resize(width, EXPORT_MARGIN_PX + title_px - 30 + EXPORT_ROW_PX * (hi - lo + 1))
        chart.show()
        for _ in range(3):  # layout, then the axes' sizes
            QCoreApplication.processEvents()
        return chart.plot_widget

    def export_title_lines(self) -> list[str]:
        """The last exported chart's title, line by line (``[]`` before any export)."""
        if self.exported is None:
            return []
        return self.exported.plot.titleLabel.text.split("<br>")

    def rows_that_fit(self) -> int:
        """Rows the view can show with every one named (one per ``NameAxis.LABEL_PX``);
        30 before the chart is laid out."""
        height = self.plot.getViewBox().height()
        return max(10, int(height // NameAxis.LABEL_PX)) if height > 50 else 30

    def show_row(self, name: str) -> None:
        """Scroll the rows so that ``name``'s is in view (centred, at the current zoom, or
        zoomed in until every row shown is named) and mark it with a band."""
        if name not in self.names:
            return
        y = self.names.index(name)
        (y0, y1) = self.plot.getViewBox().viewRange()[1]
        span = min(y1 - y0, self.rows_that_fit())
        self.plot.setYRange(y - span / 2, y + span / 2, padding=0)
        if self.marked is None:
            self.marked = pg.LinearRegionItem(orientation="horizontal", movable=False,
                                              brush=pg.mkBrush(255, 213, 79, 110),
                                              pen=pg.mkPen(None))
            self.marked.setZValue(-8)  # over the format bands, under the markers
            self.plot.addItem(self.marked, ignoreBounds=True)
        self.marked.setRegion((y - 0.5, y + 0.5))
        self.marked_name = name

    def _set_ranges(self, measured: Sequence[TensorRow],
                    spread: Mapping[tuple[str, str], SeedSpread], index: dict[str, int]) -> None:
        ranges = self.ranges = {"meas_fwd": {}, "meas_bwd": {}}
        for row in measured:
            s = spread.get((row.name, row.kind))
            if s is not None and row.name in index and s.low > 0 and s.high > s.low:
                key = "meas_fwd" if row.kind in FORWARD_KINDS else "meas_bwd"
                ranges[key][row.name] = (s.low, s.high)
        for key, item in self._ranges.items():
            data = ranges[key]
            if not data:
                if item.xData is not None and len(item.xData):  # (a redraw without seeds:
                    item.setData([], [])  # nothing to clear most times)
                continue
            offset = -0.18 if key.endswith("fwd") else 0.18
            ys = np.repeat([index[name] + offset for name in data], 2)
            xs = np.log2(np.array(list(data.values()), dtype=np.float64)).ravel()
            ok = np.isfinite(xs).reshape(-1, 2).all(1).repeat(2)
            item.setData(xs[ok], ys[ok])

    def set_collapse(self, collapse: Collapse | None) -> None:
        """A dashed line just above the collapsing norm's row, labelled: from there down the
        chart the stack's tokens differ by less than its dtype resolves
        (:mod:`unitscale_core.scaling.collapse`). ``None`` (or a norm not on the chart): no
        line."""
        if self.collapse_line is not None:
            self.plot.removeItem(self.collapse_line)
            self.collapse_line = None
        self._collapse = collapse
        if collapse is None or collapse.norm not in self.names:
            return
        label = f"tokens' own parts below {collapse.dtype} from here on ↓"
        line = pg.InfiniteLine(
            pos=self.names.index(collapse.norm) - 0.5, angle=0, movable=False,
            pen=pg.mkPen(COLLAPSE_COLOUR, width=1.5, style=Qt.PenStyle.DashLine), label=label,
            labelOpts={"position": 0.02, "color": COLLAPSE_COLOUR, "anchors": [(0, 1), (0, 1)],
                       "fill": pg.mkBrush(255, 255, 255, 200)})
        line.setToolTip(collapse.describe())
        line.setZValue(-5)  # under the markers, over the format bands
        self.plot.addItem(line, ignoreBounds=True)
        self.collapse_line = line

    def set_formats(self, names: Sequence[str]) -> None:
        """Draw each format's normal range (solid) and subnormal range (faint) as x bands.

        The bands already there are moved and recoloured (a format change in the panel):
        removing regions and adding new ones cost ~2 ms and a second paint."""
        self._format_names = list(names)
        specs = []
        for name in names:
            fmt = FORMATS[name]
            tip = (f"{name}: normal 2^{math.log2(fmt.min_normal):.0f}…{fmt.max_normal:g}, "
                   f"subnormal down to 2^{math.log2(fmt.min_subnormal):.0f}")
            for lo, hi, alpha in ((math.log2(fmt.min_subnormal), math.log2(fmt.min_normal), 18),
                                  (math.log2(fmt.min_normal), math.log2(fmt.max_normal), 40)):
                colour = QColor(BAND_COLOURS.get(name, "#888888"))
                colour.setAlpha(alpha)
                specs.append((lo, hi, colour, tip))
        for band in self.bands[len(specs):]:
            self.plot.removeItem(band)
        del self.bands[len(specs):]
        moved = False
        for i, (lo, hi, colour, tip) in enumerate(specs):
            if i < len(self.bands):
                moved = True
                band = self.bands[i]  # set up as the constructor below does
                band.setRegion((lo, hi))
                band.setBrush(colour)
                hover = QColor(colour)
                hover.setAlpha(min(colour.alpha() * 2, 255))
                band.setHoverBrush(hover)
                band.informViewBoundsChanged()  # the x range follows the bands too
                band.update()
            else:
                band = pg.LinearRegionItem(values=(lo, hi), movable=False, brush=colour,
                                           pen=pg.mkPen(None))
                band.setZValue(-10)
                self.plot.addItem(band)
                self.bands.append(band)
            band.setToolTip(tip)
        if moved:
            self._settle_view()

    def _settle_view(self) -> None:
        """Bring the view's range, transform and the bands' bounds up to date now. Left to
        the paint, the new range changes the transform there, which changes the items'
        bounds, which asks for a second paint of the whole chart (~3 ms more)."""
        vb = self.plot.getViewBox()
        if vb.autoRangeEnabled()[0]:
            vb.updateAutoRange()
        vb.updateMatrix()
        if vb.autoRangeEnabled()[0]:
            vb.updateAutoRange()  # (the items' bounds in pixels follow the transform)
        for band in self.bands:
            band.boundingRect()
            for line in band.lines:
                line.boundingRect()

    # -- interaction -------------------------------------------------------------------------
    def describe(self, name: str) -> str:
        """Hover text: the tensor, its predicted/measured forward and backward RMS, formula."""
        parts = [name]
        for key, label in (("pred_fwd", "forward"), ("pred_bwd", "backward"),
                           ("meas_fwd", "measured forward"), ("meas_bwd", "measured backward")):
            if name in self.values.get(key, {}):
                value = self.values[key][name]
                parts.append(f"{label}: {_value_text(value)}")
                low_high = self.ranges.get(key, {}).get(name)
                if low_high is not None:
                    parts.append(f"  draws over the seeds: {_value_text(low_high[0])} … "
                                 f"{_value_text(low_high[1])}")
        formula = self.formula(name)
        if formula:
            parts.append(formula)
        return "\n".join(parts)

    def formula(self, name: str) -> str:
        """How the predicted forward RMS of ``name`` was obtained ("" if unknown)."""
        if self._formula_rows is None:
            self._formula_rows = {r.name: r for r in self._shown[0] if r.kind in FORWARD_KINDS}
        row = self._formula_rows.get(name)
        return getattr(row, "formula", "") if row is not None else ""

    def _name(self, y: float) -> str:
        """The tensor drawn at height ``y`` (forward and backward sit ±0.18 off its row)."""
        return self.names[min(max(round(y), 0), len(self.names) - 1)]

    def _tip(self, x: float, y: float) -> str:
        return self.describe(self._name(y))

    def _on_click(self, _item, pos: QPointF) -> None:
        self.picked.emit(self._name(pos.y()))


def wrap_title(title: str, metrics: QFontMetricsF, width: float) -> list[str]:
    """``title`` in lines at most ``width`` wide (as ``metrics`` measures them), broken at
    its " · " separators, then at ", " inside a part still too wide; a single word wider
    than ``width`` stays whole on its line."""
    def fits(text: str) -> bool:
        return metrics.horizontalAdvance(text) <= width

    pieces: list[str] = []
    for i, part in enumerate(title.split(" · ")):
        sep = " · " if i else ""
        if fits(part):
            pieces.append(sep + part)
            continue
        for j, word in enumerate(part.split(", ")):
            pieces.append((sep if j == 0 else ", ") + word)
    lines: list[str] = []
    for piece in pieces:
        if not lines:
            lines.append(piece)
        elif fits(lines[-1] + piece):
            lines[-1] += piece
        else:  # the separator ends the line it follows; the next line starts on the word
            sep = " · " if piece.startswith(" · ") else ", "
            lines[-1] += sep.rstrip()
            lines.append(piece[len(sep):])
    return lines or [""]


def _html_escape(text: str) -> str:
    """pyqtgraph's title is rich text: ``<``, ``>`` and ``&`` in a name are shown as such."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
