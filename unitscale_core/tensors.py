"""The row every scale table shares: one tensor's name, kind, RMS and format headroom.

The predictor (``unitscale_core.scaling``) and the measurement (``unitscale_core.measure``)
both produce these rows under the same names, so they line up row for row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

KINDS = ("activation", "weight", "grad_activation", "grad_weight")
#: A prediction agrees with a measurement when |log2(predicted/measured)| is at most this (25%).
AGREEMENT_LOG2 = 0.32
#: The formats every row reports headroom in (fp32 has room for anything a model produces).
REPORTED_FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp16", "bf16")


#: A formula as text, or deferred as ``(template, args)`` for ``str.format`` (args may be
#: deferred formulas themselves). A 96-layer prediction makes ~6000 formulas and formatting
#: them eagerly costs a third of a frame; a row renders its own on first read.
Formula = str | tuple


def render_formula(formula: Formula) -> str:
    """The text of a possibly deferred formula."""
    if isinstance(formula, str):
        return formula
    template, args = formula
    return template.format(*(render_formula(a) if isinstance(a, tuple) else a for a in args))


#: Shared by every row without scales or formats (a prediction makes thousands of rows; an
#: empty dict each would cost a noticeable part of a frame). Read-only, so never shared state.
_EMPTY: Mapping = MappingProxyType({})


class TableRow(Mapping):
    """Row ``i`` of a format table ``{format: {column: array}}`` as
    ``{format: {column: float}}``, each inner dict built only when read."""

    __slots__ = ("_tables", "_i")

    def __init__(self, tables: Mapping[str, Mapping[str, Any]], i: int):
        self._tables, self._i = tables, i

    def __getitem__(self, fmt: str) -> dict[str, float]:
        return {k: float(col[self._i]) for k, col in self._tables[fmt].items()}

    def __iter__(self):
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)


class TensorRow:
    """One tensor of one training step.

    ``scales``: the factors the parametrization applies to this op (``forward``,
    ``grad_input``, ``grad_weight``), empty for standard or measured rows.
    ``formats``: per format, ``underflow`` and ``overflow`` fractions and the log2 headroom to
    the max normal (``headroom_max_log2``) and to the min subnormal (``headroom_min_log2``).
    ``formula``: how a predicted RMS was obtained (empty for measured rows); it may be passed
    deferred (see :data:`Formula`) and is rendered when first read.

    ``formats`` may also be given as ``(tables, i)``: row ``i`` of a column table
    (:class:`TableRow`), so a predictor can attach a vectorised table to thousands of rows
    without building an object for each.

    A slotted class rather than a dataclass: thousands are made per prediction.
    """

    __slots__ = ("name", "kind", "rms", "scales", "_formats", "shape", "_formula")

    def __init__(self, name: str, kind: str, rms: float,
                 scales: dict[str, float] | None = None,
                 formats: Mapping[str, dict[str, float]] | None = None,
                 shape: tuple[int, ...] = (), formula: Formula = ""):
        self.name, self.kind, self.rms = name, kind, rms
        self.scales = _EMPTY if scales is None else scales
        self._formats = _EMPTY if formats is None else formats
        self.shape, self._formula = shape, formula

    @property
    def formats(self) -> Mapping[str, dict[str, float]]:
        f = self._formats
        if type(f) is tuple:
            f = self._formats = TableRow(*f)
        return f

    @formats.setter
    def formats(self, value) -> None:
        self._formats = value

    @property
    def formula(self) -> str:
        if not isinstance(self._formula, str):
            self._formula = render_formula(self._formula)
        return self._formula

    @formula.setter
    def formula(self, value: Formula) -> None:
        self._formula = value

    def _key(self) -> tuple:
        return (self.name, self.kind, self.rms, self.scales,
                {f: dict(d) for f, d in self.formats.items()}, self.shape, self.formula)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorRow):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        return (f"TensorRow(name={self.name!r}, kind={self.kind!r}, rms={self.rms!r}, "
                f"shape={self.shape!r})")

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict: non-finite numbers become None (JSON has no NaN or infinity)."""
        return {
            "name": self.name, "kind": self.kind, "rms": _finite(self.rms),
            "shape": list(self.shape), "formula": self.formula,
            "scales": {k: _finite(v) for k, v in self.scales.items()},
            "formats": {f: {k: _finite(v) for k, v in d.items()}
                        for f, d in self.formats.items()},
        }


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def headroom_log2(rms: float, max_normal: float, min_subnormal: float) -> tuple[float, float]:
    """``(log2(max_normal / rms), log2(rms / min_subnormal))``; ±inf at rms 0 or inf."""
    if rms <= 0:
        return math.inf, -math.inf
    if not math.isfinite(rms):
        return -math.inf, math.inf
    return math.log2(max_normal / rms), math.log2(rms / min_subnormal)
