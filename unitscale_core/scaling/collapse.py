"""Where a stack's tokens lose what tells them apart, within the resolution of the format.

Attention averages the tokens of a sequence, and a residual add that shrinks its skip path
(unit scaling's ``(τ·branch + skip)/√(1 + τ²)`` at every sub-block) lets the embeddings fade:
deep in such a stack a token's stream is a shared vector whose load varies smoothly with
position, plus a sliver of its own. ``s`` is that own share of the variance (``w·u / Var`` of
the residual stream's :class:`~.covariance.Cov` at each LayerNorm: what distinguishes the
token from its neighbours beyond its position). It is a relative amplitude ``√s``; once that is
below the unit roundoff ``ε`` of the format the model computes in, it is rounding noise, and
with it the query and key gradients (which weigh keys and values centred on a query's
weights), however well their RMS itself fits the format. Measured: fp32's query weight
gradients are 6–200× fp64's a few layers past the point and equal to 5% ten layers before it
(``tests/core/test_collapse.py``).

The point moves a few layers with the initialisation (the own share scatters ~10× between
seeds), so it is a warning about a region, not an exact layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import NamedTuple

#: Unit roundoff (half the spacing of numbers near 1) of the format each ``dtype`` computes
#: the matmul inputs in: fp32 24 significant bits, bf16 8, fp16 11, FP8 e4m3 4, e5m2 3.
RESOLUTION = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11,
              "fp8_e4m3": 2.0**-4, "fp8_e5m2": 2.0**-3}


class Collapse(NamedTuple):
    """The first LayerNorm whose input tokens differ by less than ``resolution``."""

    norm: str  # the LayerNorm's row name, e.g. "layers.27.norm1"
    own_share: float  # s: the token's own share of its variance there
    dtype: str
    resolution: float  # ε of dtype

    def describe(self) -> str:
        """One line for a summary: where, how far below, and what it means."""
        return (f"tokens' own parts fall below {self.dtype} resolution from {self.norm} "
                f"(own share {self.own_share:.1e}, √s = {math.sqrt(self.own_share):.1e} < "
                f"ε = {self.resolution:.1e}): query and key gradients there are rounding noise")


def find_collapse(own_shares: Iterable[tuple[str, float]], dtype: str,
                  seq_len: int) -> Collapse | None:
    """The first ``(norm, s)`` in execution order with ``√s < ε(dtype)``, i.e. ``s < ε²``;
    None when every norm keeps its tokens apart (or a sequence has one token: nothing to
    tell apart)."""
    eps = RESOLUTION.get(dtype)
    if eps is None or seq_len < 2:
        return None
    for norm, share in own_shares:
        if share < eps * eps:
            return Collapse(norm, max(share, 0.0), dtype, eps)
    return None


_LAYER = re.compile(r"^(?P<stack>(?:encoder\.|decoder\.)?)layers\.(?P<i>\d+)\.(?P<rest>.+)$")
#: The rows that weigh keys and values centred on the attention weights: what the collapse
#: turns into rounding noise (activation gradients, and the weight and bias gradients of the
#: query and key projections).
_CENTRED = {("q", "grad_activation"), ("k", "grad_activation"), ("scores", "grad_activation"),
            ("q.weight", "grad_weight"), ("q.bias", "grad_weight"),
            ("k.weight", "grad_weight"), ("k.bias", "grad_weight")}


def noise_rows(rows: Iterable[tuple[str, str]], collapse: Collapse | None
               ) -> frozenset[tuple[str, str]]:
    """The ``(name, kind)`` rows of attention past ``collapse`` in its stack whose values are
    rounding noise: the query, key and score gradients (:data:`_CENTRED`) of every layer
    after the collapsing norm's, and of its own layer when that norm comes before the
    attention (``norm1``)."""
    if collapse is None:
        return frozenset()
    at = _LAYER.match(collapse.norm)
    if at is None:  # a final norm: no attention after it in its stack
        return frozenset()
    stack, first = at["stack"], int(at["i"]) + (0 if at["rest"] == "norm1" else 1)
    out = []
    for name, kind in rows:
        if kind == "activation" or kind == "weight" or "attn." not in name:
            continue  # (most rows, without a regular expression)
        m = _LAYER.match(name)
        if m is None or m["stack"] != stack or int(m["i"]) < first:
            continue
        module, _, part = m["rest"].partition(".")
        if module in ("attn", "cross_attn") and (part, kind) in _CENTRED:
            out.append((name, kind))
    return frozenset(out)
