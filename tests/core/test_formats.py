"""Number formats and Gaussian headroom, checked against what torch's casts actually do.

The fractions are compared with *measured* casts of millions of Gaussian samples (categories
read off the cast result, not from the thresholds under test), so a wrong threshold or formula
fails here.
"""

from __future__ import annotations

import math
import subprocess
import sys
import timeit

import numpy as np
import pytest
import torch

from unitscale_core.scaling import formats as fm
from unitscale_core.scaling.formats import (
    FORMATS,
    NumberFormat,
    gaussian_format_stats,
    gaussian_format_table,
    get_format,
    headroom_status,
)

N_SAMPLES = 2_000_000
Z_TOL = 5.0  # standard errors allowed between a predicted and a measured count


# -- the format table against torch.finfo ----------------------------------------------------


@pytest.mark.parametrize("name", list(FORMATS))
def test_formats_match_torch_finfo(name: str) -> None:
    fmt = FORMATS[name]
    assert fmt.name == name
    fi = torch.finfo(fmt.torch_dtype())
    mantissa_bits = round(-math.log2(fi.eps))
    assert fmt.max_normal == fi.max
    assert fmt.min_normal == fi.smallest_normal == fi.tiny
    assert fmt.min_subnormal == 2.0 ** (math.log2(fi.tiny) - mantissa_bits)
    assert fmt.mantissa_bits == mantissa_bits


def test_documented_decimal_values() -> None:
    expected = {
        "fp32": (3.4028235e38, -126, -149), "bf16": (3.3895314e38, -126, -133),
        "fp16": (65504, -14, -24), "fp8_e4m3": (448, -6, -9), "fp8_e5m2": (57344, -14, -16),
    }
    assert set(FORMATS) == set(expected)
    for name, (mx, lo_n, lo_s) in expected.items():
        fmt = FORMATS[name]
        assert fmt.max_normal == pytest.approx(mx, rel=1e-7)
        assert fmt.min_normal == 2.0**lo_n and fmt.min_subnormal == 2.0**lo_s
    assert FORMATS["fp8_e4m3"].torch_dtype() is torch.float8_e4m3fn
    assert FORMATS["fp8_e5m2"].torch_dtype() is torch.float8_e5m2


# -- exact thresholds against torch casts ----------------------------------------------------


def _source_dtype(fmt: NumberFormat) -> tuple[torch.dtype, type]:
    # torch casts float64 -> 16/8-bit via float32, so probe those from exact float32 values.
    return (torch.float64, np.float64) if fmt.name == "fp32" else (torch.float32, np.float32)


def _cast(values: list[float], fmt: NumberFormat) -> np.ndarray:
    tdt, _ = _source_dtype(fmt)
    return torch.tensor(values, dtype=tdt).to(fmt.torch_dtype()).to(torch.float64).numpy()


def _overflowed(x: np.ndarray, y: np.ndarray, fmt: NumberFormat) -> np.ndarray:
    """The cast lost the value at the top: inf/NaN, or clipped to ±max by more than half an ulp.

    (A correctly rounded value is never more than half an ulp from its input, so a result at
    ±max further than that was saturated.)
    """
    at_max = np.abs(y) == fmt.max_normal
    clipped = at_max & (np.abs(np.abs(x) - fmt.max_normal) > fmt.ulp_at_max / 2)
    return ~np.isfinite(y) | clipped


@pytest.mark.parametrize("name", list(FORMATS))
def test_thresholds_match_torch_cast(name: str) -> None:
    fmt = FORMATS[name]
    _, npdt = _source_dtype(fmt)

    def up(v: float) -> float:
        return float(np.nextafter(npdt(v), npdt(np.inf)))

    def down(v: float) -> float:
        return float(np.nextafter(npdt(v), npdt(0)))

    s, n, mx = fmt.min_subnormal, fmt.min_normal, fmt.max_normal
    u, t_n, o = fmt.underflow_threshold, fmt.normal_threshold, fmt.overflow_threshold
    assert (u, t_n) == (s / 2, n - s / 2)

    # underflow: |x| <= s/2 rounds to zero (the tie at s/2 goes to the even neighbour, 0)
    xs = [down(u), u, up(u), -u, -up(u)]
    assert list(_cast(xs, fmt)) == [0.0, 0.0, s, 0.0, -s]
    # subnormal below n - s/2, normal from it (the tie rounds up to n, whose mantissa is even)
    xs = [down(t_n), t_n, up(t_n)]
    assert list(_cast(xs, fmt)) == [n - s, n, n]
    # overflow: beyond max + ulp/2 rounding passes max
    xs = [mx, down(o), up(o), -up(o), 2 * mx, float("inf")]
    y = _cast(xs, fmt)
    assert list(y[:2]) == [mx, mx]
    assert list(_overflowed(np.array(xs), y, fmt)) == [False, False, True, True, True, True]


def test_measured_overflow_behaviour() -> None:
    """fp16/bf16/e5m2/fp32 give inf; e4m3fn has no inf: torch 2.13 saturates (older: NaN)."""
    for name in ("fp32", "bf16", "fp16", "fp8_e5m2"):
        fmt = FORMATS[name]
        assert np.isinf(_cast([fmt.overflow_threshold * 1.01], fmt)).all()
    y = float(_cast([465.0], FORMATS["fp8_e4m3"])[0])
    assert math.isnan(y) or y == 448.0


# -- fractions against sampling --------------------------------------------------------------


@pytest.fixture(scope="module")
def standard_normal() -> torch.Tensor:
    gen = torch.Generator().manual_seed(20230320)
    return torch.randn(N_SAMPLES, dtype=torch.float64, generator=gen)


def _rms_cases() -> list[tuple[str, float]]:
    cases = []
    for name, f in FORMATS.items():
        for rms in (f.min_subnormal, 3 * f.min_subnormal, f.min_normal, 1.0, f.max_normal / 3,
                    f.max_normal):
            cases.append((name, rms))
    return cases


@pytest.mark.parametrize(("name", "rms"), _rms_cases())
def test_fractions_match_sampled_casts(
    standard_normal: torch.Tensor, name: str, rms: float
) -> None:
    fmt = FORMATS[name]
    x = standard_normal * rms
    y = x.to(fmt.torch_dtype()).to(torch.float64)
    x_np, y_np = x.numpy(), y.numpy()
    over = _overflowed(x_np, y_np, fmt)
    under = y_np == 0
    sub = ~over & ~under & (np.abs(y_np) < fmt.min_normal)
    measured = {
        "underflow": int(under.sum()),
        "subnormal": int(sub.sum()),
        "overflow": int(over.sum()),
        "normal": int((~over & ~under & ~sub).sum()),
    }
    stats = gaussian_format_stats(rms, fmt)
    for key, count in measured.items():
        p = getattr(stats, key)
        expected = N_SAMPLES * p
        tol = Z_TOL * math.sqrt(N_SAMPLES * p * (1 - p)) + 1.5
        assert abs(count - expected) <= tol, (name, rms, key, count, expected, tol)


# -- closed forms, edge cases ----------------------------------------------------------------


def test_fractions_sum_to_one_and_headroom() -> None:
    for fmt in FORMATS.values():
        for rms in (1e-300, fmt.min_subnormal, 1.0, fmt.max_normal, 1e300):
            s = gaussian_format_stats(rms, fmt)
            total = s.underflow + s.subnormal + s.normal + s.overflow
            assert total == pytest.approx(1.0, abs=1e-12)
            # log2(max/rms) and log2(rms/s), without overflowing the ratios
            assert s.headroom_max_log2 == pytest.approx(math.log2(fmt.max_normal) - math.log2(rms))
            assert s.headroom_min_log2 == pytest.approx(
                math.log2(rms) - math.log2(fmt.min_subnormal)
            )
    s = gaussian_format_stats(1.0, "fp16")
    assert s.headroom_min_log2 == 24.0
    assert s.headroom_max_log2 == pytest.approx(16.0, abs=1e-3)


def test_tails_are_accurate_without_cancellation() -> None:
    fp16, e4m3 = FORMATS["fp16"], FORMATS["fp8_e4m3"]
    # overflow ~ erfc(10) ≈ 2.09e-45: far below 1 - erf's resolution
    s = gaussian_format_stats(fp16.overflow_threshold / (10 * math.sqrt(2)), fp16)
    assert s.overflow == pytest.approx(math.erfc(10.0), rel=1e-9)
    # a subnormal fraction in the far tail: erfc(z_u) - erfc(z_n) with z_n huge
    rms = fp16.min_subnormal / 20
    s = gaussian_format_stats(rms, fp16)
    assert s.subnormal == pytest.approx(math.erfc(10 / math.sqrt(2)), rel=1e-9)
    assert s.subnormal > 0
    # tiny underflow at huge rms: erf(z) ≈ 2z/√π
    s = gaussian_format_stats(1e6, e4m3)
    z = e4m3.underflow_threshold / (1e6 * math.sqrt(2))
    assert s.underflow == pytest.approx(2 * z / math.sqrt(math.pi), rel=1e-9)


def test_zero_and_extreme_rms() -> None:
    s = gaussian_format_stats(0.0, "fp8_e4m3")
    assert (s.underflow, s.subnormal, s.normal, s.overflow) == (1.0, 0.0, 0.0, 0.0)
    assert s.headroom_min_log2 == -math.inf and s.headroom_max_log2 == math.inf
    # exactly zero is representable: nothing is lost, whatever the Gaussian limit's fractions
    assert headroom_status(s) == "zero"
    assert headroom_status(gaussian_format_stats(5e-324, "fp8_e4m3")) == "lost"  # tiny ≠ zero
    assert list(fm.headroom_status_array([1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1e-300])) \
        == ["zero", "lost"]
    assert list(fm.headroom_status_array([1.0], [0.0], [0.0])) == ["lost"]  # no rms: no zero
    for rms in (5e-324, 1e-300, 1e300, 1.7e308):
        for fmt in FORMATS.values():
            s = gaussian_format_stats(rms, fmt)
            values = (s.underflow, s.subnormal, s.normal, s.overflow)
            assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
            assert math.isfinite(s.headroom_max_log2) and math.isfinite(s.headroom_min_log2)
    assert gaussian_format_stats(5e-324, "fp32").underflow == 1.0
    assert gaussian_format_stats(1.7e308, "fp32").overflow == 1.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0, "1.0", None, True])
def test_invalid_rms_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="rms"):
        gaussian_format_stats(bad, "fp16")  # type: ignore[arg-type]
    if not isinstance(bad, (str, bool, type(None))):  # numpy reads True as 1.0
        with pytest.raises(ValueError, match=r"rms.*index \(1,\)"):
            gaussian_format_table([1.0, bad], "fp16")


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="fmt"):
        gaussian_format_stats(1.0, "fp4")
    assert get_format("bf16") is FORMATS["bf16"]
    assert get_format(FORMATS["bf16"]) is FORMATS["bf16"]


# -- the vectorised table --------------------------------------------------------------------


def test_table_matches_scalar() -> None:
    rms = np.array([[0.0, 1e-9, 2.0**-14], [1.0, 3e4, 1e300]])
    for fmt in FORMATS.values():
        table = gaussian_format_table(rms, fmt)
        assert set(table) == {
            "underflow", "subnormal", "normal", "overflow", "headroom_max_log2",
            "headroom_min_log2",
        }
        for arr in table.values():
            assert arr.shape == rms.shape and arr.dtype == np.float64
        for idx in np.ndindex(rms.shape):
            s = gaussian_format_stats(float(rms[idx]), fmt)
            for key, arr in table.items():
                assert arr[idx] == getattr(s, key), (fmt.name, idx, key)
    assert gaussian_format_table([], "fp16")["underflow"].shape == (0,)


def test_table_is_fast() -> None:
    rms = np.logspace(-50, 50, 1000)
    best = min(timeit.repeat(lambda: gaussian_format_table(rms, "fp8_e4m3"), number=1, repeat=20))
    assert best < 2e-3, f"1,000-element table took {best * 1e3:.2f} ms"


# -- status ----------------------------------------------------------------------------------


def test_headroom_status() -> None:
    for fmt in FORMATS.values():
        assert headroom_status(gaussian_format_stats(1.0, fmt)) == "fine"
    e4m3 = FORMATS["fp8_e4m3"]
    assert headroom_status(gaussian_format_stats(100.0, e4m3)) == "at_risk"  # overflow ~4e-6
    assert headroom_status(gaussian_format_stats(2.0**-6, e4m3)) == "at_risk"  # 60% subnormal
    assert headroom_status(gaussian_format_stats(2.0**-10, e4m3)) == "lost"  # mostly zeros
    assert headroom_status(gaussian_format_stats(1e3, e4m3)) == "lost"  # mostly overflow
    assert headroom_status(gaussian_format_stats(1e-9, "fp16")) == "lost"
    assert headroom_status(gaussian_format_stats(1e-6, "fp16")) == "at_risk"
    assert fm.LOST_FRACTION == 0.5


def test_formats_module_imports_neither_torch_nor_qt() -> None:
    code = (
        "import sys, unitscale_core.scaling; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'PySide6')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
