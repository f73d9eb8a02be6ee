"""The seed document's formula d_e = log P_t / log α, Parameters = β·d_e (not Unit Scaling)."""

from __future__ import annotations

import math

import pytest

from unitscale_core.scaling.seed_formula import (
    SeedFormulaError,
    SeedFormulaResult,
    seed_formula,
)


# The seed document's own code (§5.3), copied verbatim as the reference.
def unit_scaling(target_performance, alpha, beta):  # noqa: ANN001, ANN201
    d_e = math.log(target_performance) / math.log(alpha)
    num_parameters = beta * d_e
    return num_parameters


def test_seed_example_matches_seed_code_and_warns() -> None:
    result = seed_formula(0.85, 1.2, 1e6)
    assert isinstance(result, SeedFormulaResult)
    assert result.parameters == unit_scaling(0.85, 1.2, 1e6)
    assert result.d_e == math.log(0.85) / math.log(1.2)
    assert result.d_e == pytest.approx(-0.891, abs=5e-4)
    assert result.parameters == pytest.approx(-8.91e5, rel=1e-3)  # never clamped
    w = result.warning
    assert w
    assert "negative" in w and "meaningless" in w
    assert "same side of 1" in w
    assert "P_t = 0.85 is below 1" in w and "α = 1.2 is above 1" in w


@pytest.mark.parametrize(
    ("target", "alpha", "beta", "d_e"),
    [(100.0, 10.0, 1e6, 2.0), (0.5, 0.25, 3.0, 0.5), (8, 2, 7, 3.0)],
)
def test_sound_examples(target: float, alpha: float, beta: float, d_e: float) -> None:
    result = seed_formula(target, alpha, beta)
    assert result.d_e == pytest.approx(d_e, rel=1e-12)
    assert result.parameters == pytest.approx(beta * d_e, rel=1e-12)
    assert result.parameters == unit_scaling(target, alpha, beta)
    assert result.warning == ""


def test_target_above_one_with_alpha_below_one_warns() -> None:
    result = seed_formula(2.0, 0.5, 10.0)
    assert result.d_e == pytest.approx(-1.0) and result.parameters == pytest.approx(-10.0)
    assert "P_t = 2 is above 1" in result.warning and "α = 0.5 is below 1" in result.warning


def test_target_one_gives_zero_and_a_warning() -> None:
    result = seed_formula(1.0, 1.2, 1e6)
    assert result.d_e == 0.0 and result.parameters == 0.0
    assert "zero parameters" in result.warning and "meaningless" in result.warning


@pytest.mark.parametrize(
    ("kwargs", "field", "reason"),
    [
        ({"target": 0.0}, "target", "> 0"),
        ({"target": -0.5}, "target", "> 0"),
        ({"target": math.nan}, "target", "finite"),
        ({"target": math.inf}, "target", "finite"),
        ({"target": "0.85"}, "target", "finite number"),
        ({"target": True}, "target", "finite number"),
        ({"target": None}, "target", "finite number"),
        ({"alpha": 1.0}, "alpha", "must not be 1"),
        ({"alpha": 1}, "alpha", "must not be 1"),
        ({"alpha": 0.0}, "alpha", "> 0"),
        ({"alpha": -1.2}, "alpha", "> 0"),
        ({"alpha": -math.inf}, "alpha", "finite"),
        ({"alpha": False}, "alpha", "finite number"),
        ({"beta": 0.0}, "beta", "> 0"),
        ({"beta": -1e6}, "beta", "> 0"),
        ({"beta": math.nan}, "beta", "finite"),
        ({"beta": "1e6"}, "beta", "finite number"),
    ],
)
def test_invalid_input_names_its_field(kwargs: dict, field: str, reason: str) -> None:
    args = {"target": 0.85, "alpha": 1.2, "beta": 1e6, **kwargs}
    with pytest.raises(SeedFormulaError) as info:
        seed_formula(**args)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field == field and err.fields == (field,)
    assert reason in err.reason
    assert str(err).startswith(f"{field}: ")


def test_all_errors_are_collected() -> None:
    with pytest.raises(SeedFormulaError) as info:
        seed_formula(-1.0, 1.0, math.inf)
    err = info.value
    assert err.field == "target"
    assert err.fields == ("target", "alpha", "beta")
    message = str(err)
    assert "target:" in message and "alpha:" in message and "beta:" in message
