"""pytest-qt: the positional panel follows the config, switches schemes, and exports."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtWidgets import QComboBox, QSpinBox, QWidget

from unitscale_core import positional as P


@pytest.fixture
def window(make_window):
    return make_window()


def panel_of(win):
    panel = win.findChild(QWidget, "positionalPanel")
    assert panel is win.positional_panel
    return panel


def choose(combo: QComboBox, data) -> None:
    combo.setCurrentIndex(combo.findData(data))


def test_follows_config_kind_and_d_model(qtbot, window):
    panel = panel_of(window)
    window.model_panel.findChild(QComboBox, "positional").setCurrentText("sinusoidal")
    assert panel.kind.currentData() == "sinusoidal"
    window.model_panel.findChild(QSpinBox, "d_model").setValue(64)
    assert window.config.d_model == 64 and panel.d_model.value() == 64
    shown = panel.primary.heatmap.data
    np.testing.assert_array_equal(shown, P.sinusoidal(window.config.max_len, 64))


def test_rope_uses_head_size(qtbot, window):
    panel = panel_of(window)
    window.model_panel.findChild(QComboBox, "positional").setCurrentText("rope")
    assert panel.d_model.value() == window.config.head_dim == 64
    assert panel.primary.heatmap.data.shape == (512, 32)  # cos of [max_len, d/2] angles


def test_changing_kind_here_stops_following_and_redraws(qtbot, window):
    panel = panel_of(window)
    choose(panel.kind, "alibi")
    choose(panel.view, "head_bias")
    assert not panel.follow.isChecked()
    panel.heads.setValue(8)
    panel.head.setValue(1)
    data = panel.primary.heatmap.data
    assert data[0, 10] == pytest.approx(-P.alibi_slopes(8)[1] * 10)
    # a config change no longer moves the panel
    window.model_panel.findChild(QComboBox, "positional").setCurrentText("rope")
    assert panel.kind.currentData() == "alibi"


def test_side_by_side_comparison(qtbot, window):
    panel = panel_of(window)
    choose(panel.kind, "sinusoidal")
    choose(panel.view, "similarity_cosine")
    choose(panel.compare, "rope")
    assert panel.secondary.isVisible()
    assert panel.secondary.result.matrix.shape == panel.primary.result.matrix.shape


def test_odd_width_for_rope_is_explained_not_raised(qtbot, window):
    panel = panel_of(window)
    choose(panel.kind, "rope")
    panel.d_model.setValue(31)
    assert "d_model=31 must be even" in panel.primary.note.text()


def test_long_range_goes_to_the_worker(qtbot, window):
    panel = panel_of(window)
    choose(panel.kind, "alibi")
    choose(panel.view, "head_bias")
    with qtbot.waitSignal(panel.computed, timeout=10_000):
        panel.length.setValue(8192)
    assert panel._request_id > 0  # computed off the GUI thread
    assert panel.primary.heatmap.data.shape == (1024, 1024)
    assert "every 8-th position" in panel.primary.note.text()


def test_hover_text_names_position_and_value(qtbot, window):
    panel = panel_of(window)
    choose(panel.kind, "alibi")
    choose(panel.view, "head_bias")
    text = panel.primary.heatmap.describe(3, 7)
    assert text.startswith("query position 3, key position 7: bias = ")


def test_export_png_and_npy(qtbot, window, tmp_path):
    panel = panel_of(window)
    choose(panel.kind, "sinusoidal")
    panel.export_npy(tmp_path / "pe.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "pe.npy"), panel.primary.heatmap.data)
    panel.export_png(tmp_path / "pe.png")
    assert (tmp_path / "pe.png").read_bytes()[:4] == b"\x89PNG"
    choose(panel.view, "distance")
    panel.export_npy(tmp_path / "curve.npy")
    assert np.load(tmp_path / "curve.npy").ndim == 2


def test_learned_table_of_the_configured_model(qtbot, window):
    """The configured model's own table, built in the worker, equals build_model's."""
    from unitscale_core import build_model

    panel = panel_of(window)
    choose(panel.kind, "learned")
    with qtbot.waitSignal(panel.computed, timeout=30_000):
        choose(panel.learned_source, "model")
    model = build_model(window.config)
    want = model.pos.table.weight.detach().numpy()
    np.testing.assert_array_equal(panel.primary.heatmap.data, want[: panel.length.value()])
    assert "configured model" in panel.primary.note.text()
