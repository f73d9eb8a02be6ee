"""Transformer building blocks: attention, feed-forward, encoder and decoder layers.

Shapes in comments: B batch, T query length, S key length, C = d_model, H heads, D = C / H,
F = d_ff. Every op goes through ``ops`` (see :mod:`.ops`), so one set of modules serves the
standard, unit-scaled and u-μP parametrizations. ``Tap`` modules are identity points whose
module names are the tensor names measurement reports (``layers.0.attn.probs`` …).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .ops import StandardOps


class Tap(nn.Identity):
    """A named point in the forward pass; hooks on it see the tensor and its gradient."""


class Linear(nn.Linear):
    """``nn.Linear`` whose product is the parametrization's (``ops.linear``).

    ``role`` is ``"hidden"``, ``"ffn"`` (feed-forward matrices, whose factors mirror each
    other), ``"router"`` (a MoE router: forward-scaled under unit too) or ``"readout"`` (the
    output head, which u-μP scales by ``1/fan_in``). Initialised by ``ops.init_linear``.
    """

    def __init__(self, fan_in: int, fan_out: int, bias: bool, ops: StandardOps,
                 role: str = "hidden"):
        super().__init__(fan_in, fan_out, bias=bias)
        self.ops, self.role = ops, role
        ops.init_linear(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.linear(x, self.weight, self.bias, self.role)


class Embedding(nn.Embedding):
    """``nn.Embedding`` (N(0, 1)) looked up through ``ops.embedding``."""

    def __init__(self, rows: int, dim: int, ops: StandardOps):
        super().__init__(rows, dim)
        self.ops = ops
        ops.init_embedding(self)

    def forward(self, ids: Tensor) -> Tensor:
        return self.ops.embedding(ids, self.weight)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over ``dim`` (default ``d_model``; gain 1, bias 0; bias only with
    ``cfg.bias``; ε = 1e-5, torch's default) through ``ops``."""

    def __init__(self, cfg: ModelConfig, ops: StandardOps, dim: int | None = None):
        super().__init__(cfg.d_model if dim is None else dim, bias=cfg.bias)
        self.ops = ops

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.layer_norm(x, self)


#: RMSNorm's ε when a config does not say (ModelConfig has no ε field): Llama 2/3 checkpoints
#: use 1e-5 or 1e-6, Gemma 1e-6, OLMo 2 1e-6; a checkpoint loader sets ``eps`` from its file.
RMSNORM_EPS = 1e-6


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): ``y = x / √(mean(x²) + ε) · g`` over the last dim.

    Gain ``g`` of size ``dim`` (initialised to 1), never a bias, no mean removal (Llama, Gemma,
    OLMo 2). Computed by ``ops.rms_norm``: ``torch.nn.functional.rms_norm`` (standard) or
    ``unit_scaling.functional.rms_norm`` (unit, u-μP), whose forward is the same — an RMSNorm
    output already has RMS 1 at gain 1, whatever its input's scale, so nothing needs scaling —
    and whose gain gradient (a sum over the b positions) is scaled by ``b^-½``.
    """

    def __init__(self, dim: int, ops: StandardOps, eps: float = RMSNORM_EPS):
        super().__init__()
        self.ops = ops
        self.normalized_shape = (dim,)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.rms_norm(x, self)


#: Every norm module class (what measurement records and u-μP tags as ``norm``).
NORM_CLASSES = (LayerNorm, RMSNorm)


def make_norm(cfg: ModelConfig, ops: StandardOps, dim: int | None = None) -> nn.Module:
    """The config's norm (``cfg.norm_type``) over ``dim`` features (default ``d_model``):
    :class:`LayerNorm` (with a bias when ``cfg.bias``) or :class:`RMSNorm` (gain only)."""
    if cfg.norm_type == "rmsnorm":
        return RMSNorm(cfg.d_model if dim is None else dim, ops)
    return LayerNorm(cfg, ops, dim)


@dataclass
class PositionContext:
    """What a stack's positional scheme hands every attention block of that stack.

    ``bias``: additive logits bias ``(H, T, S)`` (T5 relative buckets or ALiBi) or None;
    ``rope``: ``(cos, sin)`` each ``(T, D/2)`` for rotary embeddings, or None;
    ``allowed``: bool ``(T, S)`` attention pattern, or None for full attention;
    ``causal``: whether the pattern hides future keys (u-μP's attention model uses it).
    """

    bias: Tensor | None = None
    rope: tuple[Tensor, Tensor] | None = None
    allowed: Tensor | None = None
    causal: bool = False


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (2i, 2i+1) of the first R = 2·cos.shape[-1] dims by angle θ (Su et al.
    2021, eq. 34); the other D − R dims pass through (partial rotary, GPT-NeoX ``rotary_pct``).

    ``x: (B, H, T, D)``, ``cos, sin: (T, R/2)``;
    ``(x₀, x₁) ↦ (x₀ cos θ − x₁ sin θ, x₀ sin θ + x₁ cos θ)``.
    """
    r = 2 * cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    x0, x1 = rot[..., 0::2], rot[..., 1::2]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


def softcap(z: Tensor, cap: float | None) -> Tensor:
    """Soft cap ``c·tanh(z/c)`` (Gemma 2); identity when ``cap`` is None.

    The same op under every parametrization: for ``|z| ≪ c`` it is the identity (slope 1),
    so a unit-scaled logit (RMS ≈ 1 ≪ c = 30 or 50) keeps its scale and its gradient.
    """
    return z if cap is None else cap * torch.tanh(z / cap)


#: activations with a gate projection (``ffn.gate``)
GATED = ("swiglu", "geglu")


class Attention(nn.Module):
    """Multi-head attention: ``softmax(QKᵀ·m + bias + mask) V``, then an output projection.

    ``m = 1/√D`` (standard, unit) or ``1/D`` (u-μP), ``D = cfg.head_size`` (``head_dim``, or
    ``d_model / n_heads``). Projections ``q: C → H·D``, ``k, v: C → H_kv·D`` (biases per
    ``cfg.has_qkv_bias``), ``o: H·D → C`` (bias per ``cfg.bias``). Grouped-query attention
    (Ainslie et al. 2023; MQA for ``H_kv = 1``): each of the ``H_kv`` key/value heads serves
    its group of ``g = H / H_kv`` consecutive query heads (query head ``h`` reads kv head
    ``h // g``, HF's ``repeat_kv``), repeated by ``ops.repeat_kv`` (see there for the unit
    scaling of the repeat). Self-attention when ``memory`` is None, cross-attention otherwise
    (keys and values from ``memory``). When ``capture`` is set, the probabilities
    ``(B, H, T, S)`` — one map per query head — are kept in ``self.probs`` without changing
    the output. Taps: ``scores`` (logits before masking), ``probs``, ``context`` (``P V``,
    heads merged).
    """

    def __init__(self, cfg: ModelConfig, ops: StandardOps):
        super().__init__()
        c = cfg.d_model
        self.ops = ops
        self.n_heads = cfg.n_heads
        #: key/value heads (GQA: fewer than n_heads; MQA: 1) and the head size D
        self.kv_heads = cfg.kv_heads
        self.head_size = cfg.head_size
        self.q = Linear(c, cfg.attn_width, cfg.has_qkv_bias, ops)
        self.k = Linear(c, cfg.kv_width, cfg.has_qkv_bias, ops)
        self.v = Linear(c, cfg.kv_width, cfg.has_qkv_bias, ops)
        #: QK-norm (``cfg.norm_type``) after the projections, before rope: "head" over each
        #: head's D dims with one gain of size D shared by the heads (Qwen 3, Gemma 3);
        #: "all_heads" over the whole projection, gains H·D and H_kv·D (OLMo 2)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            head = cfg.qk_norm == "head"
            self.q_norm = make_norm(cfg, ops, cfg.head_size if head else cfg.attn_width)
            self.k_norm = make_norm(cfg, ops, cfg.head_size if head else cfg.kv_width)
        self.scores = Tap()
        self.probs_tap = Tap()
        self.context = Tap()
        self.o = Linear(cfg.attn_width, c, cfg.bias, ops)
        self.dropout = cfg.dropout
        self.softcap = cfg.attn_softcap
        self.capture = False
        #: applied to the probabilities before they are kept (e.g. block-averaging on the
        #: device so a long sequence never keeps a full [H, T, S] map per layer)
        self.capture_fn: Callable[[Tensor], object] | None = None
        self.probs: Tensor | None = None
        #: a caller's array of the probabilities' shape that the softmax writes into when no
        #: gradient is needed (the maps of every layer land in one array without a copy)
        self.probs_out: Tensor | None = None

    def _heads(self, x: Tensor) -> Tensor:
        """``(B, T, heads·D) → (B, heads, T, D)`` for the query or the key/value heads."""
        b, t, width = x.shape
        return x.view(b, t, width // self.head_size, self.head_size).transpose(1, 2)

    def forward(self, x: Tensor, ctx: PositionContext, memory: Tensor | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        ops = self.ops
        src = x if memory is None else memory
        q, k, v = self.q(x), self.k(src), self.v(src)
        if self.qk_norm == "all_heads":  # (B, T, H·D) and (B, S, H_kv·D) as a whole
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.qk_norm == "head":  # each head's D dims, one gain shared by the heads
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        if self.kv_heads != self.n_heads:  # GQA/MQA: (B, H_kv, S, D) → (B, H, S, D)
            group = self.n_heads // self.kv_heads
            k, v = ops.repeat_kv(k, group), ops.repeat_kv(v, group)
        q, k, v = ops.attention_in(q, k, v, ctx.causal)
        # the soft cap acts on the scaled logits, before any bias or mask (Gemma 2)
        scores = self.scores(softcap(ops.scores(q, k), self.softcap))  # (B, H, T, S)
        if ctx.bias is not None:
            scores = scores + ctx.bias
        keep = ctx.allowed  # (T, S)
        if key_padding_mask is not None:  # (B, S), True = padding (torch's convention)
            pad_keep = ~key_padding_mask[:, None, None, :]
            keep = pad_keep if keep is None else keep & pad_keep
        scores = ops.softmax_in(scores, ctx.causal)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        out = self.probs_out
        if out is not None and out.shape == scores.shape and out.dtype == scores.dtype \
                and not scores.requires_grad:
            probs = torch.softmax(scores, dim=-1, out=out)
        else:
            probs = torch.softmax(scores, dim=-1)
        if key_padding_mask is not None:  # a query whose keys are all padding attends to nothing
            probs = torch.nan_to_num(probs, nan=0.0)
        probs = self.probs_tap(probs)
        if self.capture:
            self.probs = probs.detach() if self.capture_fn is None else \
                self.capture_fn(probs.detach())
        probs = ops.dropout(ops.softmax_out(probs, ctx.causal), self.dropout, self.training)
        y = ops.attention_out(ops.attend(probs, v), k.shape[-2], ctx.causal)  # (B, H, T, D)
        return self.o(self.context(y.transpose(1, 2).flatten(2)))  # (B, T, C)


class FeedForward(nn.Module):
    """``down(act(up(x)))``; SwiGLU: ``down(silu(gate(x)) ⊙ up(x))``, GeGLU:
    ``down(gelu_tanh(gate(x)) ⊙ up(x))`` (Shazeer 2020; Gemma's ``gelu_pytorch_tanh``)."""

    def __init__(self, cfg: ModelConfig, ops: StandardOps):
        super().__init__()
        c, f = cfg.d_model, cfg.d_ff
        self.ops = ops
        self.activation = cfg.activation
        if cfg.activation in GATED:
            self.gate = Linear(c, f, cfg.bias, ops, role="ffn")
        self.up = Linear(c, f, cfg.bias, ops, role="ffn")
        self.act = Tap()
        self.down = Linear(f, c, cfg.bias, ops, role="ffn")

    def forward(self, x: Tensor) -> Tensor:
        if self.activation == "swiglu":
            h = self.ops.swiglu(self.up(x), self.gate(x))  # (B, T, F)
        elif self.activation == "geglu":
            h = self.ops.geglu(self.up(x), self.gate(x))  # (B, T, F)
        else:
            h = self.ops.activation(self.up(x), self.activation)
        return self.down(self.act(h))  # (B, T, C); the residual branch applies dropout


class MoE(nn.Module):
    """Routed mixture-of-experts feed-forward (Mixtral, Jiang et al. 2024), named ``moe``.

    ``p = softmax(router(x))`` over the E experts (``router: Linear(C, E)``, no bias, softmax
    in fp32), the k largest kept and renormalised, ``p̂_i = p_i / Σ_top-k p``; the output is
    ``Σ_k p̂_k · expert_k(x)``, each expert a dense :class:`FeedForward` (``experts.{e}``,
    up/gate/down per the activation). An expert that no token of the batch chose is not run
    (as transformers' ``MixtralExperts``): its modules record no tensor and its weights get no
    gradient. The weighted sum is ``ops.moe_combine`` (unit scaling: see there); under
    unit/u-μP the router is forward-scaled (``role="router"``) so its logits have unit RMS
    whatever the constraint, as the attention logits do.
    """

    def __init__(self, cfg: ModelConfig, ops: StandardOps):
        super().__init__()
        self.ops = ops
        self.n_experts, self.k = cfg.n_experts, cfg.experts_per_token
        self.router = Linear(cfg.d_model, cfg.n_experts, False, ops, role="router")
        self.experts = nn.ModuleList([FeedForward(cfg, ops) for _ in range(cfg.n_experts)])

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x: (N, C)`` → (renormalised top-k weights ``(N, k)`` fp32, expert ids ``(N, k)``)."""
        probs = torch.softmax(self.router(x).float(), dim=-1)  # (N, E)
        top, idx = probs.topk(self.k, dim=-1)
        return top / top.sum(dim=-1, keepdim=True), idx

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        weights, idx = self.route(flat)
        slots = flat.new_zeros(flat.shape[0], self.k, shape[-1])  # expert outputs (N, k, C)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                slots = slots.index_put((tok, slot), expert(flat[tok]))
        y = self.ops.moe_combine(weights.to(x.dtype), slots, self.n_experts)
        return y.view(shape)


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each in a τ-weighted residual branch.

    Norm placements (``cfg.norm``; each norm is ``make_norm``'s, per ``cfg.norm_type``):

    * pre: ``x ← add(f(norm(x)), x)`` (GPT-2, Llama);
    * post: ``x ← norm(add(f(x), x))`` (Vaswani et al. 2017, BERT);
    * sandwich: ``x ← add(out_norm(f(norm(x))), x)`` (Gemma 2);
    * branch_output: ``x ← add(out_norm(f(x)), x)`` (OLMo 2; no input norm: ``norm1``,
      ``norm2`` are absent),

    where ``add`` is the parametrization's residual add (τ-weighted when unit-scaled) and
    ``norm``/``out_norm`` are ``norm1``/``attn_out_norm`` for attention and ``norm2``/
    ``ffn_out_norm`` for the feed-forward. Under unit and u-μP the split/add is the pre-norm
    one for sandwich and branch_output too: ``residual_add`` assumes a unit-scaled branch, and
    an output norm (gain 1) makes the branch exactly unit-RMS whatever ``f``'s own scale, so
    the τ-weighted sum keeps the stream at the scale the depth rule plans for; the branch's
    gradient passes the output norm's backward, which is scale-free (``∂(x/rms(x))`` is
    ``1/rms(x)`` times a projection), so the split's backward scale still applies. For
    branch_output the sub-block reads the raw stream, which the τ-weighted adds keep near
    unit RMS (standard lets it grow, as OLMo 2 does).
    Tap ``after_attn`` is the residual stream between the two sub-blocks.
    """

    def __init__(self, cfg: ModelConfig, ops: StandardOps, taus: tuple[float, ...]):
        super().__init__()
        self.ops = ops
        self.taus = taus
        #: "pre", "post", "sandwich" or "branch_output"
        self.placement = cfg.norm
        self.pre_norm = cfg.norm in ("pre", "sandwich")  # a norm on the sub-block's input
        #: GPT-J / GPT-NeoX's parallel block (every sub-block reads the layer's input)
        self.parallel = cfg.parallel_residual
        self.dropout = cfg.dropout
        out_norms = cfg.norm in ("sandwich", "branch_output")
        in_norms = cfg.norm != "branch_output"
        self.norm1 = make_norm(cfg, ops) if in_norms else None
        self.attn = Attention(cfg, ops)
        self.attn_out_norm = make_norm(cfg, ops) if out_norms else None
        self.after_attn = Tap()
        self.norm2 = make_norm(cfg, ops) if in_norms else None
        #: the feed-forward sub-block: ``ffn`` (dense) or ``moe`` (n_experts > 1)
        self.ffn_name = "moe" if cfg.is_moe else "ffn"
        setattr(self, self.ffn_name, MoE(cfg, ops) if cfg.is_moe else FeedForward(cfg, ops))
        self.ffn_out_norm = make_norm(cfg, ops) if out_norms else None

    def feed_forward(self, x: Tensor) -> Tensor:
        """The layer's feed-forward sub-block (``ffn`` or ``moe``) on ``x``."""
        return getattr(self, self.ffn_name)(x)

    def _residual(self, x: Tensor, norm: nn.Module | None, branch: Callable[[Tensor], Tensor],
                  tau: float, out_norm: nn.Module | None = None) -> Tensor:
        """One sub-block ``branch`` with its norms (class docstring): ``norm`` before it
        (pre, sandwich) or after the add (post), ``out_norm`` on its output (sandwich,
        branch_output)."""
        ops = self.ops
        res, skip = ops.residual_split(x, tau)
        if self.pre_norm:
            res = norm(res)
        h = branch(res)
        if out_norm is not None:
            h = out_norm(h)
        y = ops.residual_add(ops.dropout(h, self.dropout, self.training), skip, tau)
        return norm(y) if self.placement == "post" else y

    def _parallel(self, x: Tensor,
                  branches: list[tuple[nn.Module, Callable[[Tensor], Tensor], float]]) -> Tensor:
        """Parallel sub-blocks ``(norm, f, τ)`` all reading ``x`` (GPT-J, GPT-NeoX):
        standard ``x + Σ_i f_i(norm_i(x))``.

        Unit scaling: the branches are added to the skip one after another in the order
        given, ``s ← residual_add(f_i, s, τ_i)``, with the same τ's the depth rule gives the
        sequential sub-blocks; with unit, uncorrelated branches the output has unit RMS and
        branch i the weight ``c_i = τ_i/√(1 + τ_i²) · Π_{j>i} 1/√(1 + τ_j²)`` (the skip
        ``Π_j 1/√(1 + τ_j²)``; ``Σ c² = 1``), exactly the share of the stream it has after a
        sequential layer. The splits are taken in the reverse order,
        ``(r_i, x) ← residual_split(x, τ_i)`` from the last branch to the first, which gives
        each branch input the backward scale ``c_i`` and the skip the skip's: every
        forward weight meets its own backward scale, so the gradient is the true one (the
        sequential split/add pair's "delayed" branch scaling, three ways)."""
        ops, p = self.ops, self.dropout
        inputs = []
        for _norm, _f, tau in reversed(branches):
            res, x = ops.residual_split(x, tau)
            inputs.append(res)
        for (norm, f, tau), res in zip(branches, reversed(inputs)):
            x = ops.residual_add(ops.dropout(f(norm(res)), p, self.training), x, tau)
        return x

    def forward(self, x: Tensor, ctx: PositionContext,
                key_padding_mask: Tensor | None = None) -> Tensor:
        if self.parallel:  # x + attn(norm1(x)) + ffn(norm2(x)): no after_attn
            return self._parallel(x, [
                (self.norm1, lambda h: self.attn(h, ctx, None, key_padding_mask), self.taus[0]),
                (self.norm2, self.feed_forward, self.taus[1])])
        x = self._residual(x, self.norm1, lambda h: self.attn(h, ctx, None, key_padding_mask),
                           self.taus[0], self.attn_out_norm)
        return self._residual(self.after_attn(x), self.norm2, self.feed_forward, self.taus[1],
                              self.ffn_out_norm)


class DecoderLayer(EncoderLayer):
    """Masked self-attention, cross-attention over ``memory``, then feed-forward.

    ``taus`` = (self-attention, cross-attention, feed-forward); tap ``after_cross``. With
    ``parallel_residual`` all three read the layer's input (``_parallel``; no published model
    does this, it is the parallel block's rule applied to the decoder's three sub-blocks).
    Cross-attention's norms follow the same placement: ``cross_norm`` (absent for
    branch_output) and ``cross_out_norm`` (sandwich, branch_output).
    """

    def __init__(self, cfg: ModelConfig, ops: StandardOps, taus: tuple[float, ...]):
        super().__init__(cfg, ops, (taus[0], taus[2]))
        self.cross_tau = taus[1]
        self.cross_norm = make_norm(cfg, ops) if cfg.norm != "branch_output" else None
        self.cross_attn = Attention(cfg, ops)
        self.cross_out_norm = (make_norm(cfg, ops) if cfg.norm in ("sandwich", "branch_output")
                               else None)
        self.after_cross = Tap()

    def forward(self, x: Tensor, ctx: PositionContext, memory: Tensor | None = None,
                cross_ctx: PositionContext | None = None,
                tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None) -> Tensor:
        if self.parallel:  # x + attn(norm1 x) + cross(cross_norm x, memory) + ffn(norm2 x)
            return self._parallel(x, [
                (self.norm1, lambda h: self.attn(h, ctx, None, tgt_key_padding_mask),
                 self.taus[0]),
                (self.cross_norm, lambda h: self.cross_attn(
                    h, cross_ctx or PositionContext(), memory, memory_key_padding_mask),
                 self.cross_tau),
                (self.norm2, self.feed_forward, self.taus[1])])
        x = self._residual(x, self.norm1,
                           lambda h: self.attn(h, ctx, None, tgt_key_padding_mask), self.taus[0],
                           self.attn_out_norm)
        x = self._residual(self.after_attn(x), self.cross_norm, lambda h: self.cross_attn(
            h, cross_ctx or PositionContext(), memory, memory_key_padding_mask), self.cross_tau,
            self.cross_out_norm)
        return self._residual(self.after_cross(x), self.norm2, self.feed_forward, self.taus[1],
                              self.ffn_out_norm)
