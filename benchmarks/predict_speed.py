"""Analytic prediction time against the 16 ms frame budget, and against one measurement.

For a GPT-3-shaped config (96 layers, d_model 12288) the predictor must answer within a frame
(issue 3: ≤ 16 ms); for a small config it is compared with running the model (one measured
forward+backward), the thing it replaces. Medians of several cold runs (caches cleared).

    python benchmarks/predict_speed.py [--repeats 5] [--json]
"""

from __future__ import annotations

import json
import os
import platform
import time

from _common import median_ms, parser

from unitscale_core import ModelConfig
from unitscale_core.measure import measure
from unitscale_core.scaling import rules
from unitscale_core.scaling.predict import _predict_cached, predict

GPT3 = ModelConfig(d_model=12288, n_heads=96, d_ff=49152, n_layers=96, vocab_size=50257,
                   max_len=2048, seq_len=2048, batch_size=1)
SMALL = ModelConfig(d_model=256, n_heads=4, d_ff=1024, n_layers=4, seq_len=128, batch_size=8)


def _cold(warm: bool) -> None:
    _predict_cached.cache_clear()
    if not warm:
        rules.clear_caches()


def main() -> None:
    args = parser(__doc__).parse_args()
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                            f"{platform.python_version()}"}
    for param in ("standard", "unit", "umup"):
        cfg = GPT3.replace(parametrization=param)
        predict(cfg)  # numerical caches warm, as in a running app
        ms = median_ms(lambda c=cfg: predict(c, formats=("fp8_e4m3",)), args.repeats,
                       lambda: _cold(True))
        out[f"predict_96_layers_ms_{param}"] = {"value": round(ms, 1), "goal": 16.0,
                                                "ratio_to_frame": round(ms / 16.0, 2)}
    small_pred = median_ms(lambda: predict(SMALL), args.repeats, lambda: _cold(True))
    t0 = time.perf_counter()
    measure(SMALL)
    small_meas = (time.perf_counter() - t0) * 1e3
    out["predict_vs_measure_small"] = {"ours_ms": round(small_pred, 2),
                                       "theirs_ms": round(small_meas, 1),
                                       "ratio": round(small_pred / small_meas, 4)}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(out["machine"])
    for key, value in out.items():
        if key != "machine":
            print(f"{key:34s} {value}")


if __name__ == "__main__":
    main()
