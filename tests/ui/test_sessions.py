"""Sessions: New / Open / Save / Save As, recent files, unsaved-changes prompts, and the
layout, panel choices and last config restored on the next launch — with settings isolated in
a temporary INI file, and damaged files and settings refused without touching them."""

from __future__ import annotations

import json

import pytest
from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QFileDialog, QMessageBox, QSpinBox

from app.main_window import MAX_RECENT, MainWindow
from unitscale_core import ModelConfig
from unitscale_core.config import backup_path, dumps_json, load

Button = QMessageBox.StandardButton


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path, monkeypatch):
    """Every QSettings of these tests lives under tmp_path, never the user's."""
    for fmt in (QSettings.Format.NativeFormat, QSettings.Format.IniFormat):
        QSettings.setPath(fmt, QSettings.Scope.UserScope, str(tmp_path / "user-settings"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def settings_file(tmp_path):
    return str(tmp_path / "session.ini")


@pytest.fixture
def session(qtbot, settings_file):
    """``session()`` → a program-like window (restores, remembers, confirms) on the INI file;
    closed without prompting afterwards."""

    def make(**kwargs):
        store = QSettings(settings_file, QSettings.Format.IniFormat)
        win = MainWindow(restore_settings=True, settings=store, **kwargs)
        # closed at teardown without asking (a test may leave unsaved changes)
        qtbot.addWidget(win, before_close_func=lambda w: setattr(w, "_confirm", False))
        win.show()
        qtbot.waitExposed(win)
        return win

    return make


@pytest.fixture
def answer(monkeypatch):
    """QMessageBox.question answers the queued buttons; the questions are recorded."""
    queue: list = []
    asked: list[str] = []

    def question(parent, title, text, *args):
        asked.append(text)
        return queue.pop(0)

    monkeypatch.setattr(QMessageBox, "question", staticmethod(question))
    return queue, asked


@pytest.fixture
def dialogs(monkeypatch):
    """File dialogs answer the queued (path, filter) pairs."""
    saves: list = []
    opens: list = []
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a: saves.pop(0)))
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a: opens.pop(0)))
    return saves, opens


def set_layers(win: MainWindow, n: int) -> None:
    win.model_panel.findChild(QSpinBox, "n_layers").setValue(n)


def test_title_shows_file_and_unsaved_mark(session, tmp_path):
    win = session()
    assert win.windowTitle().startswith("untitled[*]") and not win.isWindowModified()
    set_layers(win, 3)
    assert win.isWindowModified() and win.is_modified()
    path = tmp_path / "m.json"
    assert win.save_config(path)
    assert win.windowTitle().startswith("m.json[*]") and not win.isWindowModified()
    set_layers(win, 4)  # back to the file's value: unchanged again
    set_layers(win, 3)
    assert not win.isWindowModified()


def test_save_as_toml_then_save_keeps_backup(session, dialogs, tmp_path):
    saves, _ = dialogs
    win = session()
    set_layers(win, 5)
    saves.append((str(tmp_path / "model"), "TOML (*.toml)"))  # no suffix: the filter's
    assert win.save()  # untitled: Save asks where
    path = tmp_path / "model.toml"
    assert win.path == path.resolve() and load(path) == win.config
    first = path.read_bytes()
    set_layers(win, 6)
    assert win.save()  # Ctrl+S: to the same file, no dialog
    assert load(path).n_layers == 6 and not saves
    assert backup_path(path).read_bytes() == first  # model.bak.toml: the previous version
    assert not list(tmp_path.glob(".*.tmp"))
    keys = {a.objectName(): a.shortcut().toString() for a in win.findChildren(type(
        win.menuBar().actions()[0])) if a.objectName()}
    assert keys["saveAction"] == "Ctrl+S" and keys["saveAsAction"] == "Ctrl+Shift+S"
    assert keys["openAction"] == "Ctrl+O" and keys["newAction"] == "Ctrl+N"


def test_unsaved_changes_prompt_on_close_new_and_open(session, answer, dialogs, tmp_path):
    queue, asked = answer
    saves, opens = dialogs
    win = session()
    set_layers(win, 7)
    queue.append(Button.Cancel)
    assert not win.close() and win.isVisible()  # Cancel keeps the window open
    queue.append(Button.Cancel)
    assert not win.new_config() and win.config.n_layers == 7
    other = tmp_path / "other.json"
    other.write_text(dumps_json(ModelConfig(n_layers=2)))
    queue.append(Button.Cancel)
    opens.append((str(other), ""))
    win._open_dialog()
    assert win.config.n_layers == 7 and opens  # the dialog was not even shown
    queue.append(Button.Discard)
    assert win.new_config() and win.config == ModelConfig() and win.path is None
    set_layers(win, 9)
    queue.append(Button.Save)
    saves.append((str(tmp_path / "kept.json"), "JSON (*.json)"))
    assert win.close()
    assert load(tmp_path / "kept.json").n_layers == 9
    assert len(asked) == 5 and all("Save the changes" in q for q in asked)


def test_recent_files_persist_and_missing_ones_are_pruned(session, tmp_path):
    win = session()
    paths = []
    for i in range(MAX_RECENT + 2):
        p = tmp_path / f"c{i}.json"
        p.write_text(dumps_json(ModelConfig(n_layers=i + 1)))
        paths.append(p)
        assert win.open_config(p)
    assert win.recent_files() == [str(p.resolve()) for p in reversed(paths)][:MAX_RECENT]
    paths[-2].unlink()
    win._fill_recent_menu()
    assert str(paths[-2].resolve()) not in win.recent_files()
    assert "c8.json" in win.notice.text() and "\n" not in win.notice.text()
    entries = [a.data() for a in win.recent_menu.actions() if a.data()]
    assert entries == win.recent_files()
    assert win.open_recent(win.recent_files()[1]) and win.config.n_layers == MAX_RECENT
    win._confirm = False
    win.close()
    again = session()
    assert again.recent_files() == win.recent_files()


def test_session_restored_on_next_launch(session, tmp_path):
    win = session()
    path = tmp_path / "s.json"
    set_layers(win, 3)
    assert win.save_config(path)
    set_layers(win, 5)  # unsaved at quit: kept for the next launch, still marked
    sp, pp = win.scaling_panel, win.positional_panel
    sp.format.setCurrentIndex(sp.format.findData("fp16"))
    sp.param.setCurrentIndex(sp.param.findData("umup"))
    sp.filter.setText("attn")
    sp.seed_tab.inputs["alpha"].setValue(1.5)
    pp.compare.setCurrentIndex(pp.compare.findData("rope"))
    pp.view.setCurrentIndex(pp.view.findData("similarity_cosine"))
    win.attention_panel.text.setText("hello world")
    win.docks["Sizes"].hide()
    win._confirm = False
    win.close()

    again = session()
    assert again.config == win.config and again.config.n_layers == 5
    assert again.path == path.resolve() and again.isWindowModified()
    assert again.windowTitle().startswith("s.json[*]")
    sp, pp = again.scaling_panel, again.positional_panel
    assert sp.format.currentData() == "fp16" and sp.param.currentData() == "umup"
    assert sp.filter.text() == "attn" and sp.seed_tab.inputs["alpha"].value() == 1.5
    assert sp.shown_config().parametrization == "umup"
    assert pp.compare.currentData() == "rope" and pp.view.currentData() == "similarity_cosine"
    assert pp.follow.isChecked() and pp.kind.currentData() == again.config.positional
    assert again.attention_panel.text.text() == "hello world"
    assert not again.docks["Sizes"].isVisible()
    assert again.problems == []


def test_damaged_settings_start_on_defaults_with_one_line(session, settings_file):
    store = QSettings(settings_file, QSettings.Format.IniFormat)
    store.setValue("last_config", '{"d_model": 100, "n_heads": 12')  # truncated
    store.setValue("geometry", "not a geometry")
    store.setValue("window_state", 12)
    store.setValue("recent_files", json.dumps([1, 2]))
    store.setValue("current_file", "/nonexistent/x.json")
    store.setValue("panels/scalingPanel", json.dumps({"scaleFormat": "fp99", "bogus": 1,
                                                      "scaleFilter": 7}))
    store.setValue("panels/positionalPanel", "[[[[")
    store.setValue("panels/attentionPanel", json.dumps({"attnSource": "/etc/passwd"}))
    store.sync()
    win = session()
    assert win.config == ModelConfig()
    assert win.scaling_panel.format.currentData() == "fp8_e4m3"  # unchanged default
    assert win.attention_panel.source.currentData() == "configured"
    text = win.notice.text()
    assert text.startswith("Some saved settings were skipped:") and "\n" not in text
    joined = " ".join(win.problems)
    for needle in ("not valid JSON", "geometry", "window_state", "recent_files", "x.json",
                   "fp99", "bogus", "scaleFilter", "positionalPanel", "/etc/passwd"):
        assert needle in joined, needle


@pytest.mark.parametrize("content", [
    b'{"schema_version": 1, "d_model": 2',  # truncated
    b"\xff\xfe\x00garbage",  # not text
    b"[" * 100_000,  # nested too deeply
    b'{"d_model": 64, "__import__(\'os\').system(\'touch pwned\')": 1}',  # hostile key
    b'd_model = "1e9"\n',  # TOML syntax as JSON
])
def test_bad_config_file_is_refused_and_left_untouched(session, tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    win = session()
    before = win.config
    assert not win.open_config(path)
    assert win.config == before and win.path is None
    assert path.read_bytes() == content and not (tmp_path / "pwned").exists()
    assert win.notice.text().startswith("Could not open bad.json") and \
        "\n" not in win.notice.text()
    assert str(path.resolve()) not in win.recent_files()


def test_failed_save_reports_and_keeps_session(session, tmp_path):
    win = session()
    set_layers(win, 3)
    target = tmp_path / "no" / "such" / "dir.json"
    assert not win.save_config(target)
    assert not target.exists() and win.path is None and win.isWindowModified()
    assert win.notice.text().startswith("Could not save dir.json")
