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
