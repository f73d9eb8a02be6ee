"""Attention maps for the attention panel and ``unitscale attention``: capture and summaries.

Sources: the configured model (random init, any parametrization) or a checkpoint loaded by
:mod:`.pretrained`. Text enters through the checkpoint's tokenizer; a configured model uses
the bundled all-MiniLM-L6-v2 WordPiece tokenizer and folds its ids into the config's
vocabulary (``id mod vocab_size``), which the result's ``note`` says.

Summaries: head average, per-head entropy, and attention rollout (Abnar & Zuidema 2020).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .config import ModelConfig


@dataclass
class AttentionResult:
    """Every layer's attention for one text.

    ``attentions``: float32 ``[layers, heads, query, key]`` (self-attention; for an
    encoder-decoder the decoder's); ``encoder_attentions`` the encoder's self-attention and
    ``cross_attentions`` ``[layers, heads, target, source]`` for encoder-decoder configs;
    ``tokens`` label the axes (``source_tokens`` the cross-attention keys); ``truncated``
    counts text tokens cut to fit the model's positions; ``allowed`` is the configured
    attention pattern ``[query, key]`` (None: every key allowed).
    """

    attentions: np.ndarray
    tokens: list[str]
    truncated: int = 0
    note: str = ""
    cross_attentions: np.ndarray | None = None
    encoder_attentions: np.ndarray | None = None
    source_tokens: list[str] = field(default_factory=list)
    allowed: np.ndarray | None = None
    #: > 1 when ``attentions`` were block-averaged by this factor on the device (long texts);
    #: then ``entropy`` [layers, heads], ``average`` [layers, t, s] and ``rollout`` hold what
    #: was computed from the full maps before they were dropped.
    factor: int = 1
    entropy: np.ndarray | None = None
    average: np.ndarray | None = None
    rollout: np.ndarray | None = None
    #: the same summaries per kind ("self", "encoder", "cross") when reduced on the device
    summaries: dict[str, dict[str, np.ndarray | None]] = field(default_factory=dict)
    #: key/value heads (grouped-query attention) when fewer than the query heads, else None;
    #: the maps stay one per query head (see :func:`head_label`)
    kv_heads: int | None = None


def kv_group(head: int, heads: int, kv_heads: int | None) -> int | None:
    """The K/V head query head ``head`` reads: ``head // (heads / kv_heads)`` (HF's
    ``repeat_kv``: consecutive query heads share one K/V head), or None without GQA."""
    if not kv_heads or kv_heads >= heads:
        return None
    return head // (heads // kv_heads)


def head_label(head: int, heads: int, kv_heads: int | None) -> str:
    """``"head 5 · kv 1"`` for a query head sharing K/V head 1, ``"head 5"`` without GQA."""
    group = kv_group(head, heads, kv_heads)
    return f"head {head}" if group is None else f"head {head} · kv {group}"


def kv_summary(heads: int, kv_heads: int | None) -> str:
    """One line naming each K/V head's query heads: ``"8 query heads share 2 K/V heads
    (kv 0: heads 0–3; kv 1: heads 4–7)"``, or "" without GQA."""
    if kv_group(0, heads, kv_heads) is None:
        return ""
    size = heads // kv_heads
    groups = "; ".join(f"kv {g}: heads {g * size}–{(g + 1) * size - 1}" if size > 1
                       else f"kv {g}: head {g}" for g in range(kv_heads))
    return f"{heads} query heads share {kv_heads} K/V heads ({groups})"


class _DeviceReducer:
    """Capture hook for long single-stack sequences: per layer, keep only the block-averaged
    maps, the per-head entropy and the rollout, computed in torch before the full
    ``[H, T, T]`` probabilities are dropped — host memory stays ``O(L·H·max_side²)``
    (plus one ``T × T`` rollout accumulator), not ``O(L·H·T²)``."""

    def __init__(self, factor: int, with_rollout: bool = True):
        self.factor = factor
        self.with_rollout = with_rollout  # not for cross-attention
        self.acc = None  # rollout product so far, (T, T)

    def pool(self, x):
        import torch.nn.functional as F

        # ceil_mode: the last partial block averages only the cells it covers
        return F.avg_pool2d(x, self.factor, ceil_mode=True)

    def __call__(self, probs):
        import torch

        p = probs[0].float()  # (H, T, S)
        ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean(-1)  # (H,)
        avg = p.mean(0)  # (T, S)
        roll = None
        if self.with_rollout:
            eye = torch.eye(avg.shape[0], dtype=avg.dtype)
            a = 0.5 * eye + 0.5 * avg
            a = a / a.sum(-1, keepdim=True)
            self.acc = a if self.acc is None else a @ self.acc
            roll = self.pool(self.acc[None])[0].numpy()
        return {"att": self.pool(p).numpy(), "entropy": ent.numpy(),
                "average": self.pool(avg[None])[0].numpy(), "rollout": roll}


def _kind_of(name: str) -> str:
    """Which attention a module name is: "encoder", "cross" or "self" (the shown stack)."""
    if name.endswith(".cross_attn"):
        return "cross"
    return "encoder" if name.startswith("encoder.") else "self"


def configured_attentions(cfg: ModelConfig, text: str, check_cancelled=None,
                          max_side: int | None = None) -> AttentionResult:
    """Attention of the configured model (at initialisation) for ``text``.

    Tokenised with the bundled WordPiece tokenizer, ids folded into ``cfg.vocab_size``,
    at most ``cfg.max_len`` tokens. Runs on the CPU in eval mode, one sequence. An
    encoder-decoder sees the text as both source and target. With ``max_side`` and a longer
    single-stack sequence, maps are block-averaged on the device as each layer runs (see
    :class:`_DeviceReducer`; entropy and rollout from the full maps).
    """
    import torch

    from . import pretrained
    from .measure import cached_model
    from .model import allowed as allowed_mask

    bundled = pretrained.minilm()
    enc = pretrained.encode(bundled, text, positions=cfg.max_len)
    ids = enc.ids.remainder(cfg.vocab_size)
    note = ("tokenised with the bundled all-MiniLM-L6-v2 WordPiece tokenizer; ids folded into "
            f"the config's vocabulary of {cfg.vocab_size} (id mod {cfg.vocab_size})")
    t = ids.shape[-1]
    model = cached_model(cfg.replace(dropout=0.0, device="cpu"), torch.device("cpu"))
    model.eval()
    modules = model.attention_modules()
    factor = math.ceil(t / max_side) if max_side else 1
    reducers = {kind: _DeviceReducer(factor, with_rollout=kind != "cross")
                for kind in ("self", "encoder", "cross")} if factor > 1 else {}
    for name, m in modules:
        m.capture, m.capture_fn = True, reducers.get(_kind_of(name))
    try:
        with torch.no_grad():
            if check_cancelled is not None:
                check_cancelled()
            model.hidden(ids)  # the stacks only: attention needs no vocabulary head
        probs = {name: m.probs if reducers else m.probs[0].float().numpy()
                 for name, m in modules}  # (H, T, S) each, or the reducer's summaries
    finally:
        for _, m in modules:
            m.capture, m.capture_fn, m.probs = False, None, None
    causal = cfg.architecture != "encoder"
    mask = allowed_mask(t, t, cfg.attention, cfg.window, causal)
    result = AttentionResult(
        attentions=np.zeros((0,), np.float32), tokens=enc.tokens, truncated=enc.truncated,
        note=note, allowed=None if mask is None else mask.numpy(),
        kv_heads=cfg.kv_heads if cfg.kv_heads < cfg.n_heads else None)
    stack = lambda keys: np.stack([probs[k] for k in keys]).astype(np.float32)  # noqa: E731
    if reducers:
        result.factor = factor
        for kind in ("self", "encoder", "cross"):
            layers = [v for k, v in probs.items() if _kind_of(k) == kind]
            if not layers:
                continue
            roll = None if kind == "cross" else np.stack([x["rollout"] for x in layers])
            result.summaries[kind] = {
                "att": np.stack([x["att"] for x in layers]).astype(np.float32),
                "entropy": np.stack([x["entropy"] for x in layers]),
                "average": np.stack([x["average"] for x in layers]).astype(np.float32),
                "rollout": None if roll is None else roll.astype(np.float32)}
        main = result.summaries["self"]
        result.attentions = main["att"]
        result.entropy, result.average, result.rollout = (main["entropy"], main["average"],
                                                          main["rollout"])
        if "cross" in result.summaries:
            result.cross_attentions = result.summaries["cross"]["att"]
            result.encoder_attentions = result.summaries["encoder"]["att"]
            result.source_tokens = enc.tokens
        result.note += f"; maps block-averaged ×{factor} on the device"
        return result
    if cfg.architecture == "encoder-decoder":
        result.encoder_attentions = stack([k for k in probs if k.startswith("encoder.")])
        result.attentions = stack([k for k in probs if k.startswith("decoder.")
                                   and k.endswith(".attn")])
        result.cross_attentions = stack([k for k in probs if k.endswith(".cross_attn")])
        result.source_tokens = enc.tokens
    else:
        result.attentions = stack(list(probs))
    return result


def checkpoint_attentions(loaded, text: str) -> AttentionResult:
    """Attention of a loaded checkpoint (:func:`unitscale_core.pretrained.load_checkpoint`)."""
    from . import pretrained

    probs, tokens, truncated = pretrained.attentions(loaded, text)
    t = len(tokens)
    # every decoder checkpoint (gpt2, gpt_neox, llama, …) is causal; BERT's attention is full
    allowed = np.tril(np.ones((t, t), dtype=bool)) if loaded.config.attention == "causal" \
        else None
    note = f"{loaded.kind} checkpoint {loaded.folder}"
    cfg = loaded.config
    return AttentionResult(probs, tokens, truncated, note, allowed=allowed,
                           kv_heads=cfg.kv_heads if cfg.kv_heads < cfg.n_heads else None)


def head_average(att: np.ndarray) -> np.ndarray:
    """Mean over heads: ``[layers, heads, T, S] → [layers, T, S]``."""
    return att.mean(axis=1)


def entropy(att: np.ndarray) -> np.ndarray:
    """Per-head attention entropy in nats, averaged over queries: ``[layers, heads]``.

    ``H = −Σ_j p_ij log p_ij``; a head spreading evenly over ``n`` keys has ``log n``, a head
    attending to one key has 0.
    """
    p = np.clip(att, 1e-30, 1.0)
    return -(att * np.log(p)).sum(axis=-1).mean(axis=-1)


def uniform_entropy(allowed: np.ndarray | None, t: int) -> float:
    """Entropy of uniform attention over each query's allowed keys (the maximum)."""
    if t == 0:
        return 0.0
    counts = np.full(t, t) if allowed is None else allowed.sum(axis=1)
    return float(np.mean(np.log(np.maximum(counts, 1))))


def rollout(att: np.ndarray, residual: float = 0.5) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020, §3): ``[layers, T, T]``.

    Each layer's head-averaged attention is mixed with the identity for the residual
    connection, ``Â = residual·I + (1 − residual)·A``, rows renormalised, and multiplied up the
    stack: ``R_l = Â_l R_{l−1}``, ``R_0 = Â_0``. Row i of ``R_l`` says how much of token i's
    representation after layer l comes from each input token.
    """
    avg = head_average(att)
    layers, t, s = avg.shape
    if t != s:
        raise ValueError("rollout needs square (self-)attention")
    eye = np.eye(t, dtype=np.float64)
    out = np.empty((layers, t, t), dtype=np.float32)
    acc = eye
    for layer in range(layers):
        a = residual * eye + (1 - residual) * avg[layer]
        a = a / a.sum(axis=-1, keepdims=True)
        acc = a @ acc
        out[layer] = acc
    return out


def reduce_for_display(matrix: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    """Block-average a ``[T, S]`` map to at most ``max_side`` per side; returns (map, factor).

    Averaging (not sampling) keeps a sharp diagonal visible at any zoom. The last row and
    column of blocks, partly beyond the map when ``T`` or ``S`` is not a multiple of the
    factor, average only the cells they cover (as ``avg_pool2d(..., ceil_mode=True)``).
    """
    t, s = matrix.shape[-2:]
    factor = max(1, math.ceil(max(t, s) / max_side))
    if factor == 1:
        return matrix, 1
    tp, sp = -(-t // factor) * factor, -(-s // factor) * factor
    padded = np.zeros(matrix.shape[:-2] + (tp, sp), dtype=np.float32)
    padded[..., :t, :s] = matrix
    real = np.zeros((tp, sp), dtype=np.float32)
    real[:t, :s] = 1.0

    def block_sums(x: np.ndarray) -> np.ndarray:
        shape = x.shape[:-2] + (tp // factor, factor, sp // factor, factor)
        return x.reshape(shape).sum(axis=(-3, -1))

    return (block_sums(padded) / block_sums(real)).astype(np.float32), factor
