"""One forward+backward scale measurement: ours against ``unit_scaling``'s ``track_scales``.

The same unit-scaled decoder on both sides: Graphcore's ``unit_scaling.TransformerDecoder``
(pre-norm, causal, SwiGLU MLP of 4 × width, no positional encoding, no biases, untied readout)
and our ``ModelConfig`` of the same shape (``parametrization="unit"``, ``activation="swiglu"``,
``positional="none"``, ``bias=False``, ``tie_embeddings=False``), width 256, 4 heads, 4 layers,
vocabulary 8192, batch 8 × 128 tokens. Parameter counts are reported: they differ only by our
LayerNorms' gains (9 norms × 256), which their weightless RMSNorm lacks.

Ours: ``unitscale_core.measure.measure`` — RMS and five formats' underflow/overflow fractions of
every activation, weight and gradient. Theirs: ``track_scales(model)``, ``model.loss(ids)`` and
``backward()`` — five statistics of every traced tensor, forward and backward. Both timed
warm (model built, graph traced), alternately; medians. The first call of each (build, trace) is
reported too.

    python benchmarks/measure_speed.py [--repeats 5] [--json]
"""

from __future__ import annotations

import time
import warnings

import torch
from _common import paired_medians_ms, parser, ratio_entry, report

from unitscale_core import ModelConfig
from unitscale_core.measure import measure
from unitscale_core.sizing import count_parameters

WIDTH, HEADS, LAYERS, VOCAB, SEQ, BATCH = 256, 4, 4, 8192, 128, 8
OURS = ModelConfig(architecture="decoder", d_model=WIDTH, n_heads=HEADS, d_ff=4 * WIDTH,
                   n_layers=LAYERS, vocab_size=VOCAB, max_len=SEQ, seq_len=SEQ,
                   batch_size=BATCH, positional="none", attention="causal", norm="pre",
                   activation="swiglu", bias=False, tie_embeddings=False, dropout=0.0,
                   parametrization="unit", dtype="fp32", device="cpu")


def _theirs():
    import unit_scaling as uu
    from unit_scaling.transforms import track_scales

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = uu.TransformerDecoder(hidden_size=WIDTH, vocab_size=VOCAB, layers=LAYERS,
                                      heads=HEADS)
    n_params = sum(p.numel() for p in model.parameters())
    tracked = track_scales(model)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    def step():
        tracked.zero_grad(set_to_none=True)
        tracked.loss(ids).backward()
        return tracked.scales_graph()

    return step, n_params


def run(repeats: int = 5) -> dict:
    """``measure_vs_track_scales``: ``{"ours_ms", "theirs_ms", "ratio", …}``."""
    warnings.filterwarnings("ignore", message=r"std\(\): degrees of freedom")
    theirs, their_params = _theirs()
    ours_params = count_parameters(OURS)["total"]
    t0 = time.perf_counter()
    rows = measure(OURS)
    ours_first = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    graph = theirs()
    theirs_first = (time.perf_counter() - t0) * 1e3
    assert any("metrics" in n.meta for n in graph.nodes)  # their tracking really ran
    o, th = paired_medians_ms(lambda: measure(OURS), theirs, repeats)
    return {"measure_vs_track_scales": ratio_entry(
        o, th, ours_first_ms=round(ours_first, 1), theirs_first_ms=round(theirs_first, 1),
        ours_tensors=len(rows),
        ours_params=ours_params, theirs_params=their_params)}


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    report(run(args.repeats), args.json)
