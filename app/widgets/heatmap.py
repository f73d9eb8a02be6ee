"""A labelled heatmap: pyqtgraph ImageItem + ColorBarItem, hover read-out, PNG/SVG/NPY export.

Rows are drawn top to bottom (row 0 at the top, like a matrix), columns left to right. Large
matrices are shown as given: pass what fits on screen; ``setImage(..., autoLevels=False)``
keeps updates fast (pyqtgraph's own advice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from ..export import Figure, save_npy, save_png, svg_bytes, write_bytes

pg.setConfigOptions(imageAxisOrder="row-major", antialias=False)

Formatter = Callable[[int, int, float], str]


def _default_format(row: int, col: int, value: float) -> str:
    return f"row {row}, column {col}: {value:.4g}"


class Heatmap(QWidget):
    """A matrix as a coloured image with a colour bar, axis titles and a hover read-out.

    ``hovered(row, col)`` is emitted as the mouse moves over a cell; the formatted text is
    shown under the plot and as the widget's tooltip.
    """

    hovered = Signal(int, int)

    def __init__(self, title: str = "", cmap: str = "viridis", parent: QWidget | None = None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.view = pg.GraphicsLayoutWidget()
        self.view.setBackground("w")
        self.plot = self.view.addPlot(title=title)
        self.plot.invertY(True)
        self.plot.setAspectLocked(False)
        self.plot.setMenuEnabled(False)
        self.plot.hideButtons()
        self.image = pg.ImageItem()
        self.plot.addItem(self.image)
        self.colorbar = pg.ColorBarItem(colorMap=cmap, interactive=False, width=14)
        self.colorbar.setImageItem(self.image, insert_in=self.plot)
        for axis in ("left", "bottom"):
            self.plot.getAxis(axis).setTextPen("k")
            self.plot.getAxis(axis).setPen("k")
        self.colorbar.axis.setTextPen("k")  # readable on white, in the panel and in exports
        self.readout = QLabel(" ", objectName="heatmapReadout")
        layout.addWidget(self.view, 1)
        layout.addWidget(self.readout)
        self.data = np.zeros((1, 1), dtype=np.float32)
        self._row_coords: np.ndarray | None = None
        self._col_coords: np.ndarray | None = None
        self.formatter: Formatter = _default_format
        self.plot.scene().sigMouseMoved.connect(self._on_mouse)

    def set_matrix(self, data: np.ndarray, *, title: str | None = None,
                   xlabel: str = "", ylabel: str = "", levels: tuple[float, float] | None = None,
                   row_coords: Sequence[int] | None = None,
                   col_coords: Sequence[int] | None = None,
                   formatter: Formatter | None = None, symmetric: bool = False,
                   robust: bool = False) -> None:
        """Show ``data`` (2-D). ``row_coords``/``col_coords`` give the original index of each
        shown row/column when the matrix was subsampled; hover reports those. Levels default
        to the data's range (``robust``: its 0.5–99.5 percentiles; ``symmetric``: ±max)."""
        data = np.asarray(data, dtype=np.float32)
        if data.ndim != 2:
            raise ValueError(f"heatmap data must be 2-D, got shape {data.shape}")
        self.data = data
        self._row_coords = None if row_coords is None else np.asarray(row_coords)
        self._col_coords = None if col_coords is None else np.asarray(col_coords)
        finite = data[np.isfinite(data)]
        if levels is None:
            if not finite.size:
                lo, hi = 0.0, 1.0
            elif robust:
                lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
            else:
                lo, hi = float(finite.min()), float(finite.max())
            if symmetric:
                m = max(abs(lo), abs(hi))
                lo, hi = -m, m
            if hi <= lo:
                hi = lo + 1.0
            levels = (lo, hi)
        self.image.setImage(data, autoLevels=False, levels=levels)
        self.colorbar.setLevels(levels)
        rows, cols = data.shape
        # Axes in original coordinates when subsampled: stretch the image over that range.
        x1 = float(self._col_coords[-1] + 1) if self._col_coords is not None else float(cols)
        y1 = float(self._row_coords[-1] + 1) if self._row_coords is not None else float(rows)
        self.image.setRect(0.0, 0.0, x1, y1)
        self.plot.setLimits(xMin=0, xMax=x1, yMin=0, yMax=y1)
        self.plot.setRange(xRange=(0, x1), yRange=(0, y1), padding=0)
        if title is not None:
            self.plot.setTitle(title, color="k")
        self.plot.setLabel("bottom", xlabel, color="k")
        self.plot.setLabel("left", ylabel, color="k")
        if formatter is not None:
            self.formatter = formatter

    def set_colormap(self, name: str) -> None:
        self.colorbar.setColorMap(pg.colormap.get(name))

    def cell_at(self, x: float, y: float) -> tuple[int, int] | None:
        """(row, col) of the shown matrix under plot coordinates (x, y), or None outside."""
        rows, cols = self.data.shape
        rect = self.image.boundingRect()
        x1 = self._col_coords[-1] + 1 if self._col_coords is not None else cols
        y1 = self._row_coords[-1] + 1 if self._row_coords is not None else rows
        if not (0 <= x < x1 and 0 <= y < y1) or rect.width() == 0:
            return None
        return min(int(y / y1 * rows), rows - 1), min(int(x / x1 * cols), cols - 1)

    def describe(self, row: int, col: int) -> str:
        """The hover text for a shown cell, in original coordinates."""
        r = int(self._row_coords[row]) if self._row_coords is not None else row
        c = int(self._col_coords[col]) if self._col_coords is not None else col
        return self.formatter(r, c, float(self.data[row, col]))

    def _on_mouse(self, pos) -> None:
        if not self.plot.sceneBoundingRect().contains(pos):
            return
        point = self.plot.vb.mapSceneToView(pos)
        cell = self.cell_at(point.x(), point.y())
        if cell is None:
            self.readout.setText(" ")
            return
        text = self.describe(*cell)
        self.readout.setText(text)
        self.view.setToolTip(text)
        self.hovered.emit(*cell)

    # -- export --------------------------------------------------------------------------------
    def figure(self, key: str, label: str,
               data: Callable[[], np.ndarray] | None = None) -> Figure:
        """This heatmap as an export item: PNG (plot and colour bar as on screen), SVG,
        and ``data()`` (default: the shown matrix) as NPY."""
        return Figure(key, label, lambda: self.view,
                      data=data or (lambda: self.data))

    def export_png(self, path: str | Path, scale: float = 2.0) -> None:
        save_png(self.view, path, scale)

    def export_svg(self, path: str | Path) -> None:
        write_bytes(path, svg_bytes(self.view))

    def export_npy(self, path: str | Path) -> None:
        """The shown matrix, float32, loadable with ``np.load(path)`` (no pickle)."""
        save_npy(self.data, path)
