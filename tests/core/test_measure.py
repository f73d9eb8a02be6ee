"""Measurement: names, unit scale where the papers promise it, and unit-scaling's own model."""

from __future__ import annotations

import math

import pytest
import torch
import unit_scaling as uu

from unitscale_core import ModelConfig
from unitscale_core.measure import measure, measurement_batch, tensor_stats
from unitscale_core.tensors import KINDS

SMALL = dict(d_model=64, n_heads=4, d_ff=256, n_layers=2, vocab_size=257, max_len=64,
             seq_len=32, batch_size=4)


def by_key(rows):
    return {(r.name, r.kind): r for r in rows}


def test_rows_cover_every_tensor_and_kind():
    cfg = ModelConfig(**SMALL)
    rows = measure(cfg)
    keys = by_key(rows)
    assert {r.kind for r in rows} == set(KINDS)
    for name in ("tok_emb", "embed", "layers.0.norm1", "layers.0.attn.q", "layers.0.attn.scores",
                 "layers.0.attn.probs", "layers.0.attn.context", "layers.0.attn.o",
                 "layers.0.after_attn", "layers.0.ffn.up", "layers.0.ffn.act",
                 "layers.0.ffn.down", "layers.1", "norm", "head"):
        assert (name, "activation") in keys and (name, "grad_activation") in keys, name
    assert ("loss", "activation") in keys
    n_params = sum(1 for _ in __import__("unitscale_core").build_model(cfg).parameters())
    assert sum(r.kind == "weight" for r in rows) == n_params
    assert all(math.isfinite(r.rms) for r in rows)


def test_encoder_decoder_names_and_second_embedding_call():
    rows = by_key(measure(ModelConfig(architecture="encoder-decoder", **SMALL)))
    for name in ("encoder.layers.0.attn.probs", "decoder.layers.1.cross_attn.probs",
                 "decoder.layers.0.after_cross", "tok_emb", "tok_emb@2", "decoder.embed"):
        assert (name, "activation") in rows, name


def test_measured_rms_matches_torch_directly():
    """The recorded RMS of the logits equals recomputing them by hand."""
    cfg = ModelConfig(**SMALL)
    rows = by_key(measure(cfg))
    model = __import__("unitscale_core").build_model(cfg).train()
    logits = model(measurement_batch(cfg, torch.device("cpu"))["ids"])
    want = logits.detach().pow(2).mean().sqrt().item()
    assert rows[("head", "activation")].rms == pytest.approx(want, rel=1e-5)


def test_format_fractions_are_counted_on_values():
    x = torch.tensor([0.0, 1e-9, 1.0, 1e5, float("inf")])
    rms, formats = tensor_stats(x)
    assert formats["fp16"]["underflow"] == pytest.approx(1 / 5)  # 1e-9 → 0; exact 0 is not lost
    assert formats["fp16"]["overflow"] == pytest.approx(2 / 5)  # 1e5 and inf
    assert formats["fp8_e4m3"]["underflow"] == pytest.approx(1 / 5)
    assert math.isinf(rms)


@pytest.mark.parametrize("param", ["unit", "umup"])
def test_unit_scaled_tensors_start_near_one(param):
    """Blake et al. 2023 §4 / u-μP §3: weights, the residual stream, projections and their
    gradients are unit-scaled at initialisation (within a factor of 2 here)."""
    cfg = ModelConfig(parametrization=param, positional="none", d_model=128, n_heads=4,
                      d_ff=512, n_layers=2, vocab_size=512, max_len=64, seq_len=64,
                      batch_size=8, tie_embeddings=False, bias=False, activation="swiglu")
    rows = by_key(measure(cfg))
    near_one = [("tok_emb.weight", "weight"), ("layers.0.attn.q.weight", "weight"),
                ("embed", "activation"), ("layers.0.attn.q", "activation"),
                ("layers.0.attn.v", "activation"), ("layers.1.ffn.up", "activation"),
                ("layers.1", "activation"), ("norm", "activation"),
                ("head", "grad_activation"), ("layers.1.ffn.down", "grad_activation")]
    for key in near_one:
        assert abs(math.log2(rows[key].rms)) < 1.0, (key, rows[key].rms)
    # …while standard weights are far from 1 (U(±1/√fan_in): rms 1/√(3·128) ≈ 0.051)
    std = by_key(measure(cfg.replace(parametrization="standard")))
    assert std[("layers.0.attn.q.weight", "weight")].rms == pytest.approx(
        1 / math.sqrt(3 * 128), rel=0.05)


def _uu_rows(model, ids):
    """RMS of unit_scaling.TransformerDecoder's outputs and gradients, by its module names."""
    acts, grads = {}, {}

    def hook(name):
        def fn(_m, _i, out):
            acts[name] = out.detach().pow(2).mean().sqrt().item()
            out.register_hook(lambda g: grads.__setitem__(name, g.pow(2).mean().sqrt().item()))
        return fn

    names = ["embedding", "final_norm", "projection"] + [
        f"layers.{i}{s}" for i in range(len(model.layers))
        for s in ("", ".mhsa.linear_o", ".mlp.linear_2")]
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    logits = model(ids)
    loss = uu.functional.cross_entropy(logits.flatten(0, 1), torch.randint(0, 512, (ids.numel(),)))
    loss.backward()
    for h in handles:
        h.remove()
    wgrads = {n: p.grad.pow(2).mean().sqrt().item() for n, p in model.named_parameters()}
    return acts, grads, wgrads


def test_umup_matches_unit_scaling_transformer_decoder():
    """Same shapes as ``unit_scaling.TransformerDecoder`` (pre-norm, SwiGLU, no bias, no
    positions, untied readout, u-μP residual rule): every comparable tensor within 25%."""
    d, layers, heads, vocab, t, b = 128, 3, 4, 512, 64, 8
    cfg = ModelConfig(architecture="decoder", parametrization="umup", d_model=d, n_heads=heads,
                      d_ff=4 * d, n_layers=layers, vocab_size=vocab, max_len=t, seq_len=t,
                      batch_size=b, positional="none", activation="swiglu", bias=False,
                      tie_embeddings=False, norm="pre")
    ours = by_key(measure(cfg))
    torch.manual_seed(0)
    ref = uu.TransformerDecoder(hidden_size=d, vocab_size=vocab, layers=layers, heads=heads)
    acts, grads, wgrads = _uu_rows(ref, measurement_batch(cfg, torch.device("cpu"))["ids"])
    pairs = {"embed": "embedding", "norm": "final_norm", "head": "projection"}
    for i in range(layers):
        pairs[f"layers.{i}"] = f"layers.{i}"
        pairs[f"layers.{i}.attn.o"] = f"layers.{i}.mhsa.linear_o"
        pairs[f"layers.{i}.ffn.down"] = f"layers.{i}.mlp.linear_2"
    checked = 0
    for mine, theirs in pairs.items():
        for kind, table in (("activation", acts), ("grad_activation", grads)):
            err = math.log2(ours[(mine, kind)].rms / table[theirs])
            assert abs(err) <= 0.32, (mine, kind, ours[(mine, kind)].rms, table[theirs])
            checked += 1
    wpairs = {"tok_emb.weight": "embedding.weight", "head.weight": "projection.weight"}
    for i in range(layers):
        for a, c in (("attn.o", "mhsa.linear_o"), ("ffn.up", "mlp.linear_1"),
                     ("ffn.gate", "mlp.linear_gate"), ("ffn.down", "mlp.linear_2")):
            wpairs[f"layers.{i}.{a}.weight"] = f"layers.{i}.{c}.weight"
    for mine, theirs in wpairs.items():
        err = math.log2(ours[(mine, "grad_weight")].rms / wgrads[theirs])
        assert abs(err) <= 0.32, (mine, ours[(mine, "grad_weight")].rms, wgrads[theirs])
        checked += 1
    assert checked == 2 * len(pairs) + len(wpairs)


def test_cancellation_stops_at_the_first_check():
    class Stop(Exception):
        pass

    calls = []

    def check():
        calls.append(1)
        raise Stop()

    with pytest.raises(Stop):
        measure(ModelConfig(**SMALL), check_cancelled=check)
    assert calls == [1]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp8_e4m3"])
def test_low_precision_runs(dtype):
    rows = measure(ModelConfig(parametrization="unit", dtype=dtype, **SMALL))
    assert any(r.kind == "grad_weight" for r in rows)


def test_models_are_cached_and_reused_without_stale_gradients():
    from unitscale_core import measure as M

    cfg = ModelConfig(**SMALL)
    first = by_key(measure(cfg))
    model = M.cached_model(cfg, torch.device("cpu"))
    assert all(p.grad is None for p in model.parameters())  # cleared for the next pass
    again = by_key(measure(cfg))
    assert again == first or all(abs(again[k].rms - first[k].rms) < 1e-6 for k in first)
    longer = measure(cfg.replace(seq_len=16))  # same weights, no rebuild
    assert M.cached_model(cfg.replace(seq_len=16), torch.device("cpu")) is model
    assert by_key(longer)[("tok_emb.weight", "weight")].rms == first[
        ("tok_emb.weight", "weight")].rms
    assert M.cached_model(cfg.replace(seed=1), torch.device("cpu")) is not model


def test_measure_seeds_is_the_geometric_mean_of_single_measurements():
    """Over three seeds: each tensor's RMS is the geometric mean of three single measurements
    at seeds s, s+1, s+2, its format fractions their mean; one seed is measure() itself."""
    from unitscale_core.measure import measure_seeds

    cfg = ModelConfig(d_model=32, n_heads=2, d_ff=64, n_layers=1, vocab_size=64, max_len=8,
                      seq_len=8, batch_size=2, seed=4)
    single = [{(r.name, r.kind): r for r in measure(cfg.replace(seed=s))} for s in (4, 5, 6)]
    done = []
    rows = measure_seeds(cfg, 3, progress=done.append)
    assert done == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [(r.name, r.kind) for r in rows] == [(r.name, r.kind) for r in measure(cfg)]
    for row in rows:
        draws = [m[(row.name, row.kind)] for m in single]
        values = [d.rms for d in draws]
        if all(v > 0 for v in values):
            assert row.rms == pytest.approx(math.prod(values) ** (1 / 3), rel=1e-9)
        for fmt in row.formats:
            assert row.formats[fmt]["underflow"] == pytest.approx(
                sum(d.formats[fmt]["underflow"] for d in draws) / 3)
    assert [r.rms for r in measure_seeds(cfg, 1)] == [r.rms for r in measure(cfg)]
    with pytest.raises(ValueError, match="seeds"):
        measure_seeds(cfg, 0)


def test_measure_seeds_reports_how_each_tensor_varied():
    """With the combined rows, each tensor's lowest and highest draw and the standard
    deviation of its log2 RMS over the seeds (a zero tensor in every draw: none)."""
    from unitscale_core.measure import measure_seeds_with_spread

    cfg = ModelConfig(d_model=32, n_heads=2, d_ff=64, n_layers=1, vocab_size=64, max_len=8,
                      seq_len=8, batch_size=2, seed=4)
    single = [{(r.name, r.kind): r.rms for r in measure(cfg.replace(seed=s))} for s in (4, 5, 6)]
    rows, spread = measure_seeds_with_spread(cfg, 3)
    assert set(spread) == {(r.name, r.kind) for r in rows}
    varied = 0
    for key, s in spread.items():
        values = [m[key] for m in single]
        assert (s.low, s.high) == (min(values), max(values))
        if min(values) > 0:
            logs = [math.log2(v) for v in values]
            mean = sum(logs) / 3
            assert s.log2_std == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in logs) / 3))
            varied += s.log2_std > 0.01
        elif max(values) == 0:
            assert s.log2_std == 0.0
    assert varied > len(spread) / 2  # other seeds, other draws
    _, one = measure_seeds_with_spread(cfg, 1)
    assert all(s.log2_std == 0.0 and s.low == s.high for s in one.values())


# -- memory, progress and cancel (issue 19) ------------------------------------------------------

def test_no_activation_or_gradient_outlives_the_measurement(monkeypatch):
    """Every tensor the hooks see (activations, their gradients, weight gradients) is gone
    once measure() returns: nothing is copied or kept, and the cached model holds no
    gradients (only its weights)."""
    import gc
    import weakref

    from unitscale_core import measure as M

    seen = []
    original = M.tensor_stats

    def spy(x):
        seen.append(weakref.ref(x))
        return original(x)

    monkeypatch.setattr(M, "tensor_stats", spy)
    cfg = ModelConfig(**SMALL)
    model = M.cached_model(cfg, torch.device("cpu"))  # the model measure() will reuse
    weights = {id(p) for p in model.parameters()}
    measure(cfg)
    assert M.is_cached(cfg, "cpu")
    gc.collect()
    alive = [r() for r in seen if r() is not None and id(r()) not in weights]
    assert len(seen) > 100 and alive == []


def test_the_logits_are_not_held_during_the_backward(monkeypatch):
    """When the logits' gradient arrives, no Python-held tensor of the logits' shape is
    alive but that gradient: the loss's graph keeps what its backward needs, the caller
    does not keep a second full (batch, seq, vocab) copy."""
    import gc

    from unitscale_core import measure as M

    cfg = ModelConfig(**SMALL)
    shape = (cfg.batch_size, cfg.seq_len, cfg.vocab_size)
    found = []
    original = M.tensor_stats

    def spy(x):
        if tuple(x.shape) == shape and not x.requires_grad and x.grad_fn is None and \
                not found:  # the first logits-shaped gradient: the top of the backward
            gc.collect()
            found.append([o for o in gc.get_objects()
                          if type(o) is torch.Tensor and tuple(o.shape) == shape
                          and o is not x])
        return original(x)

    monkeypatch.setattr(M, "tensor_stats", spy)
    measure(cfg)
    assert found and found[0] == []


@pytest.mark.parametrize("make", [
    lambda: torch.randn(3, 1000, 7) * 5,
    lambda: torch.randn(70, 130).t(),  # not contiguous
    lambda: torch.randn(1, 257).expand(40, 257),  # an expanded gradient (stride 0)
    lambda: torch.cat([torch.zeros(500), torch.tensor([1e-9, 7e-7, 70000.0, float("inf")]),
                       torch.randn(4000) * 1e-5]),
    lambda: (torch.randn(50, 60) * 3).to(torch.bfloat16),
    lambda: torch.tensor([float("nan"), 1.0] * 600),
])
def test_large_tensors_are_reduced_in_pieces_with_the_same_statistics(monkeypatch, make):
    """Above STATS_CHUNK elements a tensor is reduced a piece (≤ STATS_PIECE) at a time:
    the format counts are the same, exactly, the RMS the same to rounding, and no piece the
    statistics see is larger than STATS_PIECE."""
    from unitscale_core import measure as M

    x = make()
    want_rms, want = tensor_stats(x)
    sizes = []
    original = M._counts

    def spy(a):
        sizes.append(a.numel())
        return original(a)

    monkeypatch.setattr(M, "STATS_CHUNK", 100)
    monkeypatch.setattr(M, "STATS_PIECE", 64)
    monkeypatch.setattr(M, "_counts", spy)
    rms, got = tensor_stats(x)
    assert sum(sizes) == x.numel() and max(sizes) <= 64 and len(sizes) > 1
    if math.isnan(want_rms):
        assert math.isnan(rms)
    else:
        assert rms == pytest.approx(want_rms, rel=1e-5)
    for fmt in want:
        assert got[fmt]["underflow"] == want[fmt]["underflow"]
        assert got[fmt]["overflow"] == want[fmt]["overflow"]


def test_progress_counts_layers_forward_then_backward_and_ends_at_one():
    reports = []
    measure(ModelConfig(**SMALL), report=lambda f, text: reports.append((f, text)))
    fractions = [f for f, _ in reports]
    texts = [t for _, t in reports]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert "forward: 1 of 2 layers" in texts and "forward: 2 of 2 layers" in texts
    first_backward = texts.index("backward")
    assert all(t.startswith("forward") for t in texts[:first_backward])
    assert any(t.startswith("backward: ") for t in texts[first_backward:])
    assert any(t.startswith("weights and gradients") for t in texts)


def test_progress_over_seeds_is_monotone_and_ends_at_one():
    from unitscale_core.measure import measure_seeds

    cfg = ModelConfig(d_model=32, n_heads=2, d_ff=64, n_layers=1, vocab_size=64, max_len=8,
                      seq_len=8, batch_size=2)
    reports = []
    measure_seeds(cfg, 2, report=lambda f, text: reports.append((f, text)))
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert ("measured 1 of 2 seeds" in [t for _, t in reports]
            and reports[-1] == (1.0, "measured 2 of 2 seeds"))
    assert any(t.startswith("seed 2 of 2: backward") for _, t in reports)


def test_cancel_in_the_backward_pass_stops_inside_it():
    """A check_cancelled that trips on its N-th call, N past the forward's tensors: the
    exception comes out of the backward pass at that very call (not at its end), and the
    cached model keeps no half-made gradients."""
    from unitscale_core import measure as M

    class Cancelled(Exception):
        pass

    cfg = ModelConfig(**SMALL)
    forward = sum(r.kind == "activation" for r in measure(cfg)) - 1  # less the loss row
    calls, kinds = [], []

    def check():
        calls.append(1)
        if len(calls) == forward + 5:
            raise Cancelled()

    def report(_f, text):
        kinds.append(text.split(":")[0])

    with pytest.raises(Cancelled):
        measure(cfg, check_cancelled=check, report=report)
    assert len(calls) == forward + 5
    assert kinds[-1] == "backward" and "weights and gradients" not in kinds
    assert all(p.grad is None for p in M.cached_model(cfg, torch.device("cpu")).parameters())
