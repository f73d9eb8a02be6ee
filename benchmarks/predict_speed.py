"""Analytic prediction time against the 16 ms frame budget, and against one measurement.

For a GPT-3-shaped config (96 layers, d_model 12288, seq 2048) the predictor must answer within
a frame (issue 3 / 7: ≤ 16 ms); ``predict_96_layers_ms`` is the slowest of the three
parametrizations (each also reported). For a small config it is compared with running the model
(one measured forward+backward), the thing it replaces. Medians of several runs with the
prediction cache cleared (the numerical rule caches stay warm, as in a running app).

    python benchmarks/predict_speed.py [--repeats 5] [--json]
"""

from __future__ import annotations

from _common import median_ms, parser, ratio_entry, report

from unitscale_core import ModelConfig
from unitscale_core.config import PARAMETRIZATIONS
from unitscale_core.measure import measure
from unitscale_core.scaling import rules
from unitscale_core.scaling.predict import clear_cache, predict

GPT3 = ModelConfig(d_model=12288, n_heads=96, d_ff=49152, n_layers=96, vocab_size=50257,
                   max_len=2048, seq_len=2048, batch_size=1)
SMALL = ModelConfig(d_model=256, n_heads=4, d_ff=1024, n_layers=4, seq_len=128, batch_size=8)


def _cold(warm: bool) -> None:
    clear_cache()
    if not warm:
        rules.clear_caches()


def run(repeats: int = 5, compare_measure: bool = True) -> dict:
    """``predict_96_layers_ms``: ``{"value", "<parametrization>_ms"…}``; with
    ``compare_measure`` also ``predict_vs_measure_small``."""
    per_param = {}
    for param in PARAMETRIZATIONS:
        cfg = GPT3.replace(parametrization=param)
        predict(cfg)  # numerical caches warm, as in a running app
        per_param[f"{param}_ms"] = round(median_ms(
            lambda c=cfg: predict(c, formats=("fp8_e4m3",)), repeats, lambda: _cold(True)), 2)
    out: dict = {"predict_96_layers_ms": {"value": max(per_param.values()), **per_param}}
    if compare_measure:
        small_pred = median_ms(lambda: predict(SMALL), repeats, lambda: _cold(True))
        measure(SMALL)  # builds (and caches) the model, as the app's second measurement would
        small_meas = median_ms(lambda: measure(SMALL), max(1, repeats // 2))
        out["predict_vs_measure_small"] = ratio_entry(small_pred, small_meas)
    return out


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    report(run(args.repeats), args.json)
