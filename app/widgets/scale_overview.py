"""An overview of a deep model's scales: layers across, tensor roles down, log₂ RMS as colour.

A 96-layer prediction has ~5800 rows; a list of them cannot show which layers and which roles
fall out of a format. Here each layer tensor is one cell: x = its layer (encoder layers, then
decoder layers), y = its role within the layer (``attn.q``, ``attn.scores``, ``ffn.up``, the
norms, ``stream`` for the layer's output …) in op-graph order, forward roles above the backward
(``∇``) ones. Colour = log₂ RMS on a diverging map centred on 0 (a unit-scaled tensor); a
white-edged ``×`` marks a cell the chosen format loses (more than half of a Gaussian of that
RMS underflows or overflows), a dot one at risk (see
:func:`unitscale_core.scaling.formats.headroom_status`); an exact zero is representable and
is marked neither way. Tensors outside the layers (embeddings, the final norm, the head, the
loss) sit in a strip to the right, one row each, forward and backward side by side.

Two groups: activations (forward, and their gradients) or weights (and their gradients). The
grid of a model is worked out once per set of tensor names (:func:`overview_grid`); an update
is a gather of the rows' RMS into it and one ``setImage(autoLevels=False)``. Hovering a cell
names its tensor, log₂ RMS and status below the plot; clicking one emits
``picked(name, kind)``.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from unitscale_core.scaling.formats import FORMATS, gaussian_format_table, headroom_status_array
from unitscale_core.tensors import TensorRow

from .scale_chart import ClippedAxis, MarkerSeries, NameAxis

#: The kinds each group shows: its forward kind (upper block) and its backward kind.
GROUPS: dict[str, tuple[str, str]] = {"activations": ("activation", "grad_activation"),
                                      "weights": ("weight", "grad_weight")}
#: The role of a layer's own output (``layers.3``: the residual stream after layer 3).
STREAM = "stream"
#: ``[encoder.|decoder.]layers.<i>[.<role>]``
LAYER_NAME = re.compile(r"^(?:(?P<stack>encoder|decoder)\.)?layers\.(?P<layer>\d+)"
                        r"(?:\.(?P<role>.+))?$")
BACKWARD_MARK = "∇ "
COLOUR_MAP = "CET-D1"  # blue (small) – white (unit) – red (large)
#: The colour scale spans at least ±this many doublings around 0.
MIN_LEVEL = 4.0
#: The strip's width at most (two columns and the names of the tensors in it).
STRIP_MAX_WIDTH = 190
STATUS_TEXT = {"fine": "fine", "at_risk": "at risk", "lost": "lost", "zero": "exactly zero",
               "": ""}
_NAME, _KIND, _RMS = attrgetter("name"), attrgetter("kind"), attrgetter("rms")


@dataclass(frozen=True)
class OverviewGrid:
    """Where each row of a prediction sits in the overview of one group.

    ``cells[y, x]``: the index into the rows of the tensor in role ``y`` of layer ``x`` (−1:
    none, e.g. the cross-attention roles of an encoder layer). ``strip[i, j]``: the row of
    non-layer tensor ``strip_names[i]`` of kind ``kinds[j]`` (−1: none).
    """

    group: str
    kinds: tuple[str, str]
    layers: tuple[str, ...]  # x labels
    roles: tuple[str, ...]  # y labels, forward block then backward block
    n_forward: int  # roles[:n_forward] are the forward kind's
    cells: np.ndarray  # (len(roles), len(layers)) int
    strip_names: tuple[str, ...]
    strip: np.ndarray  # (len(strip_names), 2) int


def _merge(order: list[str], sequence: Sequence[str]) -> None:
    """Insert the roles of ``sequence`` missing from ``order`` after their predecessor, so a
    decoder layer's cross-attention roles land after its self-attention's."""
    at = -1
    for role in sequence:
        if role in order:
            at = order.index(role)
        else:
            at += 1
            order.insert(at, role)


def overview_grid(names: Sequence[str], kinds: Sequence[str], group: str) -> OverviewGrid:
    """The grid of ``group`` for rows with these ``names`` and ``kinds`` (row order).

    Layer ``x`` counts encoder layers first (``enc i``), then decoder layers (``dec i``); a
    single stack's layers are labelled by number. A role is the name after the layer
    (``attn.q``; ``stream`` for the layer's output). Every row of the group's kinds lands in
    exactly one cell or strip entry.
    """
    fwd_kind, bwd_kind = GROUPS[group]
    layer_of: dict[tuple[str, int], int] = {}
    per_layer: dict[str, dict[tuple[str, int], list[str]]] = {fwd_kind: {}, bwd_kind: {}}
    placed: list[tuple[int, str, tuple[str, int], str]] = []  # (row, kind, layer key, role)
    strip_names: list[str] = []
    strip_rows: dict[tuple[str, str], int] = {}
    for i, (name, kind) in enumerate(zip(names, kinds)):
        if kind != fwd_kind and kind != bwd_kind:
            continue
        m = LAYER_NAME.match(name)
        if m is None:
            if name not in strip_rows and (name, fwd_kind) not in strip_rows and \
                    (name, bwd_kind) not in strip_rows:
                strip_names.append(name)
            strip_rows[(name, kind)] = i
            continue
        key = (m.group("stack") or "", int(m.group("layer")))
        role = m.group("role") or STREAM
        layer_of.setdefault(key, len(layer_of))
        per_layer[kind].setdefault(key, []).append(role)
        placed.append((i, kind, key, role))
    stacks = {stack for stack, _ in layer_of}
    keys = sorted(layer_of, key=lambda k: ({"encoder": 0, "": 1, "decoder": 2}[k[0]], k[1]))
    x_of = {k: x for x, k in enumerate(keys)}
    if len(stacks) > 1 or stacks - {""}:
        labels = tuple(f"{stack[:3]} {n}" if stack else str(n) for stack, n in keys)
    else:
        labels = tuple(str(n) for _, n in keys)
    orders: dict[str, list[str]] = {}
    for kind in (fwd_kind, bwd_kind):
        order: list[str] = []
        for key in keys:
            _merge(order, per_layer[kind].get(key, []))
        orders[kind] = order
    y_of = {(fwd_kind, r): y for y, r in enumerate(orders[fwd_kind])}
    n_fwd = len(orders[fwd_kind])
    y_of.update({(bwd_kind, r): n_fwd + y for y, r in enumerate(orders[bwd_kind])})
    roles = tuple(orders[fwd_kind]) + tuple(BACKWARD_MARK + r for r in orders[bwd_kind])
    cells = np.full((len(roles), len(keys)), -1, dtype=np.int64)
    for i, kind, key, role in placed:
        cells[y_of[(kind, role)], x_of[key]] = i
    strip = np.full((len(strip_names), 2), -1, dtype=np.int64)
    for j, name in enumerate(strip_names):
        for c, kind in enumerate((fwd_kind, bwd_kind)):
            strip[j, c] = strip_rows.get((name, kind), -1)
    return OverviewGrid(group, (fwd_kind, bwd_kind), labels, roles, n_fwd, cells,
                        tuple(strip_names), strip)


_GRIDS: OrderedDict[tuple, OverviewGrid] = OrderedDict()
_GRIDS_SIZE = 8


def cached_grid(names: tuple[str, ...], kinds: tuple[str, ...], group: str) -> OverviewGrid:
    """:func:`overview_grid`, kept for the last few models (the same model in another format,
    dtype or parametrization has the same names)."""
    key = (group, names, kinds)
    grid = _GRIDS.get(key)
    if grid is None:
        grid = _GRIDS[key] = overview_grid(names, kinds, group)
        while len(_GRIDS) > _GRIDS_SIZE:
            _GRIDS.popitem(last=False)
    else:
        _GRIDS.move_to_end(key)
    return grid


def statuses(rms: np.ndarray, fmt: str) -> np.ndarray:
    """``fine`` / ``at_risk`` / ``lost`` of Gaussian tensors of these RMS in ``fmt``
    (:func:`~unitscale_core.scaling.formats.headroom_status_array`), ``zero`` where the RMS is
    exactly 0 (zero is representable: nothing is lost) and ``""`` where it is not finite."""
    out = np.full(rms.shape, "", dtype=object)
    ok = np.isfinite(rms) & (rms > 0)
    if ok.any():
        distinct, index = np.unique(rms[ok], return_inverse=True)
        table = gaussian_format_table(distinct, FORMATS[fmt])
        status = headroom_status_array(table["underflow"], table["subnormal"],
                                       table["overflow"])
        out[ok] = status[index]
    out[rms == 0] = "zero"
    return out


def _gather(values: np.ndarray, index: np.ndarray, fill):
    out = np.full(index.shape, fill, dtype=values.dtype)
    have = index >= 0
    out[have] = values[index[have]]
    return out


class ScaleOverview(QWidget):
    """Layers × roles heatmap of log₂ RMS with status marks, a strip of the other tensors,
    a colour bar and a hover read-out (objectName ``overviewReadout``)."""

    picked = Signal(str, str)  # name, kind

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.view = pg.GraphicsLayoutWidget()
        self.view.setObjectName("overviewView")
        self.view.setBackground("w")
        layout.addWidget(self.view, 1)
        self.readout = QLabel(objectName="overviewReadout")
        self.readout.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.readout)
        self.plot = self.view.addPlot(row=0, col=0, axisItems={
            "left": _RoleAxis("left"), "bottom": _LayerAxis("bottom")})
        self.strip_plot = self.view.addPlot(row=0, col=1, axisItems={
            "right": _RoleAxis("right"), "bottom": ClippedAxis("bottom")})
        for plot in (self.plot, self.strip_plot):
            plot.invertY(True)
            plot.setMenuEnabled(False)
            plot.hideButtons()
            plot.setMouseEnabled(x=False, y=False)  # a fixed grid: every cell in view
            for axis in ("left", "bottom", "right"):
                plot.getAxis(axis).setTextPen("k")
                plot.getAxis(axis).setPen("k")
        self.plot.setLabel("bottom", "layer", color="k")
        self.strip_plot.hideAxis("left")
        self.strip_plot.showAxis("right")
        self.strip_plot.getAxis("bottom").setTicks([[(0, "fwd"), (1, "∇")], []])
        self.strip_plot.setMaximumWidth(STRIP_MAX_WIDTH)
        self.colour_map = pg.colormap.get(COLOUR_MAP)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.strip_image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.strip_plot.addItem(self.strip_image)
        self.split_lines = [pg.InfiniteLine(angle=0, movable=False, pen=pg.mkPen("k", width=1.5))
                            for _ in range(2)]
        self.plot.addItem(self.split_lines[0], ignoreBounds=True)
        self.strip_plot.addItem(self.split_lines[1], ignoreBounds=True)
        self.marks: dict[str, list[MarkerSeries]] = {}
        for status, symbol, size in (("lost", "x", 10), ("at_risk", "o", 5)):
            self.marks[status] = []
            for plot in (self.plot, self.strip_plot):
                item = _Marks(symbol, size, pg.mkPen("w", width=1), "k", status)
                item.setZValue(5)
                plot.addItem(item)
                self.marks[status].append(item)
        self.bar = pg.ColorBarItem(values=(-MIN_LEVEL, MIN_LEVEL), colorMap=self.colour_map,
                                   interactive=False, label="log₂ RMS", width=14)
        self.bar.setImageItem([self.image, self.strip_image])
        self.view.addItem(self.bar, row=0, col=2)
        self.legend = QLabel(objectName="overviewLegend")
        self.legend.setWordWrap(True)
        layout.insertWidget(0, self.legend)
        self.group = "activations"
        self.fmt = "fp8_e4m3"
        self.grid: OverviewGrid | None = None
        self._rows: Sequence[TensorRow] = ()
        self._dirty = False
        #: log₂ RMS of each cell (nan: no tensor) and of the strip, and their statuses
        self.values = np.empty((0, 0))
        self.strip_values = np.empty((0, 2))
        self.status = np.empty((0, 0), dtype=object)
        self.strip_status = np.empty((0, 2), dtype=object)
        self.view.scene().sigMouseMoved.connect(self._on_hover)
        self.view.scene().sigMouseClicked.connect(self._on_click)

    # -- data --------------------------------------------------------------------------------
    def set_rows(self, rows: Sequence[TensorRow], fmt: str) -> None:
        """Show ``rows`` (a prediction or measurement) in ``fmt``; drawn now when visible,
        else when next shown (a hidden overview costs a reference)."""
        self._rows, self.fmt = rows, fmt
        self._dirty = True
        if self.isVisible():
            self.refresh()

    def set_group(self, group: str) -> None:
        """``activations`` or ``weights`` (see :data:`GROUPS`)."""
        if group not in GROUPS:
            raise ValueError(f"group: {group!r} is not one of {', '.join(GROUPS)}")
        if group != self.group:
            self.group = group
            self._dirty = True
            self.refresh()

    def showEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        if self._dirty:
            self.refresh()

    def refresh(self) -> None:
        """Bring the image up to the rows given (a no-op when it shows them)."""
        if not self._dirty:
            return
        self._dirty = False
        rows = self._rows
        names = tuple(map(_NAME, rows))
        grid = cached_grid(names, tuple(map(_KIND, rows)), self.group)
        new_grid = grid is not self.grid
        self.grid = grid
        rms = np.fromiter(map(_RMS, rows), dtype=np.float64, count=len(rows))
        with np.errstate(divide="ignore", invalid="ignore"):
            log2 = np.log2(rms)
        log2[~np.isfinite(log2)] = np.nan  # zero (−inf) and non-finite: no colour
        status = statuses(rms, self.fmt)
        self.values = _gather(log2, grid.cells, np.nan)
        self.strip_values = _gather(log2, grid.strip, np.nan)
        self.status = _gather(status, grid.cells, "")
        self.strip_status = _gather(status, grid.strip, "")
        finite = np.concatenate([self.values[np.isfinite(self.values)],
                                 self.strip_values[np.isfinite(self.strip_values)]])
        top = max(MIN_LEVEL, math.ceil(float(np.abs(finite).max())) if finite.size else 0)
        levels = (-top, top)
        self.image.setImage(self.values, autoLevels=False, levels=levels)
        self.strip_image.setImage(self.strip_values, autoLevels=False, levels=levels)
        self.bar.setLevels(levels)
        n_roles, n_layers = grid.cells.shape
        n_strip = len(grid.strip_names)
        rows_shown = max(n_roles, n_strip, 1)
        self.image.setRect(QRectF(-0.5, -0.5, max(n_layers, 1), max(n_roles, 1)))
        self.strip_image.setRect(QRectF(-0.5, -0.5, 2, max(n_strip, 1)))
        for key, image_status in enumerate((self.status, self.strip_status)):
            for st, series in self.marks.items():  # (series[0] on the grid, [1] the strip)
                ys, xs = np.nonzero(image_status == st)
                series[key].setData(xs.astype(np.float64), ys.astype(np.float64))
        if new_grid:
            self.plot.getAxis("left").set_names(list(grid.roles))
            self.plot.getAxis("bottom").set_names(list(grid.layers))
            self.strip_plot.getAxis("right").set_names(list(grid.strip_names))
            self.plot.setXRange(-0.5, max(n_layers, 1) - 0.5, padding=0)
            self.strip_plot.setXRange(-0.5, 1.5, padding=0)
            for plot in (self.plot, self.strip_plot):
                plot.setYRange(-0.5, rows_shown - 0.5, padding=0)
            for line in self.split_lines:
                line.setValue(grid.n_forward - 0.5)
            self.split_lines[1].setVisible(False)
        kinds = " / ".join(grid.kinds)
        lost = int(np.count_nonzero(self.status == "lost")
                   + np.count_nonzero(self.strip_status == "lost"))
        risk = int(np.count_nonzero(self.status == "at_risk")
                   + np.count_nonzero(self.strip_status == "at_risk"))
        self.legend.setText(
            f"{self.fmt}, {kinds}: colour = log₂ RMS (white = 1, unit scale); "
            f"× lost ({lost}: more than half underflows or overflows), • at risk ({risk}); "
            f"upper block forward, lower block (∇) backward; right: tensors outside the "
            f"layers. Click a cell to open it in the list.")

    # -- lookup ------------------------------------------------------------------------------
    def cell_of(self, name: str, kind: str) -> tuple[str, int, int] | None:
        """``("grid", x, y)`` or ``("strip", column, row)`` of a tensor shown, else None."""
        self.refresh()
        grid = self.grid
        if grid is None:
            return None
        for where, index in (("grid", grid.cells), ("strip", grid.strip)):
            for y, x in zip(*np.nonzero(index >= 0)):
                row = self._rows[index[y, x]]
                if row.name == name and row.kind == kind:
                    return where, int(x), int(y)
        return None

    def row_at(self, where: str, x: int, y: int) -> TensorRow | None:
        """The row shown in cell ``(x, y)`` of ``where`` (``grid`` or ``strip``), if any."""
        grid = self.grid
        if grid is None:
            return None
        index = grid.cells if where == "grid" else grid.strip
        if not (0 <= y < index.shape[0] and 0 <= x < index.shape[1]) or index[y, x] < 0:
            return None
        return self._rows[index[y, x]]

    def describe(self, where: str, x: int, y: int) -> str:
        """The read-out of a cell: tensor, kind, log₂ RMS and status in the format."""
        row = self.row_at(where, x, y)
        if row is None:
            return ""
        status = (self.status if where == "grid" else self.strip_status)[y, x]
        value = (self.values if where == "grid" else self.strip_values)[y, x]
        shown = f"log₂ RMS {value:.2f}" if math.isfinite(value) else f"RMS {row.rms:g}"
        return f"{row.name} ({row.kind}): {shown}, {STATUS_TEXT[status]} in {self.fmt}"

    def _cell_at(self, scene_pos: QPointF) -> tuple[str, int, int] | None:
        for where, plot in (("grid", self.plot), ("strip", self.strip_plot)):
            vb = plot.getViewBox()
            if vb.sceneBoundingRect().contains(scene_pos):
                p = vb.mapSceneToView(scene_pos)
                return where, round(p.x()), round(p.y())
        return None

    def _on_hover(self, scene_pos: QPointF) -> None:
        cell = self._cell_at(scene_pos)
        self.readout.setText(self.describe(*cell) if cell is not None else "")

    def _on_click(self, event) -> None:
        if event.button() != Qt.MouseButton.LeftButton:
            return
        cell = self._cell_at(event.scenePos())
        if cell is not None:
            self.pick(*cell)

    def pick(self, where: str, x: int, y: int) -> None:
        """Emit ``picked`` for the tensor in that cell (nothing for an empty cell)."""
        row = self.row_at(where, x, y)
        if row is not None:
            self.picked.emit(row.name, row.kind)


class _Marks(MarkerSeries):
    """Status marks: drawn over the cells, clicks go through to the cell below."""

    def mouseClickEvent(self, ev) -> None:  # noqa: N802 (pyqtgraph's name)
        ev.ignore()


class _RoleAxis(NameAxis):
    """Role (and strip tensor) labels: every row of 14 px or more is named."""

    LABEL_PX = 14


class _LayerAxis(NameAxis):
    """Layer labels along x: one per ~40 px (``dec 11`` is wider than a row's name is tall)."""

    LABEL_PX = 40
