"""A config using a field the predictor has no rule for yet: the window opens, names the
fields in the scaling summary and shows no prediction (never a crash, never a prediction that
ignores the field)."""

from unitscale_core.config import ModelConfig
from unitscale_core.scaling.predict import unpredicted_features

GQA = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2, vocab_size=64,
                  max_len=32, seq_len=16, batch_size=2, positional="rope", norm_type="rmsnorm",
                  n_experts=4, experts_per_token=2, architecture="encoder-decoder",
                  parallel_residual=True)  # (parallel + cross-attention: still refused)
TINY = ModelConfig(d_model=64, n_heads=4, d_ff=128, n_layers=2, vocab_size=64, max_len=32,
                   seq_len=16, batch_size=2)


def test_window_opens_on_an_unpredicted_config_and_names_its_fields(make_window):
    refused = unpredicted_features(GQA)
    assert refused, "pick a field the predictor refuses for this test"
    win = make_window(GQA)
    panel = win.scaling_panel
    assert panel.predicted == []
    text = panel.summary.text()
    assert text.startswith("⚠ not predicted")
    for name in refused:
        assert name in text


def test_back_to_a_predicted_config_predicts_again(make_window, qtbot):
    win = make_window(GQA)
    win.scaling_panel.update_config(TINY)
    qtbot.waitUntil(win.scaling_panel.prediction_current, timeout=30_000)
    assert win.scaling_panel.predicted
    assert "not predicted" not in win.scaling_panel.summary.text()
