"""Transformer building blocks: attention, feed-forward, encoder and decoder layers.

Shapes in comments: B batch, T query length, S key length, C = d_model, H heads, D = C / H,
F = d_ff. Parametrization ``standard`` = plain ``torch.nn`` with PyTorch's default
initialisations and no scale factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig


@dataclass
class PositionContext:
    """What a stack's positional scheme hands every attention block of that stack.

    ``bias``: additive logits bias ``(H, T, S)`` (T5 relative buckets or ALiBi) or None;
    ``rope``: ``(cos, sin)`` each ``(T, D/2)`` for rotary embeddings, or None;
    ``allowed``: bool ``(T, S)`` attention pattern, or None for full attention.
    """

    bias: Tensor | None = None
    rope: tuple[Tensor, Tensor] | None = None
    allowed: Tensor | None = None


def make_norm(cfg: ModelConfig) -> nn.LayerNorm:
    """LayerNorm over C with gain (and bias when ``cfg.bias``), PyTorch's default init."""
    return nn.LayerNorm(cfg.d_model, bias=cfg.bias)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (2i, 2i+1) of the last dim by angle θ (Su et al. 2021, eq. 34).

    ``x: (B, H, T, D)``, ``cos, sin: (T, D/2)``;
    ``(x₀, x₁) ↦ (x₀ cos θ − x₁ sin θ, x₀ sin θ + x₁ cos θ)``.
    """
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    """Multi-head attention: ``softmax(QKᵀ/√D + bias + mask) V``, then an output projection.

    Self-attention when ``memory`` is None, cross-attention otherwise (keys and values from
    ``memory``). When ``capture`` is set, the probabilities ``(B, H, T, S)`` are kept in
    ``self.probs`` without changing the output.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.d_model
        self.n_heads = cfg.n_heads
        self.q = nn.Linear(c, c, bias=cfg.bias)
        self.k = nn.Linear(c, c, bias=cfg.bias)
        self.v = nn.Linear(c, c, bias=cfg.bias)
        self.o = nn.Linear(c, c, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.capture = False
        self.probs: Tensor | None = None

    def _heads(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        return x.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: Tensor, ctx: PositionContext, memory: Tensor | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        src = x if memory is None else memory
        q, k, v = self._heads(self.q(x)), self._heads(self.k(src)), self._heads(self.v(src))
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
        if ctx.bias is not None:
            scores = scores + ctx.bias
        keep = ctx.allowed  # (T, S)
        if key_padding_mask is not None:  # (B, S), True = padding (torch's convention)
            pad_keep = ~key_padding_mask[:, None, None, :]
            keep = pad_keep if keep is None else keep & pad_keep
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if key_padding_mask is not None:  # a query whose keys are all padding attends to nothing
            probs = torch.nan_to_num(probs, nan=0.0)
        if self.capture:
            self.probs = probs.detach()
        probs = F.dropout(probs, self.dropout, self.training)
        y = (probs @ v).transpose(1, 2).flatten(2)  # (B, T, C)
        return self.o(y)


class FeedForward(nn.Module):
    """``down(act(up(x)))``; SwiGLU: ``down(silu(gate(x)) ⊙ up(x))`` (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, f = cfg.d_model, cfg.d_ff
        self.activation = cfg.activation
        if cfg.activation == "swiglu":
            self.gate = nn.Linear(c, f, bias=cfg.bias)
        self.up = nn.Linear(c, f, bias=cfg.bias)
        self.down = nn.Linear(f, c, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.activation == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)  # (B, T, F)
        elif self.activation == "relu":
            h = F.relu(self.up(x))
        else:
            h = F.gelu(self.up(x))
        return self.down(h)  # (B, T, C); the residual branch applies dropout


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each in a residual branch.

    pre-norm: ``x + f(norm(x))``; post-norm: ``norm(x + f(x))`` (Vaswani et al. 2017).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.dropout = cfg.dropout
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.ffn = FeedForward(cfg)

    def _residual(self, x: Tensor, norm: nn.Module, branch) -> Tensor:
        if self.pre_norm:
            return x + F.dropout(branch(norm(x)), self.dropout, self.training)
        return norm(x + F.dropout(branch(x), self.dropout, self.training))

    def forward(self, x: Tensor, ctx: PositionContext,
                key_padding_mask: Tensor | None = None) -> Tensor:
        x = self._residual(x, self.norm1, lambda h: self.attn(h, ctx, None, key_padding_mask))
        return self._residual(x, self.norm2, self.ffn)


class DecoderLayer(EncoderLayer):
    """Masked self-attention, cross-attention over ``memory``, then feed-forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.cross_norm = make_norm(cfg)
        self.cross_attn = Attention(cfg)

    def forward(self, x: Tensor, ctx: PositionContext, memory: Tensor | None = None,
                cross_ctx: PositionContext | None = None,
                tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None) -> Tensor:
        x = self._residual(x, self.norm1,
                           lambda h: self.attn(h, ctx, None, tgt_key_padding_mask))
        x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(
            h, cross_ctx or PositionContext(), memory, memory_key_padding_mask))
        return self._residual(x, self.norm2, self.ffn)
