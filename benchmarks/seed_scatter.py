"""How far the residual stream's gradient wanders between seeds, layer by layer.

The predictor gives each tensor's RMS over initialisations (a second moment); one seed is one
draw from that ensemble. In deep residual stacks the gradient reaching layer ``i`` is a product
of one random factor per layer it came down through, so its log₂ RMS scatters between seeds
with a variance that grows with depth. This script measures it: for a base config (a tied
decoder, d 64, 2 heads, 24 layers, 32 tokens × 2 sequences) and variants that change one thing
(width, batch, depth, parametrization, untied), the log₂ variance over seeds of the stream
gradient's RMS (``layers.{i}``, grad_activation) at the bottom layer, per layer passed
(``var_per_layer``: the bottom's variance over the number of layers), and the forward stream's
median log₂ std for contrast. Seeds 700… (not used by any test).

    python benchmarks/seed_scatter.py [--seeds 16] [--json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from unitscale_core import ModelConfig
from unitscale_core.measure import measure

BASE = dict(architecture="decoder", d_model=64, n_heads=2, d_ff=256, n_layers=24, seq_len=32,
            max_len=32, batch_size=2, vocab_size=500, tie_embeddings=True,
            parametrization="unit")
VARIANTS = {
    "base (unit)": {},
    "d_model 128": {"d_model": 128, "d_ff": 512},
    "batch 8": {"batch_size": 8},
    "12 layers": {"n_layers": 12},
    "untied": {"tie_embeddings": False},
    "umup": {"parametrization": "umup"},
    "standard": {"parametrization": "standard"},
}


def scatter(changes: dict, seeds: int) -> dict:
    """``var_bottom`` (log₂² of the stream gradient at layer 0), ``var_per_layer``, and
    ``forward_std`` (median over layers of the stream activation's log₂ std)."""
    cfg = {**BASE, **changes}
    rms: dict[tuple[str, str], list[float]] = {}
    for i in range(seeds):
        for row in measure(ModelConfig(seed=700 + i, **cfg)):
            rms.setdefault((row.name, row.kind), []).append(row.rms)
    layers = cfg["n_layers"]
    grad = [float(np.var(np.log2(rms[(f"layers.{i}", "grad_activation")])))
            for i in range(layers)]
    fwd = [float(np.std(np.log2(rms[(f"layers.{i}", "activation")]))) for i in range(layers)]
    return {"var_bottom": round(grad[0], 4), "var_per_layer": round(grad[0] / layers, 4),
            "var_by_layer": [round(v, 3) for v in grad],
            "forward_std": round(float(np.median(fwd)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = {name: scatter(changes, args.seeds) for name, changes in VARIANTS.items()}
    if args.json:
        print(json.dumps({"seeds": args.seeds, "variants": out}))
        return
    print(f"stream gradient's log2 variance over {args.seeds} seeds (from 700)")
    print(f"{'variant':14s} {'at layer 0':>10s} {'per layer':>9s} {'fwd std':>8s}")
    for name, r in out.items():
        print(f"{name:14s} {r['var_bottom']:10.4f} {r['var_per_layer']:9.4f} "
              f"{r['forward_std']:8.3f}")


if __name__ == "__main__":
    main()
