"""Encoder, decoder and encoder-decoder Transformers built from a ModelConfig.

Structured as the seed document's §5.1 classes: an ``Encoder`` is a stack of layers then a
final norm (LayerNorm or RMSNorm, ``cfg.norm_type``; present for every ``cfg.norm``),
``forward(src, mask, src_key_padding_mask)``; a ``Decoder`` takes ``memory`` and does
cross-attention, ``forward(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
memory_key_padding_mask)``. Masks follow PyTorch's convention: bool, True = *not* allowed.

Module names are the tensor names the rest of the program uses: ``layers.{i}.attn.q`` in a
single-stack model, ``encoder.layers.{i}.…`` / ``decoder.layers.{i}.…`` in an encoder-decoder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import positional
from ..config import ConfigError, ModelConfig
from ..sizing import RELATIVE_BUCKETS, RELATIVE_MAX_DISTANCE
from .layers import (
    DecoderLayer,
    Embedding,
    EncoderLayer,
    Linear,
    PositionContext,
    Tap,
    make_norm,
    softcap,
)
from .masks import allowed
from .ops import StandardOps, make_ops

TORCH_DTYPES = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
    # FP8 is simulated on matmul inputs; parameters and other activations stay in fp32.
    "fp8_e4m3": torch.float32, "fp8_e5m2": torch.float32,
}


class Positions(nn.Module):
    """A stack's positional scheme (``ModelConfig.positional``).

    * sinusoidal: ``PE(pos, 2i) = sin(pos/10000^(2i/C))``, ``PE(pos, 2i+1) = cos(…)`` added to
      the token embeddings (Vaswani et al. 2017 §3.5, the seed's §4.2.1);
    * learned: a ``max_len × C`` table added to the embeddings (``table``);
    * relative: T5's bucketed bias ``b[h, bucket(j − i)]`` added to the logits (``rel_bias``,
      Raffel et al. 2020 §2.1; bidirectional in encoders, causal buckets in decoders);
    * rope: the first R = ``cfg.rotary_dims`` dims of each Q and K head rotated by
      ``pos · θ^(−2i/R)``, θ = ``cfg.rope_base`` (Su et al. 2021; partial rotary as GPT-NeoX);
    * alibi: ``−m_h·|i − j|`` added to the logits (Press et al. 2022);
    * none: nothing.
    """

    def __init__(self, cfg: ModelConfig, ops: StandardOps, causal: bool):
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        self.kind = cfg.positional
        self.causal = causal
        if self.kind == "learned":
            self.table = Embedding(cfg.max_len, cfg.d_model, ops)
        elif self.kind == "relative":
            self.rel_bias = Embedding(RELATIVE_BUCKETS, cfg.n_heads, ops)

    def embed(self, x: Tensor) -> Tensor:
        """Add absolute positions to token embeddings ``x: (B, T, C)``."""
        t = x.shape[1]
        if self.kind == "learned":
            return self.ops.add_positions(x, self.table(torch.arange(t, device=x.device)))
        if self.kind == "sinusoidal":
            pe = torch.from_numpy(positional.sinusoidal(t, self.cfg.d_model))
            return self.ops.add_positions(x, pe.to(device=x.device, dtype=x.dtype))
        return x

    def context(self, t: int, device: torch.device, dtype: torch.dtype) -> PositionContext:
        """Logit bias, rotary angles and attention pattern for self-attention over t tokens."""
        cfg = self.cfg
        ctx = PositionContext(allowed=allowed(t, t, cfg.attention, cfg.window, self.causal,
                                              device=device),
                              causal=self.causal or cfg.attention == "causal")
        if self.kind == "relative":
            rel = positional.relative_positions(t, t)  # (T, T): key − query
            buckets = positional.t5_relative_bucket(
                rel, bidirectional=not self.causal, num_buckets=RELATIVE_BUCKETS,
                max_distance=RELATIVE_MAX_DISTANCE)
            idx = torch.from_numpy(buckets).to(device)
            ctx.bias = self.rel_bias(idx).permute(2, 0, 1).to(dtype)  # (H, T, T)
        elif self.kind == "alibi":
            ctx.bias = torch.from_numpy(positional.alibi_bias(cfg.n_heads, t)).to(device, dtype)
        elif self.kind == "rope":
            # the first rotary_dims of each head, θ_i = rope_base^(−2i/rotary_dims) (NeoX)
            theta = torch.from_numpy(positional.rope_angles(t, cfg.rotary_dims,
                                                            cfg.rope_base)).to(device)
            ctx.rope = (theta.cos().to(dtype), theta.sin().to(dtype))  # (T, R/2) each
        return ctx


def _pattern_override(mask: Tensor | None, ctx: PositionContext) -> PositionContext:
    """A caller's mask (bool, True = blocked) replaces the configured pattern."""
    if mask is not None:
        ctx.allowed = ~mask.bool()
    return ctx


def _stack_taus(ops: StandardOps, n_layers: int, per_layer: list[str]) -> list[tuple]:
    """Residual weights of each layer's sub-blocks, from the parametrization's depth rule."""
    taus = ops.taus(per_layer * n_layers)
    k = len(per_layer)
    return [tuple(taus[i * k:(i + 1) * k]) for i in range(n_layers)]


class Encoder(nn.Module):
    """A stack of encoder layers then a final norm (the seed's §5.1.1 ``Encoder``).

    Tap ``embed``: token embeddings plus absolute positions, the residual stream's start.
    """

    causal = False

    def __init__(self, cfg: ModelConfig, n_layers: int, ops: StandardOps):
        super().__init__()
        self.pos = Positions(cfg, ops, causal=self.causal)
        self.embed = Tap()
        taus = _stack_taus(ops, n_layers, ["attn", "mlp"])
        self.layers = nn.ModuleList([EncoderLayer(cfg, ops, taus[i]) for i in range(n_layers)])
        self.norm = make_norm(cfg, ops)

    def forward(self, src: Tensor, mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None) -> Tensor:
        """``src: (B, T, C)`` token embeddings → ``(B, T, C)``."""
        x = self.embed(self.pos.embed(src))
        ctx = _pattern_override(mask, self.pos.context(x.shape[1], x.device, x.dtype))
        for layer in self.layers:
            x = layer(x, ctx, src_key_padding_mask)
        return self.norm(x)


class Decoder(nn.Module):
    """Causal self-attention + cross-attention layers, then a final norm (§5.1.2)."""

    def __init__(self, cfg: ModelConfig, n_layers: int, ops: StandardOps):
        super().__init__()
        self.pos = Positions(cfg, ops, causal=True)
        self.embed = Tap()
        taus = _stack_taus(ops, n_layers, ["attn", "attn", "mlp"])
        self.layers = nn.ModuleList([DecoderLayer(cfg, ops, taus[i]) for i in range(n_layers)])
        self.norm = make_norm(cfg, ops)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None) -> Tensor:
        """``tgt: (B, T, C)`` embeddings, ``memory: (B, S, C)`` encoder output → ``(B, T, C)``."""
        x = self.embed(self.pos.embed(tgt))
        ctx = _pattern_override(tgt_mask, self.pos.context(x.shape[1], x.device, x.dtype))
        cross = _pattern_override(memory_mask, PositionContext())
        for layer in self.layers:
            x = layer(x, ctx, memory, cross, tgt_key_padding_mask, memory_key_padding_mask)
        return self.norm(x)


class CausalEncoder(Encoder):
    """A decoder-only model's stack: encoder layers (no cross-attention) with causal masks."""

    causal = True


class TransformerLM:
    """Mixin for the token embedding, output head and loss shared by every architecture."""

    cfg: ModelConfig
    ops: StandardOps
    tok_emb: Embedding
    head: Linear

    def _init_embeddings(self, cfg: ModelConfig, ops: StandardOps) -> None:
        self.cfg = cfg
        self.ops = ops
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model, ops)
        self.head = Linear(cfg.d_model, cfg.vocab_size, False, ops, role="readout")
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        """Every attention block in execution order, with its qualified name."""
        from .layers import Attention

        return [(n, m) for n, m in self.named_modules() if isinstance(m, Attention)]

    def logits(self, h: Tensor) -> Tensor:
        """The head's vocabulary logits ``(B, T, V)`` from the stack's output, soft-capped
        ``c·tanh(z/c)`` when ``cfg.logit_softcap`` is set (Gemma 2, before the loss)."""
        return softcap(self.head(h), self.cfg.logit_softcap)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy, mean over all B·T tokens, as the parametrization computes it."""
        return self.ops.loss(logits, targets)


class EncoderOnlyModel(Encoder, TransformerLM):
    """BERT-like: embeddings → encoder stack → per-token vocabulary logits."""

    def __init__(self, cfg: ModelConfig, ops: StandardOps):
        Encoder.__init__(self, cfg, cfg.n_layers, ops)
        self._init_embeddings(cfg, ops)

    def hidden(self, idx: Tensor) -> Tensor:
        """``idx: (B, T)`` → the stack's output ``(B, T, C)``, without the vocabulary head."""
        return Encoder.forward(self, self.tok_emb(idx))

    def forward(self, idx: Tensor, mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None) -> Tensor:
        """``idx: (B, T)`` token ids → logits ``(B, T, V)``."""
        return self.logits(Encoder.forward(self, self.tok_emb(idx), mask, src_key_padding_mask))


class DecoderOnlyModel(CausalEncoder, TransformerLM):
    """GPT-like: embeddings → causal stack → next-token logits."""

    def __init__(self, cfg: ModelConfig, ops: StandardOps):
        CausalEncoder.__init__(self, cfg, cfg.n_layers, ops)
        self._init_embeddings(cfg, ops)

    def hidden(self, idx: Tensor) -> Tensor:
        """``idx: (B, T)`` → the stack's output ``(B, T, C)``, without the vocabulary head."""
        return CausalEncoder.forward(self, self.tok_emb(idx))

    def forward(self, idx: Tensor, mask: Tensor | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """``idx: (B, T)`` token ids → logits ``(B, T, V)``."""
        return self.logits(CausalEncoder.forward(self, self.tok_emb(idx), mask,
                                                 key_padding_mask))


class EncoderDecoderModel(nn.Module, TransformerLM):
    """Vaswani et al. 2017: encoder over the source, decoder over the target, shared embedding."""

    def __init__(self, cfg: ModelConfig, ops: StandardOps):
        super().__init__()
        self._init_embeddings(cfg, ops)
        self.encoder = Encoder(cfg, cfg.encoder_layers, ops)
        self.decoder = Decoder(cfg, cfg.decoder_layers, ops)

    def hidden(self, src: Tensor, tgt: Tensor | None = None) -> Tensor:
        """The decoder's output ``(B, T, C)`` for ``src`` (and ``tgt``, default ``src``)."""
        memory = self.encoder(self.tok_emb(src))
        return self.decoder(self.tok_emb(src if tgt is None else tgt), memory)

    def forward(self, src: Tensor, tgt: Tensor, src_key_padding_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None) -> Tensor:
        """``src: (B, S)``, ``tgt: (B, T)`` token ids → logits ``(B, T, V)``."""
        memory = self.encoder(self.tok_emb(src), None, src_key_padding_mask)
        y = self.decoder(self.tok_emb(tgt), memory, None, None, tgt_key_padding_mask,
                         src_key_padding_mask)
        return self.logits(y)


ARCHITECTURE_CLASSES = {
    "encoder": EncoderOnlyModel,
    "decoder": DecoderOnlyModel,
    "encoder-decoder": EncoderDecoderModel,
}


def unsupported_fields(cfg: ModelConfig) -> dict[str, str]:
    """The issue-21 fields ``cfg`` sets that the torch model does not build yet, each with
    the reason; empty when the model computes everything ``cfg`` asks for.

    Implemented: ``rope_base``, ``rotary_fraction`` (partial rotary), ``attn_softcap``,
    ``logit_softcap``, ``parallel_residual`` (``layers.EncoderLayer._parallel``),
    ``n_kv_heads`` (GQA/MQA), ``head_dim`` (``n_heads × head_dim`` need not be ``d_model``),
    ``qkv_bias`` (q/k/v biases apart from ``bias``), ``activation='geglu'``, ``n_experts``
    / ``experts_per_token`` (a routed MoE feed-forward, ``layers.MoE``), ``norm_type``
    (RMSNorm), ``norm`` sandwich / branch_output and ``qk_norm`` (head / all_heads), all
    under every parametrization and architecture (``layers.EncoderLayer``,
    ``layers.RMSNorm``).
    """
    return {}


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> nn.Module:
    """The torch model ``cfg`` describes, seeded with ``cfg.seed``, PyTorch's default init.

    ``count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())``.
    Weights are created in the config's dtype for fp32/bf16/fp16; FP8 configs keep fp32
    storage (FP8 is a simulated cast of matmul inputs).

    The parametrization decides initialisation and every op (:mod:`.ops`).
    A config using a field the model does not build yet (:func:`unsupported_fields`) is
    refused with a :class:`~unitscale_core.config.ConfigError` naming each field, never
    built as a different model.
    """
    missing = unsupported_fields(cfg)
    if missing:
        raise ConfigError(missing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = ARCHITECTURE_CLASSES[cfg.architecture](cfg, make_ops(cfg.parametrization,
                                                                      cfg.dtype))
    return model.to(device=device, dtype=TORCH_DTYPES[cfg.dtype])
