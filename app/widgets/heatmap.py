"""A labelled heatmap: pyqtgraph ImageItem + ColorBarItem, hover read-out, PNG/SVG/NPY export.

Rows are drawn top to bottom (row 0 at the top, like a matrix), columns left to right. Large
matrices are shown as given: pass what fits on screen; ``setImage(..., autoLevels=False)``
keeps updates fast (pyqtgraph's own advice).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyqtgraph as pg
import shiboken6
from PySide6.QtCore import QEvent, QObject, QPointF, Qt, QTimer, Signal
from PySide6.QtGui import QFont, QFontMetrics
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from ..export import Figure, save_npy, save_png, svg_bytes, write_bytes

pg.setConfigOptions(imageAxisOrder="row-major", antialias=False)

Formatter = Callable[[int, int, float], str]


#: Narrowest the coloured map itself may be squeezed to (pixels) before the widget refuses
#: to shrink: below the axes, colour bar and title that a scene needs, QGraphicsView shows the
#: scene's left part and cuts the rest (the last key column, the colour bar, the title's end).
MIN_MAP_WIDTH = 48


def _default_format(row: int, col: int, value: float) -> str:
    return f"row {row}, column {col}: {value:.4g}"


def fit_label(label: pg.LabelItem, parts: Sequence[str], width: float, size: str = "10pt",
              color: str = "k") -> None:
    """Show ``parts`` in ``label`` within ``width`` pixels: joined by " · " on one line when
    that fits, else one part per line, each elided ("…") to the width. A LabelItem's minimum
    width is its text's, so a title wider than its plot widens the whole scene past its view."""
    font = QFont(label.item.font())
    font.setPointSizeF(float(size.removesuffix("pt")))
    metrics = QFontMetrics(font)
    width = max(int(width), 24)
    parts = [p for p in parts if p]
    one = " · ".join(parts)
    lines = [one]
    for _ in range(4):  # the HTML item may lay the text out a few pixels wider than metrics
        text = "<br>".join(html.escape(line) for line in lines)
        if label.text != text:
            label.setText(text, color=color, size=size)
        if label.itemRect().width() <= width or not one:
            return
        if len(lines) == 1 and len(parts) > 1 and \
                max(metrics.horizontalAdvance(p) for p in parts) < metrics.horizontalAdvance(one):
            lines = list(parts)
        else:
            width = min(width, int(label.itemRect().width())) - 6
            lines = [metrics.elidedText(p, Qt.TextElideMode.ElideRight, max(width, 24))
                     for p in (parts if len(lines) > 1 else [one])]


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
        self._mouse: QPointF | None = None  # the last hovered scene position
        self._title_parts: list[str] | None = None  # a fitted title (set_title)
        self._title_size = "10pt"
        self._refit_pending = False
        self.view.installEventFilter(self)
        self.view.ci.geometryChanged.connect(self._schedule_refit)  # (axes grow later)

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
        self._refresh_readout()
        self.colorbar.setLevels(levels)
        rows, cols = data.shape
        # Axes in original coordinates when subsampled: stretch the image over that range.
        x1 = float(self._col_coords[-1] + 1) if self._col_coords is not None else float(cols)
        y1 = float(self._row_coords[-1] + 1) if self._row_coords is not None else float(rows)
        self.image.setRect(0.0, 0.0, x1, y1)
        self.plot.setLimits(xMin=0, xMax=x1, yMin=0, yMax=y1)
        self.plot.setRange(xRange=(0, x1), yRange=(0, y1), padding=0)
        if title is not None:
            self.set_title([title] if title else [])
        self.plot.setLabel("bottom", xlabel, color="k")
        self.plot.setLabel("left", ylabel, color="k")
        if formatter is not None:
            self.formatter = formatter
        self._refresh_readout()
        self.refit()

    def set_title(self, parts: Sequence[str], size: str = "10pt") -> None:
        """A title that always fits the plot: ``parts`` on one line joined by " · ", or one
        per line, elided, when the widget is narrow (:func:`fit_label`); refitted on resize."""
        self._title_parts, self._title_size = list(parts), size
        self.refit()

    def title_text(self) -> str:
        """The title as drawn (lines joined by newlines), "" without one."""
        text = self.plot.titleLabel.text if self.plot.titleLabel.isVisible() else ""
        return html.unescape((text or "").replace("<br>", "\n"))

    def refit(self) -> None:
        """Keep the whole scene inside the view: the title fitted to the width the map
        column has, and the widget no narrower than its axes, colour bar and a
        ``MIN_MAP_WIDTH`` map need (a splitter or dock then stops there instead of cutting
        off the right-hand side)."""
        self._refit_pending = False
        if getattr(self.view, "closed", False) or not shiboken6.isValid(self.view.ci):
            return  # closed: GraphicsView.close clears the scene, then resizes the view
        title = self.plot.titleLabel
        layout_min = self.view.ci.effectiveSizeHint(Qt.SizeHint.MinimumSize).width()
        title_min = title.minimumWidth() if title.isVisible() else 0.0
        rest = max(layout_min - title_min, 0.0)  # the title binds only the map's column
        if self._title_parts is not None:
            if self._title_parts:
                if not title.isVisible():
                    self.plot.setTitle("", color="k", size=self._title_size)
                points = float(self._title_size.removesuffix("pt"))
                for size in (points, points - 1, points - 2):  # smaller before eliding
                    fit_label(title, self._title_parts, self.view.width() - rest - 6,
                              f"{size:g}pt")
                    if "…" not in title.text:
                        break
                height = math.ceil(title.itemRect().height())  # (setTitle fixes 30 px)
                if title.maximumHeight() != height:
                    title.setMaximumHeight(height)
                    self.plot.layout.setRowFixedHeight(0, height)
            elif title.isVisible():
                self.plot.setTitle(None)
        wanted = math.ceil(rest + MIN_MAP_WIDTH)
        if self.view.minimumWidth() != wanted:
            self.view.setMinimumWidth(wanted)

    def _schedule_refit(self) -> None:
        if not self._refit_pending:
            self._refit_pending = True
            QTimer.singleShot(0, self.refit)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if watched is self.view and event.type() == QEvent.Type.Resize:
            self.refit()
        return False

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

    def _refresh_readout(self) -> None:
        """New data: the read-out describes the cell under the mouse now, or is cleared (it
        must never describe the previous map, e.g. a head after switching to rollout)."""
        if self._mouse is not None and self.view.underMouse():
            self._on_mouse(self._mouse)
        else:
            self._mouse = None
            self.readout.setText(" ")
            self.view.setToolTip("")

    def _on_mouse(self, pos) -> None:
        self._mouse = QPointF(pos)
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
