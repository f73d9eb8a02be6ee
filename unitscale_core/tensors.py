"""The row every scale table shares: one tensor's name, kind, RMS and format headroom.

The predictor (``unitscale_core.scaling``) and the measurement (``unitscale_core.measure``)
both produce these rows under the same names, so they line up row for row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = ("activation", "weight", "grad_activation", "grad_weight")
#: The formats every row reports headroom in (fp32 has room for anything a model produces).
REPORTED_FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp16", "bf16")


@dataclass
class TensorRow:
    """One tensor of one training step.

    ``scales``: the factors the parametrization applies to this op (``forward``,
    ``grad_input``, ``grad_weight``), empty for standard or measured rows.
    ``formats``: per format, ``underflow`` and ``overflow`` fractions and the log2 headroom to
    the max normal (``headroom_max_log2``) and to the min subnormal (``headroom_min_log2``).
    ``formula``: how a predicted RMS was obtained (empty for measured rows).
    """

    name: str
    kind: str
    rms: float
    scales: dict[str, float] = field(default_factory=dict)
    formats: Mapping[str, dict[str, float]] = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    formula: str = ""

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
