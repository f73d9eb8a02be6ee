"""Shares never round to a false 0% or 100%; no negative zero (unitscale_core.formatting)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unitscale_core.formatting import number, percent, share


def test_the_issue_examples():
    assert share(258, 259) == "258/259 (>99%)"
    assert share(259, 259) == "259/259 (100%)"
    assert share(1, 300) == "1/300 (<1%)"
    assert share(0, 259) == "0/259 (0%)"
    assert share(0, 0) == "0/0"
    assert percent(0.996, 1) == "99.6%" and percent(0.003, 1) == "0.3%"
    assert percent(0.9996, 1) == ">99.9%" and percent(0.0004, 1) == "<0.1%"
    assert percent(0.999996, significant=3) == ">99.9%"  # .3g alone gives "100"
    assert percent(0.5) == "50%" and percent(1.0, 2) == "100.00%" and percent(0.0, 1) == "0.0%"


@given(st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
       st.integers(min_value=0, max_value=3))
def test_only_exact_bounds_show_as_bounds(fraction, decimals):
    text = percent(fraction, decimals)
    zero, hundred = f"{0:.{decimals}f}%", f"{100:.{decimals}f}%"
    assert (text == zero) == (fraction == 0.0)
    assert (text == hundred) == (fraction == 1.0)
    if text[0] not in "<>":  # otherwise the value is shown to the precision asked for
        assert float(text[:-1]) == pytest.approx(100 * fraction, abs=0.5 * 10.0 ** -decimals)


@given(st.floats(min_value=0.0, max_value=1.0, allow_nan=False, exclude_min=True,
                 exclude_max=True), st.integers(min_value=1, max_value=4))
def test_significant_digits_never_reach_100(fraction, digits):
    text = percent(fraction, significant=digits)
    assert text != "100%" and float(text.lstrip("<>")[:-1]) > 0


def test_no_negative_zero():
    assert number(-0.001) == "0.00" and number(-0.0) == "0.00"
    assert number(-0.0, ".4g") == "0" and number(-0.004, "+.2f") == "+0.00"
    assert number(-0.0, ".2e") == "0.00e+00"
    assert number(-0.006) == "-0.01" and number(-1e-9, ".4g") == "-1e-09"  # not zero: kept
    assert percent(-0.001) == "0%"


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1.0, max_value=1.0),
       st.sampled_from([".2f", ".1f", ".3g", ".4g", "+.2f", ".0f"]))
def test_number_is_format_without_a_signed_zero(x, spec):
    text = number(x, spec)
    assert not re.fullmatch(r"-[0.]+(e[+-]\d+)?", text)
    assert float(text) == float(format(x, spec))
