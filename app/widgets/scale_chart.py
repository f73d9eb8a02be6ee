"""A log2 scale chart: one row per tensor, forward and backward scale side by side.

Like ``unit_scaling.analysis.plot`` (tensors down the y axis in op-graph order, log2 RMS along
x), but live: number-format ranges are drawn as bands behind the points, hovering a point names
the tensor, its value and its formula, and clicking one emits ``picked(name)``.

Markers: filled = predicted, hollow = measured; blue = forward (activation or weight), red =
backward (its gradient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QVBoxLayout, QWidget

from unitscale_core.scaling.formats import FORMATS
from unitscale_core.tensors import TensorRow

FORWARD_COLOUR = "#1f5fbf"
BACKWARD_COLOUR = "#c62828"
BAND_COLOURS = {"fp8_e4m3": "#2e7d32", "fp8_e5m2": "#6a1b9a", "fp16": "#ef6c00",
                "bf16": "#00838f", "fp32": "#546e7a"}
MAX_LABELS = 40
FORWARD_KINDS = {"activation": "grad_activation", "weight": "grad_weight"}


def _log2(x: float) -> float:
    return math.log2(x) if x > 0 and math.isfinite(x) else math.nan


class ScaleChart(QWidget):
    """Tensors (rows) × log2 RMS, with format bands."""

    picked = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.plot_widget = pg.PlotWidget(background="w")
        layout.addWidget(self.plot_widget)
        self.plot = self.plot_widget.getPlotItem()
        self.plot.invertY(True)
        self.plot.showGrid(x=True, y=False, alpha=0.25)
        self.plot.setLabel("bottom", "log₂ RMS", color="k")
        self.plot.setMenuEnabled(False)
        for axis in ("left", "bottom"):
            self.plot.getAxis(axis).setTextPen("k")
            self.plot.getAxis(axis).setPen("k")
        legend = self.plot.addLegend(offset=(10, -10), labelTextColor="k", colCount=2)
        legend.setBrush(pg.mkBrush(255, 255, 255, 220))
        self.bands: list[pg.LinearRegionItem] = []
        self.names: list[str] = []
        self._formula_rows: dict[str, TensorRow] = {}  # formulas render on hover only
        self._series: dict[str, pg.ScatterPlotItem] = {}
        for key, colour, symbol, filled, label in (
            ("pred_fwd", FORWARD_COLOUR, "o", True, "forward (predicted)"),
            ("pred_bwd", BACKWARD_COLOUR, "t1", True, "backward (predicted)"),
            ("meas_fwd", FORWARD_COLOUR, "o", False, "forward (measured)"),
            ("meas_bwd", BACKWARD_COLOUR, "t1", False, "backward (measured)"),
        ):
            brush = pg.mkBrush(colour) if filled else pg.mkBrush(None)
            pen = pg.mkPen(colour, width=1.5)
            item = pg.ScatterPlotItem(size=9 if filled else 13, symbol=symbol, brush=brush,
                                      pen=pen, hoverable=True, name=label, tip=self._tip)
            item.sigClicked.connect(self._on_click)
            self.plot.addItem(item)
            self._series[key] = item
        self.values: dict[str, dict[str, float]] = {}

    # -- data ----------------------------------------------------------------------------------
    def set_rows(self, predicted: Sequence[TensorRow],
                 measured: Sequence[TensorRow] | None = None) -> None:
        """Show predictions (and measurements, matched by name and kind)."""
        self.names = []
        index: dict[str, int] = {}
        for row in predicted:
            if row.kind in FORWARD_KINDS and row.name not in index:
                index[row.name] = len(self.names)
                self.names.append(row.name)
        self._formula_rows = {r.name: r for r in predicted if r.kind in FORWARD_KINDS}
        self.values = {"pred_fwd": {}, "pred_bwd": {}, "meas_fwd": {}, "meas_bwd": {}}
        for prefix, rows in (("pred", predicted), ("meas", measured or [])):
            for row in rows:
                if row.name not in index:
                    continue
                side = "fwd" if row.kind in FORWARD_KINDS else "bwd"
                self.values[f"{prefix}_{side}"][row.name] = row.rms
        for key, item in self._series.items():
            data = self.values[key]
            rows = np.fromiter((index[n] for n in data), dtype=np.int64, count=len(data))
            rms = np.fromiter(data.values(), dtype=np.float64, count=len(data))
            with np.errstate(divide="ignore", invalid="ignore"):
                xs = np.log2(rms)
            ok = np.isfinite(xs)
            # side by side: forward just above the row's line, backward just below
            offset = -0.18 if key.endswith("fwd") else 0.18
            # no per-point data (pyqtgraph stores it point by point): a point's row is its y
            # rounded, which hover and click map back to the name
            item.setData(x=xs[ok], y=rows[ok] + offset)
        self._label_rows()
        self.plot.setLimits(yMin=-1, yMax=max(len(self.names), 1) + 1)
        self.plot.enableAutoRange(x=True)
        self.plot.setYRange(-0.5, min(len(self.names), 60) - 0.5, padding=0)

    def _label_rows(self) -> None:
        step = max(1, math.ceil(len(self.names) / MAX_LABELS))
        ticks = [(i, name) for i, name in enumerate(self.names) if i % step == 0]
        self.plot.getAxis("left").setTicks([ticks, []])

    def set_formats(self, names: Sequence[str]) -> None:
        """Draw each format's normal range (solid) and subnormal range (faint) as x bands."""
        for band in self.bands:
            self.plot.removeItem(band)
        self.bands = []
        for name in names:
            fmt = FORMATS[name]
            colour = QColor(BAND_COLOURS.get(name, "#888888"))
            for lo, hi, alpha in ((math.log2(fmt.min_subnormal), math.log2(fmt.min_normal), 18),
                                  (math.log2(fmt.min_normal), math.log2(fmt.max_normal), 40)):
                colour.setAlpha(alpha)
                band = pg.LinearRegionItem(values=(lo, hi), movable=False, brush=colour,
                                           pen=pg.mkPen(None))
                band.setZValue(-10)
                band.setToolTip(f"{name}: normal 2^{math.log2(fmt.min_normal):.0f}…"
                                f"{fmt.max_normal:g}, subnormal down to "
                                f"2^{math.log2(fmt.min_subnormal):.0f}")
                self.plot.addItem(band)
                self.bands.append(band)

    # -- interaction -------------------------------------------------------------------------
    def describe(self, name: str) -> str:
        """Hover text: the tensor, its predicted/measured forward and backward RMS, formula."""
        parts = [name]
        for key, label in (("pred_fwd", "forward"), ("pred_bwd", "backward"),
                           ("meas_fwd", "measured forward"), ("meas_bwd", "measured backward")):
            if name in self.values.get(key, {}):
                value = self.values[key][name]
                parts.append(f"{label}: {value:.4g} (log₂ {_log2(value):.2f})")
        formula = self.formula(name)
        if formula:
            parts.append(formula)
        return "\n".join(parts)

    def formula(self, name: str) -> str:
        """How the predicted forward RMS of ``name`` was obtained ("" if unknown)."""
        row = self._formula_rows.get(name)
        return getattr(row, "formula", "") if row is not None else ""

    def _name(self, y: float) -> str:
        """The tensor drawn at height ``y`` (forward and backward sit ±0.18 off its row)."""
        return self.names[min(max(round(y), 0), len(self.names) - 1)]

    def _tip(self, x: float, y: float, data) -> str:
        return self.describe(self._name(y))

    def _on_click(self, _item, points, _event=None) -> None:
        if len(points):
            self.picked.emit(self._name(points[0].pos().y()))
