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
from unitscale_core.scaling.predict import predict, predicted_covariances, shared_input_factor
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


#: Developed configs below the goal at their seed (0) since the position-resolved model:
#: that draw's output projection of the shared part is 15% below its expectation, which
#: lowers the whole backward by ~0.35 log2; over seeds 100–103 they reach 94% and 97%.
DEVELOPED_GAPS = {("unit", 0), ("unit", 5)}


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
@pytest.mark.parametrize("index", range(len(DEVELOPED)))
def test_prediction_agrees_with_measurement(param, index, request):
    if (param, index) in DEVELOPED_GAPS:
        request.applymarker(pytest.mark.xfail(strict=True, reason="unlucky seed, see notes"))
    share, worst = agreement(ModelConfig(parametrization=param, **{**BASE, **DEVELOPED[index]}))
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
    # added 2026-11-29 (fourth session) after the position-resolved covariance model, first
    # run after it: deeper stacks, where position structure compounds
    "decoder-deep-8": dict(architecture="decoder", d_model=96, n_heads=4, d_ff=384, n_layers=8,
                           seq_len=48, max_len=48, batch_size=4, vocab_size=800, seed=23),
    "encoder-deep-6-relative": dict(architecture="encoder", d_model=64, n_heads=4, d_ff=256,
                                    n_layers=6, seq_len=40, max_len=40, batch_size=4,
                                    vocab_size=500, positional="relative", seed=29),
    "decoder-rope-swiglu-6": dict(architecture="decoder", d_model=128, n_heads=4, d_ff=256,
                                  n_layers=6, seq_len=32, max_len=32, batch_size=3,
                                  vocab_size=700, positional="rope", activation="swiglu",
                                  bias=False, seed=31),
    # added 2026-11-29 (fifth session) after the coherent query/key gradients and the
    # row-mean scale fix, first run after them: a deep causal stack on binned positions, a
    # deeper sinusoidal encoder-decoder, a full-attention encoder with learned positions
    "decoder-deep-12": dict(architecture="decoder", d_model=128, n_heads=4, d_ff=512,
                            n_layers=12, seq_len=64, max_len=64, batch_size=4,
                            vocab_size=900, seed=37),
    "enc-dec-sinusoidal-5": dict(architecture="encoder-decoder", d_model=96, n_heads=4,
                                 d_ff=384, n_layers=3, n_decoder_layers=2, seq_len=32,
                                 max_len=32, batch_size=4, vocab_size=600,
                                 positional="sinusoidal", seed=41),
    "encoder-learned-full-4": dict(architecture="encoder", d_model=112, n_heads=4, d_ff=448,
                                   n_layers=4, seq_len=56, max_len=64, batch_size=3,
                                   vocab_size=700, positional="learned", attention="full",
                                   seed=43),
}
#: Held-out configs below the goal today (measured shares in the issue notes): relative (T5)
#: biases, whose fixed per-head pattern the uniform expected weights do not carry; and
#: full-attention encoders under unit/u-μP, whose token deviations span few feature directions
#: by the second layer, so the query/key gradients' pair terms Σ_{j≠l} (ṽ_j·ṽ_l)(k̃_j·k̃_l) are
#: twice what isotropic deviations give (measured; the model carries no feature-space shape).
KNOWN_GAPS = {("unit", "encoder-deep-6-relative"), ("unit", "encoder-learned-full-4"),
              ("umup", "encoder-learned-full-4"), ("umup", "enc-dec-sinusoidal-5")}


def _check_held_out(request, param: str, config: dict, tied: bool, known_gap: bool) -> None:
    """≥ 90% within 25%, or a strict expected failure where the gap is known."""
    if known_gap:
        request.applymarker(pytest.mark.xfail(strict=True, reason="known gap, see notes"))
    share, worst = agreement(ModelConfig(parametrization=param, tie_embeddings=tied, **config))
    assert share >= 0.90, worst


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
@pytest.mark.parametrize("name", list(HELD_OUT))
def test_held_out_configs(param, name, request):
    _check_held_out(request, param, HELD_OUT[name], False, (param, name) in KNOWN_GAPS)


#: Tied embeddings (the app's default; every config above is untied). Defined on
#: 2026-11-29 (sixth session) after the tied-logit lean of the stream gradient, first run after
#: it; the deep one checks stacks beyond the 12 layers above.
HELD_OUT_TIED = {
    "tied-decoder-6": dict(architecture="decoder", d_model=96, n_heads=4, d_ff=384, n_layers=6,
                           seq_len=48, max_len=48, batch_size=3, vocab_size=800, seed=51),
    "tied-encoder-rope-3": dict(architecture="encoder", d_model=128, n_heads=4, d_ff=512,
                                n_layers=3, seq_len=40, max_len=64, batch_size=4,
                                vocab_size=1200, positional="rope", seed=53),
    "tied-decoder-deep-32": dict(architecture="decoder", d_model=64, n_heads=2, d_ff=256,
                                 n_layers=32, seq_len=32, max_len=32, batch_size=2,
                                 vocab_size=500, seed=59),
    "tied-enc-dec-2": dict(architecture="encoder-decoder", d_model=80, n_heads=4, d_ff=320,
                           n_layers=2, n_decoder_layers=2, seq_len=24, max_len=24,
                           batch_size=4, vocab_size=600, seed=61),
}
#: Unit-scaled, tied: below the goal at their first run (89.2, 64.1, 84.8). The deep one is the
#: collapsed regime: after ~20 unit-scaled layers the tokens of a sequence are nearly one vector
#: (fp64: q/k gradients ~1e-16 of the v gradients), which the model does not reach.
KNOWN_TIED_GAPS = {("unit", "tied-decoder-6"), ("unit", "tied-decoder-deep-32"),
                   ("unit", "tied-enc-dec-2")}


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
@pytest.mark.parametrize("name", list(HELD_OUT_TIED))
def test_held_out_tied_configs(param, name, request):
    _check_held_out(request, param, HELD_OUT_TIED[name], True, (param, name) in KNOWN_TIED_GAPS)


#: Widths people train at (384–512, 6–12 layers, 96–256 tokens), where one initialisation
#: scatters less than in the small configs above. Defined on 2026-11-29 (seventh session) after
#: the key–value pair terms and the stream anisotropy, first run after them. Embeddings tied
#: as configured (``tie`` below).
HELD_OUT_WIDE = {
    "wide-decoder-6": dict(architecture="decoder", d_model=512, n_heads=8, d_ff=2048,
                           n_layers=6, seq_len=128, max_len=128, batch_size=4,
                           vocab_size=4096, tie_embeddings=True, seed=71),
    "wide-encoder-post-6": dict(architecture="encoder", d_model=384, n_heads=12, d_ff=1536,
                                n_layers=6, seq_len=128, max_len=128, batch_size=4,
                                vocab_size=4096, attention="full", norm="post",
                                tie_embeddings=True, seed=73),
    "wide-decoder-rope-swiglu-8": dict(architecture="decoder", d_model=512, n_heads=8,
                                       d_ff=1408, n_layers=8, seq_len=256, max_len=256,
                                       batch_size=2, vocab_size=4096, positional="rope",
                                       activation="swiglu", bias=False,
                                       tie_embeddings=False, seed=79),
    "wide-enc-dec-relative-4": dict(architecture="encoder-decoder", d_model=256, n_heads=4,
                                    d_ff=1024, n_layers=4, n_decoder_layers=4, seq_len=96,
                                    max_len=96, batch_size=4, vocab_size=4096,
                                    positional="relative", activation="relu",
                                    tie_embeddings=True, seed=83),
    "wide-decoder-alibi-12": dict(architecture="decoder", d_model=384, n_heads=6, d_ff=1536,
                                  n_layers=12, seq_len=192, max_len=192, batch_size=2,
                                  vocab_size=4096, positional="alibi", tie_embeddings=True,
                                  seed=89),
}
#: At their first run the 12-layer ALiBi decoder missed under all three (77.7 / 69.7 / 83.1):
#: its heads' slopes make each one's expected weights decay with distance, where the
#: predictor's map was uniform. With a map per group of slopes (developed on
#: ``test_alibi_heads_attend_on_their_own_maps``'s config): 97.3 / 98.0 / 99.7.
KNOWN_WIDE_GAPS: set[tuple[str, str]] = set()


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
@pytest.mark.parametrize("name", list(HELD_OUT_WIDE))
def test_held_out_wide_configs(param, name, request):
    config = dict(HELD_OUT_WIDE[name])
    _check_held_out(request, param, config, config.pop("tie_embeddings"),
                    (param, name) in KNOWN_WIDE_GAPS)


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
def test_alibi_heads_attend_on_their_own_maps(param):
    """ALiBi, 8 heads (slopes 1/2 … 1/256) over 128 tokens: each head group's expected
    weights decay at its own rate. With one uniform map (the slopes counted as logit spread)
    this config was at 86 / 79 / 87%: attention probabilities +0.7 log2 (a Gaussian spread
    of the ramp's variance is far sharper than the ramp), values' gradients +0.6."""
    cfg = ModelConfig(architecture="decoder", d_model=256, n_heads=8, d_ff=1024, n_layers=6,
                      seq_len=128, max_len=128, batch_size=2, vocab_size=3000,
                      positional="alibi", tie_embeddings=True, seed=300, parametrization=param)
    errors = log2_errors(cfg)
    probs = [err for (name, kind), (err, *_) in errors.items() if name.endswith("attn.probs")
             and kind == "activation"]
    assert max(map(abs, probs)) <= 0.1, probs
    share, worst = agreement(cfg)
    assert share >= 0.95, worst


def test_rope_decorrelates_what_queries_and_keys_share():
    """RoPE rotates each query and key by its position, so their shared parts (most of a
    deep unit-scaled stream) stop being shared: they move the weights along a row. Measured
    on a 6-layer unit-scaled RoPE decoder, the query-specific logit variance is ~0.45 at
    layers 2–5 where the unrotated model has 0.06–0.005, and the top two layers' query
    gradients came out 0.55 log2 low; rotated (``covariance.rotated``), within 0.32."""
    cfg = ModelConfig(architecture="decoder", d_model=384, n_heads=6, d_ff=1024, n_layers=6,
                      seq_len=192, max_len=192, batch_size=2, vocab_size=3000,
                      positional="rope", activation="swiglu", bias=False,
                      tie_embeddings=False, seed=400, parametrization="unit")
    errors = log2_errors(cfg)
    top = {name: err for (name, kind), (err, *_) in errors.items()
           if kind in ("grad_activation", "grad_weight") and
           name.startswith(("layers.4.attn.q", "layers.5.attn.q", "layers.4.attn.k",
                            "layers.5.attn.k"))}
    assert len(top) == 8 and max(map(abs, top.values())) <= 0.32, top


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
def test_rope_leaves_cross_attention_key_bias_without_gradient(param):
    """Cross-attention is never rotated, so its key bias shifts each query's logits
    uniformly and softmax gives it no gradient (measured ~1e-10…1e-7), however the
    self-attentions are positioned; with RoPE applied to it the prediction was
    1e-4…0.1. The rotated self-attentions' key biases keep theirs."""
    cfg = ModelConfig(architecture="encoder-decoder", positional="rope", d_model=64,
                      n_heads=4, d_ff=256, n_layers=2, vocab_size=256, max_len=32,
                      seq_len=16, batch_size=4, tie_embeddings=False, seed=100,
                      parametrization=param)
    errors = log2_errors(cfg)
    cross = {name: (pred, meas) for (name, kind), (_e, pred, meas) in errors.items()
             if kind == "grad_weight" and name.endswith("cross_attn.k.bias")}
    assert len(cross) == 2
    assert all(pred == 0.0 and meas < 1e-6 for pred, meas in cross.values()), cross
    own = {name: err for (name, kind), (err, pred, _m) in errors.items()
           if kind == "grad_weight" and name.endswith("attn.k.bias") and "cross" not in name}
    assert len(own) == 4 and max(map(abs, own.values())) <= 1.0, own


def test_tied_norm_gains_get_the_self_logits_pull():
    """Standard, tied, pre-norm: growing a branch dilutes the token's own embedding in the
    final stream and lowers its (dominant) self-logit, so every norm gain's gradient has a
    mean over features (measured here: −0.013…−0.017, 0.7–0.8 of its RMS;
    ``_branch_scale_coherence`` predicts −0.012). Without it the norm2 gains' gradients were
    0.52–0.77 log2 low."""
    cfg = ModelConfig(architecture="decoder", d_model=256, n_heads=8, d_ff=1024, n_layers=4,
                      seq_len=128, max_len=128, batch_size=2, vocab_size=3000,
                      tie_embeddings=True, seed=310, parametrization="standard")
    errors = log2_errors(cfg)
    gains = {name: err for (name, kind), (err, *_) in errors.items()
             if kind == "grad_weight" and name.startswith("layers.") and
             name.endswith(("norm1.weight", "norm2.weight"))}
    assert len(gains) == 8 and max(map(abs, gains.values())) <= 0.32, gains


@pytest.mark.parametrize("positional, norm", [("alibi", "post"), ("none", "pre")])
def test_tied_final_norm_takes_the_self_logit_part_out_of_the_stream_gradient(positional,
                                                                              norm):
    """Standard, tied: the softmax's weight on the input token puts ``κ e_t`` in the final
    norm's output gradient, and the norm's backward projects out its part along ``x̂_t``
    (``lean²`` of variance per element). Without a position table ``e_t`` is most of
    ``x̂_t``, and leaving that out put every activation gradient from the final norm's
    input down +0.33…0.37 log2 high (seed means, 4 seeds, this config); now within 0.25."""
    base = dict(architecture="decoder", positional=positional, norm=norm, d_model=128,
                n_heads=4, d_ff=512, n_layers=2, vocab_size=512, max_len=32, seq_len=32,
                batch_size=4, tie_embeddings=True, parametrization="standard")
    errors: dict[str, list[float]] = {}
    for seed in (100, 101, 102, 103):
        for (name, kind), (err, *_) in log2_errors(ModelConfig(**base, seed=seed)).items():
            if kind == "grad_activation" and name not in ("norm", "head", "loss"):
                errors.setdefault(name, []).append(err)
    mean = {name: sum(v) / len(v) for name, v in errors.items()}
    below = {name: m for name, m in mean.items() if name in ("layers.1", "layers.0", "embed")}
    assert len(below) == 3 and max(map(abs, below.values())) <= 0.25, below
    assert sum(abs(m) <= 0.32 for m in mean.values()) >= 0.9 * len(mean), mean


def test_tied_logits_lean_the_stream_gradient_against_its_shared_parts():
    """Standard, tied: the softmax's weight on the input token's own logit sends back a
    gradient against the rest of the normed stream, shared between tokens; without it the
    bias gradients came out 0.5–0.8 log2 low and the share was 85% (a config the fix was
    developed on)."""
    cfg = ModelConfig(architecture="decoder", d_model=128, n_heads=4, d_ff=512, n_layers=4,
                      seq_len=128, max_len=128, batch_size=2, vocab_size=1000, seed=5,
                      tie_embeddings=True, parametrization="standard")
    errors = log2_errors(cfg)
    biases = [err for (name, kind), (err, *_) in errors.items()
              if kind == "grad_weight" and name.endswith("bias") and ".attn.k." not in name]
    assert sum(abs(e) <= 0.32 for e in biases) >= 0.8 * len(biases), biases
    share, worst = agreement(cfg)
    assert share >= 0.90, worst


@pytest.mark.parametrize("name, config, before", [
    ("post-norm encoder (BERT-like)",
     dict(architecture="encoder", d_model=256, n_heads=4, d_ff=1024, n_layers=8, seq_len=96,
          max_len=96, batch_size=4, vocab_size=3000, attention="full", norm="post"), -0.27),
    ("pre-norm decoder (GPT-2-like)",
     dict(architecture="decoder", d_model=384, n_heads=6, d_ff=1536, n_layers=12,
          seq_len=128, max_len=128, batch_size=2, vocab_size=4000), -0.17),
    # narrow: the self-logit (32.7 ± 7 here) spreads around the others' log-sum-exp (≈ 28),
    # so the softmax's weight on the input token is 0.83 measured, not σ(32.7 − 28) ≈ 1;
    # with σ at the mean the lean started 33% high and the bias gradients were +0.22
    ("deep narrow pre-norm decoder",
     dict(architecture="decoder", d_model=64, n_heads=2, d_ff=256, n_layers=24, seq_len=32,
          max_len=32, batch_size=2, vocab_size=500), +0.22),
])
def test_tied_bias_gradients_grow_down_the_stack_with_the_gradients_lean(name, config, before):
    """Standard, tied: the gradient's part set against the stream's shared parts meets each
    branch's own output on the way down (``_aligned_cross``), so what every row shares grows
    faster than independent terms allow, and the bias gradients sum it. Averaged over seeds
    500–503 the bias gradients' mean log2 error is within ±0.1 (``before``: without the cross
    term, or for the narrow one with the self-logit's spread left out of ``p_self``) and ≥ 95%
    of all seed-averaged errors are within 25%."""
    errors: dict[tuple[str, str], list[float]] = {}
    for seed in range(500, 504):
        cfg = ModelConfig(tie_embeddings=True, parametrization="standard", seed=seed, **config)
        for key, (err, *_) in log2_errors(cfg).items():
            errors.setdefault(key, []).append(err)
    mean = {key: sum(v) / len(v) for key, v in errors.items()}
    biases = [m for (n, kind), m in mean.items() if kind == "grad_weight" and n.endswith(".bias")
              and ".attn.k." not in n]
    bias_error = sum(biases) / len(biases)
    assert abs(bias_error) <= 0.1, (name, bias_error)
    share = sum(abs(m) <= 0.32 for m in mean.values()) / len(mean)
    assert share >= 0.95, (name, share)


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


def test_causal_stack_keeps_the_early_tokens_own_parts():
    """Deep in a causal stack the tokens share almost everything, yet the early ones keep
    their own part (token 0 attends only to itself). The residual stream's token-specific
    variance, predicted per layer, against one measured step: within a factor 1.6 at every
    layer of an 8-layer unit-scaled decoder (averaging it away, as one scalar per part did,
    under-predicted it 30× by the last layer)."""
    import torch

    from unitscale_core.measure import cached_model, measurement_batch, record_tensors

    cfg = ModelConfig(parametrization="unit", n_layers=8, seq_len=32, max_len=32, d_model=64,
                      n_heads=4, d_ff=256, vocab_size=500, batch_size=4, tie_embeddings=False,
                      seed=3)
    covs = predicted_covariances(cfg)
    model = cached_model(cfg, torch.device("cpu"))
    model.train()
    batch = measurement_batch(cfg, torch.device("cpu"))
    stream = {}

    def keep(name, kind, x):
        if kind == "activation" and name.count(".") == 1 and name.startswith("layers."):
            stream[name] = x.detach().double()

    with record_tensors(model, keep):
        torch.manual_seed(cfg.seed)
        model(batch["ids"])
    assert len(stream) == cfg.n_layers
    for name, x in stream.items():
        b, t, c = x.shape
        per_seq = x.sum(1)
        same = float(((per_seq * per_seq).sum() - (x * x).sum()) / (b * t * (t - 1) * c))
        own = float(x.pow(2).mean()) - same
        predicted = covs[(name, "activation")].parts()[0]
        assert 1 / 1.6 < predicted / own < 1.6, (name, predicted, own)


def test_layernorm_removes_the_row_means_of_the_stream_it_reads():
    """Sinusoidal encodings have a row mean (≈ 0.5 at early positions, the same in every
    sequence) that a LayerNorm subtracts. A pre-norm block's norm reads the stream before its
    residual add weighs the skip path, so it removes the row means at the stream's scale, not
    the next stream's (taking them at √½ of it had the unit-scaled batch-wide part 35% high
    here and cost the sinusoidal held-out configs 10 points). Measured over 48 sequences."""
    import torch

    from unitscale_core.measure import cached_model, measurement_batch, record_tensors

    cfg = ModelConfig(parametrization="unit", architecture="encoder", positional="sinusoidal",
                      n_layers=1, seq_len=40, max_len=40, d_model=96, n_heads=4, d_ff=256,
                      vocab_size=500, batch_size=48, tie_embeddings=False, seed=5)
    covs = predicted_covariances(cfg)
    model = cached_model(cfg, torch.device("cpu"))
    batch = measurement_batch(cfg, torch.device("cpu"))
    seen = {}

    def keep(name, kind, x):
        if kind == "activation" and name == "layers.0.norm1":
            seen[name] = x.detach().double()

    with record_tensors(model, keep):
        model(batch["ids"])
    x = seen["layers.0.norm1"]
    b, t, c = x.shape
    per_seq = x.sum(1)  # (b, c): Σ over positions; pairs of different sequences only
    every = per_seq.sum(0)
    batch_wide = float((every * every).sum() - (per_seq * per_seq).sum()) / (
        b * (b - 1) * t * t * c)
    assert covs[("layers.0.norm1", "activation")].parts()[2] == pytest.approx(batch_wide,
                                                                              rel=0.1)


def test_a_stopped_prediction_raises_and_caches_nothing():
    from unitscale_core.scaling.predict import PredictionCancelled, is_predicted

    cfg = ModelConfig(n_layers=6, seed=404, **{k: v for k, v in BASE.items() if k != "n_layers"})
    asked = []

    def stop():
        asked.append(1)
        return len(asked) > 3  # after three sub-blocks

    with pytest.raises(PredictionCancelled):
        predict(cfg, should_stop=stop)
    assert len(asked) == 4 and not is_predicted(cfg, ("fp8_e4m3", "fp8_e5m2", "fp16", "bf16"))
    assert predict(cfg)  # and the next one runs in full
