"""The prediction's bookkeeping: deferred formulas, the cache, vectorised status counts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from unitscale_core import ModelConfig
from unitscale_core.scaling import predict as P
from unitscale_core.scaling.formats import (
    FormatStats,
    get_format,
    headroom_status,
    headroom_status_array,
)
from unitscale_core.tensors import TensorRow, render_formula

SMALL = ModelConfig(d_model=64, n_heads=4, d_ff=256, n_layers=3, vocab_size=512, max_len=64,
                    seq_len=32, batch_size=4)


def test_deferred_formula_renders_like_an_fstring():
    x, n = 1.23456, 768
    deferred = ("{}; + {} (summed)", (("σ = {:.3g}", (x,)), ("fan_in {}", (n,))))
    assert render_formula(deferred) == f"σ = {x:.3g}; + fan_in {n} (summed)"
    row = TensorRow("a", "activation", 1.0, formula=deferred)
    assert row.formula == "σ = 1.23; + fan_in 768 (summed)"
    assert row.to_json()["formula"] == row.formula


def test_predicted_formulas_are_text_with_the_numbers():
    rows = P.predict(SMALL)
    q = next(r for r in rows if r.name == "layers.0.attn.q" and r.kind == "activation")
    assert isinstance(q.formula, str) and "fan_in" in q.formula and "64" in q.formula
    tied = P.predict(SMALL.replace(tie_embeddings=True))
    grad = next(r for r in tied if r.name == "tok_emb.weight" and r.kind == "grad_weight")
    assert "shared weight, summed" in grad.formula  # the head's and the embedding's, added


def test_cache_answers_and_forgets():
    P.clear_cache()
    assert not P.is_predicted(SMALL, ("fp16",))
    first = P.predict(SMALL, formats=("fp16",))
    assert P.is_predicted(SMALL, ("fp16",))
    assert all(a is b for a, b in zip(first, P.predict(SMALL, formats=("fp16",))))
    P.clear_cache()
    again = P.predict(SMALL, formats=("fp16",))
    assert [r.rms for r in again] == [r.rms for r in first]
    assert again[0] is not first[0]


def test_cache_is_bounded():
    P.clear_cache()
    for i in range(P._CACHE_SIZE + 3):
        P.predict(SMALL.replace(vocab_size=600 + i), formats=("fp16",))
    assert len(P._CACHE) == len(P._PASSES) == P._CACHE_SIZE
    assert not P.is_predicted(SMALL.replace(vocab_size=600), ("fp16",))


def test_formats_dtype_seed_and_device_reuse_the_pass(monkeypatch):
    """Another format, dtype, seed or device of a predicted config makes no new pass, and
    its answer equals a cold prediction's: the same RMS, formats as asked, the collapse of
    its own dtype."""
    deep = SMALL.replace(n_layers=24, d_model=32, n_heads=2, d_ff=64, seq_len=16, max_len=16,
                         parametrization="unit")
    variants = [(deep.replace(dtype="bf16", seed=7, device="cpu"), ("fp8_e4m3", "bf16")),
                (deep.replace(dtype="fp16"), ("fp16",)), (deep.replace(seed=3), ())]
    P.clear_cache()
    cold = {}
    for cfg, formats in variants:  # each from its own pass
        P.clear_cache()
        rows = P.predict(cfg, formats=formats)
        cold[cfg] = ([(r.name, r.kind, r.rms, dict(r.formats)) for r in rows],
                     P.stream_collapse(cfg))
    P.clear_cache()
    P.predict(deep, formats=("fp16",))
    calls = []
    real = P._Predictor
    monkeypatch.setattr(P, "_Predictor", lambda *a, **k: calls.append(a) or real(*a, **k))
    for cfg, formats in variants:
        assert P.is_predicted(cfg, formats)
        rows = P.predict(cfg, formats=formats)
        assert all(set(r.formats) == set(formats) for r in rows)
        assert ([(r.name, r.kind, r.rms, dict(r.formats)) for r in rows],
                P.stream_collapse(cfg)) == cold[cfg]
    assert calls == []
    # the collapse follows the dtype: bf16 resolves less, so its tokens collapse earlier
    at = {dtype: P.stream_collapse(deep.replace(dtype=dtype)) for dtype in ("fp32", "bf16")}
    assert at["bf16"] is not None
    assert at["fp32"] is None or int(at["fp32"].norm.split(".")[1]) > \
        int(at["bf16"].norm.split(".")[1])
    assert calls == []
    # a field the prediction reads does make a new pass
    P.predict(deep.replace(seq_len=8), formats=("fp16",))
    assert len(calls) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.floats(1e-12, 1e6), st.just(0.0)), min_size=1, max_size=40),
       st.sampled_from(["fp8_e4m3", "fp8_e5m2", "fp16", "bf16"]))
def test_status_array_matches_the_scalar_rule(rms_values, fmt):
    from unitscale_core.scaling.formats import gaussian_format_table

    table = gaussian_format_table(rms_values, fmt)
    vectorised = headroom_status_array(table["underflow"], table["subnormal"],
                                       table["overflow"], rms_values)
    for i, rms in enumerate(rms_values):
        stats = FormatStats(get_format(fmt).name, rms, table["underflow"][i],
                            table["subnormal"][i], table["normal"][i], table["overflow"][i],
                            table["headroom_max_log2"][i], table["headroom_min_log2"][i])
        assert vectorised[i] == headroom_status(stats)


def test_status_counts_match_row_by_row():
    for param in ("standard", "unit", "umup"):
        cfg = SMALL.replace(parametrization=param)
        for fmt in ("fp8_e4m3", "fp16"):
            rows = P.predict(cfg, formats=(fmt,))
            expected = {"zero": 0, "fine": 0, "at_risk": 0, "lost": 0}
            for r in rows:
                f = r.formats[fmt]
                stats = FormatStats(fmt, r.rms, f["underflow"], f["subnormal"],
                                    1 - f["underflow"] - f["overflow"] - f["subnormal"],
                                    f["overflow"], f["headroom_max_log2"],
                                    f["headroom_min_log2"])
                expected[headroom_status(stats)] += 1
            assert P.status_counts(cfg, fmt) == expected
    # a standard model in FP8 loses something (its gradients underflow), unit scaling less
    lost_std = P.status_counts(SMALL, "fp8_e4m3")["lost"]
    lost_unit = P.status_counts(SMALL.replace(parametrization="unit"), "fp8_e4m3")["lost"]
    assert lost_std > lost_unit
    # the LayerNorm biases start at exactly zero: counted as zero, never as lost
    zeros = [r.name for r in P.predict(SMALL, formats=("fp8_e4m3",)) if r.rms == 0]
    assert zeros and P.status_counts(SMALL, "fp8_e4m3")["zero"] == len(zeros)


def test_stream_collapse_outlives_the_rows_in_the_cache(monkeypatch):
    """The collapse of a predicted config is answered without a new prediction even after
    its rows left the cache (the panel asks for the shown config's on the GUI thread)."""
    deep = ModelConfig(d_model=32, n_heads=2, d_ff=64, n_layers=32, vocab_size=64, max_len=16,
                       seq_len=16, batch_size=2, parametrization="unit")
    P.clear_cache()
    P.predict(deep, formats=("fp16",))
    want = P.stream_collapse(deep)
    assert want is not None
    for i in range(P._CACHE_SIZE + 1):  # push its rows and its pass out
        P.predict(SMALL.replace(vocab_size=600 + i), formats=("fp16",))
    assert not P.is_predicted(deep, ("fp16",))
    calls = []
    monkeypatch.setattr(P, "_Predictor", lambda *a, **k: calls.append(a))
    assert P.stream_collapse(deep) == want
    assert calls == []  # no prediction was made
