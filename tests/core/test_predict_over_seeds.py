"""Held-out predictions against measurement averaged over seeds.

The prediction is an expectation over initialisations; one measurement is one draw, and in
the small held-out configs of ``test_predict.py`` a draw moves the share within 25% by ±10
points (``benchmarks/agreement_seeds.py``). Here each tensor's log2 error is averaged over
seeds 100–103 (the error against the geometric mean of its RMS, the app's "× N seeds"
measurement) and ≥ 90% of them must be within 25%, per config and parametrization, and over
all the configs' tensors of each parametrization (the issue's goal, "≥ 90% of tensors under
each parametrization") — the goal with the luck of one draw taken out. Seeds 100… are not the
configs' own, so these are further draws of configs nobody tuned on.

At one seed no prediction can reach that under ``unit``: the other seeds' geometric mean, as a
prediction of each tensor's typical draw, scores 87.3% over all held-out tensors at one seed
(``benchmarks/agreement_seeds.py --all --seeds 16``: its ceiling column), and the predictor
86.4%.
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
#: rounding noise) and whose backward scatters ±1–2 log2 per seed (see docs/agreement.md, *Which
#: average* and *Collapse*).
KNOWN_GAPS = {("unit", "tied-decoder-deep-32")}

CONFIGS = {**{name: (c, False) for name, c in HELD_OUT.items()},
           **{name: (c, True) for name, c in HELD_OUT_TIED.items()}}


_MEAN_ERRORS: dict[tuple[str, str], dict[tuple[str, str], float]] = {}


def seed_averaged_errors(param: str, name: str) -> dict[tuple[str, str], float]:
    """``(tensor, kind) → log2 error averaged over`` :data:`SEEDS` for a held-out config;
    measured once per session (the per-config and the per-parametrization tests share it)."""
    hit = _MEAN_ERRORS.get((param, name))
    if hit is not None:
        return hit
    config, tied = CONFIGS[name]
    errors: dict[tuple[str, str], list[float]] = {}
    for seed in SEEDS:
        cfg = ModelConfig(parametrization=param, tie_embeddings=tied,
                          **{**config, "seed": seed})
        for key, (err, _pred, _meas) in log2_errors(cfg).items():
            errors.setdefault(key, []).append(err)
    mean = {key: float(np.mean(v)) for key, v in errors.items()}
    _MEAN_ERRORS[(param, name)] = mean
    return mean


def seed_averaged_share(param: str, name: str) -> tuple[float, list]:
    """Share of tensors whose log2 error, averaged over :data:`SEEDS`, is within 25%; and
    the five worst (mean error, name, kind)."""
    mean = seed_averaged_errors(param, name)
    share = float(np.mean([abs(m) <= TOLERANCE for m in mean.values()]))
    worst = sorted(((abs(m), key) for key, m in mean.items()), reverse=True)[:5]
    return share, worst


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_held_out_configs_over_seeds(param, name, request):
    if (param, name) in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(strict=True, reason="known gap, see KNOWN_GAPS"))
    share, worst = seed_averaged_share(param, name)
    assert share >= 0.90, worst


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
def test_each_parametrization_over_all_held_out_tensors(param):
    """The goal as the issues state it: ≥ 90% of the held-out tensors of each
    parametrization within 25% (seed-averaged), the 32-layer decoder's 1,939 included."""
    errors = [m for name in CONFIGS for m in seed_averaged_errors(param, name).values()]
    share = float(np.mean([abs(m) <= TOLERANCE for m in errors]))
    assert share >= 0.90, (share, len(errors))
