"""Attention patterns as boolean "may attend" matrices (query rows, key columns).

Patterns (``ModelConfig.attention``), for query position i, key position j and window w:

* ``full``    every key;
* ``causal``  ``j ≤ i`` (Vaswani et al. 2017 §3.2.3, the seed's mask M);
* ``local``   ``|i − j| < w`` — with causality ``0 ≤ i − j < w``;
* ``strided`` ``|i − j| < w`` or ``(i − j) mod w = 0`` — the strided pattern of Child et al.
  2019 ("Generating Long Sequences with Sparse Transformers", §4.2), causal in a decoder.

Decoder stacks are always causal (the seed's §4.1.2 masked attention); encoder stacks use the
pattern as configured. Every pattern lets a query see itself, so no softmax row is empty.
"""

from __future__ import annotations

import torch


def allowed(q_len: int, k_len: int, pattern: str, window: int, causal: bool,
            device: torch.device | str | None = None) -> torch.Tensor | None:
    """Bool tensor ``[q_len, k_len]``, True where attention is allowed; None means all allowed."""
    if pattern == "full" and not causal:
        return None
    i = torch.arange(q_len, device=device).unsqueeze(1)  # (T, 1)
    j = torch.arange(k_len, device=device).unsqueeze(0)  # (1, S)
    delta = i - j  # (T, S): how far back the key is
    causal = causal or pattern == "causal"
    if pattern == "local":
        ok = delta.abs() < window
    elif pattern == "strided":
        ok = (delta.abs() < window) | (delta.remainder(window) == 0)
    else:
        ok = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        ok = ok & (delta >= 0)
    return ok
