"""The collapse warning (:mod:`unitscale_core.scaling.collapse`) against measurement.

Past the predicted LayerNorm a unit-scaled stack's tokens differ by less than fp32's
resolution, so fp32's query weight gradients are rounding noise: several times what the same
model computes in fp64. Ten layers before it the two agree. The point moves with the seed, so
the check takes several."""

from __future__ import annotations

import math

import pytest
import torch

from unitscale_core import ModelConfig
from unitscale_core.measure import measurement_batch
from unitscale_core.model import build_model
from unitscale_core.scaling.collapse import RESOLUTION, find_collapse
from unitscale_core.scaling.predict import stream_collapse

#: tests/core/test_predict.py's held-out "tied-decoder-deep-32"
DEEP = dict(architecture="decoder", d_model=64, n_heads=2, d_ff=256, n_layers=32, seq_len=32,
            max_len=32, batch_size=2, vocab_size=500, tie_embeddings=True)


def _layer(norm: str) -> int:
    return int(norm.split(".")[1])


def _query_weight_grads(cfg: ModelConfig, dtype: torch.dtype) -> list[float]:
    torch.manual_seed(0)
    model = build_model(cfg, device=torch.device("cpu")).to(dtype)
    model.train()
    batch = measurement_batch(cfg, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    model.loss(model(batch["ids"]), batch["targets"]).backward()
    return [float(layer.attn.q.weight.grad.pow(2).mean().sqrt()) for layer in model.layers]


def test_find_collapse_takes_the_first_norm_below_the_resolution():
    eps = RESOLUTION["fp32"]
    shares = [("layers.0.norm1", 1.0), ("layers.0.norm2", 0.5 * eps * eps),
              ("layers.1.norm1", 0.1 * eps * eps)]
    assert find_collapse(shares, "fp32", 64).norm == "layers.0.norm2"
    assert find_collapse(shares, "bf16", 64).norm == "layers.0.norm2"
    assert find_collapse([("norm", 2 * eps * eps)], "fp32", 64) is None
    assert find_collapse(shares, "fp32", 1) is None  # one token: nothing to tell apart
    collapse = find_collapse([("layers.3.norm1", 1e-6)], "bf16", 8)
    assert collapse.norm == "layers.3.norm1" and "bf16" in collapse.describe()


@pytest.mark.parametrize("seed", [100, 101, 102])
def test_unit_stack_collapses_where_predicted(seed):
    cfg = ModelConfig(parametrization="unit", seed=seed, **DEEP)
    collapse = stream_collapse(cfg)
    assert collapse is not None and collapse.dtype == "fp32"
    at = _layer(collapse.norm)
    assert 10 <= at <= cfg.n_layers - 3, collapse
    fp32 = _query_weight_grads(cfg, torch.float32)
    fp64 = _query_weight_grads(cfg, torch.float64)
    before = fp32[at - 10] / fp64[at - 10]
    last = fp32[-1] / fp64[-1]
    assert before == pytest.approx(1.0, abs=0.05), (at, before)
    assert last >= 3.0, (at, last)


def test_umup_stack_keeps_its_tokens_apart():
    """u-μP's residual rule keeps a share of every embedding: no collapse predicted, and fp32
    and fp64 agree to the last layer."""
    cfg = ModelConfig(parametrization="umup", seed=100, **DEEP)
    assert stream_collapse(cfg) is None
    fp32 = _query_weight_grads(cfg, torch.float32)
    fp64 = _query_weight_grads(cfg, torch.float64)
    assert all(math.isclose(a, b, rel_tol=0.05) for a, b in zip(fp32, fp64))


@pytest.mark.parametrize("seed", [100, 101, 102])
def test_bf16_collapses_earlier_where_predicted(seed):
    """bf16's ε = 2⁻⁸: the point comes ~18 layers earlier than fp32's, and the model run in
    bf16 has query weight gradients within 25% of fp64's four layers before it and ≥ 3×
    (up to 10⁵× at the top) four layers after it."""
    cfg = ModelConfig(parametrization="unit", seed=seed, **DEEP)
    fp32, bf16 = stream_collapse(cfg), stream_collapse(cfg.replace(dtype="bf16"))
    at = _layer(bf16.norm)
    assert 4 <= at < _layer(fp32.norm) - 10
    low = _query_weight_grads(cfg, torch.bfloat16)
    exact = _query_weight_grads(cfg, torch.float64)
    assert low[at - 4] / exact[at - 4] == pytest.approx(1.0, abs=0.25)
    assert low[at + 4] / exact[at + 4] >= 3.0


def test_noise_rows_are_the_centred_attention_gradients_past_the_point():
    from unitscale_core.scaling.collapse import Collapse, noise_rows
    from unitscale_core.scaling.predict import predict

    cfg = ModelConfig(parametrization="unit", seed=100, **DEEP)
    collapse = stream_collapse(cfg)
    at = _layer(collapse.norm)
    rows = [(r.name, r.kind) for r in predict(cfg)]
    noise = noise_rows(rows, collapse)
    first = at if collapse.norm.endswith("norm1") else at + 1
    assert (f"layers.{first}.attn.q", "grad_activation") in noise
    assert (f"layers.{first}.attn.k.weight", "grad_weight") in noise
    assert (f"layers.{first - 1}.attn.q", "grad_activation") not in noise
    assert all(_layer(name) >= first for name, _ in noise)
    assert not any(name.endswith(("attn.v", "attn.o", "probs")) or kind == "activation"
                   for name, kind in noise)
    per_layer = {k for k in noise if _layer(k[0]) == first}
    assert len(per_layer) == 7  # q, k, scores gradients; q and k weight and bias gradients
    assert noise_rows(rows, None) == frozenset()
    final = Collapse("norm", 1e-20, "fp32", 2.0**-24)  # after the last layer: nothing
    assert noise_rows(rows, final) == frozenset()
    norm1 = Collapse("layers.5.norm1", 1e-20, "fp32", 2.0**-24)  # before layer 5's attention
    assert ("layers.5.attn.q", "grad_activation") in noise_rows(rows, norm1)
