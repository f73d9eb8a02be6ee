"""pytest-qt: typing into the model panel updates the sizes panel and MainWindow.config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PySide6.QtCore import QPoint, Qt
from PySide6.QtGui import QAction
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDockWidget,
    QFileDialog,
    QLabel,
    QSpinBox,
    QWidget,
)

from app.main_window import MainWindow
from unitscale_core import ModelConfig, count_parameters
from unitscale_core.config import FIELD_NAMES, dumps_json, load, load_with_warnings
from unitscale_core.sizing import format_count


@pytest.fixture
def window(qtbot):
    win = MainWindow()
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    return win


def editor(win: MainWindow, name: str) -> QWidget:
    widget = win.findChild(QWidget, name)
    assert widget is not None, name
    return widget


def type_into(qtbot, spin: QSpinBox, text: str) -> None:
    spin.setFocus()
    spin.selectAll()
    qtbot.keyClicks(spin.lineEdit(), text)
    qtbot.keyClick(spin.lineEdit(), Qt.Key.Key_Tab)


def exact_total(win: MainWindow) -> str:
    return win.sizes_panel.table.item(0, 2).text()


def test_panels_and_editors_are_named(window):
    assert window.findChild(QWidget, "modelPanel") is window.model_panel
    assert window.findChild(QWidget, "sizesPanel") is window.sizes_panel
    for name in FIELD_NAMES:
        assert editor(window, name).toolTip()
    assert window.config == ModelConfig()


def test_typing_a_valid_value_updates_config_and_sizes(qtbot, window):
    with qtbot.waitSignal(window.config_changed):
        type_into(qtbot, editor(window, "d_model"), "512")
    assert window.config.d_model == 512
    expected = count_parameters(window.config)["total"]
    assert exact_total(window) == f"{expected:,}"
    assert window.sizes_panel.value("Parameters (P)") == format_count(expected)
    assert not editor(window, "d_model_error").isVisible()


def test_invalid_value_marks_editor_and_keeps_last_valid_config(qtbot, window):
    before = window.config
    shown_before = exact_total(window)
    changes = []
    window.config_changed.connect(changes.append)
    type_into(qtbot, editor(window, "d_model"), "102")
    error = window.findChild(QLabel, "d_model_error")
    assert error.isVisible()
    assert error.text() == "d_model=102 is not divisible by n_heads=4"
    assert editor(window, "d_model").property("invalid") is True
    assert window.config == before and exact_total(window) == shown_before
    assert changes == []  # nothing downstream ran
    # fixing another field makes the draft valid again: 102 / 6 heads = 17
    type_into(qtbot, editor(window, "n_heads"), "6")
    assert not error.isVisible()
    assert window.config.d_model == 102 and window.config.n_heads == 6
    assert changes and changes[-1] == window.config


def test_seq_len_above_max_len_is_explained(qtbot, window):
    type_into(qtbot, editor(window, "seq_len"), "4096")
    assert editor(window, "seq_len_error").text() == "seq_len=4096 is above max_len=512"
    assert window.config.seq_len == 128


def test_zero_layers_is_refused(qtbot, window):
    type_into(qtbot, editor(window, "n_layers"), "0")
    assert "n_layers=0 must be positive" in editor(window, "n_layers_error").text()
    assert window.config.n_layers == 4


def test_combo_and_checkbox_edits(qtbot, window):
    arch = editor(window, "architecture")
    assert isinstance(arch, QComboBox)
    arch.setCurrentText("encoder-decoder")
    assert window.config.architecture == "encoder-decoder"
    assert editor(window, "n_decoder_layers").isEnabled()
    tie = editor(window, "tie_embeddings")
    assert isinstance(tie, QCheckBox)
    qtbot.mouseClick(tie, Qt.MouseButton.LeftButton, pos=QPoint(8, tie.height() // 2))
    assert window.config.tie_embeddings is False
    assert exact_total(window) == f"{count_parameters(window.config)['total']:,}"


def test_preset_fills_every_field(qtbot, window):
    preset = window.findChild(QComboBox, "preset")
    index = preset.findData("gpt2-small")
    preset.setCurrentIndex(index)
    preset.activated.emit(index)
    assert window.config.d_model == 768 and window.config.vocab_size == 50257
    assert exact_total(window) == "124,439,808"
    assert editor(window, "d_model").value() == 768


def test_view_menu_restores_closed_docks(qtbot, window):
    dock = window.findChild(QDockWidget, "sizesPanelDock")
    dock.close()
    assert not dock.isVisible()
    window.restore_default_layout()
    assert dock.isVisible()


def test_status_bar_names_the_device(qtbot, window):
    qtbot.waitUntil(lambda: "torch" in window.device_label.text(), timeout=30_000)
    assert window.device_label.text().startswith(("CPU", "CUDA", "MPS"))


def test_open_and_save_config(qtbot, window, tmp_path):
    path = tmp_path / "m.toml"
    window.model_panel.findChild(QSpinBox, "n_layers").setValue(7)
    assert window.save_config(str(path))
    fresh = MainWindow()
    qtbot.addWidget(fresh)
    assert fresh.open_config(str(path))
    assert fresh.config == window.config
    assert fresh.model_panel.findChild(QSpinBox, "n_layers").value() == 7
    bad = tmp_path / "bad.json"
    bad.write_text('{"d_model": 100, "n_heads": 12}')
    before = fresh.config
    assert not fresh.open_config(str(bad))
    assert fresh.config == before
    assert "d_model=100 is not divisible" in fresh.statusBar().currentMessage()
    fresh.close()


def test_hidden_attention_tab_stays_idle_until_shown(qtbot, window):
    """Attention runs a model; behind the Positional tab it must not, so start-up is idle
    and closing never waits on it."""
    qtbot.wait(100)
    assert not window.worker.busy()
    with qtbot.waitSignal(window.attention_panel.computed, timeout=60_000):
        window.docks["Attention"].raise_()
    assert "tokens" in window.attention_panel.status.text()


def test_warm_up_runs_once_silently_and_leaves_the_model_built(qtbot):
    """The program's window warms torch up in the worker once the device is known: no busy
    indicator, and the shown (small) config's model is then in the measurement's cache."""
    from unitscale_core import measure

    cfg = ModelConfig(d_model=64, n_heads=2, d_ff=128, n_layers=2, vocab_size=256,
                      seq_len=16, batch_size=2, seed=12345)
    win = MainWindow(cfg, warm_up=True)
    qtbot.addWidget(win)
    started: list[tuple[str, bool]] = []
    win.worker.started_job.connect(lambda ch, rid: started.append((ch, win.busy.isVisible())))
    win.show()
    try:
        qtbot.waitUntil(lambda: any(ch == "warmup" for ch, _ in started)
                        and not win.worker.busy(), timeout=60_000)
        assert [shown for ch, shown in started if ch == "warmup"] == [False]
        key = cfg.replace(seq_len=1, batch_size=1, device="auto")
        assert any(k[0] == key for k in measure._models)  # noqa: SLF001
    finally:
        win.close()


# -- Hugging Face import (issue 21): File → Open of a config.json or a model folder ----------

HF_CONFIGS = Path(__file__).resolve().parents[1] / "core" / "data" / "hf_configs"


@pytest.fixture
def hf_folder(tmp_path):
    """A Hugging Face model folder: Llama-3.2-1B/config.json (its rope scaling is warned)."""
    folder = tmp_path / "Llama-3.2-1B"
    folder.mkdir()
    shutil.copy(HF_CONFIGS / "llama-3.2-1b.json", folder / "config.json")
    return folder


def test_opening_a_hf_config_json_imports_it_untitled_and_lists_its_warnings(window,
                                                                             hf_folder):
    expected, warnings = load_with_warnings(hf_folder / "config.json")
    assert warnings  # rope_scaling: the fixture is chosen for a warning
    assert window.open_config(hf_folder / "config.json")
    assert window.config == expected and window.config.n_layers == 16
    assert window.path is None and window.imported_from() == (hf_folder / "config.json")
    assert window.windowTitle().startswith("Llama-3.2-1B (imported from Hugging Face)")
    assert not window.is_modified()
    assert window.import_warnings == warnings
    assert warnings[0] in window.notice.text() and "\n" not in window.notice.text()
    box = window.import_box
    assert box is not None and box.isVisible() and not box.isModal()
    for line in warnings:
        assert f"• {line}" in box.informativeText()
    # opening the program's own file afterwards: titled again, the dialog goes
    own = hf_folder.parent / "own.json"
    own.write_text(dumps_json(ModelConfig(n_layers=3)))
    assert window.open_config(own)
    assert window.path == own.resolve() and window.imported_from() is None
    assert window.import_box is None and window.import_warnings == []
    assert window.notice.text() == ""  # the import's line named the wrong config by then
    assert window.open_config(hf_folder)  # File → New after an import: the same
    assert warnings[0] in window.notice.text()
    assert window.new_config()
    assert window.notice.text() == "" and window.import_box is None


def test_hf_folder_menu_entry_imports_and_save_never_overwrites_config_json(
        qtbot, window, hf_folder, monkeypatch):
    source = hf_folder / "config.json"
    original = source.read_bytes()
    monkeypatch.setattr(QFileDialog, "getExistingDirectory",
                        staticmethod(lambda *a: str(hf_folder)))
    entry = window.findChild(QAction, "openHfFolderAction")
    assert entry.text().replace("&", "") == "Open Hugging Face model folder…"
    entry.trigger()
    assert window.config == load_with_warnings(hf_folder)[0]
    assert window.imported_from() == source and window.path is None
    starts: list[str] = []
    answers = [(str(source), "JSON (*.json)"), (str(hf_folder.parent / "mine.json"), "")]

    def save_dialog(parent, title, start, filters):
        starts.append(start)
        return answers.pop(0)

    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(save_dialog))
    # Save (Ctrl+S) after an import asks where, starting on a new name beside the folder
    assert not window.save()  # the user picked the config.json itself: refused by name
    assert starts == [str(hf_folder.parent / "Llama-3.2-1B.json")]
    assert source.read_bytes() == original
    assert "config.json is a Hugging Face config.json" in window.notice.text()
    assert not window.save_config(source)  # a direct call is refused too
    assert source.read_bytes() == original and not list(hf_folder.glob("config.bak*"))
    assert window.save()  # a second Save: the dialog again, a new name this time
    mine = hf_folder.parent / "mine.json"
    assert window.path == mine.resolve() and load(mine) == window.config
    assert window.imported_from() is None and source.read_bytes() == original


def test_a_hf_file_of_another_name_suggests_a_name_beside_it(window, tmp_path):
    path = tmp_path / "llama-3-8b.json"
    shutil.copy(HF_CONFIGS / "llama-3-8b.json", path)
    assert window.open_config(path)
    assert window.config.n_layers == 32 and window.config.kv_heads == 8
    assert window.import_box is None and window.import_warnings == []  # nothing to warn
    assert window.suggested_save_path() == tmp_path / "llama-3-8b.unitscale.json"
    assert window.windowTitle().startswith("llama-3-8b.json (imported from Hugging Face)")


def test_an_unsupported_hf_model_type_is_one_line_and_nothing_is_lost(qtbot, window,
                                                                      tmp_path):
    type_into(qtbot, editor(window, "n_layers"), "6")
    before = window.config
    folder = tmp_path / "falcon"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "falcon", "hidden_size": 64}')
    assert not window.open_config(folder)
    assert window.config == before and window.config.n_layers == 6
    text = window.notice.text()
    assert text.startswith("Could not open falcon: model_type='falcon' is not supported")
    assert "\n" not in text and window.import_box is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not window.open_config(empty)
    assert "holding no config.json" in window.notice.text() and window.config == before


def test_open_recent_keeps_a_hf_folder_and_says_when_it_is_gone(window, hf_folder):
    assert window.open_config(hf_folder)
    assert window.recent_files()[0] == str(hf_folder.resolve())
    window._fill_recent_menu()  # a folder still there is kept (it is not a file)
    assert window.recent_files()[0] == str(hf_folder.resolve())
    assert window.open_recent(str(hf_folder.resolve()))
    shutil.rmtree(hf_folder)
    before = window.config
    assert not window.open_recent(str(hf_folder.resolve()))
    assert window.config == before and str(hf_folder.resolve()) not in window.recent_files()
    assert window.notice.text() == "Removed from Open Recent (no longer there): Llama-3.2-1B"


def test_a_hf_config_given_at_launch_is_imported_not_the_session_file(qtbot, hf_folder):
    """``unitscale-explorer --config FOLDER``: the window gets the config and its path."""
    source = hf_folder / "config.json"
    config, warnings = load_with_warnings(hf_folder)
    win = MainWindow(config, path=hf_folder)
    qtbot.addWidget(win)
    assert win.path is None and win.imported_from() == source
    assert win.import_warnings == warnings and win.import_box is not None
    assert win.suggested_save_path() == hf_folder.parent / "Llama-3.2-1B.json"
    win.close()


def test_file_export_of_a_panel_behind_a_tab_brings_it_to_the_front(qtbot, window):
    """Real window: File → Export → Positional with the Scaling tab in front wrote a
    1636×162 PNG of a panel never laid out, showing the previous config's view."""
    from PySide6.QtWidgets import QMenu

    export_menu = window.findChild(QMenu, "exportMenu")
    subs = {a.text(): a.menu() for a in export_menu.actions() if a.menu() is not None}
    assert list(subs) == ["Scaling", "Sizes", "Positional", "Attention", "Training"]
    def on_screen(panel) -> bool:
        return not panel.visibleRegion().isEmpty()

    assert not on_screen(window.positional_panel)  # behind the Scaling tab
    subs["Positional"].aboutToShow.emit()
    qtbot.waitUntil(lambda: on_screen(window.positional_panel), timeout=5_000)
    assert window.positional_panel._active  # noqa: SLF001 (it updates again)
    figure = window.positional_panel.export_items()[0]
    assert figure.widget().height() > 300
    subs["Sizes"].aboutToShow.emit()
    qtbot.waitUntil(lambda: on_screen(window.sizes_panel), timeout=5_000)
    assert not on_screen(window.positional_panel)


def test_file_export_lists_the_training_panels_exports_too(qtbot, window, monkeypatch,
                                                            tmp_path):
    """File → Export had no Training entry (its exports lived only on the panel's button):
    the same actions, and they say where they wrote or why not."""
    from PySide6.QtWidgets import QMenu

    sub = window.findChild(QMenu, "exportTrainingMenu")
    own = window.training_panel.export_button.menu()
    assert [a.text() for a in sub.actions()] == [a.text() for a in own.actions()]
    path = tmp_path / "loss.png"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a: (str(path), "")))
    sub.aboutToShow.emit()
    qtbot.waitUntil(lambda: not window.training_panel.visibleRegion().isEmpty(), timeout=5_000)
    by_text = {a.text(): a for a in sub.actions()}
    by_text["Loss plot as PNG…"].trigger()
    assert path.stat().st_size > 0
    assert window.training_panel.status.text() == f"wrote {path}"
    by_text["Records as CSV…"].trigger()  # no run yet: refused, said in the panel
    assert "start a run first" in window.training_panel.status.text()

