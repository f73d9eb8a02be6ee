"""Export: every panel's figures (PNG, SVG, NPY) and tables (CSV, Markdown) through its Export
menu, atomic writes, failures reported, Copy as image, and the Markdown/CSV encoders."""

from __future__ import annotations

import csv
import io
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PySide6.QtCore import QPoint, Qt
from PySide6.QtGui import QContextMenuEvent, QFont, QFontMetricsF, QGuiApplication, QImage
from PySide6.QtWidgets import QApplication, QFileDialog, QMessageBox, QToolButton

from app import export
from app.export import Figure, Table, TableData, csv_text, markdown_text
from unitscale_core import ModelConfig
from unitscale_core.scaling.predict import predict
from unitscale_core.sizing import size_report

SMALL = ModelConfig(d_model=64, n_heads=4, d_ff=128, n_layers=2, vocab_size=256, max_len=64,
                    seq_len=16, batch_size=2)
UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def md_cells(line: str) -> list[str]:
    """A Markdown table line split on unescaped pipes, escapes undone (a reader's view)."""
    assert line.startswith("| ") or line.startswith("|:") or line.startswith("|-"), line
    parts = UNESCAPED_PIPE.split(line)[1:-1]
    return [re.sub(r"\\(.)", r"\1", p.strip()).replace("&lt;", "<") for p in parts]


@pytest.fixture
def save_as(monkeypatch, tmp_path):
    """QFileDialog.getSaveFileName answers the paths queued in the returned list."""
    answers: list[str] = []
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        staticmethod(lambda *a, **k: (answers.pop(0), "")))
    return answers


@pytest.fixture
def warnings(monkeypatch):
    shown: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning",
                        staticmethod(lambda parent, title, text, *a: shown.append(text)))
    return shown


def menu_actions(panel, name: str) -> dict:
    button = panel.findChild(QToolButton, name)
    assert button is not None, name
    menu = button.menu()
    menu.aboutToShow.emit()  # rebuilt from what the panel shows now
    return {a.objectName(): a for a in menu.actions() if a.objectName()}


def test_markdown_table_is_well_formed_and_escaped():
    table = TableData(["name | kind", "value"],
                      [["a|b", "1.5"], ["back\\slash `code` *x*", "2"], ["two\nlines <b>", ""]],
                      [["a|b", 1.5], ["back\\slash `code` *x*", 2], ["two\nlines <b>", None]])
    lines = markdown_text(table).splitlines()
    assert len(lines) == 2 + 3
    assert md_cells(lines[0]) == ["name | kind", "value"]
    assert md_cells(lines[1]) == [":---", "---:"]  # text left, numbers right
    assert [md_cells(line) for line in lines[2:]] == [
        ["a|b", "1.5"], ["back\\slash `code` *x*", "2"], ["two lines <b>", ""]]


def test_csv_keeps_exact_values_and_quotes():
    x = 0.1 + 0.2  # not 0.3: the CSV must keep every digit
    table = TableData(["a", "b"], [["x, y", "0.3"]], [["x, y", x]])
    rows = list(csv.reader(io.StringIO(csv_text(table))))
    assert rows == [["a", "b"], ["x, y", repr(x)]] and float(rows[1][1]) == x


def test_scale_table_csv_and_markdown_match_predict(qtbot, make_window, save_as, tmp_path):
    win = make_window(SMALL)
    panel = win.scaling_panel
    actions = menu_actions(panel, "scalingExport")
    save_as[:] = [str(tmp_path / "s.csv"), str(tmp_path / "s")]  # suffix added when missing
    actions["export_scales_csv"].trigger()
    actions["export_scales_md"].trigger()
    rows = predict(SMALL.replace(), formats=(panel.format.currentData(),))
    with open(tmp_path / "s.csv", newline="", encoding="utf-8") as handle:
        got = list(csv.DictReader(handle))
    assert [(g["tensor"], g["kind"]) for g in got] == [(r.name, r.kind) for r in rows]
    assert [float(g["predicted RMS"]) for g in got] == [r.rms for r in rows]  # exact
    md = (tmp_path / "s.md").read_text(encoding="utf-8").splitlines()
    assert len(md) == len(rows) + 2
    header = md_cells(md[0])
    assert header[:3] == ["tensor", "kind", "predicted RMS"]
    assert all(len(md_cells(line)) == len(header) for line in md[1:])
    assert md_cells(md[2])[0] == rows[0].name
    assert not list(tmp_path.glob(".*.tmp"))


def test_sizes_table_exact_column_is_integers(qtbot, make_window, tmp_path):
    win = make_window(SMALL)
    table = win.sizes_panel.export_items()[0]
    assert isinstance(table, Table)
    export.save_item(table, tmp_path / "sizes.csv")
    with open(tmp_path / "sizes.csv", newline="", encoding="utf-8") as handle:
        got = {r["Quantity"].strip(): r["Exact"] for r in csv.DictReader(handle)}
    report = size_report(SMALL)
    assert got["Parameters (P)"] == str(report["total"])
    assert got["Memory: training total"] == str(report["memory_bytes"]["total"])


def test_every_figure_exports_png_svg_npy(qtbot, make_window, tmp_path):
    win = make_window(SMALL)
    win.resize(1400, 900)
    qtbot.wait(50)
    # the positional view is a tab behind Scaling: it computes once shown (the model's
    # learned table is built in the worker)
    win.show_dock(win.docks["Positional"])

    def positional_ready() -> bool:
        try:
            win.positional_panel.primary.array()
        except ValueError:
            return False
        return True

    qtbot.waitUntil(positional_ready, timeout=30_000)
    panels = [win.scaling_panel, win.positional_panel]
    figures = [(p, f) for p in panels for f in p.export_items() if isinstance(f, Figure)]
    assert {f.key for _, f in figures} >= {"scaleChart", "positional"}
    for _, fig in figures:
        png, svg = tmp_path / f"{fig.key}.png", tmp_path / f"{fig.key}.svg"
        export.save_item(fig, png)
        image = QImage(str(png))
        widget = fig.widget()
        assert (image.width(), image.height()) == (2 * widget.width(), 2 * widget.height())
        export.save_item(fig, svg)
        root = ET.fromstring(svg.read_bytes())
        assert root.tag.endswith("svg") and len(list(root.iter())) > 10
        if fig.data is not None:
            export.save_item(fig, tmp_path / f"{fig.key}.npy")
            np.testing.assert_array_equal(np.load(tmp_path / f"{fig.key}.npy"), fig.data())
    # the positional heatmap's data is the encoding the core computes
    from unitscale_core.positional_views import compute_view

    expected = compute_view(win.positional_panel.spec(),
                            win.positional_panel.model_table()).matrix
    np.testing.assert_array_equal(np.load(tmp_path / "positional.npy"), expected)


def test_attention_items_cover_views_and_table(qtbot, tmp_path):
    from app.panels.attention_panel import AttentionPanel, compute_maps
    from app.worker import Worker

    worker = Worker()
    panel = AttentionPanel(SMALL, worker)
    qtbot.addWidget(panel)
    panel.resize(1000, 700)
    panel.show()
    maps = compute_maps("configured", "a b c d", SMALL, None, 512)
    panel.show_maps(maps)
    items = {i.key: i for i in panel.export_items()}
    km = maps.kinds["self"]
    export.save_item(items["attentionModelView"], tmp_path / "mv.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "mv.npy"), km.att)
    export.save_item(items["attentionEntropy"], tmp_path / "e.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), km.entropy)
    export.save_item(items["attentionMatrix"], tmp_path / "m.md")
    md = (tmp_path / "m.md").read_text(encoding="utf-8").splitlines()
    assert md_cells(md[0])[2:] == km.key_tokens and len(md) == 2 + len(km.query_tokens)
    worker.stop(2000)


def test_failed_write_leaves_nothing_and_says_why(qtbot, make_window, save_as, warnings,
                                                  tmp_path):
    win = make_window(SMALL)
    target = tmp_path / "missing" / "chart.png"
    save_as.append(str(target))
    assert menu_actions(win.scaling_panel, "scalingExport")["export_scaleChart_png"] \
        .trigger() is None
    assert len(warnings) == 1 and str(target) in warnings[0]
    assert "\n" not in warnings[0]
    assert not target.exists() and not list(tmp_path.rglob("*.tmp"))
    # an existing file is kept whole when the new one cannot be written
    good = tmp_path / "table.csv"
    good.write_text("old\n")
    table = Table("t", "t", lambda: TableData(["a"], [["1"]]))

    def broken(_table):
        raise OSError(28, "No space left on device")

    original = export.csv_text
    export.csv_text = broken
    try:
        save_as.append(str(good))
        export.export_with_dialog(win, table, ".csv")
    finally:
        export.csv_text = original
    assert good.read_text() == "old\n" and "No space left" in warnings[-1]


def test_copy_as_image_copies_the_focused_panels_figure(qtbot, make_window):
    win = make_window(SMALL)
    win.resize(1400, 900)
    qtbot.wait(50)
    QGuiApplication.clipboard().clear()
    win.scaling_panel.table.setFocus()
    QApplication.processEvents()
    image = win.copy_focused_image()
    chart = win.scaling_panel.chart.exported.plot_widget  # the whole chart, with its title
    assert (image.width(), image.height()) == (2 * chart.width(), 2 * chart.height())
    pasted = QGuiApplication.clipboard().image()
    assert (pasted.width(), pasted.height()) == (image.width(), image.height())
    # a panel without figures copies itself
    win.sizes_panel.table.setFocus()
    QApplication.processEvents()
    image = win.copy_focused_image()
    assert image.width() == 2 * win.sizes_panel.width()
    action = win.findChild(type(win.menuBar().actions()[0]), "copyImageAction")
    assert action.shortcut().toString() == "Ctrl+Shift+C"


def test_right_click_on_a_table_opens_its_export_menu(qtbot, make_window, monkeypatch):
    win = make_window(SMALL)
    shown: list[list[str]] = []
    monkeypatch.setattr(export, "popup_menu", lambda menu, _where: shown.append(
        [a.text() for a in menu.actions() if a.text()]))
    viewport = win.sizes_panel.table.viewport()
    event = QContextMenuEvent(QContextMenuEvent.Reason.Mouse, QPoint(5, 5),
                              viewport.mapToGlobal(QPoint(5, 5)), Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(viewport, event)
    assert shown == [["Sizes table as CSV…", "Sizes table as Markdown…"]]


def test_exported_chart_title_wraps_within_the_image(qtbot, make_window):
    """The file's title named the config, parametrization, dtype and format on one line that
    ran past a 900 px image's edge (seen in a real window: '… · standard ·' then cut). Each
    line now fits, nothing is dropped, and the title row is tall enough for them."""
    from app.widgets.scale_chart import EXPORT_MIN_WIDTH, wrap_title

    panel = make_window().scaling_panel
    title = panel.chart_title()
    assert title.endswith("range shaded")
    panel.chart.resize(600, 400)  # narrower than the export's minimum width
    widget = panel.export_items()[0].widget()
    chart = panel.chart.exported
    assert widget.width() == EXPORT_MIN_WIDTH
    lines = panel.chart.export_title_lines()
    assert len(lines) >= 2 and " ".join(lines) == title
    text_item = chart.plot.titleLabel.item
    assert text_item.boundingRect().width() <= widget.width()
    assert text_item.boundingRect().height() <= chart.plot.titleLabel.maximumHeight() + 1
    metrics = QFontMetricsF(QFont(chart.font().family(), 10))
    assert wrap_title("a · b", metrics, 1000) == ["a · b"]
    assert wrap_title("aaaa · bbbb", metrics, metrics.horizontalAdvance("aaaa ·")) == [
        "aaaa ·", "bbbb"]


@pytest.fixture
def dialog_starts(monkeypatch):
    """Each save dialog's starting path, recorded; the dialog answers the queued paths."""
    starts: list[str] = []
    answers: list[str] = []

    def ask(parent, title, start, *rest, **kw):
        starts.append(start)
        return answers.pop(0), ""

    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(ask))
    return starts, answers


def test_export_dialog_starts_in_documents_then_the_last_export_folder(
        qtbot, make_window, dialog_starts, tmp_path, monkeypatch):
    """Never the working directory: the first export proposes the Documents folder (home
    when there is none), named after the panel, the item and the config; the next starts
    where the last one went, also from another panel and the training panel's own menu."""
    from pathlib import Path

    import platformdirs

    documents = tmp_path / "Documents"
    documents.mkdir()
    monkeypatch.setattr(platformdirs, "user_documents_dir", lambda: str(documents))
    monkeypatch.chdir(tmp_path)
    starts, answers = dialog_starts
    win = make_window(SMALL)
    assert win.save_config(tmp_path / "my model.json")
    sizes = menu_actions(win.sizes_panel, "sizesExport")
    answers.append("")  # cancelled: nothing written, nothing remembered
    sizes["export_sizes_csv"].trigger()
    assert Path(starts[-1]) == documents / "my-model-sizes-table.csv"
    out = tmp_path / "figures"
    out.mkdir()
    answers.append(str(out / "s.csv"))
    sizes["export_sizes_csv"].trigger()
    assert (out / "s.csv").exists()
    answers.append("")
    menu_actions(win.attention_panel, "attnExport")["export_attentionModelView_png"].trigger()
    assert Path(starts[-1]) == out / "my-model-attention-model-view.png"
    answers.append("")
    win.training_panel.export_button.menu().actions()[1].trigger()
    assert Path(starts[-1]) == out / "my-model-training-loss-plot.png"
    (out / "s.csv").unlink()
    out.rmdir()
    answers.append("")  # the folder is gone: back to Documents
    sizes["export_sizes_csv"].trigger()
    assert Path(starts[-1]).parent == documents
    monkeypatch.setattr(platformdirs, "user_documents_dir", lambda: str(tmp_path / "none"))
    assert export.default_export_folder() == Path.home()


def test_export_name_follows_preset_and_shape(qtbot, make_window):
    win = make_window(SMALL)
    assert win.export_config_name() == "decoder-2x64"  # untitled: its shape
    box = win.model_panel.preset
    box.setCurrentIndex(box.findData("gpt2-small"))
    box.activated.emit(box.currentIndex())
    assert win.export_config_name() == "gpt2-small"
    assert export.suggested_export_path(win.scaling_panel, "scale chart", ".png").name == \
        "gpt2-small-scaling-scale-chart.png"
    assert export.export_file_name(["a/b: c", "", "Modèle", "modèle"], ".svg") == \
        "a-b-c-modèle.svg"
    assert export.export_file_name(["..", "/"], ".csv") == "export.csv"


def test_last_export_folder_is_remembered_between_sessions(qtbot, tmp_path, dialog_starts):
    """The folder is written to the session's settings as soon as an export succeeds, and the
    next session's first export dialog starts there."""
    from pathlib import Path

    from PySide6.QtCore import QSettings

    from app.main_window import MainWindow

    starts, answers = dialog_starts
    ini = str(tmp_path / "session.ini")
    out = tmp_path / "exports"
    out.mkdir()
    win = MainWindow(SMALL, restore_settings=True, confirm_unsaved=False,
                     settings=QSettings(ini, QSettings.Format.IniFormat))
    qtbot.addWidget(win)
    answers.append(str(out / "sizes.md"))
    menu_actions(win.sizes_panel, "sizesExport")["export_sizes_md"].trigger()
    assert (out / "sizes.md").exists()
    assert QSettings(ini, QSettings.Format.IniFormat).value(export.EXPORT_FOLDER_KEY) == str(out)
    win.close()
    export._export_state.update(folder="", store=None)  # a new process remembers nothing
    again = MainWindow(restore_settings=True, confirm_unsaved=False,
                       settings=QSettings(ini, QSettings.Format.IniFormat))
    qtbot.addWidget(again)
    answers.append("")
    menu_actions(again.sizes_panel, "sizesExport")["export_sizes_csv"].trigger()
    assert Path(starts[-1]).parent == out
    again.close()


def test_untitled_save_as_proposes_documents_and_the_config_name(qtbot, make_window,
                                                                 tmp_path, monkeypatch):
    import platformdirs

    monkeypatch.setattr(platformdirs, "user_documents_dir", lambda: str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    win = make_window(SMALL)
    assert win.suggested_save_path() == tmp_path / "decoder-2x64.json"
    box = win.model_panel.preset
    box.setCurrentIndex(box.findData("gpt2-small"))
    box.activated.emit(box.currentIndex())
    assert win.suggested_save_path() == tmp_path / "gpt2-small.json"
