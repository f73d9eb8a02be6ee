"""Sessions: New / Open / Save / Save As, recent files, unsaved-changes prompts, and the
layout, panel choices and last config restored on the next launch — with settings isolated in
a temporary INI file, and damaged files and settings refused without touching them."""

from __future__ import annotations

import json
from pathlib import Path

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


# -- damaged settings files (issue 20 #2) ----------------------------------------------------

DAMAGED_FILES = {
    "binary garbage": (b"\xff\xfe\x00\x01garbage\x00\x00\x9c", "holds NUL bytes"),
    "not UTF-8": (b"[General]\nlast_config=\xff\xfe\xfd\n", "is not UTF-8 text (line 2)"),
    "empty": (b"", "is empty"),
    "blank": (b"\n  \n", "is empty"),
    "NUL bytes": (b"[General]\nlast_config=abc\x00def\n", "holds NUL bytes (line 2)"),
    "control characters": (b"[General]\nx=\x01\x02\n", "holds control characters (line 2)"),
    "not a settings file": (b"hello world\nno equals here\n", "line 1 is not a setting"),
}


@pytest.mark.parametrize("kind", list(DAMAGED_FILES))
def test_damaged_settings_file_is_named_kept_and_replaced(session, settings_file, kind):
    """Qt reads each of these as "no settings" with status NoError; the window names the
    damage in the notice, starts on the defaults, keeps the damaged bytes as
    ``NAME.damaged`` and only then writes its own settings on close (which restore)."""
    content, reason = DAMAGED_FILES[kind]
    Path(settings_file).write_bytes(content)
    win = session()
    assert win.config == ModelConfig()
    text = win.notice.text()
    assert text.startswith(f"Settings file session.ini {reason}") and "\n" not in text
    assert "kept as session.ini.damaged" in text and "started on the defaults" in text
    kept = Path(settings_file + ".damaged")
    assert kept.read_bytes() == content  # kept before anything could write
    set_layers(win, 3)
    win._confirm = False
    win.close()
    assert kept.read_bytes() == content
    again = session()
    assert again.config.n_layers == 3 and again.settings_damage == "" and again.problems == []


def test_a_second_damage_keeps_the_first_copy(session, settings_file):
    Path(settings_file).write_bytes(b"\x00first")
    win = session()
    win._confirm = False
    win.close()
    Path(settings_file).write_bytes(b"\x00second")
    again = session()
    assert "kept as session.ini.damaged.2" in again.notice.text()
    assert Path(settings_file + ".damaged").read_bytes() == b"\x00first"
    assert Path(settings_file + ".damaged.2").read_bytes() == b"\x00second"


def test_damaged_settings_that_cannot_be_kept_are_left_untouched(session, settings_file,
                                                                 monkeypatch):
    """No copy can be written (a read-only folder, a full disk): the file is never written
    over; the session runs on the defaults and says its settings are not saved."""
    import app.main_window as MW

    def no_room(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MW, "keep_damaged_copy", no_room)
    content = b"[General]\n\x00\x00\x00"
    Path(settings_file).write_bytes(content)
    win = session()
    assert "No space left on device" in win.notice.text()
    assert "left as it is and this session's settings are not saved" in win.notice.text()
    set_layers(win, 3)
    win._clear_recent()  # the session writes to a scratch store, never to the damaged file
    win._confirm = False
    win.close()
    assert Path(settings_file).read_bytes() == content


HUGE = "9" * 5000  # beyond Python's 4300-digit limit for int(str)


@pytest.mark.parametrize("key, value, needle", [
    ("last_config", '{"dropout": ' + "9" * 401 + "}", "dropout"),
    ("last_config", '{"d_model": ' + HUGE + "}", "not valid JSON"),
    ("recent_files", "[" + HUGE + "]", "recent_files"),
    ("panels/scalingPanel", json.dumps({"measureSeeds": 10**401}), "measureSeeds"),
    ("panels/scalingPanel", '{"measureSeeds": ' + HUGE + "}", "scalingPanel"),
    ("panels/positionalPanel", json.dumps({"posBase": 10**401, "posFollow": False}),
     "posBase"),
    ("panels/attentionPanel", json.dumps({"attnText": 10**401}), "attnText"),
    ("current_file", HUGE, "could not reopen"),
    ("current_file", HUGE + ".json", "could not reopen"),
    ("current_file", "/tmp/with\0nul.json", "could not reopen"),
])
def test_huge_integers_and_odd_paths_in_settings_start_normally(session, settings_file, key,
                                                                 value, needle):
    """A damaged value is skipped with its reason; start-up never raises (a 401-digit
    measureSeeds raised OverflowError, a >4300-digit integer in any JSON setting ValueError)."""
    store = QSettings(settings_file, QSettings.Format.IniFormat)
    store.setValue(key, value)
    store.sync()
    win = session()
    assert needle in " ".join(win.problems), win.problems
    assert win.notice.text().startswith("Some saved settings were skipped:")
    assert len(win.notice.text()) < 400
    if key == "last_config":
        assert win.config == ModelConfig()


def test_special_files_in_settings_never_hang_the_start(tmp_path):
    """The user's settings file, or the last session's ``current_file``, replaced by a FIFO:
    the window still opens within seconds (Qt's QSettings blocked reading a FIFO settings
    file, and ``load`` blocked opening a FIFO config), names the problem, and leaves the FIFO
    as it is. Run in a subprocess, so that a regression fails instead of hanging the suite."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "user-settings" / "UnitScalingExplorer"
    folder.mkdir(parents=True)
    config_fifo = tmp_path / "last.json"
    os.mkfifo(config_fifo)
    script = tmp_path / "start.py"
    script.write_text(
        "import os, sys\n"
        "from PySide6.QtCore import QSettings\n"
        "from PySide6.QtWidgets import QApplication\n"
        "app = QApplication([])\n"
        f"QSettings.setPath(QSettings.Format.NativeFormat, QSettings.Scope.UserScope, "
        f"{str(tmp_path / 'user-settings')!r})\n"
        "from app.main_window import MainWindow, user_settings_path\n"
        "path = user_settings_path()\n"
        "if sys.argv[1] == 'settings':\n"
        "    os.mkfifo(path)\n"
        "else:\n"
        "    s = QSettings(path, QSettings.Format.IniFormat)\n"
        f"    s.setValue('current_file', {str(config_fifo)!r})\n"
        "    s.sync()\n"
        "win = MainWindow(restore_settings=True)\n"
        "print('NOTICE', win.notice.text(), flush=True)\n"
        "win._confirm = False\n"
        "win.close()\n"
        "print('KIND', 'fifo' if __import__('stat').S_ISFIFO(os.stat(path).st_mode) "
        "else 'file', flush=True)\n")
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_CONFIG_HOME": str(tmp_path)}
    for case in ("settings", "current_file"):
        for leftover in folder.iterdir():
            leftover.unlink()
        done = subprocess.run([sys.executable, str(script), case], capture_output=True,
                              text=True, timeout=90, env=env, cwd=os.getcwd())
        assert done.returncode == 0, done.stderr[-2000:]
        notice = next(line for line in done.stdout.splitlines() if line.startswith("NOTICE"))
        if case == "settings":
            assert "is a FIFO (named pipe)" in notice and "not saved" in notice
            assert "KIND fifo" in done.stdout  # left as it is
        else:
            assert "could not reopen last.json" in notice and "FIFO" in notice
            assert "KIND file" in done.stdout


# -- what is saved restores (issue 20 #11) ----------------------------------------------------

def _at_limits(panel) -> None:
    """Every saved control of ``panel`` at an end of its range: spin boxes at their maximum
    (the positional sizes at their minimum, to keep the test quick), combos and tabs at their
    last item, check boxes flipped (never auto-measure), text boxes overfilled with
    characters INI files escape."""
    from PySide6.QtWidgets import (
        QCheckBox,
        QComboBox,
        QDoubleSpinBox,
        QLineEdit,
        QTabBar,
        QTabWidget,
    )

    from app.widgets.controls_state import MAX_TEXT

    quick = {"posLength", "posDModel", "posHeads"}
    for w in panel._state_controls():
        name = w.objectName()
        if isinstance(w, (QSpinBox, QDoubleSpinBox)):
            w.setValue(w.minimum() if name in quick else w.maximum())
        elif isinstance(w, (QComboBox, QTabWidget, QTabBar)):
            w.setCurrentIndex(w.count() - 1)
        elif isinstance(w, QCheckBox) and name not in ("autoMeasure", "posFollow"):
            w.setChecked(not w.isChecked())
        elif isinstance(w, QLineEdit):
            w.setText(('a"b,c\\d=e[f];g#h ٣ é\t' * MAX_TEXT)[: MAX_TEXT + 50])
            assert len(w.text()) == MAX_TEXT  # held at the limit restore accepts


def test_every_panel_state_at_its_limits_round_trips(session):
    """Whatever a panel saves comes back unchanged and without a problem (an attention text
    over 10,000 characters used to be saved and then refused at the next launch)."""
    win = session()
    win.positional_panel.follow.setChecked(False)  # its sizes are saved too
    for panel in (win.scaling_panel, win.positional_panel, win.attention_panel):
        _at_limits(panel)
    saved = win.panel_states()
    assert set(saved) >= {"scalingPanel", "positionalPanel", "attentionPanel"}
    win._confirm = False
    win.close()
    again = session()
    assert again.problems == [] and again.notice.text() == ""
    assert again.panel_states() == saved


def test_text_past_the_limit_is_refused_with_a_reason(session):
    from PySide6.QtGui import QGuiApplication
    from PySide6.QtWidgets import QToolTip

    from app.widgets.controls_state import MAX_TEXT

    win = session()
    box = win.attention_panel.text
    QGuiApplication.clipboard().setText("x" * (MAX_TEXT + 1))
    box.setFocus()
    box.selectAll()
    box.paste()
    assert len(box.text()) == MAX_TEXT
    assert "at most 10,000 characters" in QToolTip.text()
