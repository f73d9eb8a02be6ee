"""A layers × heads grid of colour-mapped maps drawn as one texture atlas.

The attention model view used to draw every thumbnail as a pyqtgraph ``ImageItem`` in a
``ViewBox`` of its own: 72 items for a 6 × 12 model, each converting its map to a QImage
in Python and painted on its own (24 ms per update and repaint of 128² maps, issue 22).
:class:`AtlasGrid` is one item: all maps are colour-mapped at once in numpy (one lookup
table, one level pair per map) into one ARGB image with gaps between the cells, which is
drawn with one ``drawImage``; the layer and head labels and the selection frames are drawn
over it by the same item.

The atlas is built at the device pixels the cells cover, each pixel taking its map's value
at the pixel's centre (nearest neighbour). That is what Qt's unsmoothed ``drawImage`` of a
map scaled into its cell shows, so the picture is the per-cell one, while a 128² map in a
70-pixel cell costs 70² colour look-ups, not 128² look-ups and a rescale. A painter of
another scale (an export at 2× the pixels, pyqtgraph's image exporter) gets an atlas built
for its own pixels, so exported cells stay sharp. The colours follow pyqtgraph's
``ImageItem`` exactly: index = clip(⌊(v − lo) · 256 / (hi − lo)⌋, 0, 255) into the
colour map's 256-entry table, computed in float32 as pyqtgraph does; NaN cells are masked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QFont, QFontMetrics, QImage, QPainter, QPen, QPicture
from PySide6.QtWidgets import QSizePolicy

#: Colours in the lookup table (pyqtgraph's ``ImageItem.setColorMap`` uses 256).
LUT_POINTS = 256
MASKED = LUT_POINTS  # the table's entry for a masked (NaN) cell
GAP = 2  # pixels between cells (the old grid's layout spacing)
MARGIN = 2  # around the cells, so a selection frame on an outer cell stays inside the item
MIN_CELL = 8  # least cell side, pixels
LABEL_POINTS = 8.0


def _argb(color: QColor) -> int:
    """A colour as an opaque premultiplied ARGB32 pixel value."""
    return 0xFF000000 | (color.red() << 16) | (color.green() << 8) | color.blue()


def colour_table(cmap: str | pg.ColorMap, masked: str) -> np.ndarray:
    """``LUT_POINTS + 1`` premultiplied ARGB32 pixels (uint32): the colour map's 256 colours as
    ``ImageItem.setColorMap`` samples them, then the masked colour."""
    cmap = pg.colormap.get(cmap) if isinstance(cmap, str) else cmap
    rgb = np.asarray(cmap.getLookupTable(nPts=LUT_POINTS, alpha=False), dtype=np.uint32)
    table = np.empty(LUT_POINTS + 1, dtype=np.uint32)
    table[:LUT_POINTS] = 0xFF000000 | (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    table[MASKED] = _argb(QColor(masked))
    return table


def sample_indices(n_source: int, n_pixels: int) -> np.ndarray:
    """The source index each of ``n_pixels`` shows when ``n_source`` values are stretched over
    them, nearest neighbour: ⌊(p + ½) · n_source / n_pixels⌋ (the value under the pixel's
    centre)."""
    idx = ((np.arange(n_pixels) + 0.5) * (n_source / n_pixels)).astype(np.intp)
    return np.minimum(idx, n_source - 1)


def colour_indices(values: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                   out: np.ndarray | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """Lookup-table indices (int32) for ``values`` broadcastable against ``lo``/``hi``:
    pyqtgraph's float rescale, (v − lo) · (256 / (hi − lo)) in float32 clipped to [0, 255]
    and truncated; NaN → :data:`MASKED`. ``values`` is overwritten; ``out`` (int32) and
    ``mask`` (bool), of ``values``' shape, are used as given when passed."""
    rng = hi.astype(np.float64) - lo
    rng[rng == 0] = 1.0  # (pyqtgraph: a zero range counts as 1)
    scale = (LUT_POINTS / rng).astype(np.float32)
    if lo.any():  # (linear levels start at 0: one pass fewer)
        np.subtract(values, lo.astype(np.float32), out=values)
    np.multiply(values, scale, out=values)
    mask = np.isnan(values, out=mask)
    np.clip(values, 0, LUT_POINTS - 1, out=values)
    np.copyto(values, MASKED, where=mask)
    if out is None:
        out = np.empty(values.shape, dtype=np.int32)
    np.copyto(out, values, casting="unsafe")  # truncation, as pyqtgraph's astype
    return out


def atlas_buffer(shape: tuple[int, int], cell: tuple[int, int], gap: int) -> np.ndarray:
    """A zeroed (transparent) buffer for :func:`atlas_pixels`: uint32 ``[L, ch + gap, H,
    cw + gap]``."""
    (layers, heads), (ch, cw) = shape, cell
    return np.zeros((layers, ch + gap, heads, cw + gap), dtype=np.uint32)


def atlas_pixels(maps: np.ndarray | None, shape: tuple[int, int], lo: np.ndarray | None,
                 hi: np.ndarray | None, cell: tuple[int, int], gap: int,
                 table: np.ndarray, out: np.ndarray | None = None,
                 work: dict | None = None) -> np.ndarray:
    """The atlas as premultiplied ARGB32 pixels, uint32 ``[rows, cols]``: ``maps``
    ``[L, H, a, b]`` (None: every cell masked), each sampled to ``cell`` = (height, width)
    pixels and coloured by its ``lo[l, h]``–``hi[l, h]``, cells ``gap`` pixels apart
    (transparent). The result is a view of ``out`` (:func:`atlas_buffer`; a buffer of an
    earlier atlas of the same size can be passed again), whose rows are
    ``H · (width + gap)`` pixels long (the trailing gap column is cut off).

    ``work``: a dict kept between calls for the index tables and scratch arrays: fresh
    arrays cost more than the arithmetic (a 6 × 12 atlas at 960 × 540 took 1.2 ms with
    ``out`` and ``work`` reused against 5–10 ms with fresh arrays, on 2 shared cores)."""
    layers, heads = shape
    ch, cw = cell
    buffer = atlas_buffer(shape, cell, gap) if out is None else out
    if maps is None:
        buffer[:, :ch, :, :cw] = table[MASKED]
    else:
        _, _, a, b = maps.shape
        key = (layers, heads, a, b, ch, cw, gap)
        scratch = work.get(key) if work is not None else None
        if scratch is None:
            # one gather for the whole atlas, gaps included (they take pixel 0 and are
            # cleared afterwards, so every pass runs over contiguous memory): for each
            # layer, [ch + gap, H, cw + gap] flat indices into its [H, a, b] maps
            # (np.take along an axis is ~5× faster than fancy indexing)
            rows = np.concatenate([sample_indices(a, ch), np.zeros(gap, np.intp)])
            cols = np.concatenate([sample_indices(b, cw), np.zeros(gap, np.intp)])
            flat = (np.arange(heads)[None, :, None] * (a * b) + rows[:, None, None] * b
                    + cols[None, None, :]).ravel()
            size = buffer.shape
            scratch = (flat, np.empty(size, np.float32), np.empty(size, bool),
                       np.empty(size, np.int32))
            if work is not None:
                work.clear()  # one shape at a time
                work[key] = scratch
        flat, sampled, mask, idx = scratch
        np.take(maps.reshape(layers, heads * a * b), flat, axis=1,
                out=sampled.reshape(layers, -1))
        colour_indices(sampled, lo[:, None, :, None], hi[:, None, :, None], idx, mask)
        np.take(table, idx, out=buffer, mode="clip")
        buffer[:, ch:] = 0  # the gaps, transparent
        buffer[:, :, :, cw:] = 0
    flat_rows = buffer.reshape(layers * (ch + gap), heads * (cw + gap))
    return flat_rows[: max(layers * (ch + gap) - gap, 0), : max(heads * (cw + gap) - gap, 0)]


def _nice_step(need: float, pitch: float) -> int:
    """The least of 1, 2, 5, 10, 20, … cells whose ``pitch`` covers ``need`` pixels."""
    base = 1
    while True:
        for m in (1, 2, 5):
            if m * base * pitch >= need or m * base > 10_000:
                return m * base
        base *= 10


def _label_font() -> QFont:
    font = QFont()
    font.setPointSizeF(LABEL_POINTS)
    return font


@dataclass(frozen=True)
class Geometry:
    """Where the cells are, for one device scale: the cell area's top left (item coordinates),
    each cell's size in device pixels and the pitch (cell + gap) in item units."""

    x0: float
    y0: float
    cell_px: tuple[int, int]  # (height, width), device pixels
    gap_px: int
    scale: float

    @property
    def cell_w(self) -> float:
        return self.cell_px[1] / self.scale

    @property
    def cell_h(self) -> float:
        return self.cell_px[0] / self.scale

    @property
    def pitch_x(self) -> float:
        return (self.cell_px[1] + self.gap_px) / self.scale

    @property
    def pitch_y(self) -> float:
        return (self.cell_px[0] + self.gap_px) / self.scale


class AtlasGrid(pg.GraphicsWidget):
    """Layers × heads maps as one atlas image, labelled "L0…" down the left and "H0…" along
    the top (every k-th when the cells are narrower than the labels).

    ``clicked(layer, head)`` on a left click on a cell; ``hovered(layer, head)`` when the
    mouse enters a cell, whose tooltip then names it ("layer 2, head 5 · kv 1")."""

    clicked = Signal(int, int)
    hovered = Signal(int, int)

    def __init__(self, cmap: str = "viridis", masked: str = "#cfcfcf"):
        super().__init__()
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setAcceptHoverEvents(True)
        self.table = colour_table(cmap, masked)
        self._masked = QColor(masked)
        self.grid_shape = (0, 0)
        self.maps: np.ndarray | None = None
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None
        self._version = 0  # bumped by every set_maps: the cached atlases are stale
        self._cache: dict[tuple, tuple[QImage, np.ndarray]] = {}
        self._spare: list[np.ndarray] = []  # buffers of dropped atlases, to fill again
        self._work: dict = {}  # atlas_pixels' index tables and scratch arrays
        self._labels: tuple[tuple | None, QPicture | None] = (None, None)
        self._outline: tuple[list[tuple[int, int]], QPen | None] = ([], None)
        self.head_name: Callable[[int], str] = lambda h: f"head {h}"
        self.tooltips: dict[tuple[int, int], str] = {}  # set per cell (cell_tooltip's override)
        self.hovered_cell: tuple[int, int] | None = None
        self._font = _label_font()
        self._metrics = QFontMetrics(self._font)
        self._label_w = 0.0
        self._head_label_w = 0.0
        self._header_h = 0.0
        self._fit_labels()

    # -- data ----------------------------------------------------------------------------------
    def set_shape(self, layers: int, heads: int) -> None:
        """An empty ``layers`` × ``heads`` grid (every cell masked grey) when the shape
        changes; the maps are dropped."""
        if (layers, heads) == self.grid_shape:
            return
        self.grid_shape = (layers, heads)
        self.maps = self.lo = self.hi = None
        self._outline = ([], None)
        self.tooltips.clear()
        self._changed()
        self._fit_labels()

    def set_maps(self, maps: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """``maps`` float32 ``[L, H, a, b]`` (NaN: masked), coloured from ``lo[l, h]`` to
        ``hi[l, h]``. The array is kept, not copied: pass a new one for new maps."""
        self.set_shape(*maps.shape[:2])
        self.maps = maps
        self.lo = np.asarray(lo, dtype=np.float64).reshape(self.grid_shape)
        self.hi = np.asarray(hi, dtype=np.float64).reshape(self.grid_shape)
        self._changed()

    def _changed(self) -> None:
        self._version += 1
        self._drop_cache()
        self.update()

    def set_outline(self, cells: Sequence[tuple[int, int]], pen: QPen | None) -> None:
        """Frame ``cells`` with ``pen`` (None or no cells: no frame)."""
        outline = (list(cells) if pen is not None else [], pen)
        if outline[0] != self._outline[0] or outline[1] is not self._outline[1]:
            self._outline = outline
            self.update()

    def outline_pen(self, layer: int, head: int) -> QPen | None:
        """The frame drawn around a cell (None: none)."""
        cells, pen = self._outline
        return pen if (layer, head) in cells else None

    def cell_tooltip(self, layer: int, head: int) -> str:
        return self.tooltips.get((layer, head)) or f"layer {layer}, {self.head_name(head)}"

    # -- geometry ------------------------------------------------------------------------------
    def _fit_labels(self) -> None:
        """Room for the labels ("L23" column, "H11" row) and the least size the cells need."""
        layers, heads = self.grid_shape
        m = self._metrics
        self._label_w = (m.horizontalAdvance(f"L{max(layers - 1, 0)}") + 4) if layers else 0
        self._head_label_w = m.horizontalAdvance(f"H{max(heads - 1, 0)}") + 4 if heads else 0
        self._header_h = m.height() + 1 if heads else 0
        width = self._label_w + 2 * MARGIN + heads * MIN_CELL + max(heads - 1, 0) * GAP
        height = self._header_h + 2 * MARGIN + layers * MIN_CELL + max(layers - 1, 0) * GAP
        self.setMinimumSize(math.ceil(width), math.ceil(height))
        self.updateGeometry()

    def geometry_for(self, scale: float = 1.0) -> Geometry | None:
        """The cells' placement at ``scale`` device pixels per unit (None: no cells or no
        room)."""
        layers, heads = self.grid_shape
        if not layers or not heads:
            return None
        rect = self.rect()
        x0, y0 = self._label_w + MARGIN, self._header_h + MARGIN
        width, height = rect.width() - x0 - MARGIN, rect.height() - y0 - MARGIN
        gap = max(1, round(GAP * scale))
        cw = int((width * scale - (heads - 1) * gap) // heads)
        ch = int((height * scale - (layers - 1) * gap) // layers)
        if cw < 1 or ch < 1:
            return None
        return Geometry(x0, y0, (ch, cw), gap, scale)

    def _screen_scale(self) -> float:
        view = self.getViewWidget()
        return float(view.devicePixelRatioF()) if view is not None else 1.0

    def cell_rect(self, layer: int, head: int, geometry: Geometry | None = None) -> QRectF:
        """A cell's rectangle in item coordinates (empty when the grid has no room)."""
        g = geometry or self.geometry_for(self._screen_scale())
        if g is None:
            return QRectF()
        return QRectF(g.x0 + head * g.pitch_x, g.y0 + layer * g.pitch_y, g.cell_w, g.cell_h)

    def cell_at(self, pos: QPointF) -> tuple[int, int] | None:
        """(layer, head) of the cell under ``pos`` (item coordinates); None between cells
        and outside them."""
        g = self.geometry_for(self._screen_scale())
        if g is None:
            return None
        dx, dy = pos.x() - g.x0, pos.y() - g.y0
        if dx < 0 or dy < 0:
            return None
        head, layer = int(dx // g.pitch_x), int(dy // g.pitch_y)
        if layer >= self.grid_shape[0] or head >= self.grid_shape[1]:
            return None
        if dx - head * g.pitch_x >= g.cell_w or dy - layer * g.pitch_y >= g.cell_h:
            return None  # in the gap
        return layer, head

    # -- drawing -------------------------------------------------------------------------------
    def atlas_image(self, g: Geometry) -> QImage:
        """The atlas for ``g`` (cached until the maps or the cell size change)."""
        key = (self._version, self.grid_shape, g.cell_px, g.gap_px, g.scale)
        cached = self._cache.get(key)
        if cached is None:
            (layers, heads), (ch, cw) = self.grid_shape, g.cell_px
            want = (layers, ch + g.gap_px, heads, cw + g.gap_px)  # atlas_buffer's shape
            spare = next((b for b in self._spare if b.shape == want), None)
            if spare is not None:
                self._spare.remove(spare)
            pixels = atlas_pixels(self.maps, self.grid_shape, self.lo, self.hi, g.cell_px,
                                  g.gap_px, self.table, out=spare, work=self._work)
            rows, cols = pixels.shape
            # a view of the numpy buffer (no copy): it is cached with the image, which
            # must not outlive it
            image = QImage(pixels.base, cols, rows, pixels.strides[0],
                           QImage.Format.Format_ARGB32_Premultiplied)
            image.setDevicePixelRatio(g.scale)
            if len(self._cache) > 3:
                self._drop_cache()
            cached = self._cache[key] = (image, pixels)
        return cached[0]

    def _drop_cache(self) -> None:
        """Forget the cached atlases; their buffers are reused for the next ones (the
        images that view them are dropped with them: painters copy what they draw)."""
        self._spare = [pixels.base for _, pixels in self._cache.values()][-2:]
        self._cache.clear()

    def paint(self, painter: QPainter, *_args) -> None:
        transform = painter.deviceTransform()
        scale = math.hypot(transform.m11(), transform.m12()) or 1.0
        g = self.geometry_for(scale)
        if g is None:
            return
        image = self.atlas_image(g)
        # the cells start on a whole device pixel: the atlas is then copied, not resampled
        origin = transform.map(QPointF(g.x0, g.y0))
        snapped, ok = transform.inverted()
        at = snapped.map(QPointF(round(origin.x()), round(origin.y()))) if ok else \
            QPointF(g.x0, g.y0)
        painter.drawImage(at, image)
        self._paint_labels(painter, g)
        cells, pen = self._outline
        if pen is not None and cells:
            painter.setPen(pen)
            painter.setBrush(Qt.BrushStyle.NoBrush)
            for layer, head in cells:
                painter.drawRect(self.cell_rect(layer, head, g))

    def _paint_labels(self, painter: QPainter, g: Geometry) -> None:
        """The "H…" and "L…" labels, recorded once per layout as a QPicture (replaying it is
        a tenth of the Python calls that drawing each label again costs)."""
        key = (self.grid_shape, g.x0, g.y0, g.pitch_x, g.pitch_y, g.cell_w, g.cell_h)
        if self._labels[0] != key:
            picture = QPicture()
            recorder = QPainter(picture)
            self._draw_labels(recorder, g)
            recorder.end()
            self._labels = (key, picture)
        painter.drawPicture(0, 0, self._labels[1])

    def _draw_labels(self, painter: QPainter, g: Geometry) -> None:
        layers, heads = self.grid_shape
        painter.setFont(self._font)
        painter.setPen(QColor("black"))
        line = self._metrics.height()
        centre = int(Qt.AlignmentFlag.AlignCenter)
        step = _nice_step(self._head_label_w, g.pitch_x)
        for h in range(0, heads, step):
            x = g.x0 + h * g.pitch_x + g.cell_w / 2
            painter.drawText(QRectF(x - self._head_label_w, 0, 2 * self._head_label_w,
                                    self._header_h), centre, f"H{h}")
        step = _nice_step(line, g.pitch_y)
        right = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        for layer in range(0, layers, step):
            y = g.y0 + layer * g.pitch_y + g.cell_h / 2
            painter.drawText(QRectF(0, y - line, self._label_w - 2, 2 * line), right,
                             f"L{layer}")

    # -- mouse ---------------------------------------------------------------------------------
    def hoverEvent(self, ev) -> None:  # noqa: N802 (pyqtgraph's name)
        cell = None if ev.isExit() else self.cell_at(ev.pos())
        if cell == self.hovered_cell:
            return
        self.hovered_cell = cell
        self.setToolTip(self.cell_tooltip(*cell) if cell is not None else "")
        if cell is not None:
            self.hovered.emit(*cell)

    def mouseClickEvent(self, ev) -> None:  # noqa: N802 (pyqtgraph's name)
        cell = self.cell_at(ev.pos()) if ev.button() == Qt.MouseButton.LeftButton else None
        if cell is None:
            ev.ignore()
            return
        ev.accept()
        self.clicked.emit(*cell)
