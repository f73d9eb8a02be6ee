"""Number formats, Gaussian headroom, and the seed document's formula (headless; no Qt)."""

from .formats import (
    FORMATS,
    FormatStats,
    NumberFormat,
    gaussian_format_stats,
    gaussian_format_table,
    get_format,
    headroom_status,
)
from .seed_formula import SeedFormulaError, SeedFormulaResult, seed_formula

__all__ = [
    "FORMATS",
    "FormatStats",
    "NumberFormat",
    "SeedFormulaError",
    "SeedFormulaResult",
    "gaussian_format_stats",
    "gaussian_format_table",
    "get_format",
    "headroom_status",
    "seed_formula",
]
