"""Issue 21's modern-architecture fields in the analytic predictor.

Until a feature has a rule, every entry point of the predictor refuses a config using it with
a ValueError naming the field (never a prediction made as if the feature were absent); a field
at a value that builds the classic model is predicted as before."""

from __future__ import annotations

import math
import re

import pytest

from unitscale_core import ModelConfig
from unitscale_core.cli import main
from unitscale_core.config import dumps_json
from unitscale_core.measure import measure
from unitscale_core.scaling.predict import (
    UnpredictedFeature,
    predict,
    predicted_covariances,
    status_counts,
    stream_anisotropy,
    stream_collapse,
    unpredicted_features,
)

from .test_predict import log2_errors

_EXPERT = re.compile(r"^(.*\.moe\.experts\.\d+)\.")


def routed_log2_errors(cfg: ModelConfig) -> dict[tuple[str, str], tuple[float, float, float]]:
    """:func:`.test_predict.log2_errors`, except that an expert no token of the measured batch
    chose (it does not run: weight rows only) is compared on its weights: the predictor cannot
    know which expert the draw leaves empty, and predicts every expert's tensors."""
    if not cfg.is_moe:
        return log2_errors(cfg)
    meas = {(r.name, r.kind): r.rms for r in measure(cfg)}
    ran = {m.group(1) for name, kind in meas if kind == "activation"
           for m in [_EXPERT.match(name)] if m}
    errors = {}
    for r in predict(cfg):
        m = _EXPERT.match(r.name)
        if m and m.group(1) not in ran and r.kind != "weight":
            assert (r.name, r.kind) not in meas  # an expert that did not run
            continue
        got = meas.pop((r.name, r.kind))  # (KeyError: a predicted name not measured)
        err = (0.0 if got < 1e-6 else math.inf) if r.rms == 0 else math.log2(r.rms / got)
        errors[(r.name, r.kind)] = (err, r.rms, got)
    assert not meas, f"measured but not predicted: {sorted(meas)[:5]}"
    return errors

TINY = dict(d_model=32, n_heads=2, d_ff=64, n_layers=1, vocab_size=64, seq_len=8,
            batch_size=2, max_len=16)

ENTRY_POINTS = [
    lambda cfg: predict(cfg),
    lambda cfg: predicted_covariances(cfg),
    lambda cfg: status_counts(cfg, "fp16"),
    lambda cfg: stream_anisotropy(cfg),
    lambda cfg: stream_collapse(cfg),
]


#: Every issue-21 field at once, in one stack and with cross-attention
EVERY_FIELD = [
    dict(parallel_residual=True, parametrization=p, architecture=a, n_experts=4,
         experts_per_token=2, norm_type="rmsnorm", n_kv_heads=1, positional="rope",
         rotary_fraction=0.5, activation="geglu", qk_norm="head", attn_softcap=50.0)
    for p in ("standard", "unit", "umup") for a in ("decoder", "encoder-decoder")
]


@pytest.mark.parametrize("change", EVERY_FIELD,
                         ids=[f"{c['parametrization']}-{c['architecture']}"
                              for c in EVERY_FIELD])
def test_every_modern_field_is_predicted_at_every_entry_point(change):
    """No issue-21 field is refused any more: a config using them all goes through every
    entry point with finite, positive activation RMS."""
    cfg = ModelConfig(**{**TINY, **change})
    assert unpredicted_features(cfg) == {}
    for entry in ENTRY_POINTS:
        entry(cfg)
    assert all(math.isfinite(r.rms) for r in predict(cfg))


def _refuse_moe(cfg: ModelConfig) -> dict[str, str]:
    """``unpredicted_features`` as it would be for a field without its rule: MoE here."""
    return {"n_experts": "n_experts: the predictor has no rule for it"} if cfg.is_moe else {}


def test_a_refused_feature_is_named_at_every_entry_point(monkeypatch):
    """The refusal mechanism a field without a rule goes through (none today): every entry
    point raises UnpredictedFeature, a ValueError naming the field, rather than predicting
    the model as if the feature were absent."""
    from unitscale_core.scaling import predict as P

    monkeypatch.setattr(P, "unpredicted_features", _refuse_moe)
    cfg = ModelConfig(**{**TINY, "n_experts": 4, "experts_per_token": 2})
    for entry in ENTRY_POINTS:
        with pytest.raises(UnpredictedFeature) as info:
            entry(cfg)
        assert isinstance(info.value, ValueError)
        assert set(info.value.errors) == {"n_experts"}
        assert "n_experts" in str(info.value)
    predict(cfg.replace(n_experts=1, experts_per_token=1))  # the dense config is predicted


@pytest.mark.parametrize("change", [
    dict(n_heads=2, n_kv_heads=2),       # as many kv heads as heads: plain attention
    dict(head_dim=16),                   # d_model / n_heads
    dict(bias=False, qkv_bias=False),    # the same as bias
    dict(rope_base=500000.0),            # no rope: θ is not used
    dict(rotary_fraction=0.5),           # no rope: nothing rotated
    dict(positional="rope", rotary_fraction=1.0, rope_base=10000.0),
])
def test_classic_equivalent_values_are_predicted_as_before(change):
    cfg = ModelConfig(**{**TINY, **change})
    plain = {k: v for k, v in change.items()
             if k not in ("n_kv_heads", "head_dim", "qkv_bias", "rope_base", "rotary_fraction")}
    base = ModelConfig(**{**TINY, **plain})
    got = {(r.name, r.kind): r.rms for r in predict(cfg)}
    want = {(r.name, r.kind): r.rms for r in predict(base)}
    assert got == want


def test_cli_predict_refuses_in_one_line(tmp_path, capsys, monkeypatch):
    """A refused field (none today: refused here by patching, as a later field without its
    rule would be) is one line on stderr naming it, exit 2."""
    from unitscale_core.scaling import predict as P

    monkeypatch.setattr(P, "unpredicted_features", _refuse_moe)
    path = tmp_path / "c.json"
    path.write_text(dumps_json(ModelConfig(**{**TINY, "n_experts": 4,
                                              "experts_per_token": 2})))
    assert main(["predict", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "n_experts" in err and "\n" not in err


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
def test_qkv_bias_apart_from_bias_gives_q_k_v_their_own_biases(param):
    """Qwen 2: biases on q, k and v only. q, k, v and everything the attention makes of them
    are the all-biased model's (the same linear rule, bias variance included: standard
    ``√(fan_in·σ_x²·σ_w² + σ_b²)``); o, the FFN and the norms carry no bias; and the reverse."""
    def rows(**change):
        cfg = ModelConfig(**{**TINY, "parametrization": param, "n_layers": 2, **change})
        return {(r.name, r.kind): r.rms for r in predict(cfg)}

    qwen, biased, plain = rows(bias=False, qkv_bias=True), rows(bias=True), rows(bias=False)
    qkv = [k for k in biased if re.search(r"\.attn\.[qkv](\.|$)", k[0])]
    assert {k for k in qwen if k[0].endswith(".bias")} == {
        k for k in qkv if k[0].endswith(".bias")}
    assert len(qkv) >= 2 * 3 * 2
    first_q = ("layers.0.attn.q", "activation")
    assert qwen[first_q] == biased[first_q]
    if param == "standard":  # U(±1/√fan_in) biases add to q's variance
        assert qwen[first_q] > plain[first_q]
    assert set(rows(bias=True, qkv_bias=False)) == set(plain) | {
        k for k in biased if k[0].endswith(".bias") and k not in qkv}


def test_rope_base_reaches_the_rotation():
    """θ = 500000 is predicted (no longer refused) and changes what the rotated scores and
    the key gradients come out as, nothing before the first rotation."""
    base = dict(TINY, positional="rope", n_layers=2, seq_len=16, max_len=32)
    a = {(r.name, r.kind): r.rms for r in predict(ModelConfig(**base))}
    b = {(r.name, r.kind): r.rms for r in predict(ModelConfig(**base, rope_base=500000.0))}
    assert set(a) == set(b)
    assert a[("layers.0.attn.q", "activation")] == b[("layers.0.attn.q", "activation")]
    assert any(abs(a[k] / b[k] - 1) > 1e-3 for k in a if a[k] > 0)


#: Held-out configs of issue 21's fields, written down before they were first measured
#: (none was tuned on). Only fields both the model and the predictor handle so far.
HELD_OUT_MODERN = {
    # Llama-3-like rope θ with SwiGLU, no biases, untied
    "llama-rope-500000": dict(positional="rope", rope_base=500000.0, activation="swiglu",
                              bias=False, tie_embeddings=False, d_model=128, n_heads=4,
                              d_ff=352, n_layers=3, vocab_size=512, seq_len=64,
                              batch_size=4, max_len=128),
    # Gemma-2-like soft caps on tied logits (attention 50, final 30), rope, no biases
    "gemma-softcaps": dict(positional="rope", attn_softcap=50.0, logit_softcap=30.0,
                           tie_embeddings=True, bias=False, d_model=96, n_heads=3, d_ff=256,
                           n_layers=3, vocab_size=384, seq_len=48, batch_size=4,
                           max_len=64),
    # Pythia-like parallel attention + FFN, a quarter of each head rotated, biases, untied
    "neox-parallel-partial-rope": dict(parallel_residual=True, positional="rope",
                                       rotary_fraction=0.25, activation="gelu", bias=True,
                                       tie_embeddings=False, d_model=96, n_heads=4, d_ff=384,
                                       n_layers=3, vocab_size=384, seq_len=48, batch_size=4,
                                       max_len=64),
    # Llama-3-like: RMSNorm, grouped-query attention 6 over 2, rope θ 5e5, SwiGLU
    "llama-rmsnorm-gqa": dict(positional="rope", rope_base=500000.0, norm_type="rmsnorm",
                              n_heads=6, n_kv_heads=2, activation="swiglu", bias=False,
                              tie_embeddings=False, d_model=96, d_ff=256, n_layers=3,
                              vocab_size=384, seq_len=48, batch_size=4, max_len=64),
    # Gemma-2-like: sandwich RMSNorms, GeGLU, head_dim 32 × 4 heads ≠ d_model, GQA, caps
    "gemma-sandwich-geglu": dict(positional="rope", norm_type="rmsnorm", norm="sandwich",
                                 activation="geglu", n_heads=4, n_kv_heads=2, head_dim=32,
                                 attn_softcap=50.0, logit_softcap=30.0, tie_embeddings=True,
                                 bias=False, d_model=96, d_ff=256, n_layers=3,
                                 vocab_size=384, seq_len=48, batch_size=4, max_len=64),
    # OLMo-2-like: norms on the sub-blocks' outputs only, QK-norm over the whole projection
    "olmo-branch-qknorm": dict(positional="rope", norm_type="rmsnorm", norm="branch_output",
                               qk_norm="all_heads", activation="swiglu", n_heads=4,
                               bias=False, tie_embeddings=False, d_model=96, d_ff=256,
                               n_layers=3, vocab_size=384, seq_len=48, batch_size=4,
                               max_len=64),
    # Qwen-3-like: per-head QK-norm, MQA, q/k/v biases only
    "qwen-qk-head-mqa": dict(positional="rope", norm_type="rmsnorm", qk_norm="head",
                             n_heads=4, n_kv_heads=1, activation="swiglu", bias=False,
                             qkv_bias=True, tie_embeddings=False, d_model=96, d_ff=256,
                             n_layers=3, vocab_size=384, seq_len=48, batch_size=4,
                             max_len=64),
    # Mixtral-like: RMSNorm, GQA 6 over 2, SwiGLU experts, 4 experts top 2, rope θ 1e6
    # (written down before it was first measured; 4 seeds: 100 / 99.3 / 100%)
    "mixtral-moe-4x2": dict(positional="rope", rope_base=1000000.0, norm_type="rmsnorm",
                            n_heads=6, n_kv_heads=2, activation="swiglu", n_experts=4,
                            experts_per_token=2, bias=False, tie_embeddings=False,
                            d_model=96, d_ff=256, n_layers=3, vocab_size=384, seq_len=48,
                            batch_size=4, max_len=64),
    # 8 experts top 1 (Switch-like routing, no router gradient), MQA; under unit scaling its
    # last layer leaves an expert empty in most seeds (compared on its weights only)
    # (written down before it was first measured; 100 / 96.6 / 100% when added, 100 / 95.3 /
    # 100% with rules.routed_loads: the rows that pick a rarely chosen expert carry larger
    # gradients than the average row, which nothing models yet)
    "moe-8x1-mqa": dict(positional="rope", norm_type="rmsnorm", n_heads=4, n_kv_heads=1,
                        activation="swiglu", n_experts=8, experts_per_token=1, bias=False,
                        tie_embeddings=False, d_model=128, d_ff=256, n_layers=3,
                        vocab_size=512, seq_len=64, batch_size=4, max_len=128),
}
#: parametrizations a held-out config is checked under where not all three (the others are
#: refused until the predictor has their rules)
HELD_OUT_PARAMS: dict[str, tuple[str, ...]] = {}
SEEDS = (100, 101, 102, 103)


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
@pytest.mark.parametrize("name", list(HELD_OUT_MODERN))
def test_modern_held_out_configs_over_seeds(param, name):
    """≥ 90% of tensors within 25% (|log2 error| ≤ 0.32), each tensor's error averaged over
    seeds 100–103 (as test_predict_over_seeds)."""
    if param not in HELD_OUT_PARAMS.get(name, (param,)):
        with pytest.raises(UnpredictedFeature):
            predict(ModelConfig(**{**HELD_OUT_MODERN[name], "parametrization": param}))
        return
    errors: dict = {}
    for seed in SEEDS:
        cfg = ModelConfig(**{**HELD_OUT_MODERN[name], "parametrization": param, "seed": seed})
        for key, (err, _p, _m) in routed_log2_errors(cfg).items():
            errors.setdefault(key, []).append(err)
    mean = {k: sum(v) / len(v) for k, v in errors.items()}
    share = sum(abs(e) <= 0.32 for e in mean.values()) / len(mean)
    worst = sorted(((abs(e), k) for k, e in mean.items()), reverse=True)[:5]
    print(f"{name} {param}: {share:.1%} of {len(mean)} within 25%; worst {worst}")
    assert share >= 0.9, worst


#: A parallel encoder-decoder: the decoder's self-attention, cross-attention and feed-forward
#: all read the layer's input (``DecoderLayer``; no published model, the parallel rule on
#: three sub-blocks). Measured once before this test was written (seeds 100–101: standard
#: 100%, unit 97.0%, u-μP 97.9% of 331 tensors), nothing tuned on it.
PARALLEL_ENC_DEC = dict(architecture="encoder-decoder", parallel_residual=True,
                        positional="rope", rotary_fraction=0.25, activation="gelu", bias=True,
                        tie_embeddings=False, d_model=96, n_heads=4, d_ff=384, n_layers=2,
                        vocab_size=384, seq_len=48, batch_size=4, max_len=64)


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
def test_parallel_residual_with_cross_attention_over_seeds(param):
    """≥ 90% of tensors within 25%, seed-averaged over seeds 100–101, and the decoder's
    parallel layers have no intermediate stream taps (``log2_errors`` checks the names)."""
    errors: dict = {}
    for seed in SEEDS[:2]:
        cfg = ModelConfig(**{**PARALLEL_ENC_DEC, "parametrization": param, "seed": seed})
        for key, (err, _p, _m) in log2_errors(cfg).items():
            errors.setdefault(key, []).append(err)
    assert ("decoder.layers.0.cross_attn.q", "activation") in errors
    assert not any(name.endswith(("after_attn", "after_cross")) for name, _k in errors)
    mean = {k: sum(v) / len(v) for k, v in errors.items()}
    share = sum(abs(e) <= 0.32 for e in mean.values()) / len(mean)
    worst = sorted(((abs(e), k) for k, e in mean.items()), reverse=True)[:5]
    print(f"parallel encoder-decoder {param}: {share:.1%} of {len(mean)} within 25%; "
          f"worst {worst}")
    assert share >= 0.9, worst


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
def test_parallel_residual_without_biases_is_predicted(param):
    """With rope and no biases the first layer's feed-forward reads a stream with no shared
    part at all (no positions added, no bias; in a sequential layer attention's averaging
    gives it one): predicted, not a crash in the covariance kernels (it raised a reshape
    ValueError under standard before). Seed 100: 100% of 141 tensors within 25% under each
    parametrization when this test was written; asserted ≥ 90%."""
    cfg = ModelConfig(**{**HELD_OUT_MODERN["neox-parallel-partial-rope"], "bias": False,
                         "parametrization": param, "seed": SEEDS[0]})
    errors = log2_errors(cfg)
    share = sum(abs(e) <= 0.32 for e, _p, _m in errors.values()) / len(errors)
    assert share >= 0.9, sorted(((abs(e), k) for k, (e, _p, _m) in errors.items()),
                                reverse=True)[:5]


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
def test_a_mixture_of_experts_is_predicted_at_every_entry_point(param):
    """A routed MoE (4 experts, top 2; and top 1) goes through every entry point; every
    expert gets the same rows (they are alike in distribution); with top 1 the router gets no
    gradient (p̂ = 1 whatever its logits) and the model's own gradient there is ~0 too."""
    cfg = ModelConfig(**{**TINY, "parametrization": param, "n_experts": 4,
                         "experts_per_token": 2, "n_layers": 2, "batch_size": 4,
                         "seq_len": 16})
    for entry in ENTRY_POINTS:
        entry(cfg)
    rows = {(r.name, r.kind): r.rms for r in predict(cfg)}
    expert = {(re.sub(r"experts\.\d+", "experts.*", n), k): v for (n, k), v in rows.items()
              if ".experts." in n}
    for (n, k), v in rows.items():
        if ".experts." in n:
            assert expert[(re.sub(r"experts\.\d+", "experts.*", n), k)] == v
    assert {n for n, _k in rows if ".experts." in n and n.endswith("down.weight")} == {
        f"layers.{i}.moe.experts.{e}.down.weight" for i in range(2) for e in range(4)}
    assert all(math.isfinite(v) and v > 0 for (n, k), v in rows.items()
               if ".moe." in n and k != "weight" or n.endswith("router.weight"))
    top1 = {(r.name, r.kind): r.rms for r in predict(cfg.replace(experts_per_token=1))}
    assert top1[("layers.0.moe.router.weight", "grad_weight")] == 0.0
    assert top1[("layers.0.moe.router", "grad_activation")] == 0.0
    errors = routed_log2_errors(cfg.replace(experts_per_token=1))
    assert errors[("layers.0.moe.router.weight", "grad_weight")][0] == 0.0  # measured ~0


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_experts_are_listed_expert_by_expert_as_measured(activation):
    """The predicted rows come in the measurement's order: expert 0's up, gate, act, down,
    then expert 1's… (the Scaling panel lists them so; they were every expert's ``up``, then
    the rest of expert 0, in the window of a Mixtral-8x7B preset)."""
    cfg = ModelConfig(**{**TINY, "n_experts": 3, "experts_per_token": 2,
                         "activation": activation})
    def moe(rows):  # activations and their gradients (weights follow each side's own order)
        return [(r.name, r.kind) for r in rows
                if ".moe." in r.name and r.kind in ("activation", "grad_activation")]

    predicted, measured = moe(predict(cfg)), moe(measure(cfg))
    assert len(predicted) > 3 * 3 * 2
    assert predicted == measured
