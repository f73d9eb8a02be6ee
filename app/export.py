"""Export, one way for every panel: figures to PNG, SVG and the clipboard, heatmap data to NPY,
tables to CSV and Markdown.

A panel lists what it can export with ``export_items() -> list[Figure | Table]``;
:func:`export_button` and :func:`attach_context_menu` turn that list into the same menu
everywhere (a panel's "Export" button, a right click on a plot or a table, the main window's
File → Export). Every file is written atomically (:func:`unitscale_core.atomic.atomic_open`):
a failed write leaves the previous file, or none, never half a file, and the user gets a
message box saying why.

PNG: the widget as on screen, drawn again at ``scale``× its pixels (``QWidget.render``), so
custom-drawn parts (token axes, colour bars) look exactly as they do in the panel and text stays
sharp; the image is ``round(width·scale) × round(height·scale)`` pixels. SVG: pyqtgraph's
``SVGExporter`` on the plot's scene (vector shapes; images embedded as PNG).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PySide6.QtCore import (
    QAbstractItemModel,
    QBuffer,
    QByteArray,
    QCoreApplication,
    QIODevice,
    QPoint,
    Qt,
)
from PySide6.QtGui import QGuiApplication, QImage, QPainter
from PySide6.QtWidgets import (
    QFileDialog,
    QMainWindow,
    QMenu,
    QMessageBox,
    QToolButton,
    QWidget,
)

from unitscale_core.atomic import atomic_open

log = logging.getLogger(__name__)

#: Item-data role holding a cell's exact value for CSV (the display text is rounded for
#: reading); a model that does not answer it exports its display text.
EXPORT_ROLE = int(Qt.ItemDataRole.UserRole) + 17
DEFAULT_SCALE = 2.0

PNG_FILTER = "PNG image (*.png)"
SVG_FILTER = "SVG drawing (*.svg)"
NPY_FILTER = "NumPy array (*.npy)"
CSV_FILTER = "CSV table (*.csv)"
MD_FILTER = "Markdown table (*.md)"


class ExportError(ValueError):
    """Nothing to export (no data yet) or a file name the format cannot take."""


# -- what panels offer -------------------------------------------------------------------------
@dataclass
class TableData:
    """A table: ``header``, the ``cells`` as shown (text) and their exact ``values`` (numbers
    where the cell is a number; same shape as ``cells``)."""

    header: list[str]
    cells: list[list[str]]
    values: list[list[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.values:
            self.values = [list(row) for row in self.cells]


@dataclass
class Figure:
    """A plot or heatmap: ``widget`` is rendered for PNG, SVG (when ``svg``) and the
    clipboard; ``data`` gives the array behind a heatmap (NPY)."""

    key: str  # file stem and objectName suffix: "scaleChart"
    label: str  # menu text: "scale chart"
    widget: Callable[[], QWidget]
    svg: bool = True
    data: Callable[[], np.ndarray] | None = None


@dataclass
class Table:
    """A table view's contents, exported as CSV (exact values) or Markdown (as shown)."""

    key: str
    label: str
    data: Callable[[], TableData]


Item = Figure | Table


# -- tables ------------------------------------------------------------------------------------
def table_from_model(model: QAbstractItemModel, columns: Sequence[int] | None = None) -> TableData:
    """Every row of ``model`` in its current (sorted, filtered) order; ``columns`` picks and
    orders columns (default all). Cells: DisplayRole text; values: :data:`EXPORT_ROLE` when
    the model gives one, else the text."""
    cols = list(range(model.columnCount())) if columns is None else list(columns)
    header = [str(model.headerData(c, Qt.Orientation.Horizontal) or "") for c in cols]
    cells, values = [], []
    for r in range(model.rowCount()):
        row_cells, row_values = [], []
        for c in cols:
            index = model.index(r, c)
            shown = index.data(Qt.ItemDataRole.DisplayRole)
            text = "" if shown is None else str(shown)
            exact = index.data(EXPORT_ROLE)
            row_cells.append(text)
            row_values.append(text if exact is None else exact)
        cells.append(row_cells)
        values.append(row_values)
    return TableData(header, cells, values)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, np.floating) and not isinstance(value, np.float64):
        return f"{float(value):.9g}"  # 9 significant digits round-trip float32
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return repr(float(value))  # shortest text that reads back as the same double
    return value


def csv_text(table: TableData) -> str:
    """Header, then one line per row of exact values (``\\n`` line ends, RFC 4180 quoting)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table.header)
    for row in table.values:
        writer.writerow([_csv_value(v) for v in row])
    return out.getvalue()


def markdown_escape(text: str) -> str:
    """A cell's text made safe inside a GitHub-flavoured Markdown table: backslashes and the
    characters that would end a cell or start markup are escaped; line breaks become spaces."""
    text = " ".join(str(text).split("\n")).replace("\r", " ")
    for ch in ("\\", "|", "`", "*"):
        text = text.replace(ch, "\\" + ch)
    return text.replace("<", "&lt;")


#: Display text that reads as a number, perhaps with a unit: "1.2 M", "20.6 MiB", "5e-4%".
NUMBER_TEXT = re.compile(r"^[-+−]?(\d[\d,]*\.?\d*|\.\d+)(e[-+]?\d+)?\s?[%A-Za-z]{0,4}$")


def _is_number(value: Any) -> bool:
    if isinstance(value, str):
        return bool(NUMBER_TEXT.match(value.strip()))
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def markdown_text(table: TableData) -> str:
    """A GFM pipe table: header row, alignment row (columns of numbers right-aligned), one
    line per row of the cells as shown."""
    n = len(table.header)
    numeric = []
    for c in range(n):
        column = [row[c] for row in table.values if c < len(row) and row[c] is not None
                  and row[c] != ""]
        numeric.append(bool(column) and all(_is_number(v) for v in column))
    lines = ["| " + " | ".join(markdown_escape(h) for h in table.header) + " |",
             "|" + "|".join("---:" if num else ":---" for num in numeric) + "|"]
    for row in table.cells:
        padded = list(row) + [""] * (n - len(row))
        lines.append("| " + " | ".join(markdown_escape(c) for c in padded[:n]) + " |")
    return "\n".join(lines) + "\n"


# -- figures -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _as_exported(widget: QWidget):
    """While a widget is drawn for a file or the clipboard: a widget with an ``exporting()``
    context manager hides what only the screen needs (the model view's "click to select")."""
    exporting = getattr(widget, "exporting", None)
    with exporting() if callable(exporting) else contextlib.nullcontext():
        yield


def render_image(widget: QWidget, scale: float = DEFAULT_SCALE) -> QImage:
    """``widget`` drawn into a white image of ``round(w·scale) × round(h·scale)`` pixels."""
    with _as_exported(widget):
        for _ in range(3):  # pending relayouts (axis sizes after a redraw) happen first
            QCoreApplication.sendPostedEvents()
        size = widget.size()
        image = QImage(max(1, round(size.width() * scale)),
                       max(1, round(size.height() * scale)), QImage.Format.Format_ARGB32)
        image.setDevicePixelRatio(scale)
        image.fill(Qt.GlobalColor.white)
        _paint_widget(widget, image)
    return image


def _paint_widget(widget: QWidget, device) -> None:
    """Draw ``widget`` and its children as on screen onto a paint ``device``."""
    scene = widget.scene() if hasattr(widget, "scene") else None
    if hasattr(scene, "prepareForPaint"):  # pyqtgraph: let items update before drawing
        scene.prepareForPaint()
    painter = QPainter(device)
    try:
        # QWidget's render (widget and children as on screen), not QGraphicsView's
        # overload, which draws the scene alone and takes other arguments
        QWidget.render(widget, painter, QPoint(0, 0))
    finally:
        painter.end()


def png_bytes(image: QImage) -> bytes:
    """``image`` encoded as PNG; OSError when Qt cannot encode it."""
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    ok = image.save(buffer, "PNG")
    buffer.close()
    if not ok:
        raise OSError("could not encode the image as PNG")
    return bytes(data)


def svg_bytes(widget: QWidget, title: str = "") -> bytes:
    """``widget`` as on screen, drawn into an SVG (lines, markers and text as vectors; images
    such as heatmaps embedded as PNG), one SVG unit per screen pixel.

    Qt's ``QSvgGenerator`` records the widget's own painting. pyqtgraph's ``SVGExporter`` is
    not used: with Qt ≥ 6.10 it fails on every plot with a path in it (it parses Qt's path
    data as "x,y" pairs; pyqtgraph issue #3485)."""
    from PySide6.QtCore import QRect
    from PySide6.QtSvg import QSvgGenerator

    with _as_exported(widget):
        for _ in range(3):
            QCoreApplication.sendPostedEvents()
        data = QByteArray()
        buffer = QBuffer(data)
        buffer.open(QIODevice.OpenModeFlag.WriteOnly)
        generator = QSvgGenerator()
        generator.setOutputDevice(buffer)
        generator.setSize(widget.size())
        generator.setViewBox(QRect(0, 0, widget.width(), widget.height()))
        generator.setTitle(title or widget.objectName())
        generator.setDescription("Unit Scaling Explorer")
        _paint_widget(widget, generator)
        buffer.close()
    return bytes(data)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` atomically (temporary file beside ``path``, then replace)."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def save_png(widget: QWidget, path: str | Path, scale: float = DEFAULT_SCALE) -> None:
    write_bytes(path, png_bytes(render_image(widget, scale)))


def save_npy(array: np.ndarray, path: str | Path) -> None:
    """``array`` as .npy, loadable with ``np.load(path)`` (no pickle)."""
    array = np.asarray(array)
    if array.dtype == object:
        raise ExportError("the data is not numeric")
    with atomic_open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def save_table(table: TableData, path: str | Path) -> None:
    """CSV (``.csv``) or Markdown (``.md``), by suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        write_text(path, csv_text(table))
    elif suffix in (".md", ".markdown"):
        write_text(path, markdown_text(table))
    else:
        raise ExportError(f"{Path(path).name}: a table is saved as .csv or .md")


def save_figure(figure: Figure, path: str | Path, scale: float = DEFAULT_SCALE) -> None:
    """PNG, SVG or NPY (the data), by suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        save_png(figure.widget(), path, scale)
    elif suffix == ".svg" and figure.svg:
        write_bytes(path, svg_bytes(figure.widget(), figure.label))
    elif suffix == ".npy" and figure.data is not None:
        save_npy(figure.data(), path)
    else:
        kinds = ".png" + (", .svg" if figure.svg else "") + (", .npy" if figure.data else "")
        raise ExportError(f"{Path(path).name}: the {figure.label} is saved as {kinds}")


def save_item(item: Item, path: str | Path, scale: float = DEFAULT_SCALE) -> None:
    if isinstance(item, Table):
        save_table(item.data(), path)
    else:
        save_figure(item, path, scale)


def copy_image(widget: QWidget, scale: float = DEFAULT_SCALE) -> QImage:
    """Put ``widget`` (as on screen, ``scale``× the pixels) on the clipboard; returns it."""
    image = render_image(widget, scale)
    QGuiApplication.clipboard().setImage(image)
    return image


# -- menus and dialogs -------------------------------------------------------------------------
#: Settings key of the folder the user last exported to (a text: the folder's path).
EXPORT_FOLDER_KEY = "export_folder"
#: The folder of the last export, and the settings store it is written to at once (the
#: program's session registers its QSettings through :func:`remember_folders_in`; tests and
#: ``unitscale report`` leave it None, so nothing is written).
_export_state: dict[str, Any] = {"folder": "", "store": None}


def default_export_folder() -> Path:
    """Where the first export of a user goes: the Documents folder (platformdirs), else the
    home folder — never the working directory, which for a program started from a menu is
    wherever the launcher ran."""
    try:
        import platformdirs

        documents = Path(platformdirs.user_documents_dir())
    except Exception:  # noqa: BLE001 - any platform lookup failure falls back to home
        documents = None
    if documents is not None and documents.is_dir():
        return documents
    return Path.home()


def export_folder() -> Path:
    """The folder an export dialog opens in: the last one exported to while it still exists,
    else :func:`default_export_folder`."""
    last = _export_state["folder"]
    if last and Path(last).is_dir():
        return Path(last)
    return default_export_folder()


def set_export_folder(folder: str | Path | None, *, store: bool = True) -> None:
    """Remember ``folder`` as the last export folder ("" or None: forget it); written to the
    registered settings store at once unless ``store`` is False (restoring from it)."""
    _export_state["folder"] = str(folder) if folder else ""
    settings = _export_state["store"]
    if store and settings is not None:
        settings.setValue(EXPORT_FOLDER_KEY, _export_state["folder"])


def remember_folders_in(settings) -> None:
    """Write each export's folder to ``settings`` (a QSettings; None: nowhere) from now on."""
    _export_state["store"] = settings


#: Characters kept in a proposed file name; runs of anything else become one "-".
_NAME_UNSAFE = re.compile(r"[^\w.+]+")


def export_file_name(parts: Sequence[str], suffix: str) -> str:
    """A file name made of ``parts`` (config name, panel, what is exported): lower case,
    "-" between words, a word repeating the one before dropped ("sizes", "sizes table" →
    ``sizes-table``), at most 120 characters before ``suffix``."""
    words: list[str] = []
    for part in parts:
        for word in _NAME_UNSAFE.sub("-", str(part).replace("_", "-")).lower().split("-"):
            word = word.strip(".")
            if word and (not words or words[-1] != word):
                words.append(word)
    return ("-".join(words)[:120].strip("-.") or "export") + suffix


def panel_name(parent: QWidget) -> str:
    """The panel an export comes from, in words: its objectName without "Panel"
    ("attentionPanel" → "attention")."""
    name = parent.objectName() or ""
    return name[:-len("Panel")] if name.endswith("Panel") else name


def config_name(parent: QWidget) -> str:
    """The config an export is of: what the window calls it (:meth:`export_config_name` of
    the main window: file, import or preset name), "" outside a window."""
    window = parent.window()
    name = getattr(window, "export_config_name", None)
    return name() if callable(name) else ""


def suggested_export_path(parent: QWidget, what: str, suffix: str) -> Path:
    """Where an export dialog starts: :func:`export_folder`, with a name saying which panel,
    what and which config (``llama-3-8b-attention-model-view.png``)."""
    return export_folder() / export_file_name(
        [config_name(parent), panel_name(parent), what], suffix)


def ask_save_path(parent: QWidget, title: str, what: str, suffix: str, filt: str) -> str | None:
    """The save dialog every export uses: starts at :func:`suggested_export_path`; the
    answer gets ``suffix`` when it has none of its own. None when cancelled."""
    start = str(suggested_export_path(parent, what, suffix))
    path, _ = QFileDialog.getSaveFileName(parent, title, start, filt)
    if not path:
        return None
    if Path(path).suffix.lower() != suffix:
        path += suffix
    return path


def note_exported(path: str | Path) -> None:
    """An export was written to ``path``: the next dialog starts in its folder (and so does
    the next session's, through the registered settings)."""
    set_export_folder(Path(path).resolve().parent)


def _notify(parent: QWidget, text: str) -> None:
    window = parent.window()
    if isinstance(window, QMainWindow):
        window.statusBar().showMessage(text, 5000)


def export_with_dialog(parent: QWidget, item: Item, suffix: str) -> str | None:
    """Ask for a file name, write ``item`` as ``suffix``; on failure say why in a message box
    (nothing is left behind). Returns the path written, or None."""
    filters = {".png": PNG_FILTER, ".svg": SVG_FILTER, ".npy": NPY_FILTER, ".csv": CSV_FILTER,
               ".md": MD_FILTER}
    path = ask_save_path(parent, f"Export {item.label} as {suffix[1:].upper()}", item.label,
                         suffix, filters[suffix])
    if path is None:
        return None
    try:
        save_item(item, path)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.warning("export to %s failed: %s", path, reason)
        QMessageBox.warning(parent, "Export failed", f"Could not write {path}: {reason}")
        return None
    note_exported(path)
    _notify(parent, f"wrote {path}")
    return path


def copy_with_message(parent: QWidget, figure: Figure) -> None:
    copy_image(figure.widget())
    _notify(parent, f"copied the {figure.label} to the clipboard")


def fill_menu(menu: QMenu, parent: QWidget, items: Sequence[Item]) -> None:
    """Add each item's actions: figures → PNG, SVG, NPY, copy; tables → CSV, Markdown."""
    for i, item in enumerate(items):
        if i:
            menu.addSeparator()
        title = item.label[:1].upper() + item.label[1:]
        if isinstance(item, Figure):
            suffixes = [".png"] + ([".svg"] if item.svg else []) + ([".npy"] if item.data else [])
        else:
            suffixes = [".csv", ".md"]
        names = {".png": "PNG", ".svg": "SVG", ".npy": "data as NPY", ".csv": "CSV",
                 ".md": "Markdown"}
        for suffix in suffixes:
            action = menu.addAction(f"{title} as {names[suffix]}…")
            action.setObjectName(f"export_{item.key}_{suffix[1:]}")
            action.triggered.connect(
                lambda _=False, it=item, s=suffix: export_with_dialog(parent, it, s))
        if isinstance(item, Figure):
            action = menu.addAction(f"Copy {item.label} as image")
            action.setObjectName(f"copy_{item.key}")
            action.triggered.connect(lambda _=False, it=item: copy_with_message(parent, it))
    if not items:
        menu.addAction("(nothing to export yet)").setEnabled(False)


def menu_for(parent: QWidget, items: Callable[[], Sequence[Item]],
             menu: QMenu | None = None) -> QMenu:
    """A menu rebuilt from ``items()`` each time it opens (what is on screen now)."""
    menu = menu or QMenu(parent)

    def rebuild() -> None:
        menu.clear()
        fill_menu(menu, parent, list(items()))

    menu.aboutToShow.connect(rebuild)
    # until it first opens (the panel may still be under construction), the menu holds the
    # disabled "(nothing to export yet)" entry; aboutToShow fills it with what is on screen
    fill_menu(menu, parent, [])
    return menu


def export_button(parent: QWidget, name: str,
                  items: Callable[[], Sequence[Item]]) -> QToolButton:
    """The panel's "Export" button: a drop-down of :func:`fill_menu`'s actions."""
    button = QToolButton(parent, objectName=name, text="Export")
    button.setToolTip("Save what this panel shows: figures as PNG, SVG or NPY, tables as CSV "
                      "or Markdown, or copy a figure to the clipboard (also: right click a "
                      "plot or table; Edit → Copy as image, Ctrl+Shift+C)")
    button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
    button.setMenu(menu_for(parent, items))
    return button


def attach_context_menu(widget: QWidget, parent: QWidget,
                        items: Callable[[], Sequence[Item]]) -> None:
    """Right click on ``widget`` opens the export menu of ``items()``."""
    widget.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)

    def show(pos) -> None:
        menu = QMenu(widget)
        fill_menu(menu, parent, list(items()))
        target = widget.viewport() if hasattr(widget, "viewport") else widget
        popup_menu(menu, target.mapToGlobal(pos))

    widget.customContextMenuRequested.connect(show)


def popup_menu(menu: QMenu, where) -> None:
    """Run a context menu at the global point ``where`` (tests replace this)."""
    menu.exec(where)


def first_figure(items: Sequence[Item]) -> Figure | None:
    return next((i for i in items if isinstance(i, Figure)), None)


__all__ = [
    "EXPORT_FOLDER_KEY", "EXPORT_ROLE", "ExportError", "Figure", "Table", "TableData",
    "ask_save_path", "attach_context_menu", "config_name", "copy_image", "csv_text",
    "default_export_folder", "export_button", "export_file_name", "export_folder",
    "export_with_dialog", "fill_menu", "first_figure", "markdown_escape", "markdown_text",
    "menu_for", "note_exported", "panel_name", "png_bytes", "remember_folders_in",
    "render_image", "save_figure", "save_item", "save_npy", "save_png", "save_table",
    "set_export_folder", "suggested_export_path", "svg_bytes", "table_from_model",
    "write_bytes", "write_text",
]
