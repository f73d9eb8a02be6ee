"""pytest-qt: the positional panel follows the config, switches schemes, and exports."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtWidgets import QComboBox, QSpinBox, QWidget

from unitscale_core import positional as P


@pytest.fixture
def window(make_window, qtbot):
    win = make_window()
    win.show_dock(win.docks["Positional"])  # in front: only then is a model table built
    qtbot.waitUntil(lambda: win.positional_panel._on_screen())  # noqa: SLF001
    return win


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
    assert panel.d_model.value() == window.config.head_size == 64
    assert panel.primary.heatmap.data.shape == (512, 32)  # cos of [max_len, d/2] angles


def test_changing_kind_here_stops_following_and_redraws(qtbot, window):
    panel = panel_of(window)
    choose(panel.kind, "alibi")
    choose(panel.view, "head_bias")
    assert not panel.follow.isChecked()
    panel.heads.setValue(8)
    panel.head.setValue(1)
    data = panel.primary.heatmap.data
    assert data[10, 0] == pytest.approx(-P.alibi_slopes(8)[1] * 10)  # (a causal decoder's)
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
    text = panel.primary.heatmap.describe(7, 3)
    assert text.startswith("query position 7, key position 3: bias = ")


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


def test_following_a_learned_model_shows_its_own_table(qtbot, window):
    """"follow the model" with the default config (learned positions, d_model 256) shows
    the configured model's own table at init (built in the worker, equal to build_model's),
    not MiniLM's 512 × 384; choosing MiniLM's table is no longer following."""
    from unitscale_core import build_model

    panel = panel_of(window)
    cfg = window.config
    assert cfg.positional == "learned" and panel.follow.isChecked()
    assert panel.learned_source.currentData() == "model"
    qtbot.waitUntil(lambda: panel.primary.heatmap.data.shape == (cfg.max_len, cfg.d_model),
                    timeout=30_000)
    want = build_model(cfg).pos.table.weight.detach().numpy()
    np.testing.assert_array_equal(panel.primary.heatmap.data, want[: panel.length.value()])
    assert "configured model" in panel.primary.note.text()
    with qtbot.waitSignal(panel.computed, timeout=30_000):
        window.model_panel.findChild(QSpinBox, "d_model").setValue(128)
    qtbot.waitUntil(lambda: panel.primary.heatmap.data.shape == (cfg.max_len, 128),
                    timeout=30_000)
    choose(panel.learned_source, "minilm")
    assert not panel.follow.isChecked()
    assert panel.primary.heatmap.data.shape == (512, 384)
    assert "MiniLM" in panel.primary.note.text()
    panel.follow.setChecked(True)  # back to the model's own table
    assert panel.learned_source.currentData() == "model"
    qtbot.waitUntil(lambda: panel.primary.heatmap.data.shape == (cfg.max_len, 128),
                    timeout=30_000)


def test_causal_alibi_is_masked_not_mirrored(qtbot, window):
    panel = panel_of(window)
    choose(panel.kind, "alibi")
    choose(panel.view, "head_bias")
    panel.heads.setValue(8)
    panel.head.setValue(2)
    panel.bidirectional.setChecked(False)
    data = panel.primary.heatmap.data
    i, j = np.indices(data.shape)
    assert np.isnan(data[j > i]).all() and np.isfinite(data[j <= i]).all()
    assert data[10, 4] == pytest.approx(-P.alibi_slopes(8)[2] * 6)
    assert "masked" in panel.primary.heatmap.describe(2, 9)
    assert "masked" in panel.primary.note.text()
    assert panel.primary.heatmap.plot.vb.state["background"] is not None  # grey behind NaN
    panel.bidirectional.setChecked(True)
    data = panel.primary.heatmap.data
    assert np.isfinite(data).all() and data[4, 10] == data[10, 4]


def test_following_a_causal_decoder_masks_alibi(qtbot, window):
    panel = panel_of(window)
    assert window.config.architecture == "decoder"
    window.model_panel.findChild(QComboBox, "positional").setCurrentText("alibi")
    assert panel.follow.isChecked() and not panel.bidirectional.isChecked()
    data = panel.primary.heatmap.data
    assert np.isnan(data[0, 1]) and np.isfinite(data[1, 0])


def test_t5_buckets_are_ordinals_with_integer_ticks(qtbot, window):
    from unitscale_core.positional_views import DIVERGING_CMAP

    panel = panel_of(window)
    window.model_panel.findChild(QComboBox, "positional").setCurrentText("relative")
    assert panel.kind.currentData() == "relative" and panel.follow.isChecked()
    assert (panel.buckets.value(), panel.max_distance.value()) == (32, 128)  # the model's
    heatmap = panel.primary.heatmap
    finite = heatmap.data[np.isfinite(heatmap.data)]
    lo, hi = int(finite.min()), int(finite.max())
    assert tuple(heatmap.image.getLevels()) == pytest.approx((lo - 0.5, hi + 0.5))
    assert heatmap.colorbar.colorMap().name != DIVERGING_CMAP
    ticks = heatmap.colorbar.axis._tickLevels[0]
    assert ticks and all(v == int(v) and text == str(int(v)) for v, text in ticks)
    assert heatmap.describe(5, 1).endswith(f"bucket = {int(heatmap.data[5, 1])}")
    choose(panel.kind, "sinusoidal")  # signed values: diverging, automatic ticks again
    assert panel.primary.heatmap.colorbar.colorMap().name == DIVERGING_CMAP
    assert panel.primary.heatmap.colorbar.axis._tickLevels is None


def test_hidden_panel_builds_the_models_table_only_when_shown(qtbot):
    """Following a learned model, the table (a model build in the worker) is asked for only
    once the panel is on screen."""
    from app.panels.positional_panel import PositionalPanel
    from app.worker import Worker
    from unitscale_core import ModelConfig

    worker = Worker()
    try:
        cfg = ModelConfig(d_model=64, n_heads=4, d_ff=128, n_layers=2, vocab_size=256,
                          max_len=64, seq_len=32)
        panel = PositionalPanel(cfg, worker)
        qtbot.addWidget(panel)
        assert panel.learned_source.currentData() == "model"
        assert panel._table_id == 0 and panel._table_wanted  # nothing built while hidden
        with qtbot.waitSignal(panel.computed, timeout=30_000):
            panel.show()
        assert panel.primary.heatmap.data.shape == (64, 64)
        assert "configured model" in panel.primary.note.text()
    finally:
        worker.stop(2000)


def test_model_table_is_built_once_the_config_is_still(qtbot):
    """Three quick edits of a followed learned model: one model build, of the last config."""
    from app.panels.positional_panel import TABLE_CHANNEL, PositionalPanel
    from app.worker import Worker
    from unitscale_core import ModelConfig

    worker = Worker()
    try:
        cfg = ModelConfig(d_model=64, n_heads=4, d_ff=128, n_layers=2, vocab_size=256,
                          max_len=64, seq_len=32)
        panel = PositionalPanel(cfg, worker)
        qtbot.addWidget(panel)
        with qtbot.waitSignal(panel.computed, timeout=30_000):
            panel.show()
        builds = []
        submit = worker.submit
        worker.submit = lambda channel, job: (builds.append(channel), submit(channel, job))[1]
        for width in (32, 48, 96):
            panel.update_config(cfg.replace(d_model=width))
        with qtbot.waitSignal(panel.computed, timeout=30_000):
            pass
        assert builds.count(TABLE_CHANNEL) == 1
        assert panel.primary.heatmap.data.shape == (64, 96)
    finally:
        worker.stop(2000)
