"""Held-out predictions against measurement averaged over seeds.

The prediction is an expectation over initialisations; one measurement is one draw, and in
the small held-out configs of ``test_predict.py`` a draw moves the share within 25% by ±10
points (``benchmarks/agreement_seeds.py``). Here each tensor's log2 error is averaged over
seeds 100–103 (the error against the geometric mean of its RMS, the app's "× N seeds"
measurement) and ≥ 90% of them must be within 25%, per config and parametrization — the goal
with the luck of one draw taken out. Seeds 100… are not the configs' own, so these are
further draws of configs nobody tuned on.
"""

from __future__ import annotations

import numpy as np
import pytest

from unitscale_core import ModelConfig

from .test_predict import HELD_OUT, HELD_OUT_TIED, log2_errors

SEEDS = (100, 101, 102, 103)
TOLERANCE = 0.32  # log2(1.25)

#: Below the goal even on seed averages (78.4% when this file was added): the tied 32-layer
#: unit-scaled decoder, whose tokens collapse (its top layers' query and key gradients are fp32
#: rounding noise) and whose backward scatters ±1–2 log2 per seed (see the README's *Which
#: average* and *Collapse*).
KNOWN_GAPS = {("unit", "tied-decoder-deep-32")}

CONFIGS = {**{name: (c, False) for name, c in HELD_OUT.items()},
           **{name: (c, True) for name, c in HELD_OUT_TIED.items()}}


def seed_averaged_share(param: str, config: dict, tied: bool) -> tuple[float, list]:
    """Share of tensors whose log2 error, averaged over :data:`SEEDS`, is within 25%; and
    the five worst (mean error, name, kind)."""
    errors: dict[tuple[str, str], list[float]] = {}
    for seed in SEEDS:
        cfg = ModelConfig(parametrization=param, tie_embeddings=tied,
                          **{**config, "seed": seed})
        for key, (err, _pred, _meas) in log2_errors(cfg).items():
            errors.setdefault(key, []).append(err)
    mean = {key: float(np.mean(v)) for key, v in errors.items()}
    share = float(np.mean([abs(m) <= TOLERANCE for m in mean.values()]))
    worst = sorted(((abs(m), key) for key, m in mean.items()), reverse=True)[:5]
    return share, worst


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_held_out_configs_over_seeds(param, name, request):
    if (param, name) in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(strict=True, reason="known gap, see KNOWN_GAPS"))
    config, tied = CONFIGS[name]
    share, worst = seed_averaged_share(param, config, tied)
    assert share >= 0.90, worst
