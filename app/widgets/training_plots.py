"""Plots of training runs: loss curves, underflow fractions over steps, PNG export of a plot.

Used by the training panel and by ``python -m app.training_figure`` (the README's figure), so
the figure is drawn by the same code as the live panel. Non-finite values (a diverged run's
loss) are drawn as gaps, never as lines to ±inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QWidget

from ..export import png_bytes, write_bytes

#: One colour per run (the panel's three runs use the first three).
RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
#: How each run's loss curve is drawn, so that runs with equal losses stay visible: A thin
#: and on top, B dashed, C wide and translucent underneath (width, alpha, z, pen style).
RUN_STYLES = ((1.6, 255, 3.0, Qt.PenStyle.SolidLine), (2.2, 255, 2.0, Qt.PenStyle.DashLine),
              (5.0, 110, 1.0, Qt.PenStyle.SolidLine))
#: One colour per tensor kind in the underflow plot.
KIND_COLOURS = {"activation": "#1f77b4", "weight": "#7f7f7f", "grad_activation": "#d62728",
                "grad_weight": "#ff7f0e"}
KIND_LABELS = {"activation": "activations", "weight": "weights",
               "grad_activation": "activation grads", "grad_weight": "weight grads"}


#: What the loss plot says while it has no curve.
#: (short lines: the plot's column is ~400 px wide at 1366×768)
EMPTY_LOSS_TEXT = "Press Start to train.\nEach run's loss per step\n(nats / token) appears here."


def _finite(values: Sequence[float]) -> np.ndarray:
    """float64 array with ±inf turned into NaN (pyqtgraph's connect="finite" skips NaN)."""
    y = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(y), y, np.nan)


def _style_plot(plot: pg.PlotItem) -> None:
    for axis in ("left", "bottom"):
        plot.getAxis(axis).setTextPen("k")
        plot.getAxis(axis).setPen("k")
    plot.showGrid(x=True, y=True, alpha=0.25)
    plot.setMenuEnabled(False)


class _CurvePlot(pg.PlotWidget):
    """A white plot with a legend and named curves that are replaced in place."""

    def __init__(self, title: str, ylabel: str, parent: QWidget | None = None,
                 legend_columns: int = 2):
        super().__init__(parent, background="w")
        self.plot_item: pg.PlotItem = self.getPlotItem()
        _style_plot(self.plot_item)
        self.plot_item.setTitle(title, color="k", size="10pt")
        self.plot_item.setLabel("bottom", "step", color="k")
        self.plot_item.setLabel("left", ylabel, color="k")
        # The legend sits below the axis, in the plot's own layout, never over the curves.
        self.legend = pg.LegendItem(labelTextColor="k", labelTextSize="8pt", verSpacing=-6,
                                    colCount=legend_columns)
        self.plot_item.layout.addItem(self.legend, 4, 1)
        self.plot_item.legend = self.legend  # named curves add their entries to it
        self.curves: dict[str, pg.PlotDataItem] = {}
        self._pens: dict[str, tuple] = {}

    def set_curve(self, key: str, label: str, x: Sequence[float], y: Sequence[float],
                  colour: str, dashed: bool = False, width: float = 2.0, alpha: int = 255,
                  z: float = 0.0, style: Qt.PenStyle | None = None) -> pg.PlotDataItem:
        """Create or update the curve ``key`` (its legend entry is ``label``); ``z`` orders
        the curves (higher on top), ``alpha`` (0–255) lets a curve beneath show through."""
        if style is None:
            style = Qt.PenStyle.DashLine if dashed else Qt.PenStyle.SolidLine
        curve = self.curves.get(key)
        if curve is not None and curve.name() != label:
            self.remove_curve(key)
            curve = None
        look = (colour, width, alpha, style)
        if curve is None or self._pens.get(key) != look:
            pen = pg.mkPen(pg.mkColor(colour), width=width, style=style)
            color = pen.color()
            color.setAlpha(alpha)
            pen.setColor(color)
            if curve is None:
                curve = self.plot_item.plot(name=label, pen=pen, connect="finite")
                self.curves[key] = curve
            else:
                curve.setPen(pen)
            self._pens[key] = look
        curve.setZValue(z)
        curve.setData(np.asarray(x, dtype=np.float64), _finite(y), connect="finite")
        return curve

    def remove_curve(self, key: str) -> None:
        self._pens.pop(key, None)
        curve = self.curves.pop(key, None)
        if curve is not None:
            self.plot_item.removeItem(curve)
            self.legend.removeItem(curve)

    def clear_curves(self) -> None:
        for key in list(self.curves):
            self.remove_curve(key)

    def curve_data(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of a curve as drawn (NaN where the value was not finite)."""
        x, y = self.curves[key].getData()
        return (np.array([]), np.array([])) if x is None else (np.asarray(x), np.asarray(y))

    def export_png(self, path: str | Path, width: int = 1200) -> None:
        """The plot (title, axes, legend) as a PNG ``width`` pixels wide, written atomically."""
        export_scene_png(self.plot_item, path, width)


class LossPlot(_CurvePlot):
    """Training loss (cross-entropy, nats per predicted token) per step, one curve per run."""

    def __init__(self, parent: QWidget | None = None, title: str = "training loss"):
        super().__init__(title, "loss (nats / token)", parent, legend_columns=1)
        self.setToolTip("Cross-entropy loss of each training step's batch, in nats per "
                        "predicted token (ln V at a uniform guess). Gaps: the loss was not "
                        "finite (overflow).")
        # Empty (before Start, after a clear): a sentence instead of a 0–1 frame that means
        # nothing; the axes come back, autoscaled, with the first curve.
        self.empty_text = pg.TextItem(EMPTY_LOSS_TEXT, color="#555555", anchor=(0.5, 0.5))
        self.empty_text.setZValue(10)
        self._empty: bool | None = None
        self._show_empty(True)

    def is_empty(self) -> bool:
        """True while no curve is drawn (the empty-state sentence shows, the axes do not)."""
        return bool(self._empty)

    def _show_empty(self, empty: bool) -> None:
        if empty == self._empty:
            return
        self._empty = empty
        for axis in ("left", "bottom"):
            self.plot_item.showAxis(axis, not empty)
        if empty:
            self.plot_item.addItem(self.empty_text, ignoreBounds=True)
            self.empty_text.setPos(0.5, 0.5)
            self.plot_item.setRange(xRange=(0, 1), yRange=(0, 1), padding=0)
        else:
            self.plot_item.removeItem(self.empty_text)
            self.plot_item.enableAutoRange()

    def set_curve(self, *args, **kwargs) -> pg.PlotDataItem:
        curve = super().set_curve(*args, **kwargs)
        self._show_empty(False)
        return curve

    def remove_curve(self, key: str) -> None:
        super().remove_curve(key)
        if not self.curves:
            self._show_empty(True)

    def set_log_y(self, on: bool) -> None:
        """Logarithmic loss axis, labelled with plain numbers (1, 2, 3, 5, 10, 20, …)."""
        self.plot_item.setLogMode(y=on)
        axis = self.plot_item.getAxis("left")
        if not on:
            axis.setTicks(None)
            return
        values = [m * 10.0**e for e in range(-2, 4) for m in (1, 1.5, 2, 3, 4, 5, 6, 8)]
        major = [(math.log10(v), f"{v:g}") for v in values]
        axis.setTicks([major, []])


class UnderflowPlot(_CurvePlot):
    """Per tensor kind: the fraction of nonzero values that a format would round to zero."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__("underflow", "values lost to underflow (%)", parent)
        self.plot_item.setYRange(0, 100, padding=0.02)
        self.setToolTip("Per tensor kind, on logged steps: the percentage of nonzero values "
                        "with |x| below half the format's smallest subnormal, i.e. values that "
                        "round to zero in that format (E4M3: 2⁻⁹, E5M2: 2⁻¹⁶, FP16: 2⁻²⁴).")


def export_scene_png(item: pg.GraphicsObject, path: str | Path, width: int = 1200) -> None:
    """Render ``item`` (a PlotItem or a layout) with pyqtgraph's ImageExporter and write the
    PNG atomically (a failed write leaves any previous file in place)."""
    from pyqtgraph.exporters import ImageExporter

    exporter = ImageExporter(item)
    exporter.parameters()["width"] = int(width)
    exporter.parameters()["antialias"] = True
    write_bytes(path, png_bytes(exporter.export(toBytes=True)))
