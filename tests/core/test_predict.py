"""Whole-model predictions against one real forward+backward pass.

The goal (issues 3 and 4) is ≥ 90% of tensors within 25% (|log2(pred/meas)| ≤ 0.32) under every
parametrization on configs nobody tuned on. ``DEVELOPED`` configs were looked at while the
predictor was built; ``HELD_OUT`` ones were first run after it was frozen, and are the honest
figure. Where a held-out config misses the goal the test is a strict expected failure, so a
fix shows up as an unexpected pass.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unitscale_core import ModelConfig
from unitscale_core.measure import measure
from unitscale_core.scaling.predict import (
    averaging_overlaps,
    key_counts,
    predict,
    shared_input_factor,
    sinusoidal_row_means,
)
from unitscale_core.tensors import KINDS

BASE = dict(d_model=64, n_heads=4, d_ff=256, n_layers=2, vocab_size=512, max_len=64,
            seq_len=32, batch_size=4, tie_embeddings=False)


def log2_errors(cfg: ModelConfig) -> dict[tuple[str, str], tuple[float, float, float]]:
    """``(name, kind) → (log2(pred/meas), pred, meas)`` over one measured step (0 where the
    prediction is 0 and the measurement below 1e-6, inf where only the prediction is 0)."""
    meas = {(r.name, r.kind): r.rms for r in measure(cfg)}
    rows = predict(cfg)
    assert {(r.name, r.kind) for r in rows} == set(meas), "predicted and measured names differ"
    errors = {}
    for r in rows:
        m = meas[(r.name, r.kind)]
        if r.rms == 0:
            err = 0.0 if m < 1e-6 else math.inf
        else:
            err = math.log2(r.rms / m)
        errors[(r.name, r.kind)] = (err, r.rms, m)
    return errors


def agreement(cfg: ModelConfig) -> tuple[float, list]:
    errors = [(abs(err), name, kind, pred, m)
              for (name, kind), (err, pred, m) in log2_errors(cfg).items()]
    ok = sum(e <= 0.32 for e, *_ in errors)
    return ok / len(errors), sorted(errors, reverse=True)[:5]


DEVELOPED = [
    {}, {"activation": "swiglu", "positional": "rope", "bias": False},
    {"architecture": "encoder", "attention": "full", "norm": "post"},
    {"positional": "alibi", "activation": "relu"},
    {"architecture": "encoder-decoder", "positional": "relative"},
    {"tie_embeddings": True},
]


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
@pytest.mark.parametrize("kw", DEVELOPED)
def test_prediction_agrees_with_measurement(param, kw):
    share, worst = agreement(ModelConfig(parametrization=param, **{**BASE, **kw}))
    assert share >= 0.90, worst


HELD_OUT = {
    "decoder-96": dict(architecture="decoder", d_model=96, n_heads=3, d_ff=384, n_layers=3,
                       seq_len=48, max_len=48, batch_size=3, vocab_size=700, seed=7),
    "encoder-rope-post": dict(architecture="encoder", d_model=128, n_heads=8, d_ff=384,
                              n_layers=2, seq_len=40, max_len=64, batch_size=4,
                              vocab_size=1000, activation="swiglu", positional="rope",
                              norm="post", seed=3),
    "strided-alibi": dict(architecture="decoder", d_model=64, n_heads=4, d_ff=256, n_layers=2,
                          seq_len=36, max_len=36, batch_size=4, vocab_size=300,
                          attention="strided", window=6, positional="alibi",
                          activation="relu", seed=11),
    "enc-dec-sinusoidal": dict(architecture="encoder-decoder", d_model=64, n_heads=2,
                               d_ff=256, n_layers=2, n_decoder_layers=1, seq_len=24,
                               max_len=32, batch_size=4, vocab_size=400,
                               positional="sinusoidal", seed=5),
    "local-12": dict(architecture="decoder", d_model=80, n_heads=4, d_ff=320, n_layers=2,
                     seq_len=64, max_len=64, batch_size=2, vocab_size=500, attention="local",
                     window=12, seed=2),
    "dropout": dict(architecture="decoder", d_model=64, n_heads=4, d_ff=256, n_layers=2,
                    seq_len=32, max_len=32, batch_size=4, vocab_size=256, dropout=0.1, seed=9),
    # added 2026-11-29 after the row-mean (sinusoidal) and shared-input fixes, first run after
    # them: fresh checks of those fixes
    "encoder-sinusoidal-post": dict(architecture="encoder", d_model=96, n_heads=4, d_ff=256,
                                    n_layers=2, seq_len=30, max_len=32, batch_size=3,
                                    vocab_size=600, positional="sinusoidal", norm="post",
                                    seed=13),
    "decoder-sinusoidal-relu": dict(architecture="decoder", d_model=128, n_heads=8, d_ff=512,
                                    n_layers=2, seq_len=40, max_len=40, batch_size=2,
                                    vocab_size=800, positional="sinusoidal", activation="relu",
                                    seed=17),
    "enc-dec-learned": dict(architecture="encoder-decoder", d_model=80, n_heads=4, d_ff=320,
                            n_layers=1, n_decoder_layers=2, seq_len=20, max_len=24,
                            batch_size=4, vocab_size=500, positional="learned", seed=19),
}
#: Held-out configs below the goal today (measured share in the issue notes): the backward
#: pass over-predicts how much gradient the tokens of a sequence share.
KNOWN_GAPS = {("unit", "decoder-96"), ("unit", "enc-dec-sinusoidal"),
              ("umup", "decoder-96"), ("unit", "encoder-sinusoidal-post"),
              ("unit", "decoder-sinusoidal-relu"), ("umup", "decoder-sinusoidal-relu")}


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
@pytest.mark.parametrize("name", list(HELD_OUT))
def test_held_out_configs(param, name, request):
    if (param, name) in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(strict=True, reason="known gap, see notes"))
    cfg = ModelConfig(parametrization=param, tie_embeddings=False, **HELD_OUT[name])
    share, worst = agreement(cfg)
    assert share >= 0.90, worst


def test_every_architecture_predicts_every_measured_tensor():
    for arch in ("encoder", "decoder", "encoder-decoder"):
        for positional in ("learned", "relative", "sinusoidal"):
            cfg = ModelConfig(architecture=arch, positional=positional, **BASE)
            meas = {(r.name, r.kind) for r in measure(cfg)}
            assert {(r.name, r.kind) for r in predict(cfg)} == meas, (arch, positional)


def test_rows_are_finite_with_formats():
    cfg = ModelConfig(d_model=12288, n_heads=96, d_ff=49152, n_layers=96, vocab_size=50257,
                      max_len=2048, seq_len=2048, batch_size=1)
    for param in ("standard", "unit", "umup"):
        rows = predict(cfg.replace(parametrization=param))
        assert {r.kind for r in rows} == set(KINDS)
        assert all(math.isfinite(r.rms) and r.rms >= 0 for r in rows)
        assert all(set(r.formats) == {"fp8_e4m3", "fp8_e5m2", "fp16", "bf16"} for r in rows)


def test_key_counts_match_the_model_masks():
    import torch

    from unitscale_core.model import allowed

    for pattern in ("full", "causal", "local", "strided"):
        for causal in (False, True):
            mask = allowed(37, 37, pattern, 5, causal)
            want = torch.full((37,), 37) if mask is None else mask.sum(1)
            assert key_counts(37, pattern, 5, causal).tolist() == want.tolist()


def test_averaging_overlap_closed_form_matches_brute_force():
    import numpy as np

    t = 50
    i = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    a = (j <= i) / (i + 1.0)  # uniform causal probabilities
    off = ~np.eye(t, dtype=bool)
    fwd, bwd, col = averaging_overlaps(t, t, "causal", 1, True)
    assert fwd == pytest.approx((a @ a.T)[off].mean())
    assert bwd == pytest.approx((a.T @ a)[off].mean())
    assert col == pytest.approx(np.mean(a.sum(0) ** 2))


# derandomized: the same 40 configs every run, so CI cannot fail on a new draw (400 random
# draws were run while developing)
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(["encoder", "decoder", "encoder-decoder"]),
    positional=st.sampled_from(["sinusoidal", "learned", "relative", "rope", "alibi", "none"]),
    attention=st.sampled_from(["full", "causal", "local", "strided"]),
    norm=st.sampled_from(["pre", "post"]), activation=st.sampled_from(["gelu", "relu", "swiglu"]),
    param=st.sampled_from(["standard", "unit", "umup"]), bias=st.booleans(), tie=st.booleans(),
    heads=st.integers(1, 16), head_dim=st.integers(1, 64), layers=st.integers(1, 24),
    seq=st.integers(1, 512), batch=st.integers(1, 64), vocab=st.integers(2, 300_000),
    window=st.integers(1, 512), dropout=st.sampled_from([0.0, 0.1, 0.5]),
)
def test_predict_never_raises_on_valid_configs(arch, positional, attention, norm, activation,
                                               param, bias, tie, heads, head_dim, layers, seq,
                                               batch, vocab, window, dropout):
    head_dim *= 2
    cfg = ModelConfig(architecture=arch, positional=positional, attention=attention, norm=norm,
                      activation=activation, parametrization=param, bias=bias,
                      tie_embeddings=tie, n_heads=heads, d_model=heads * head_dim,
                      d_ff=4 * heads * head_dim, n_layers=layers, seq_len=seq, max_len=seq,
                      batch_size=batch, vocab_size=vocab, window=window, dropout=dropout)
    rows = predict(cfg, formats=("fp8_e4m3",))
    assert rows and all(r.rms >= 0 and not math.isnan(r.rms) for r in rows)


@pytest.mark.parametrize(("d", "t", "sigma", "causal"), [(96, 48, 0.5, True), (64, 24, 0.5, False),
                                                       (64, 24, 2.0, False), (128, 32, 1.0, True)])
def test_shared_input_factor_matches_one_attention_op(d, t, sigma, causal):
    """Query gradients with K and V from one input, over those with V from another input."""
    import torch

    gen = torch.Generator().manual_seed(d + t)
    n, dh = 96, 32

    def normed():
        return torch.nn.functional.layer_norm(torch.randn(n, t, d, generator=gen), (d,))

    x, other = normed(), normed()
    w_q, w_k, w_v = (torch.randn(d, dh, generator=gen) / math.sqrt(d) for _ in range(3))
    grads, s_p2 = [], 0.0
    for xv in (x, other):
        q = (x @ w_q).requires_grad_()
        z = q @ (x @ w_k).transpose(1, 2) * (sigma / math.sqrt(dh))
        if causal:
            z = z.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        p = z.softmax(-1)
        (p @ (xv @ w_v) * torch.randn(n, t, dh, generator=gen)).sum().backward()
        grads.append(float(q.grad.pow(2).mean()))
        s_p2 = float(p.detach().pow(2).sum(-1).mean())
    measured = grads[0] / grads[1]
    assert measured > 1.0
    assert shared_input_factor(s_p2, d) == pytest.approx(measured, rel=0.12)


def test_sinusoidal_row_means_against_the_table():
    """The row means LayerNorm removes, against the encoding the model adds."""
    import numpy as np

    from unitscale_core.positional import sinusoidal

    for d, t in ((64, 24), (96, 200), (512, 64)):
        mu = sinusoidal(t, d).astype(np.float64).mean(axis=1)
        mu2, mumu = sinusoidal_row_means(d, t)
        assert mu2 == pytest.approx(float(np.mean(mu * mu)), rel=0.05)
        pairs = (mu.sum() ** 2 - (mu * mu).sum()) / (t * (t - 1))
        assert mumu == pytest.approx(float(pairs), rel=0.05)
        assert mu2 > 0.01  # a real share of the encoding's 0.5 variance per element
