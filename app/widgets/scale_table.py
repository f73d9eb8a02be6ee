"""A sortable, filterable table of tensor rows, headroom colour-coded for one number format."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt
from PySide6.QtGui import QBrush, QColor

from unitscale_core.scaling.formats import FormatStats, get_format, headroom_status
from unitscale_core.tensors import TensorRow

from ..export import EXPORT_ROLE

STATUS_COLOURS = {"fine": "#c8e6c9", "at_risk": "#ffe0b2", "lost": "#ffcdd2"}
COLUMNS = ("tensor", "kind", "predicted RMS", "log₂", "× forward", "× grad-in", "× grad-w",
           "underflow", "overflow", "↑ headroom", "↓ headroom", "status", "measured RMS",
           "log₂ error")
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
              "lost (more than half underflows or overflows)",
    "log₂ error": "log₂(predicted / measured); |error| ≤ 0.32 is within 25%",
}


def row_status(row: TensorRow, fmt: str) -> str:
    """``fine`` / ``at_risk`` / ``lost`` for a row's headroom in ``fmt`` ("" without it)."""
    f = row.formats.get(fmt)
    if not f:
        return ""
    stats = FormatStats(get_format(fmt), row.rms, f["underflow"], f.get("subnormal", 0.0),
                        1.0 - f["underflow"] - f["overflow"], f["overflow"],
                        f["headroom_max_log2"], f["headroom_min_log2"])
    return headroom_status(stats)


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


class ScaleTableModel(QAbstractTableModel):
    """Rows are predicted tensors; measured values are joined by (name, kind)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.all_rows: list[TensorRow] = []
        self.rows: list[TensorRow] = []  # all_rows passing the filter, in op-graph order
        self.measured: dict[tuple[str, str], float] = {}
        self.format = "fp8_e4m3"
        self.filter_text = ""
        self.filter_kind = ""

    def set_rows(self, rows: Sequence[TensorRow], measured: Sequence[TensorRow] | None = None,
                 fmt: str | None = None) -> None:
        self.beginResetModel()
        self.all_rows = list(rows)
        self.rows = self._filtered()
        self.measured = {(r.name, r.kind): r.rms for r in measured or []}
        if fmt is not None:
            self.format = fmt
        self.endResetModel()

    def set_filter(self, text: str, kind: str) -> None:
        """Show only rows whose name contains ``text`` (any case) and whose kind is ``kind``
        (all kinds when empty). Filtering here, in one list comprehension, rather than per
        row in a proxy callback keeps a 6000-row update within a frame."""
        self.beginResetModel()
        self.filter_text, self.filter_kind = text.lower(), kind
        self.rows = self._filtered()
        self.endResetModel()

    def _filtered(self) -> list[TensorRow]:
        text, kind = self.filter_text, self.filter_kind
        if not text and not kind:
            return list(self.all_rows)
        return [r for r in self.all_rows
                if (not kind or r.kind == kind) and text in r.name.lower()]

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

    def value(self, r: int, column: str):
        """The sortable value of a cell."""
        row = self.rows[r]
        f = row.formats.get(self.format, {})
        measured = self.measured.get((row.name, row.kind))
        if column == "tensor":
            return row.name
        if column == "kind":
            return row.kind
        if column == "predicted RMS":
            return row.rms
        if column == "log₂":
            return math.log2(row.rms) if row.rms > 0 and math.isfinite(row.rms) else None
        if column.startswith("× "):
            key = {"× forward": "forward", "× grad-in": "grad_input", "× grad-w": "grad_weight"}
            return row.scales.get(key[column])
        if column in ("underflow", "overflow"):
            return f.get(column)
        if column == "↑ headroom":
            return f.get("headroom_max_log2")
        if column == "↓ headroom":
            return f.get("headroom_min_log2")
        if column == "status":
            return self.status(row)
        if column == "measured RMS":
            return measured
        if column == "log₂ error":
            if measured is None or not (measured > 0 and row.rms > 0):
                return None
            if not (math.isfinite(measured) and math.isfinite(row.rms)):
                return None
            return math.log2(row.rms / measured)
        return None

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        column = COLUMNS[index.column()]
        value = self.value(index.row(), column)
        if role == Qt.ItemDataRole.DisplayRole:
            if column in ("underflow", "overflow") and value is not None:
                return f"{100 * value:.3g}%"
            if column in ("log₂", "↑ headroom", "↓ headroom", "log₂ error") and value is not None:
                return f"{value:.2f}"
            return value if isinstance(value, str) else _fmt(value)
        if role == EXPORT_ROLE:  # the exact number for CSV (None: the cell is empty)
            return value
        if role == Qt.ItemDataRole.UserRole:  # sort key
            return value if value is not None else -math.inf
        if role == Qt.ItemDataRole.BackgroundRole:
            if column == "status" and value in STATUS_COLOURS:
                return QBrush(QColor(STATUS_COLOURS[value]))
            if column == "log₂ error" and value is not None:
                return QBrush(QColor("#c8e6c9" if abs(value) <= 0.32 else "#ffcdd2"))
        if role == Qt.ItemDataRole.ToolTipRole:
            row = self.rows[index.row()]
            return f"{row.name} ({row.kind})\n{row.formula}" if row.formula else row.name
        if role == Qt.ItemDataRole.TextAlignmentRole and column not in ("tensor", "kind"):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None


class ScaleFilterProxy(QSortFilterProxyModel):
    """Sorts by the cell's value; the filter (substring of the tensor name, kind) is applied
    by the source :class:`ScaleTableModel`."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setSortRole(Qt.ItemDataRole.UserRole)

    def set_filter(self, text: str, kind: str) -> None:
        self.sourceModel().set_filter(text, kind)

    def lessThan(self, left, right) -> bool:  # noqa: N802
        a, b = left.data(Qt.ItemDataRole.UserRole), right.data(Qt.ItemDataRole.UserRole)
        if isinstance(a, str) or isinstance(b, str):
            return str(a) < str(b)
        return a < b
