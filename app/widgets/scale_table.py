"""A sortable, filterable table of tensor rows, headroom colour-coded for one number format.

The model filters and sorts itself (no ``QSortFilterProxyModel``): a 96-layer prediction has
~5800 rows, and a proxy would re-sort them on every reset by calling back into Python twice per
comparison. A cell's text, colour and value are worked out when the view first asks for its
row (only the rows on screen are ever drawn), then kept until the next reset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt
from PySide6.QtGui import QBrush, QColor

from unitscale_core.formatting import number, percent
from unitscale_core.scaling.formats import FormatStats, get_format, headroom_status
from unitscale_core.tensors import AGREEMENT_LOG2, TensorRow

from ..export import EXPORT_ROLE

if TYPE_CHECKING:
    from unitscale_core.measure import SeedSpread

STATUS_COLOURS = {"zero": "#e3e8ee", "fine": "#c8e6c9", "at_risk": "#ffe0b2",
                  "lost": "#ffcdd2"}
COLUMNS = ("tensor", "kind", "predicted RMS", "log₂", "× forward", "× grad-in", "× grad-w",
           "underflow", "overflow", "↑ headroom", "↓ headroom", "status", "measured RMS",
           "log₂ error", "± seeds")
TOOLTIPS = {
    "predicted RMS": "Analytic prediction at initialisation; hover a cell for its formula",
    "× forward": "Factor the parametrization multiplies this op's output by",
    "× grad-in": "Factor applied to the gradient of this op's input",
    "× grad-w": "Factor applied to this op's weight gradient",
    "underflow": "Fraction of a Gaussian tensor of this RMS that rounds to zero in the format",
    "overflow": "Fraction beyond the format's largest value",
    "↑ headroom": "log₂(max normal / RMS): doublings before overflow",
    "↓ headroom": "log₂(RMS / min subnormal): halvings before underflow",
    "status": "fine; at risk (underflow > 0.1%, overflow > 1e-6 or subnormal > 10%); "
              "lost (more than half underflows or overflows); zero (exactly 0, which every "
              "format represents: nothing is lost)",
    "log₂ error": "log₂(predicted / measured); |error| ≤ 0.32 is within 25%",
    "± seeds": "Measured over several seeds: the standard deviation of log₂ RMS between the "
               "draws (hover for the lowest and highest). Above 0.32 one initialisation "
               "often misses by more than the tolerance: more seeds tell luck from bias",
}
_PERCENT = frozenset({"underflow", "overflow"})
_HEADROOM = frozenset({"↑ headroom", "↓ headroom"})
_TWO_DECIMALS = frozenset({"log₂", "↑ headroom", "↓ headroom", "log₂ error", "± seeds"})
_STATUS_COLUMN, _ERROR_COLUMN = COLUMNS.index("status"), COLUMNS.index("log₂ error")
_SPREAD_COLUMNS = frozenset(COLUMNS.index(c) for c in ("measured RMS", "log₂ error", "± seeds"))
_SCALE_KEYS = {"× forward": "forward", "× grad-in": "grad_input", "× grad-w": "grad_weight"}
_FORMAT_KEYS = {"underflow": "underflow", "overflow": "overflow",
                "↑ headroom": "headroom_max_log2", "↓ headroom": "headroom_min_log2"}
#: The columns that depend on the number format (underflow … status: adjacent)
_FORMAT_COLUMNS = tuple(COLUMNS.index(c) for c in (*_FORMAT_KEYS, "status"))
assert _FORMAT_COLUMNS == tuple(range(_FORMAT_COLUMNS[0], _FORMAT_COLUMNS[-1] + 1))
_RIGHT = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
_ALIGNMENTS = tuple(None if c in ("tensor", "kind") else _RIGHT for c in COLUMNS)
_BRUSHES = {colour: QBrush(QColor(colour)) for colour in STATUS_COLOURS.values()}
_AGREE, _DISAGREE = _BRUSHES["#c8e6c9"], _BRUSHES["#ffcdd2"]

_DISPLAY = Qt.ItemDataRole.DisplayRole
_SORT = Qt.ItemDataRole.UserRole
_BACKGROUND = Qt.ItemDataRole.BackgroundRole
_TOOLTIP = Qt.ItemDataRole.ToolTipRole
_ALIGNMENT = Qt.ItemDataRole.TextAlignmentRole
#: The roles a cell answers; a view asks for several more per cell (font, foreground,
#: decoration, check state) on every paint, and those return at once.
_ROLES = frozenset(int(r) for r in (_DISPLAY, _SORT, _BACKGROUND, _TOOLTIP, _ALIGNMENT)) | {
    EXPORT_ROLE}


def row_status(row: TensorRow, fmt: str) -> str:
    """``zero`` / ``fine`` / ``at_risk`` / ``lost`` for a row's headroom in ``fmt`` ("" without
    it)."""
    return _status(row.formats.get(fmt), row.rms, fmt)


def _status(f: dict[str, float] | None, rms: float, fmt: str) -> str:
    if not f:
        return ""
    stats = FormatStats(get_format(fmt), rms, f["underflow"], f.get("subnormal", 0.0),
                        1.0 - f["underflow"] - f["overflow"], f["overflow"],
                        f["headroom_max_log2"], f["headroom_min_log2"])
    return headroom_status(stats)


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return number(x, f".{digits}g")


def _log2(x: float) -> float | None:
    return math.log2(x) if x > 0 and math.isfinite(x) else None


def _scatter(spread: SeedSpread | None) -> float | None:
    """The "± seeds" cell: the draws' log2 standard deviation (empty when there was one
    draw, or a draw was zero)."""
    if spread is None or not math.isfinite(spread.log2_std):
        return None
    return spread.log2_std


def _sort_key(value) -> float | str:
    """Strings sort as text; numbers as numbers, with empty (and NaN) cells first."""
    if isinstance(value, str):
        return value
    return -math.inf if value is None or value != value else value


class _Cells:
    """One shown row's cells: values (exact, sortable), texts and backgrounds by column."""

    __slots__ = ("values", "texts", "backgrounds")

    def __init__(self, row: TensorRow, fmt: str, measured: float | None,
                 spread: SeedSpread | None = None):
        f = row.formats.get(fmt)
        values = [row.name, row.kind, row.rms, _log2(row.rms)]
        values += [row.scales.get(key) for key in _SCALE_KEYS.values()]
        status = _status(f, row.rms, fmt)
        if status == "zero":  # every value stays exactly 0: none lost, no headroom to speak of
            values += [0.0, 0.0, None, None]
        else:
            values += [f.get(key) if f else None for key in _FORMAT_KEYS.values()]
        error = None
        if measured is not None and measured > 0 and row.rms > 0 and \
                math.isfinite(measured) and math.isfinite(row.rms):
            error = math.log2(row.rms / measured)
        values += [status, measured, error, _scatter(spread)]
        texts = []
        for column, value in zip(COLUMNS, values):
            if isinstance(value, str):
                texts.append(value)
            elif value is None:
                texts.append("—" if status == "zero" and column in _HEADROOM else "")
            elif column in _PERCENT:  # never a false 100% (or 0%) from rounding
                texts.append(percent(value, significant=3))
            elif column in _TWO_DECIMALS:
                texts.append(number(value, ".2f"))  # never "-0.00"
            else:
                texts.append(_fmt(value))
        backgrounds = [None] * len(COLUMNS)
        if status in STATUS_COLOURS:
            backgrounds[_STATUS_COLUMN] = _BRUSHES[STATUS_COLOURS[status]]
        if error is not None:
            backgrounds[_ERROR_COLUMN] = _AGREE if abs(error) <= AGREEMENT_LOG2 else _DISAGREE
        self.values, self.texts, self.backgrounds = values, texts, backgrounds


class ScaleTableModel(QAbstractTableModel):
    """Rows are predicted tensors; measured values are joined by (name, kind).

    ``rows`` are those shown: ``all_rows`` passing the filter, in op-graph order or sorted by
    the view's chosen column.
    """

    def __init__(self, parent=None):
        super().__init__(parent)
        self.all_rows: list[TensorRow] = []
        self.rows: list[TensorRow] = []
        self.measured: dict[tuple[str, str], float] = {}
        self.format = "fp8_e4m3"
        self.filter_text = ""
        self.filter_kind = ""
        self.sort_column = -1  # op-graph order
        self.sort_order = Qt.SortOrder.AscendingOrder
        self._cells: dict[int, _Cells] = {}  # shown row → its cells, made when first asked
        #: ``rows[i] is all_rows[_order[i]]`` (None: all rows in their order)
        self._order: list[int] | None = None
        #: set_rows' ``measured`` and ``spread`` arguments (what a same-pass update keeps)
        self._measured_rows: Sequence[TensorRow] | None = None
        self._spread_arg: Mapping[tuple[str, str], SeedSpread] | None = None
        #: (name, kind) of rows whose values are rounding noise, and why (one line)
        self.noise: frozenset[tuple[str, str]] = frozenset()
        self.noise_reason = ""
        #: (name, kind) → how a measurement over several seeds varied (else empty)
        self.spread: Mapping[tuple[str, str], SeedSpread] = {}

    def set_rows(self, rows: Sequence[TensorRow], measured: Sequence[TensorRow] | None = None,
                 fmt: str | None = None, noise: frozenset[tuple[str, str]] = frozenset(),
                 noise_reason: str = "",
                 spread: Mapping[tuple[str, str], SeedSpread] | None = None,
                 same_values: bool = False) -> None:
        """Show ``rows`` (joined with ``measured``) in ``fmt``; ``noise``: rows marked ⚠ as
        rounding noise, ``noise_reason`` their tooltip's line; ``spread``: each measured
        tensor's variation over the seeds of a measurement over several.

        ``same_values``: the caller knows ``rows`` are the rows shown but for their formats
        (another dtype or format of one predictor pass: same names, kinds, RMS, scales and
        formulas, in the same order). With the same ``measured`` and ``spread`` objects, and
        the view not sorted by a column of another format, the model then swaps the rows
        in place and says which cells changed (the format's columns, the rows whose noise
        mark changed) instead of a reset: a view repaints only those of them on screen."""
        if same_values and self._update_in_place(rows, measured, fmt, noise, noise_reason,
                                                 spread):
            return
        self.beginResetModel()
        self._measured_rows, self._spread_arg = measured, spread
        self.noise, self.noise_reason = noise, noise_reason
        self.spread = spread or {}
        self.all_rows = list(rows)
        self.measured = {(r.name, r.kind): r.rms for r in measured} if measured else {}
        if fmt is not None:
            self.format = fmt
        self.rows = self._arranged()
        self._cells = {}
        self.endResetModel()

    def _update_in_place(self, rows: Sequence[TensorRow],
                         measured: Sequence[TensorRow] | None, fmt: str | None,
                         noise: frozenset[tuple[str, str]], noise_reason: str,
                         spread: Mapping[tuple[str, str], SeedSpread] | None) -> bool:
        """:meth:`set_rows` without a reset, when it can be (see there); False: it cannot."""
        fmt = self.format if fmt is None else fmt
        new_format = fmt != self.format
        if measured is not self._measured_rows or spread is not self._spread_arg or \
                len(rows) != len(self.all_rows) or \
                (new_format and self.sort_column in _FORMAT_COLUMNS):
            return False
        changed = noise != self.noise or (noise_reason != self.noise_reason and noise)
        marked = self.noise | noise if changed else frozenset()
        self.all_rows = list(rows)
        self.rows = self.all_rows[:] if self._order is None else \
            [self.all_rows[i] for i in self._order]
        self.format, self.noise, self.noise_reason = fmt, noise, noise_reason
        self._cells = {}
        last = len(COLUMNS) - 1
        if marked:  # the ⚠ in the name and the tooltips of rows marked before or now
            shown = [i for i, r in enumerate(self.rows) if (r.name, r.kind) in marked]
            if shown:
                self.dataChanged.emit(self.index(shown[0], 0), self.index(shown[-1], last))
        if new_format and self.rows:
            self.dataChanged.emit(self.index(0, _FORMAT_COLUMNS[0]),
                                  self.index(len(self.rows) - 1, _FORMAT_COLUMNS[-1]))
        return True

    def set_filter(self, text: str, kind: str) -> None:
        """Show only rows whose name contains ``text`` (any case) and whose kind is ``kind``
        (all kinds when empty), in one list comprehension rather than per row in a proxy
        callback."""
        self.beginResetModel()
        self.filter_text, self.filter_kind = text.lower(), kind
        self.rows = self._arranged()
        self._cells = {}
        self.endResetModel()

    def _arranged(self) -> list[TensorRow]:
        """The rows to show: filtered, sorted; keeps their indices in ``all_rows`` in
        ``_order`` (a later :meth:`set_rows` of the same pass rearranges by it)."""
        text, kind = self.filter_text, self.filter_kind
        every = self.all_rows
        if not text and not kind:
            index = None
            rows = every
        else:
            index = [i for i, r in enumerate(every)
                     if (not kind or r.kind == kind) and text in r.name.lower()]
            rows = [every[i] for i in index]
        if not 0 <= self.sort_column < len(COLUMNS):
            self._order = index
            return list(rows)
        column = COLUMNS[self.sort_column]
        keys = [_sort_key(v) for v in self._column_values(rows, column)]
        if any(isinstance(k, str) for k in keys):
            keys = [str(k) if not isinstance(k, str) else k for k in keys]
        order = sorted(range(len(rows)), key=keys.__getitem__,
                       reverse=self.sort_order == Qt.SortOrder.DescendingOrder)
        self._order = order if index is None else [index[i] for i in order]
        return [rows[i] for i in order]

    def _column_values(self, rows: Sequence[TensorRow], column: str) -> list:
        """Every row's value in ``column``: attribute reads for the cheap columns, the full
        cell otherwise."""
        if column == "tensor":
            return [r.name for r in rows]
        if column == "kind":
            return [r.kind for r in rows]
        if column == "predicted RMS":
            return [r.rms for r in rows]
        if column == "log₂":
            return [_log2(r.rms) for r in rows]
        if column in _SCALE_KEYS:
            key = _SCALE_KEYS[column]
            return [r.scales.get(key) for r in rows]
        if column == "measured RMS":
            measured = self.measured
            return [measured.get((r.name, r.kind)) for r in rows]
        fmt, measured = self.format, self.measured
        if column in _FORMAT_KEYS:
            key = _FORMAT_KEYS[column]
            at_zero = 0.0 if column in _PERCENT else None  # as a zero row's cell shows it
            return [(at_zero if r.rms == 0 else f.get(key)) if (f := r.formats.get(fmt))
                    else None for r in rows]
        if column == "status":
            return [_status(r.formats.get(fmt), r.rms, fmt) for r in rows]
        if column == "± seeds":
            spread = self.spread
            return [_scatter(spread.get((r.name, r.kind))) for r in rows]
        c = COLUMNS.index(column)
        return [_Cells(r, fmt, measured.get((r.name, r.kind))).values[c] for r in rows]

    def sort(self, column: int, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        """Sort the shown rows by ``column`` (−1: op-graph order); the view calls this when a
        header is clicked, and later resets keep the order. Selections follow their rows."""
        self.layoutAboutToBeChanged.emit()
        old = self.rows
        self.sort_column, self.sort_order = column, order
        self.rows = self._arranged()
        self._cells = {}
        persistent = self.persistentIndexList()
        if persistent:
            where = {id(row): i for i, row in enumerate(self.rows)}
            moved = [self.index(where[id(old[p.row()])], p.column())
                     if 0 <= p.row() < len(old) and id(old[p.row()]) in where
                     else QModelIndex() for p in persistent]
            self.changePersistentIndexList(persistent, moved)
        self.layoutChanged.emit()

    def row_of(self, name: str) -> int:
        """The first shown row of tensor ``name`` (−1 when none is shown)."""
        for i, row in enumerate(self.rows):
            if row.name == name:
                return i
        return -1

    def rowCount(self, parent: QModelIndex | None = None) -> int:  # noqa: N802 (Qt's name)
        return 0 if parent is not None and parent.isValid() else len(self.rows)

    def columnCount(self, parent: QModelIndex | None = None) -> int:  # noqa: N802
        return len(COLUMNS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if orientation != Qt.Orientation.Horizontal:
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        if role == Qt.ItemDataRole.ToolTipRole:
            return TOOLTIPS.get(COLUMNS[section])
        return None

    def status(self, row: TensorRow) -> str:
        return row_status(row, self.format)

    def cells(self, r: int) -> _Cells:
        """Shown row ``r``'s cells (worked out on first use)."""
        cells = self._cells.get(r)
        if cells is None:
            row = self.rows[r]
            key = (row.name, row.kind)
            cells = self._cells[r] = _Cells(row, self.format, self.measured.get(key),
                                            self.spread.get(key))
        return cells

    def value(self, r: int, column: str):
        """The sortable value of a cell."""
        return self.cells(r).values[COLUMNS.index(column)]

    def data(self, index: QModelIndex | QPersistentModelIndex, role=_DISPLAY):
        if role not in _ROLES or not index.isValid():
            return None
        r, c = index.row(), index.column()
        if role == _DISPLAY:
            text = self.cells(r).texts[c]
            if c == 0 and self.noise:
                row = self.rows[r]
                if (row.name, row.kind) in self.noise:
                    return f"{text}  ⚠"
            return text
        if role == _BACKGROUND:
            return self.cells(r).backgrounds[c]
        if role == _ALIGNMENT:
            return _ALIGNMENTS[c]
        if role == EXPORT_ROLE:  # the exact number for CSV (None: the cell is empty)
            return self.cells(r).values[c]
        if role == _SORT:
            value = self.cells(r).values[c]
            return value if value is not None else -math.inf
        if role == _TOOLTIP:
            row = self.rows[r]
            tip = f"{row.name} ({row.kind})\n{row.formula}" if row.formula else row.name
            if (row.name, row.kind) in self.noise:
                tip += f"\n⚠ rounding noise: {self.noise_reason}"
            spread = self.spread.get((row.name, row.kind))
            if spread is not None and c in _SPREAD_COLUMNS:
                scatter = (f"log₂ std {spread.log2_std:.2f}" if math.isfinite(spread.log2_std)
                           else "zero in some draws")
                tip += f"\nover the seeds: {_fmt(spread.low)} … {_fmt(spread.high)}, {scatter}"
            return tip
        return None
