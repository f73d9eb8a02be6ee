"""A config using a field the predictor has no rule for: the window opens, names the fields in
the scaling summary and shows no prediction (never a crash, never a prediction that ignores
the field). Every issue-21 field is predicted today, so the refusal is made here by patching
``unpredicted_features`` (the one function the panel and the predictor ask) to refuse MoE."""

import pytest

from unitscale_core.config import ModelConfig
from unitscale_core.scaling import predict as predict_module
from unitscale_core.scaling.predict import unpredicted_features

MOE = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2, vocab_size=64,
                  max_len=32, seq_len=16, batch_size=2, positional="rope", norm_type="rmsnorm",
                  n_experts=4, experts_per_token=2)
TINY = ModelConfig(d_model=64, n_heads=4, d_ff=128, n_layers=2, vocab_size=64, max_len=32,
                   seq_len=16, batch_size=2)


def _refuse_moe(cfg):
    return {"n_experts": "n_experts: the predictor has no rule for it"} if cfg.is_moe else {}


@pytest.fixture
def moe_refused(monkeypatch):
    import app.panels.scaling_panel as scaling_panel

    assert unpredicted_features(MOE) == {}  # really predicted: the refusal is this test's
    monkeypatch.setattr(predict_module, "unpredicted_features", _refuse_moe)
    monkeypatch.setattr(scaling_panel, "unpredicted_features", _refuse_moe)


def test_window_opens_on_an_unpredicted_config_and_names_its_fields(make_window, moe_refused):
    win = make_window(MOE)
    panel = win.scaling_panel
    assert panel.predicted == []
    text = panel.summary.text()
    assert text.startswith("⚠ not predicted")
    assert "n_experts" in text


def test_back_to_a_predicted_config_predicts_again(make_window, qtbot, moe_refused):
    win = make_window(MOE)
    win.scaling_panel.update_config(TINY)
    qtbot.waitUntil(win.scaling_panel.prediction_current, timeout=30_000)
    assert win.scaling_panel.predicted
    assert "not predicted" not in win.scaling_panel.summary.text()


def test_a_mixture_of_experts_is_predicted_in_the_window(make_window, qtbot):
    win = make_window(MOE)
    qtbot.waitUntil(win.scaling_panel.prediction_current, timeout=60_000)
    names = {r.name for r in win.scaling_panel.predicted}
    assert "layers.1.moe.router" in names and "layers.0.moe.experts.3.down" in names
    assert "not predicted" not in win.scaling_panel.summary.text()
