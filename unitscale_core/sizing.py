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
    """q ``h·a·d`` and o ``a·d·h``, k and v ``h·kv·d`` each (GQA), with a = heads,
    kv = key/value heads, d = d_head; q/k/v biases ``a·d + 2·kv·d`` when ``has_qkv_bias``,
    o's bias ``h`` when ``bias``; q_norm/k_norm gains (``d`` each per head, or ``a·d`` and
    ``kv·d`` over all heads), doubled by a bias for a LayerNorm with ``bias``."""
    h, aw, kw = cfg.d_model, cfg.attn_width, cfg.kv_width
    n = 2 * h * aw + 2 * h * kw
    if cfg.has_qkv_bias:
        n += aw + 2 * kw
    if cfg.bias:
        n += h
    if cfg.qk_norm != "none":
        norm_width = 2 * cfg.head_size if cfg.qk_norm == "head" else aw + kw
        n += norm_width * (2 if cfg.norm_type == "layernorm" and cfg.bias else 1)
    return n


def _dense_ffn_params(cfg: ModelConfig) -> int:
    """GELU/ReLU: up h×f and down f×h (+f+h biases). SwiGLU/GeGLU: gate, up and down
    (+2f+h)."""
    h, f = cfg.d_model, cfg.d_ff
    if cfg.activation in ("swiglu", "geglu"):
        return 3 * h * f + ((2 * f + h) if cfg.bias else 0)
    return 2 * h * f + ((f + h) if cfg.bias else 0)


def _ffn_params(cfg: ModelConfig, active: bool = False) -> int:
    """A dense FFN, or a MoE: router ``h·E`` (no bias) + E experts (``k`` when ``active``:
    the experts one token runs)."""
    if not cfg.is_moe:
        return _dense_ffn_params(cfg)
    experts = cfg.experts_per_token if active else cfg.n_experts
    return cfg.d_model * cfg.n_experts + experts * _dense_ffn_params(cfg)


def _norm_params(cfg: ModelConfig) -> int:
    """LayerNorm gain h, plus bias h when ``bias``; RMSNorm gain h only."""
    if cfg.norm_type == "rmsnorm":
        return cfg.d_model
    return cfg.d_model * (2 if cfg.bias else 1)


def _norms_per_layer(cfg: ModelConfig, cross: bool) -> int:
    """norm1, norm2 (+cross_norm) for pre/post/sandwich (also with parallel_residual);
    sandwich adds attn_out_norm, ffn_out_norm (+cross_out_norm); branch_output has only
    the output norms."""
    blocks = 3 if cross else 2
    if cfg.norm == "sandwich":
        return 2 * blocks
    return blocks


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
    """Trainable parameters: ``{"total": N, "active": N_active, "components": {name: count}}``.

    Components: ``token_embedding``, ``position``, ``attention``, ``cross_attention``,
    ``ffn``, ``norms``, ``lm_head``. ``total`` is their sum. ``active`` is what one token uses:
    ``total`` less the ``(n_experts − experts_per_token)`` experts a MoE layer does not run
    (= ``total`` for a dense model).
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
        comp["norms"] += layers * _norms_per_layer(cfg, cross) * norm + norm  # + final norm
        if cross:
            comp["cross_attention"] += layers * attn
    total = sum(comp.values())
    unused = sum(layers for layers, _ in _stacks(cfg)) * (ffn - _ffn_params(cfg, active=True))
    return {"total": total, "active": total - unused, "components": comp}


def non_embedding_parameters(cfg: ModelConfig) -> int:
    """N of Kaplan et al. 2020: all parameters except token and position embeddings/head."""
    comp = count_parameters(cfg)["components"]
    return comp["attention"] + comp["cross_attention"] + comp["ffn"] + comp["norms"]


def flops_per_token(cfg: ModelConfig) -> dict:
    """Matmul FLOPs per token (a multiply-add counts 2), on the parameters a token uses.

    ``N_matmul`` is every active parameter of the attention and feed-forward blocks (for a
    MoE the router and the ``experts_per_token`` experts a token runs; their few biases and
    q/k-norm gains are counted as in Kaplan's N) plus the output head ``V·h``; embedding
    lookups and the layer norms are free. ``L_attn`` counts every attention block (self and
    cross), ``s = seq_len`` and ``a·d = n_heads·d_head`` the attention width.
    Two conventions for the attention term:

    * Kaplan et al. 2020 Table 1 (keys ``forward``, ``training``, ``attention``):
      ``forward = 2·N_matmul + 2·L_attn·s·a·d``, ``training = 3 × forward``
      (``6N + 6·L·s·a·d``);
    * PaLM (Chowdhery et al. 2022 App. B; Hoffmann et al. 2022 App. F), the one MFU figures
      use and the ``headline``: both ``QKᵀ`` and ``A·V`` are counted,
      ``forward_palm = 2·N_matmul + 4·L_attn·s·a·d``, ``training_palm = 3 × forward_palm``
      (``6N + 12·L·s·a·d``), ``attention_palm = 4·L_attn·s·a·d``.

    The dense count is used for every mask, as dense kernels do. For an encoder-decoder a
    "token" is one source position plus one target position.
    """
    h = cfg.d_model
    layers = sum(n for n, _ in _stacks(cfg))
    cross_layers = sum(n for n, cross in _stacks(cfg) if cross)
    weights = ((layers + cross_layers) * _attention_params(cfg)
               + layers * _ffn_params(cfg, active=True) + cfg.vocab_size * h)
    attn_blocks = layers + cross_layers
    attention = 2 * attn_blocks * cfg.seq_len * cfg.attn_width
    forward = 2 * weights + attention
    forward_palm = 2 * weights + 2 * attention
    return {"forward": forward, "training": 3 * forward, "attention": attention,
            "forward_palm": forward_palm, "training_palm": 3 * forward_palm,
            "attention_palm": 2 * attention, "headline": "palm"}


#: Bytes per element an RMSNorm keeps for backward, whatever the dtype: torch's composite
#: ``rms_norm`` (CPU) works in fp32 and keeps its input and the normalised output
#: (``x·rsqrt(mean x² + ε)``, for the gain's gradient), 2 × 4 bytes. Measured with
#: saved-tensor hooks (tests/core/test_sizing.py); a fused kernel keeps less (p + rstd), so
#: there this is an upper bound, the side a memory budget should err on.
RMSNORM_SAVED_BYTES = 8


def _norm_bytes(cfg: ModelConfig, elements: int) -> int:
    """What one norm over ``elements`` values keeps: its input (LayerNorm: p per element;
    its mean and rstd are per row, left out) or RMSNorm's :data:`RMSNORM_SAVED_BYTES`."""
    if cfg.norm_type == "rmsnorm":
        return RMSNORM_SAVED_BYTES * elements
    return BYTES_PER_ELEMENT[cfg.dtype] * elements


def _layer_activation_bytes(cfg: ModelConfig, cross: bool) -> int:
    """Activations one layer keeps for backward, Korthikanti et al. 2022 §4.1 generalised.

    With s = seq_len, b = batch, h = d_model, a = heads, w = a·d_head (q width),
    w_kv = kv_heads·d_head (k, v projections), f = d_ff, p = bytes per element and dropout
    masks of one byte when dropout > 0:

    * attention: p·(sbh [QKV input] + sb·w [Q] + 2·sb·w [K, V] + as²b [softmax] + sb·w
      [out-proj input]) + the q/k norms' (``_norm_bytes`` of sb·(w + w_kv)) + dropout:
      p·as²b [dropped probabilities] + as²b + sbh [masks]; + p·as²b with an attention soft
      cap (its tanh's output). K and V are counted at the query width w: the attention's
      matmuls keep them repeated to the query heads (HF's ``repeat_kv``, this model), so
      grouped-query attention shrinks the KV cache and the k/v weights, not these;
    * feed-forward: p·(sbh + 2sbf) (GELU/ReLU input and output) or p·(sbh + 4sbf)
      (SwiGLU/GeGLU: gate, up, activation, product); a MoE keeps that for each of the k
      experts a token runs, plus the router's probabilities p·sb·E and, per expert a token
      runs, the rows gathered for it and its output before the weighting by p̂ (2·p·k·sbh, as
      HF's Mixtral keeps them too); + sbh dropout mask;
    * each norm (``_norms_per_layer``): ``_norm_bytes(sbh)`` (p·sbh for LayerNorm); with a
      parallel residual norm1 and norm2 read the same input, kept once (− p·sbh).

    For p = 2, f = 4h, w = w_kv = h and dropout this is the paper's ``sbh(34 + 5as/h)``.
    Checked against the bytes the standard-parametrization model saves for backward
    (``torch.autograd.graph.saved_tensors_hooks``), field by field, in tests/core/test_sizing.py.
    """
    s, b, h, a, f = cfg.seq_len, cfg.batch_size, cfg.d_model, cfg.n_heads, cfg.d_ff
    w, w_kv = cfg.attn_width, cfg.kv_width
    p = BYTES_PER_ELEMENT[cfg.dtype]
    drop = cfg.dropout > 0
    attn = p * (s * b * h + 4 * s * b * w + a * s * s * b)
    if cfg.qk_norm != "none":
        attn += _norm_bytes(cfg, s * b * (w + w_kv))
    if cfg.attn_softcap is not None:
        attn += p * a * s * s * b
    if drop:
        attn += p * a * s * s * b + a * s * s * b + s * b * h
    expert = (4 if cfg.activation in ("swiglu", "geglu") else 2) * s * b * f
    if cfg.is_moe:
        k = cfg.experts_per_token
        ffn = p * (s * b * h + k * expert + s * b * cfg.n_experts + 2 * k * s * b * h)
    else:
        ffn = p * (s * b * h + expert)
    if drop:
        ffn += s * b * h
    norms = _norms_per_layer(cfg, cross) * _norm_bytes(cfg, s * b * h)
    if cfg.parallel_residual:
        norms -= p * s * b * h
    return (2 if cross else 1) * attn + ffn + norms


def activation_bytes(cfg: ModelConfig) -> int:
    """All layers' activations, plus each stack's final norm's and the fp32 logits
    (4·s·b·V; + p·s·b·V, the tanh's output, with a final-logit soft cap)."""
    s, b = cfg.seq_len, cfg.batch_size
    p = BYTES_PER_ELEMENT[cfg.dtype]
    total = sum(layers * _layer_activation_bytes(cfg, cross) for layers, cross in _stacks(cfg))
    total += len(_stacks(cfg)) * _norm_bytes(cfg, s * b * cfg.d_model)  # final norms
    total += 4 * s * b * cfg.vocab_size  # logits kept in fp32 for the cross-entropy
    if cfg.logit_softcap is not None:
        total += p * s * b * cfg.vocab_size
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
    """Inference KV cache for the config's batch at ``seq_len``: ``2·L_dec·b·s·w_kv·p``.

    Each decoder layer caches K and V (b·s·w_kv each, w_kv = kv_heads·d_head: grouped-query
    attention shrinks it by n_heads/kv_heads); an encoder-decoder also caches the
    cross-attention K and V of the encoder output (another ``2·L_dec·b·s·w_kv·p``). An
    encoder has no autoregressive cache (0).
    """
    if cfg.architecture == "encoder":
        return 0
    per = 2 * cfg.decoder_layers * cfg.batch_size * cfg.seq_len * cfg.kv_width
    per *= BYTES_PER_ELEMENT[cfg.dtype]
    return 2 * per if cfg.architecture == "encoder-decoder" else per


def kv_cache_bytes_per_token(cfg: ModelConfig) -> int:
    """KV cache of one token of one sequence: ``2·L_dec·w_kv·p`` (doubled for an
    encoder-decoder's cross-attention cache; 0 for an encoder)."""
    if cfg.architecture == "encoder":
        return 0
    per = 2 * cfg.decoder_layers * cfg.kv_width * BYTES_PER_ELEMENT[cfg.dtype]
    return 2 * per if cfg.architecture == "encoder-decoder" else per


def size_report(cfg: ModelConfig) -> dict:
    """Everything the sizes panel and ``unitscale params`` show, as one JSON-ready dict."""
    params = count_parameters(cfg)
    return {
        "total": params["total"],
        "active": params["active"],
        "components": params["components"],
        "non_embedding": non_embedding_parameters(cfg),
        "flops_per_token": flops_per_token(cfg),
        "memory_bytes": {**training_memory(cfg), "kv_cache": kv_cache_bytes(cfg),
                         "kv_cache_per_token": kv_cache_bytes_per_token(cfg)},
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
