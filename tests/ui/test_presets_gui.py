"""Issue 21's presets chosen from the model panel's menu: the window shows their sizes, the
scaling panel names the fields the predictor has no rule for, and Measure of a model far
beyond the machine's memory says so instead of building it — never a traceback."""

from __future__ import annotations

from unitscale_core.presets import load_preset
from unitscale_core.scaling.predict import unpredicted_features
from unitscale_core.sizing import count_parameters

MODERN = ["llama-3-8b", "llama-3.2-1b", "mistral-7b-v0.1", "qwen2.5-0.5b", "gemma-2-2b",
          "olmo-2-7b", "pythia-160m", "phi-3-mini-4k", "mixtral-8x7b"]


def _choose(win, key: str) -> None:
    box = win.model_panel.preset
    index = box.findData(key)
    assert index > 0, key
    box.setCurrentIndex(index)
    box.activated.emit(index)


def test_each_modern_preset_fills_the_window_and_its_sizes(make_window, qtbot):
    win = make_window()
    for key in MODERN:
        _choose(win, key)
        cfg = load_preset(key)
        assert win.config == cfg, key
        counts = count_parameters(cfg)
        sizes = win.sizes_panel
        assert sizes.table.item(0, 2).text() == f"{counts['total']:,}", key
        assert sizes.value("active per token (MoE)") != "", key
        refused = unpredicted_features(cfg)
        summary = win.scaling_panel.summary.text()
        if refused:
            assert win.scaling_panel.predicted == [], key
            assert summary.startswith("⚠ not predicted"), key
            for name in refused:
                assert name in summary, (key, name)


def test_measure_on_mixtral_offers_instead_of_building(make_window, qtbot):
    """Mixtral-8x7B needs ~400 GiB to measure in fp32: Measure says so (both figures) and
    offers to go on, building nothing; the panel stays usable."""
    win = make_window()
    _choose(win, "mixtral-8x7b")
    panel = win.scaling_panel
    panel.measure()
    qtbot.waitUntil(lambda: not panel.budget_box.isHidden(), timeout=30_000)
    text = panel.budget_label.text()
    assert "needs about" in text and "GiB" in text, text
    assert panel.measure_button.isEnabled() and panel.measured == []
    assert "Traceback" not in panel.summary.text()


def test_a_preset_note_is_shown_until_a_field_leaves_the_preset(qtbot):
    """Gemma-2-2B's note (the embedding scale the program does not apply) is shown, grey and
    wrapped, under the menu; editing a field away hides it, editing it back shows it again;
    a preset without notes (Llama-3-8B) shows none, nor does another file's config."""
    from PySide6.QtGui import QPalette

    from app.panels.model_panel import ModelPanel
    from unitscale_core.config import ModelConfig
    from unitscale_core.presets import preset_notes

    panel = ModelPanel(ModelConfig())
    qtbot.addWidget(panel)
    panel.show()
    note = panel.preset_note
    assert panel.note() == "" and note.isHidden()
    box = panel.preset
    box.setCurrentIndex(box.findData("gemma-2-2b"))
    box.activated.emit(box.currentIndex())
    (expected,) = preset_notes("gemma-2-2b")
    assert expected in panel.note() and note.isVisible()
    assert note.wordWrap() and note.foregroundRole() == QPalette.ColorRole.PlaceholderText
    assert panel.preset_key() == "gemma-2-2b"
    layers = panel._editors["n_layers"]
    layers.setValue(layers.value() + 1)
    assert panel.note() == "" and note.isHidden() and panel.preset_key() is None
    layers.setValue(layers.value() - 1)  # back to the preset's fields: its note holds again
    assert expected in panel.note() and panel.preset_key() == "gemma-2-2b"
    box.setCurrentIndex(box.findData("llama-3-8b"))
    box.activated.emit(box.currentIndex())
    assert preset_notes("llama-3-8b") == () and panel.note() == ""
    box.setCurrentIndex(box.findData("phi-3-mini-4k"))
    box.activated.emit(box.currentIndex())
    assert "sliding_window" in panel.note()
    panel.set_config(ModelConfig(n_layers=3))  # another file opened: no preset, no note
    assert panel.note() == "" and panel.preset_key() is None
    panel.set_config(ModelConfig())  # the default config is the Tiny preset's
    assert panel.preset_key() == "tiny" and panel.note() == ""


def test_a_config_equal_to_a_preset_shows_that_preset(make_window, tmp_path):
    """Opening a saved preset (or a window started on one, as the README's Llama-3-8B
    screenshot is) shows the preset chosen in the menu, with its note; a changed copy does
    not."""
    from unitscale_core.config import dumps_json
    from unitscale_core.presets import preset_notes

    gemma = load_preset("gemma-2-2b")
    win = make_window(gemma)
    panel = win.model_panel
    assert panel.preset.currentData() == "gemma-2-2b" and panel.preset_key() == "gemma-2-2b"
    assert preset_notes("gemma-2-2b")[0] in panel.note()
    path = tmp_path / "llama.json"
    path.write_text(dumps_json(load_preset("llama-3-8b")))
    assert win.open_config(path)
    assert panel.preset.currentData() == "llama-3-8b" and panel.note() == ""
    path.write_text(dumps_json(load_preset("llama-3-8b").replace(n_layers=31)))
    assert win.open_config(path)
    assert panel.preset.currentData() is None and panel.preset_key() is None
