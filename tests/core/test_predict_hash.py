"""The predictor's answers are pinned: a speed change must leave every prediction as it was.

Every developed and held-out config of the agreement tests, every preset (at 128 tokens × 2
sequences) and a 4-layer GPT-3 shape at 2048 tokens, under each parametrization, against
``tests/core/data/predict_reference.json`` (row names, kinds, scales and formulas as digests,
RMS, own shares and anisotropies within 1e-9 relative, headroom statuses in fp8-e4m3 and
fp16). See :mod:`tests.core.predict_reference` for what is pinned and how to regenerate it
(only in a commit that changes predictions on purpose, saying so in its message).
"""

from __future__ import annotations

import pytest

from unitscale_core import ModelConfig
from unitscale_core.config import PARAMETRIZATIONS
from unitscale_core.scaling import predict as P
from unitscale_core.scaling import rules as R

from . import predict_reference as ref

CONFIGS = ref.configs()
CASES = [(name, param) for name in CONFIGS for param in PARAMETRIZATIONS]


@pytest.fixture(scope="module")
def pinned() -> dict[str, dict]:
    return ref.load()


def test_every_case_is_pinned_and_every_pinned_case_is_run(pinned):
    assert set(pinned) == {f"{n}/{p}" for n, p in CASES}


@pytest.mark.parametrize("name,param", CASES, ids=[f"{n}/{p}" for n, p in CASES])
def test_prediction_is_as_pinned(pinned, name, param):
    case = f"{name}/{param}"
    got = ref.record(ModelConfig(**{**CONFIGS[name], "parametrization": param}))
    diffs = ref.differences(case, pinned[case], got)
    assert not diffs, "\n".join(diffs)


@pytest.mark.parametrize("target,where", [
    ("layer_norm_rule", "a norm's output (every stream tensor)"),
    ("softmax_row_stats", "the attention weights' statistics"),
])
def test_a_changed_rule_is_caught(monkeypatch, pinned, target, where):
    """The pin cannot pass by accident: one rule off by 1e-7 relative (far below what any
    agreement test sees) shows as differing rows."""
    original = getattr(R, target)

    def nudged(*args, **kwargs):
        out = original(*args, **kwargs)
        if isinstance(out, tuple) and not hasattr(out, "_fields"):  # (sum_p2, gf) arrays
            return tuple(x * (1 + 1e-7) for x in out)
        return out._replace(output=out.output * (1 + 1e-7))

    monkeypatch.setattr(R, target, nudged)
    P.clear_cache()
    case = "decoder-96/unit"
    got = ref.record(ModelConfig(**{**CONFIGS["decoder-96"], "parametrization": "unit"}))
    P.clear_cache()
    assert any("rms" in d for d in ref.differences(case, pinned[case], got)), where
