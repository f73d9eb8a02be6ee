"""Analytic model size: parameters, FLOPs, training memory and KV cache.

Everything here is arithmetic on :class:`~unitscale_core.config.ModelConfig`; nothing is built,
so a GPT-3-sized config answers in microseconds. ``count_parameters`` must equal
``sum(p.numel() for p in build_model(cfg).parameters())`` (tested), so the layout below mirrors
``unitscale_core.model`` exactly:

* token embedding ``V·h`` (shared by both stacks of an encoder-decoder);
* per stack: learned positions ``max_len·h``, or a T5 relative-bias table ``32·a``
  (``RELATIVE_BUCKETS`` buckets × heads), plus a final LayerNorm;
* per layer: self-attention ``4h² (+4h bias)``, feed-forward ``2hf (+f+h)`` or, for SwiGLU,
  ``3hf (+2f+h)``, and two LayerNorms ``h (+h bias)`` each; decoder layers of an
  encoder-decoder add cross-attention and a third LayerNorm;
* output head ``V·h`` unless tied to the token embedding (no bias).
"""

from __future__ import annotations

import math

from .config import ModelConfig

#: Number of relative-position buckets in the T5 bias table (Raffel et al. 2020, §2.1).
RELATIVE_BUCKETS = 32
#: Largest distance the T5 buckets distinguish (Raffel et al. 2020).
RELATIVE_MAX_DISTANCE = 128

BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1}


def _attention_params(cfg: ModelConfig) -> int:
    """Q, K, V and output projections: 4·h² weights, plus 4·h biases."""
    h = cfg.d_model
    return 4 * h * h + (4 * h if cfg.bias else 0)


def _ffn_params(cfg: ModelConfig) -> int:
    """GELU/ReLU: up h×f and down f×h (+f+h biases). SwiGLU: gate, up and down (+2f+h)."""
    h, f = cfg.d_model, cfg.d_ff
    if cfg.activation == "swiglu":
        return 3 * h * f + ((2 * f + h) if cfg.bias else 0)
    return 2 * h * f + ((f + h) if cfg.bias else 0)


def _norm_params(cfg: ModelConfig) -> int:
    """LayerNorm gain h, plus bias h."""
    return cfg.d_model * (2 if cfg.bias else 1)


def _position_params(cfg: ModelConfig) -> int:
    """Per stack: a learned table max_len·h, or T5's relative bias table buckets·heads."""
    if cfg.positional == "learned":
        return cfg.max_len * cfg.d_model
    if cfg.positional == "relative":
        return RELATIVE_BUCKETS * cfg.n_heads
    return 0


def _stacks(cfg: ModelConfig) -> list[tuple[int, bool]]:
    """(layers, has_cross_attention) for each stack of the model."""
    if cfg.architecture == "encoder-decoder":
        return [(cfg.encoder_layers, False), (cfg.decoder_layers, True)]
    return [(cfg.n_layers, False)]


def count_parameters(cfg: ModelConfig) -> dict:
    """Trainable parameters: ``{"total": N, "components": {name: count}}``.

    Components: ``token_embedding``, ``position``, ``attention``, ``cross_attention``,
    ``ffn``, ``norms``, ``lm_head``. ``total`` is their sum.
    """
    attn, ffn, norm, pos = (
        _attention_params(cfg), _ffn_params(cfg), _norm_params(cfg), _position_params(cfg)
    )
    comp = {
        "token_embedding": cfg.vocab_size * cfg.d_model,
        "position": 0,
        "attention": 0,
        "cross_attention": 0,
        "ffn": 0,
        "norms": 0,
        "lm_head": 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model,
    }
    for layers, cross in _stacks(cfg):
        comp["position"] += pos
        comp["attention"] += layers * attn
        comp["ffn"] += layers * ffn
        comp["norms"] += layers * (3 if cross else 2) * norm + norm  # + the stack's final norm
        if cross:
            comp["cross_attention"] += layers * attn
    return {"total": sum(comp.values()), "components": comp}


def non_embedding_parameters(cfg: ModelConfig) -> int:
    """N of Kaplan et al. 2020: all parameters except token and position embeddings/head."""
    comp = count_parameters(cfg)["components"]
    return comp["attention"] + comp["cross_attention"] + comp["ffn"] + comp["norms"]


def flops_per_token(cfg: ModelConfig) -> dict:
    """Matmul FLOPs per token (a multiply-add counts 2), Kaplan et al. 2020 Table 1.

    ``forward = 2·N_matmul + 2·L_attn·n_ctx·h`` where ``N_matmul`` is every weight used in a
    matmul (attention, FFN and the output head ``V·h``; embedding lookups and norms are free),
    ``n_ctx = seq_len`` and ``L_attn`` counts every attention block (self and cross: the
    ``QKᵀ`` and ``A·V`` products cost ``2·n_ctx·h`` per token each layer together). The dense
    count is used for every mask, as dense kernels do. ``training = 3 × forward`` (backward
    costs twice the forward: ``6N + 6·L·n_ctx·h``, Kaplan et al.; Hoffmann et al. 2022 App. F).
    For an encoder-decoder a "token" is one source position plus one target position.
    """
    comp = count_parameters(cfg)["components"]
    h = cfg.d_model
    weights = comp["attention"] + comp["cross_attention"] + comp["ffn"] + cfg.vocab_size * h
    attn_blocks = sum(layers * (2 if cross else 1) for layers, cross in _stacks(cfg))
    attention = 2 * attn_blocks * cfg.seq_len * h
    forward = 2 * weights + attention
    return {"forward": forward, "training": 3 * forward, "attention": attention}


def _layer_activation_bytes(cfg: ModelConfig, cross: bool) -> int:
    """Activations one layer keeps for backward, Korthikanti et al. 2022 §4.1 generalised.

    With s = seq_len, b = batch, h = d_model, a = heads, f = d_ff, p = bytes per element and
    dropout masks of one byte when dropout > 0:

    * attention: p·(sbh [QKV input] + 2sbh [Q, K] + as²b [softmax] + sbh [V] + sbh [out-proj
      input]) + dropout: p·as²b [dropped probabilities] + as²b + sbh [masks];
    * feed-forward: p·(sbh + 2sbf) (GELU/ReLU input and output) or p·(sbh + 4sbf) (SwiGLU:
      gate, up, activation, product), + sbh dropout mask;
    * each LayerNorm: p·sbh.

    For p = 2, f = 4h and dropout this is the paper's ``sbh(34 + 5as/h)``.
    """
    s, b, h, a, f = cfg.seq_len, cfg.batch_size, cfg.d_model, cfg.n_heads, cfg.d_ff
    p = BYTES_PER_ELEMENT[cfg.dtype]
    drop = cfg.dropout > 0
    attn = p * (5 * s * b * h + a * s * s * b)
    if drop:
        attn += p * a * s * s * b + a * s * s * b + s * b * h
    ffn = p * (s * b * h + (4 if cfg.activation == "swiglu" else 2) * s * b * f)
    if drop:
        ffn += s * b * h
    n_norms = 3 if cross else 2
    return (2 if cross else 1) * attn + ffn + n_norms * p * s * b * h


def activation_bytes(cfg: ModelConfig) -> int:
    """All layers' activations, plus the final norm input and fp32 logits (4·s·b·V)."""
    s, b, h = cfg.seq_len, cfg.batch_size, cfg.d_model
    p = BYTES_PER_ELEMENT[cfg.dtype]
    total = sum(layers * _layer_activation_bytes(cfg, cross) for layers, cross in _stacks(cfg))
    total += len(_stacks(cfg)) * p * s * b * h  # each stack's final norm input
    total += 4 * s * b * cfg.vocab_size  # logits kept in fp32 for the cross-entropy
    return total


def training_memory(cfg: ModelConfig) -> dict:
    """Bytes to train one step with Adam, without sharding or recomputation.

    ``weights = p·N``, ``gradients = p·N``, ``optimizer = 8·N`` (Adam's two fp32 moments)
    ``+ 4·N`` fp32 master weights when the format is not fp32 (mixed precision, Rajbhandari
    et al. 2020 §3.1: 16 bytes/parameter for fp16), and ``activations`` above.
    """
    n = count_parameters(cfg)["total"]
    p = BYTES_PER_ELEMENT[cfg.dtype]
    out = {
        "weights": p * n,
        "gradients": p * n,
        "optimizer": 8 * n + (0 if cfg.dtype == "fp32" else 4 * n),
        "activations": activation_bytes(cfg),
    }
    out["total"] = sum(out.values())
    return out


def kv_cache_bytes(cfg: ModelConfig) -> int:
    """Inference KV cache for the config's batch at ``seq_len``: ``2·L_dec·b·s·h·p``.

    Each decoder layer caches K and V (b·s·h each); an encoder-decoder also caches the
    cross-attention K and V of the encoder output (another ``2·L_dec·b·s·h·p``). An encoder has
    no autoregressive cache (0).
    """
    if cfg.architecture == "encoder":
        return 0
    per = 2 * cfg.decoder_layers * cfg.batch_size * cfg.seq_len * cfg.d_model
    per *= BYTES_PER_ELEMENT[cfg.dtype]
    return 2 * per if cfg.architecture == "encoder-decoder" else per


def size_report(cfg: ModelConfig) -> dict:
    """Everything the sizes panel and ``unitscale params`` show, as one JSON-ready dict."""
    params = count_parameters(cfg)
    return {
        "total": params["total"],
        "components": params["components"],
        "non_embedding": non_embedding_parameters(cfg),
        "flops_per_token": flops_per_token(cfg),
        "memory_bytes": {**training_memory(cfg), "kv_cache": kv_cache_bytes(cfg)},
    }


def format_count(n: float) -> str:
    """12_345_678 -> '12.3 M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def format_bytes(n: float) -> str:
    """Binary units: 1536 -> '1.5 KiB'."""
    value = float(n) if abs(n) < 1e300 else math.inf  # huge ints overflow float()
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(value) < 1024 or unit == "EiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} EiB"
