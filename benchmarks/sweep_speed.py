"""An analytic step-0 sweep against its one-second budget (issue 22).

``sweep_24_layers_8_widths_ms``: the wall time of predicting a 24-layer decoder (GPT-2-medium
shaped: 1024 tokens × 8 sequences, heads of 64, ``d_ff = 4·d``, GPT-2's vocabulary) at 8 widths
(256 … 3072) under each of the 3 parametrizations, 24 predictions from a cold prediction
cache (the numerical rule caches stay warm, as in a running app, like ``predict_speed``):
what a width × parametrization sweep costs per edit. Median of several runs; each
parametrization's share is reported too.

    python benchmarks/sweep_speed.py [--repeats 3] [--json]
"""

from __future__ import annotations

import time

from _common import parser, report

from unitscale_core import ModelConfig
from unitscale_core.config import PARAMETRIZATIONS
from unitscale_core.scaling.predict import clear_cache, predict

WIDTHS = (256, 384, 512, 768, 1024, 1536, 2048, 3072)
BASE = ModelConfig(architecture="decoder", d_model=1024, n_heads=16, d_ff=4096, n_layers=24,
                   vocab_size=50257, max_len=1024, seq_len=1024, batch_size=8)


def configs() -> list[ModelConfig]:
    """The sweep's 24 configs, width-major."""
    return [BASE.replace(d_model=w, n_heads=w // 64, d_ff=4 * w, parametrization=p)
            for w in WIDTHS for p in PARAMETRIZATIONS]


def _sweep(cfgs: list[ModelConfig]) -> dict[str, float]:
    """One cold sweep: seconds per parametrization."""
    clear_cache()
    spent = dict.fromkeys(PARAMETRIZATIONS, 0.0)
    for cfg in cfgs:
        t0 = time.perf_counter()
        predict(cfg, formats=("fp8_e4m3",))
        spent[cfg.parametrization] += time.perf_counter() - t0
    return spent


def run(repeats: int = 3) -> dict:
    """``sweep_24_layers_8_widths_ms``: ``{"value"`` (ms, the whole sweep),
    ``"<parametrization>_ms"…, "predictions"}``."""
    cfgs = configs()
    _sweep(cfgs)  # numerical caches warm
    runs = sorted((_sweep(cfgs) for _ in range(max(1, repeats))),
                  key=lambda s: sum(s.values()))
    mid = runs[len(runs) // 2]
    return {"sweep_24_layers_8_widths_ms": {
        "value": round(sum(mid.values()) * 1e3, 1),
        **{f"{p}_ms": round(s * 1e3, 1) for p, s in mid.items()},
        "predictions": len(cfgs)}}


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    report(run(args.repeats), args.json)
