"""Analytic prediction of every tensor's RMS in one training step at initialisation.

A variance-propagation pass over exactly the op graph ``unitscale_core.model`` executes,
forward from the embeddings to the loss, then backward from the loss, composed from the per-op
rules in :mod:`.rules`. Rows carry the names measurement uses (``layers.0.attn.q``, …) so the
two line up row for row. Nothing is built and nothing touches torch.

Each tensor is tracked as a :class:`~.correlation.Sig`: the variance independent from token to
token, the part shared within a sequence and the part shared by the whole batch. Attention
creates per-sequence components (every query averages the same keys) and passes existing ones
through unshrunk; biases and the mean of GELU/ReLU create batch-wide ones; weight and bias
gradients are sums over rows, where shared components add coherently:
``E[ΔW²] = α² (N σ_g² σ_x² + B·T(T−1) c_g c_x + B(B−1)T² m_g m_x)`` with ``c`` the same-sequence
and ``m`` the batch-wide covariance. Everything else follows the rules' i.i.d. formulas.

Two further correlations are modelled: with tied embeddings, the logit of a token's own input
embedding is ``α_head · d · c`` where ``c`` is the share of that embedding left in the final
normalised stream (the "self-logit", which dominates the loss of a standard model with tied
N(0, 1) embeddings); and the key bias gets no gradient (softmax ignores per-row shifts).
"""

from __future__ import annotations

import gc
import math
import threading
from collections import OrderedDict
from functools import lru_cache

import numpy as np

from ..config import ModelConfig
from ..positional import alibi_slopes, sinusoidal_at
from ..sizing import RELATIVE_BUCKETS
from ..tensors import REPORTED_FORMATS, TensorRow
from . import correlation as C
from . import rules as R
from .correlation import Sig
from .formats import FORMATS, gaussian_format_table, headroom_status_array

LN_EPS = 1e-5
#: With many ALiBi heads, the softmax statistics are averaged over at most this many slopes
#: (evenly spaced in head index) to keep a 96-layer prediction within a frame.
MAX_ALIBI_GROUPS = 8


@lru_cache(maxsize=1024)
def _linear_factors(ops: str, fan_in: int, fan_out: int, rows: int, role: str) -> R.LinearFactors:
    """The factors ``unitscale_core.model.ops`` applies to a linear layer of this role."""
    if ops == "standard":
        return R.LinearFactors(1.0, 1.0, 1.0)
    if ops == "unit":
        return R.unit_linear_scales(fan_in, fan_out, rows, "gmean")
    if role == "readout":
        return R.unit_linear_readout_scales(fan_in, fan_out, rows)
    return R.unit_linear_scales(fan_in, fan_out, rows, None if role == "ffn" else
                                "to_output_scale")


@lru_cache(maxsize=64)
def _unit_attention_factors(t_q: int, t_k: int, dh: int) -> tuple[float, ...]:
    """Unit scaling's attention factors (the same for every layer of a stack): output, q/k/v
    input-gradient, P·V left and right gradients, softmax output and input-gradient, and the
    logits' gradient factor."""
    sm = R.unit_softmax_scales(t_k, 1.0, "gmean")
    mm = R.unit_matmul_scales(t_q, t_k, dh, "gmean")
    logit_grad = R.unit_matmul_scales(t_q, dh, t_k, "to_output_scale")[1]
    return sm.output * mm[0], 1.0, mm[1], mm[2], sm.output, sm.grad_input, logit_grad


def key_counts(t: int, pattern: str, window: int, causal: bool) -> np.ndarray:
    """Keys each query may attend to (``unitscale_core.model.masks``), closed form, ``[t]``."""
    i = np.arange(t)
    causal = causal or pattern == "causal"
    if pattern in ("full", "causal"):
        return i + 1 if causal else np.full(t, t)
    w = window
    if causal:
        near = np.minimum(i + 1, w)
        return near + (i // w if pattern == "strided" else 0)
    near = np.minimum(i, w - 1) + np.minimum(t - 1 - i, w - 1) + 1
    if pattern == "strided":
        near = near + i // w + (t - 1 - i) // w
    return near


@lru_cache(maxsize=256)
def averaging_overlaps(t: int, s: int, pattern: str, window: int, causal: bool
                       ) -> tuple[float, float, float]:
    """How attention's averaging shares variance between positions (expected probabilities
    uniform over each query's allowed keys ``A_i``, ``n_i = |A_i|``).

    Returns ``(fwd, bwd, col)``: ``fwd`` = mean over query pairs ``i ≠ k`` of
    ``|A_i ∩ A_k|/(n_i n_k)`` (covariance of two outputs from independent values); ``bwd`` =
    mean over key pairs ``j ≠ l`` of ``Σ_i [j, l ∈ A_i]/n_i²`` (the same for ``Pᵀ g``); ``col``
    = mean over keys of ``(Σ_{i ∋ j} 1/n_i)²`` (how a gradient shared by all queries reaches a
    key). Closed forms for full and causal; local and strided patterns are evaluated on at most
    256 positions (the pattern's statistics are scale-free in ``t/window``).
    """
    causal = causal or pattern == "causal"
    if t != s or pattern == "full" and not causal:
        return 1.0 / s, t / (s * s), (t / s) ** 2
    if t == 1:  # one token: no pairs to share anything
        return 0.0, 0.0, 1.0
    if pattern in ("full", "causal"):
        n = np.arange(1, t + 1, dtype=np.float64)
        # fwd: pairs i < k: |A_i ∩ A_k| = i, so i/(i·k) = 1/k, and there are k−1 such i
        fwd = float(np.sum((n - 1) / n) * 2 / (t * (t - 1))) if t > 1 else 0.0
        tail = np.cumsum((1 / n**2)[::-1])[::-1]  # Σ_{i ≥ l} 1/i²
        bwd = float(np.sum((n - 1) * tail) * 2 / (t * (t - 1))) if t > 1 else 0.0
        colsum = np.cumsum((1 / n)[::-1])[::-1]  # Σ_{i ≥ j} 1/i
        return fwd, bwd, float(np.mean(colsum**2))
    size = min(t, 256)
    w = max(1, round(window * size / t)) if t > 256 else window
    i = np.arange(size)[:, None]
    j = np.arange(size)[None, :]
    d = i - j
    ok = np.abs(d) < w if pattern == "local" else (np.abs(d) < w) | (d % w == 0)
    if causal:
        ok &= d >= 0
    a = ok / ok.sum(1, keepdims=True)  # (T, S) expected probabilities
    off = ~np.eye(size, dtype=bool)
    if pattern == "local":  # only nearby positions share anything: average over those
        off &= np.abs(d) < w
    if not off.any():  # a window of one: every token attends only to itself
        return 0.0, 0.0, float(np.mean(a.sum(0) ** 2))
    fwd = float((a @ a.T)[off].mean())
    bwd = float((a.T @ a)[off].mean())
    return fwd, bwd, float(np.mean(a.sum(0) ** 2))


def shared_input_factor(sum_p2: float, d: int) -> float:
    """How much more gradient reaches the queries because keys and values are projections of
    the same ``d``-wide input (self-attention, and cross-attention's memory).

    ``gQ_i = m Σ_j gZ_ij K_j`` with ``gZ_ij = P_ij gY_i·(V_j − Σ_l P_il V_l)``, so
    ``E|gQ_i|² ∝ Σ_jl P_ij P_il (ṽ_j·ṽ_l)(k̃_j·k̃_l)``. With independent K and V only the
    diagonal ``j = l`` survives (the per-op rule). With ``K = W_k x``, ``V = W_v x`` each pair
    ``j ≠ l`` adds ``E(x̃_j·x̃_l)² ≈ |x̃|⁴/d`` (isotropic token deviations), and
    ``Σ_{j≠l} P_ij P_il = 1 − Σ_j P_ij²``: the variance is multiplied by
    ``1 + (1 − EΣp²)/(d · EΣp²)``. Checked against a torch measurement of one attention op
    (``tests/core/test_predict.py``).
    """
    s = max(sum_p2, 1e-12)
    return 1.0 + max(1.0 - s, 0.0) / (d * s)


def shared_partners(t: int, pattern: str, window: int) -> int:
    """How many other tokens of a sequence share a token's per-sequence part.

    Every other token (``t − 1``) when attention reaches the whole sequence; with local
    windows only those closer than the window, ``2(w − 1)`` (attention reaches no further).
    """
    if pattern == "local":
        return min(t - 1, 2 * (window - 1))
    return t - 1


@lru_cache(maxsize=64)
def sinusoidal_correlations(d_model: int, t: int, pattern: str, window: int
                            ) -> tuple[float, float]:
    """Mean cosine similarity of sinusoidal encodings (Vaswani et al. 2017 §3.5) between two
    positions: over the pairs that count as neighbours (:func:`shared_partners`), and over all
    pairs (positions of different sequences).

    ``PE(i)·PE(j) = Σ_k cos((i − j) ω_k)`` with ``ω_k = 10000^(−2k/d)``, so the similarity of
    a pair depends only on ``Δ = i − j``; the means weight each ``Δ`` by how many pairs have
    it (``2(t − Δ)``).
    """
    if t < 2:
        return 0.0, 0.0
    omega = 10000.0 ** (-np.arange(0, d_model, 2) / d_model)
    delta = np.arange(1, t)
    sim = np.cos(np.outer(delta, omega)).sum(1) / (d_model / 2)  # cosine similarity at Δ
    weight = 2.0 * (t - delta)
    near = delta <= shared_partners(t, pattern, window) // (2 if pattern == "local" else 1)
    rho_all = float((weight * sim).sum() / (t * t))  # includes the t identical pairs as 0
    rho_near = float((weight[near] * sim[near]).sum() / max(weight[near].sum(), 1.0))
    return max(rho_near, 0.0), max(min(rho_all, rho_near), 0.0)


@lru_cache(maxsize=64)
def sinusoidal_row_means(d_model: int, t: int) -> tuple[float, float]:
    """How much of a sinusoidal encoding is a constant across its features (its row mean).

    ``μ_i = (1/d) Σ_k PE(i)_k``; low frequencies keep ``cos(i ω_k) ≈ 1`` for every position,
    so ``μ_i`` is far from zero and common to nearby positions. A LayerNorm subtracts it, so
    it never reaches a pre-norm branch, yet it stays in the residual stream's RMS.

    Returns ``(E μ_i², E_{i≠j} μ_i μ_j)`` over positions ``0 … t − 1`` (at most 128 evenly
    spaced positions are evaluated: ``μ_i`` varies slowly with ``i``).
    """
    pos = np.unique(np.linspace(0, t - 1, min(t, 128)).round())
    mu = sinusoidal_at(pos, d_model).astype(np.float64).mean(axis=1)
    n = len(mu)
    mu2 = float(np.mean(mu * mu))
    mumu = float((mu.sum() ** 2 - (mu * mu).sum()) / (n * (n - 1))) if n > 1 else mu2
    return mu2, mumu


def _alibi_row_var(t: int, causal: bool) -> float:
    """Mean within-row variance of ``−|i − j|`` over a row's keys (slope 1)."""
    if causal:  # row i sees j = 0…i: an arithmetic sequence of n = i+1 terms
        n = np.arange(1, t + 1, dtype=np.float64)
        return float(np.mean((n * n - 1) / 12))
    i = np.arange(t, dtype=np.float64)
    # Σ_j (i−j)² and Σ_j |i−j| in closed form for j = 0…t−1
    a, b = i, t - 1 - i
    sq = (a * (a + 1) * (2 * a + 1) + b * (b + 1) * (2 * b + 1)) / 6
    ab = (a * (a + 1) + b * (b + 1)) / 2
    return float(np.mean(sq / t - (ab / t) ** 2))


class _Predictor:
    """One pass over one config; fills ``acts``, ``grads``, ``weights``, ``wgrads``."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.p = cfg.parametrization
        self.unit = self.p != "standard"
        self.c = cfg.d_model
        self.dh = cfg.head_dim
        self.b = cfg.batch_size
        self.t = cfg.seq_len
        self.rows = self.b * self.t
        # rows are made as the walk goes (no intermediate records: thousands per prediction)
        self.acts: dict[str, TensorRow] = {}
        self.grads: dict[str, TensorRow] = {}
        self.weights: dict[str, TensorRow] = {}
        self.wgrads: dict[str, TensorRow] = {}
        self.order: list[str] = []  # activation names in execution order
        self.drop = R.dropout_rule(1.0, 1.0, p=cfg.dropout, unit=self.unit).output \
            if cfg.dropout > 0 else 1.0
        # Share of a token's own embedding in the (normalised) stream, for tied logits: every
        # residual add multiplies the skip by its weight, every norm divides by its input RMS.
        self.share = 1.0
        self._all_partners = cfg.attention != "local"  # see shared_partners
        self._pair_coefs: dict[int, tuple[int, int, int]] = {}  # pair_sum's, per length
        # Variance per element of the residual stream along the all-ones feature direction
        # (sinusoidal positions' row mean): every LayerNorm removes it, the skip keeps it.
        self.flat = 0.0

    # -- bookkeeping -----------------------------------------------------------------------------
    def act(self, name: str, x: Sig | float, formula: str = "", scales: dict | None = None):
        rms = x.rms if isinstance(x, Sig) else x
        self.acts[name] = TensorRow(name, "activation", rms, scales, None, (), formula)
        self.order.append(name)
        return x

    def grad(self, name: str, g: Sig | float, formula: str = ""):
        self.grads[name] = TensorRow(name, "grad_activation", g.rms if isinstance(g, Sig)
                                     else g, None, None, (), formula)
        return g

    def weight(self, name: str, rms: float, formula: str) -> None:
        self.weights[name] = TensorRow(name, "weight", rms, None, None, (), formula)

    def wgrad(self, name: str, var: float, formula: str) -> None:
        """Record a weight gradient of variance ``var`` (a shared weight's gradients add)."""
        if name in self.wgrads:
            old = self.wgrads[name]
            var += old.rms**2
            formula = ("{}; + {} (shared weight, summed)", (old._formula, formula))
        self.wgrads[name] = TensorRow(name, "grad_weight", math.sqrt(max(var, 0.0)), None,
                                      None, (), formula)

    def pair_sum(self, g: Sig, x: Sig | None, t: int | None = None) -> float:
        """``E[(Σ_rows g·x)²]`` per element (x None: ``Σ_rows g``), rows = batch × t.

        Pairs of rows: the same token (``σ_g² σ_x²``), nearby tokens of one sequence (shared
        parts, :func:`shared_partners` of them), other tokens of the sequence and of other
        sequences (batch-wide parts only)::

            b·t·σ_g²σ_x² + b·t·p·c_g c_x + (b·t·(t − 1 − p) + b(b − 1)·t²)·m_g m_x
        """
        t = self.t if t is None else t
        coef = self._pair_coefs.get(t)
        if coef is None:
            b = self.b
            partners = t - 1 if self._all_partners else shared_partners(
                t, self.cfg.attention, self.cfg.window)
            coef = self._pair_coefs[t] = (b * t, b * t * partners,
                                          b * t * (t - 1 - partners) + b * (b - 1) * t * t)
        c_tot, c_shared, c_m = coef
        if x is None:
            return c_tot * g.total + c_shared * g.shared + c_m * g.m
        return c_tot * g.total * x.total + c_shared * g.shared * x.shared + c_m * g.m * x.m

    # -- ops -----------------------------------------------------------------------------------
    def linear_fwd(self, name: str, x: Sig, fan_in: int, fan_out: int, t: int | None = None,
                   role: str = "hidden") -> tuple[Sig, dict]:
        """Forward of ``ops.linear`` over batch × ``t`` rows."""
        rows = self.b * (self.t if t is None else t)
        f = _linear_factors(self.p, fan_in, fan_out, rows, role)
        has_bias = self.cfg.bias and role != "readout"
        tied = role == "readout" and self.cfg.tie_embeddings  # the head is the N(0, 1) table
        w = R.torch_default_linear_weight_rms(fan_in) if not (self.unit or tied) else 1.0
        bias = R.torch_default_linear_bias_rms(fan_in) if has_bias and not self.unit else 0.0
        gain = f.output * math.sqrt(fan_in) * w
        y = x.scaled(gain).plus_global((f.output * bias) ** 2)
        scales = {"forward": f.output, "grad_input": f.grad_input, "grad_weight": f.grad_weight}
        self.act(name, y, ("α·√(fan_in·σ_x²·σ_w² + σ_b²) = {:.3g}·√({}·{:.3g}²·{:.3g}² + "
                           "{:.3g}²)", (f.output, fan_in, x.rms, w, bias)),
                 scales if self.unit else None)
        self.weight(name + ".weight", w, "N(0, 1)" if self.unit else
                    ("nn.Linear default U(±1/√fan_in): 1/√(3·{})", (fan_in,)))
        if has_bias:
            self.weight(name + ".bias", bias, "zeros" if self.unit else
                        ("nn.Linear default: 1/√(3·{})", (fan_in,)))
        return y, {"name": name, "x": x, "w": w, "fan_out": fan_out, "f": f, "bias": has_bias,
                   "t": self.t if t is None else t}

    def linear_bwd(self, ctx: dict, g: Sig, zero_bias_grad: bool = False) -> Sig:
        name, f = ctx["name"], ctx["f"]
        self.grad(name, g)
        aw2 = f.grad_weight**2
        self.wgrad(name + ".weight", aw2 * self.pair_sum(g, ctx["x"], ctx["t"]),
                   ("α_w²·E[(Σ_rows g·x)²], α_w = {:.3g}", (f.grad_weight,)))
        if ctx["bias"]:
            if zero_bias_grad:
                self.wgrad(name + ".bias", 0.0, "0: softmax ignores a shift shared by all keys")
            else:
                self.wgrad(name + ".bias", aw2 * self.pair_sum(g, None, ctx["t"]),
                           ("α_w²·E[(Σ_rows g)²], α_w = {:.3g}", (f.grad_weight,)))
        return g.scaled(f.grad_input * math.sqrt(ctx["fan_out"]) * ctx["w"])

    def norm_fwd(self, name: str, x: Sig) -> tuple[Sig, dict]:
        """LayerNorm of the residual stream. It subtracts each row's mean, so the stream's
        flat part (``self.flat``, shared by the tokens: taken from ``m``, then ``s``) never
        reaches the output and does not count in the variance it divides by."""
        flat = self.flat
        if flat > 0:
            from_m = min(flat, x.m)
            x = Sig(x.u, max(x.s - (flat - from_m), 0.0), x.m - from_m)
        r = R.layer_norm_rule(x.rms, 1.0, d=self.c, b_rows=self.rows, eps=LN_EPS)
        y = x.normalised(r.output)
        self.act(name, y, ("LayerNorm: √(v/(v+ε)), input σ = {:.3g} (row mean removed)",
                           (x.rms,)))
        self.weight(name + ".weight", 1.0, "LayerNorm gain: ones")
        if self.cfg.bias:
            self.weight(name + ".bias", 0.0, "LayerNorm bias: zeros")
        return y, {"name": name, "x": x, "y": y}

    def norm_bwd(self, ctx: dict, g: Sig) -> Sig:
        alpha = R.unit_layer_norm_grad_param_scale(self.c, self.rows) if self.unit else 1.0
        r = R.layer_norm_rule(ctx["x"].rms, g.rms, d=self.c, b_rows=self.rows, eps=LN_EPS)
        name = ctx["name"]
        self.grad(name, g)
        self.wgrad(name + ".weight", alpha**2 * self.pair_sum(g, ctx["y"]),
                   ("α²·E[(Σ_rows g·x̂)²], α = {:.3g}", (alpha,)))
        if self.cfg.bias:
            self.wgrad(name + ".bias", alpha**2 * self.pair_sum(g, None),
                       ("α²·E[(Σ_rows g)²], α = {:.3g}", (alpha,)))
        return g.scaled(r.grad_input / g.rms) if g.rms > 0 else g

    def residual_add(self, branch: Sig, skip: Sig, tau: float) -> Sig:
        w_r, w_s = R.residual_weights(tau) if self.unit else (1.0, 1.0)
        return branch.scaled(w_r).plus(skip.scaled(w_s))

    def residual_split_bwd(self, g_branch: Sig, g_skip: Sig, tau: float) -> Sig:
        w_r, w_s = R.residual_weights(tau) if self.unit else (1.0, 1.0)
        return g_branch.scaled(w_r).plus(g_skip.scaled(w_s))

    # -- attention -----------------------------------------------------------------------------
    def _logit_bias_vars(self, kind: str, t: int, causal: bool) -> list[float]:
        """Per head group: the within-row variance a positional logit bias adds."""
        if kind == "relative":
            return [1.0]  # T5 table entries N(0, 1); a row spans many buckets
        if kind != "alibi":
            return [0.0]
        slopes = alibi_slopes(self.cfg.n_heads)
        if len(slopes) > MAX_ALIBI_GROUPS:
            slopes = slopes[np.linspace(0, len(slopes) - 1, MAX_ALIBI_GROUPS).round().astype(int)]
        base = _alibi_row_var(t, causal)
        return [float(m * m * base) for m in slopes]

    def attention_fwd(self, prefix: str, xq: Sig, xkv: Sig, t_q: int, t_k: int,
                      causal: bool, pattern: str, positional: str) -> tuple[Sig, dict]:
        c, dh = self.c, self.dh
        q, lq = self.linear_fwd(f"{prefix}.q", xq, c, c, t_q)
        k, lk = self.linear_fwd(f"{prefix}.k", xkv, c, c, t_k)
        v, lv = self.linear_fwd(f"{prefix}.v", xkv, c, c, t_k)
        m = 1.0 / dh if self.p == "umup" else 1.0 / math.sqrt(dh)
        self.act(prefix + ".scores", R.attention_logits_rms(q.rms, k.rms, dh, m),
                 ("m·√d_head·σ_q·σ_k, m = {:.3g}, d_head = {}", (m, dh)))
        is_causal = causal or pattern == "causal"
        plain = pattern in ("full", "causal") or t_q != t_k
        counts = None if plain else key_counts(t_q, pattern, self.cfg.window, causal)
        # Only the keys' token-specific part moves probabilities: shared parts of k shift a
        # whole row (softmax-invariant) or are shared with the query's own sequence.
        sigma_qk = m * math.sqrt(dh * q.total * k.u)
        stats = []
        for var in self._logit_bias_vars(positional, t_k, is_causal):
            sigma_z = math.sqrt(sigma_qk**2 + var)
            if plain:
                stats.append(R.softmax_moments(sigma_z, t_k, is_causal and t_q == t_k, dh))
            else:
                stats.append(R.softmax_moments_for_counts(sigma_z, counts, dh))
        sum_p2 = sum(s.sum_p2 for s in stats) / len(stats)
        grad_factor = sum(max(s.grad_factor, 0.0) for s in stats) / len(stats)
        self.act(prefix + ".probs", math.sqrt(sum_p2 / t_k),
                 ("√(E Σp²/S), E Σp² = {:.3g}, S = {}, logit σ = {:.3g}", (sum_p2, t_k,
                                                                        sigma_qk)))
        if self.p == "unit":
            (out_scale, grad_qkv, grad_left, grad_right, sm_out, grad_sm_in,
             logit_grad) = _unit_attention_factors(t_q, t_k, dh)
        else:
            out_scale = 1.0
            if self.p == "umup" and (t_k > 1 or not is_causal):
                out_scale = R.unit_sdpa_scale(t_k, dh, is_causal)
            grad_qkv, grad_left, grad_right, sm_out, grad_sm_in = out_scale, 1.0, 1.0, 1.0, 1.0
            logit_grad = m
        fwd_pair, bwd_pair, col2 = averaging_overlaps(t_q, t_k, pattern, self.cfg.window,
                                                      causal)
        # Queries of one sequence share q's per-sequence part, so q_s·k_j is a key preference
        # common to all of them: their probabilities overlap more than uniform ones would.
        sigma_a = m * math.sqrt(dh * q.shared * k.u)
        if sigma_a > 1e-3:
            row_causal = is_causal and t_q == t_k
            common = R.softmax_moments(sigma_a, t_k, row_causal).sum_p2 / R.softmax_moments(
                0.0, t_k, row_causal).sum_p2
            fwd_pair, bwd_pair = fwd_pair * common, bwd_pair * common
        fwd_pair = min(fwd_pair, sum_p2)
        # P·V: shared parts of V pass whole (rows sum to 1); the independent part shrinks to
        # E Σp², of which the expected (uniform) weights make a per-sequence share.
        ctx_sig = Sig(v.u * (sum_p2 - fwd_pair), v.s + v.u * fwd_pair, v.m).scaled(
            out_scale * self.drop)
        scales = {"forward": out_scale, "grad_input": grad_qkv if self.p == "umup" else
                  grad_left} if self.unit else None
        self.act(prefix + ".context", ctx_sig,
                 ("α·σ_v·√(E Σp²) + shared parts, α = {:.3g}", (out_scale,)), scales)
        out, lo = self.linear_fwd(f"{prefix}.o", ctx_sig, c, c, t_q)
        return out, {"prefix": prefix, "lq": lq, "lk": lk, "lv": lv, "lo": lo, "q": q, "k": k,
                     "v": v, "t_q": t_q, "t_k": t_k, "sum_p2": sum_p2, "gf": grad_factor,
                     "m": logit_grad, "grad_qkv": grad_qkv, "grad_left": grad_left,
                     "grad_right": grad_right, "grad_sm_in": grad_sm_in, "sm_out": sm_out,
                     "bwd_pair": bwd_pair, "col2": col2}

    def attention_bwd(self, a: dict, g: Sig) -> tuple[Sig, Sig, Sig]:
        """Backward from the output projection's gradient; returns the gradients reaching
        the query input and the key and value inputs."""
        prefix, dh, v = a["prefix"], self.dh, a["v"]
        g_ctx = self.linear_bwd(a["lo"], g)
        self.grad(f"{prefix}.context", g_ctx)
        gl = a["grad_left"] * self.drop
        self.grad(f"{prefix}.probs", gl * math.sqrt(dh * g_ctx.total * v.total),
                  "g_P = α·gY·Vᵀ: √(d_head·σ_gy²·σ_v²)")
        # the softmax Jacobian removes what is constant along a row: V's shared parts
        g_p_moving = gl * math.sqrt(dh * g_ctx.total * v.u)
        g_logits = g_p_moving * math.sqrt(a["gf"] / a["t_k"]) * a["grad_sm_in"]
        self.grad(f"{prefix}.scores", g_logits,
                  "softmax Jacobian: g_P·√((EΣp² − 2EΣp³ + E(Σp²)²)/S)")
        # Pᵀ g: the independent part of g shrinks, shared parts reach keys by column sums
        gain_v = a["grad_right"] * a["sm_out"] * self.drop
        t_ratio = a["t_q"] / a["t_k"]
        pair = min(a["bwd_pair"], t_ratio * a["sum_p2"])
        g_v = Sig(g_ctx.u * (t_ratio * a["sum_p2"] - pair) + g_ctx.shared * max(
            a["col2"] - t_ratio**2, 0.0), g_ctx.u * pair + g_ctx.s * t_ratio**2,
            g_ctx.m * t_ratio**2).scaled(gain_v)
        # gQ = m·gZ·K: rows of gZ sum to zero, so K's shared parts drop out; K and V come
        # from the same input, which adds the pairs of keys (shared_input_factor)
        g_q = Sig((a["m"] * g_logits) ** 2 * a["t_k"] * a["k"].u
                  * shared_input_factor(a["sum_p2"], self.c))
        g_k = Sig((a["m"] * g_logits) ** 2 * a["t_q"] * a["q"].total)
        s = a["grad_qkv"]
        gq = self.linear_bwd(a["lq"], g_q.scaled(s))
        # the key bias shifts every logit of a row equally, which softmax ignores — unless
        # RoPE rotates it differently at each position
        gk = self.linear_bwd(a["lk"], g_k.scaled(s),
                             zero_bias_grad=self.cfg.positional != "rope")
        gv = self.linear_bwd(a["lv"], g_v.scaled(s))
        return gq, gk, gv

    # -- feed-forward --------------------------------------------------------------------------
    def ffn_fwd(self, prefix: str, x: Sig) -> tuple[Sig, dict]:
        c, f, kind = self.c, self.cfg.d_ff, self.cfg.activation
        up, lu = self.linear_fwd(f"{prefix}.up", x, c, f, role="ffn")
        ctx: dict = {"prefix": prefix, "lu": lu, "up": up, "kind": kind}
        if kind == "swiglu":
            gate, lg = self.linear_fwd(f"{prefix}.gate", x, c, f, role="ffn")
            alpha = R.unit_silu_glu_scale() if self.unit else 1.0
            pf, pd, rhos = C.silu_kernel(gate)
            h = C.product(up, pf, rhos).scaled(alpha)
            self.act(prefix + ".act", h, ("α·σ_up·rms(silu(gate)), α = {:.3g}", (alpha,)),
                     {"forward": alpha, "grad_input": alpha} if self.unit else None)
            ctx.update(lg=lg, gate=gate, alpha=alpha, pf=pf, pd=pd, rhos=rhos)
        else:
            factors = R.ElementwiseFactors(1.0, 1.0)
            if self.unit:
                constraint = "gmean" if self.p == "unit" else "to_output_scale"
                factors = (R.unit_gelu_scales(1.0, constraint) if kind == "gelu"
                           else R.unit_relu_scales(constraint))
            h = C.elementwise(kind, up, factors.output)
            self.act(prefix + ".act", h, ("α·rms({}(x)), x ~ N(0, {:.3g}²); mean and "
                                          "correlations by Hermite expansion", (kind, up.rms)),
                     {"forward": factors.output, "grad_input": factors.grad_input}
                     if self.unit else None)
            ctx["factors"] = factors
        out, ld = self.linear_fwd(f"{prefix}.down", h, f, c, role="ffn")
        ctx["ld"] = ld
        return out, ctx

    def ffn_bwd(self, a: dict, g: Sig) -> Sig:
        g_act = self.linear_bwd(a["ld"], g)
        self.grad(f"{a['prefix']}.act", g_act)
        if a["kind"] == "swiglu":
            alpha = a["alpha"]
            g_up = C.product(g_act, a["pf"], a["rhos"]).scaled(alpha)
            up = a["up"]
            rho_s, rho_m = a["rhos"]
            g_gate = C.from_pair_covariances(
                up.total * C.kernel(a["pd"], 1.0) * g_act.total,
                up.shared * C.kernel(a["pd"], rho_s) * g_act.shared,
                up.m * C.kernel(a["pd"], rho_m) * g_act.m).scaled(alpha)
            return self.linear_bwd(a["lu"], g_up).plus(self.linear_bwd(a["lg"], g_gate))
        g_up = C.elementwise_grad(a["kind"], a["up"], g_act, a["factors"].grad_input)
        return self.linear_bwd(a["lu"], g_up)

    # -- layers --------------------------------------------------------------------------------
    def block_fwd(self, x: Sig, norm_name: str, tau: float, branch_fwd) -> tuple[Sig, dict]:
        """One residual sub-block; returns (new stream, context for backward)."""
        pre = self.cfg.norm == "pre"
        if self.unit:
            self.share *= R.residual_weights(tau)[1]
            self.flat *= R.residual_weights(tau)[1] ** 2
        if pre:
            h, n = self.norm_fwd(norm_name, x)
            inner, ctx = branch_fwd(h)
            out = self.residual_add(inner.scaled(self.drop), x, tau)
        else:
            inner, ctx = branch_fwd(x)
            y = self.residual_add(inner.scaled(self.drop), x, tau)
            out, n = self.norm_fwd(norm_name, y)
            self.flat = 0.0  # the stream is now a LayerNorm output
            self.share /= max(n["x"].rms, 1e-30)
        return out, {"norm": n, "branch": ctx, "tau": tau, "pre": pre}

    def block_bwd(self, blk: dict, g_out: Sig, branch_bwd) -> Sig:
        """Backward of a residual sub-block from the gradient at its output."""
        tau = blk["tau"]
        if blk["pre"]:
            g_inner = branch_bwd(blk["branch"], g_out.scaled(self.drop))
            return self.residual_split_bwd(self.norm_bwd(blk["norm"], g_inner), g_out, tau)
        g_y = self.norm_bwd(blk["norm"], g_out)
        g_branch_in = branch_bwd(blk["branch"], g_y.scaled(self.drop))
        return self.residual_split_bwd(g_branch_in, g_y, tau)

    def _taus(self, kinds: list[str]) -> list[float]:
        """u-μP's depth rule (Appendix G, as ``unitscale_core.model.ops.UmupOps.taus``)."""
        if self.p == "umup":
            n = len(kinds)
            return [1.0 / math.sqrt(n / 2 + k) for k in range(n)]
        return [1.0] * len(kinds)

    def stack(self, prefix: str, n_layers: int, x: Sig, causal: bool,
              memory: Sig | None) -> tuple[Sig, list]:
        """Forward through a stack's layers; returns the output and backward contexts."""
        cfg = self.cfg
        kinds = ["attn", "attn", "mlp"] if memory is not None else ["attn", "mlp"]
        taus = self._taus(kinds * n_layers)
        layers = []
        for i in range(n_layers):
            lp = f"{prefix}layers.{i}"
            tau = taus[i * len(kinds):(i + 1) * len(kinds)]
            x, sa = self.block_fwd(x, f"{lp}.norm1", tau[0], lambda h, lp=lp: (
                self.attention_fwd(f"{lp}.attn", h, h, self.t, self.t, causal, cfg.attention,
                                   cfg.positional)))
            self.act(f"{lp}.after_attn", x, "residual stream after self-attention")
            blocks = [("attn", sa, f"{lp}.after_attn")]
            if memory is not None:
                x, ca = self.block_fwd(x, f"{lp}.cross_norm", tau[1], lambda h, lp=lp: (
                    self.attention_fwd(f"{lp}.cross_attn", h, memory, self.t, self.t, False,
                                       "full", "none")))
                self.act(f"{lp}.after_cross", x, "residual stream after cross-attention")
                blocks.append(("cross", ca, f"{lp}.after_cross"))
            x, fb = self.block_fwd(x, f"{lp}.norm2", tau[-1], lambda h, lp=lp: (
                self.ffn_fwd(f"{lp}.ffn", h)))
            self.act(lp, x, "layer output (residual stream)")
            blocks.append(("ffn", fb, lp))
            layers.append(blocks)
        return x, layers

    def stack_bwd(self, layers: list, g: Sig, memory_grads: list) -> Sig:
        for blocks in reversed(layers):
            for kind, blk, tap in reversed(blocks):
                self.grad(tap, g)
                if kind == "ffn":
                    g = self.block_bwd(blk, g, self.ffn_bwd)
                elif kind == "attn":
                    g = self.block_bwd(blk, g, self._self_attn_bwd)
                else:
                    g = self.block_bwd(blk, g, lambda a, gy: self._cross_attn_bwd(
                        a, gy, memory_grads))
        return g

    def _self_attn_bwd(self, a: dict, g: Sig) -> Sig:
        gq, gk, gv = self.attention_bwd(a, g)
        return gq.plus(gk).plus(gv)

    def _cross_attn_bwd(self, a: dict, g: Sig, memory_grads: list) -> Sig:
        gq, gk, gv = self.attention_bwd(a, g)
        memory_grads.append(gk.plus(gv))
        return gq

    # -- embeddings and positions --------------------------------------------------------------
    def embed_fwd(self, prefix: str, tok_name: str) -> tuple[Sig, dict]:
        """Token lookup, absolute positions, the ``embed`` tap."""
        positional = self.cfg.positional
        self.act(tok_name, 1.0, "embedding rows N(0, 1)")
        pos_var = 0.0
        factors = (1.0, 1.0, 1.0)
        if positional in ("learned", "sinusoidal"):
            if positional == "learned":
                self.act(f"{prefix}pos.table", 1.0, "learned table N(0, 1)")
                self.weight(f"{prefix}pos.table.weight", 1.0, "nn.Embedding N(0, 1)")
                pos_var = 1.0
            else:
                pos_var = R.sinusoidal_rms(self.c, self.t) ** 2
            if self.unit:
                constraint = "gmean" if self.p == "unit" else "to_output_scale"
                factors = R.apply_constraint(constraint, 2**-0.5, 1.0, self.b**-0.5)
        flat = 0.0
        if positional == "sinusoidal":
            # nearby positions' encodings are alike (low frequencies barely turn); the row
            # means (flat) are split off: LayerNorm removes them (see norm_fwd)
            rho_s, rho_m = sinusoidal_correlations(self.c, self.t, self.cfg.attention,
                                                   self.cfg.window)
            mu2, mumu = sinusoidal_row_means(self.c, self.t)
            flat = mu2
            var_c = max(pos_var - mu2, 0.0)
            near_c = min(max(rho_s * pos_var - mu2, 0.0), var_c)
            all_c = min(max(rho_m * pos_var - mumu, 0.0), near_c)
            pos_sig = Sig(var_c - near_c, near_c - all_c + max(mu2 - mumu, 0.0),
                          all_c + min(mumu, mu2))
        else:  # learned rows are independent draws, like the tokens themselves
            pos_sig = Sig(pos_var)
        embed = Sig(1.0).plus(pos_sig).scaled(factors[0])
        self.flat = flat * factors[0] ** 2
        self.act(f"{prefix}embed", embed, f"α·√(σ_tok² + σ_pos²), α = {factors[0]:.3g}",
                 {"forward": factors[0], "grad_input": factors[1]} if self.unit else None)
        if positional == "relative":
            self.act(f"{prefix}pos.rel_bias", 1.0, "T5 bias table N(0, 1)")
            self.weight(f"{prefix}pos.rel_bias.weight", 1.0, "nn.Embedding N(0, 1)")
        self.share = factors[0]
        return embed, {"prefix": prefix, "tok": tok_name, "factors": factors}

    def embed_bwd(self, e: dict, g: Sig) -> Sig:
        """Gradients of the embed tap, the positions, and the token-embedding output."""
        prefix, f, b = e["prefix"], e["factors"], self.b
        positional = self.cfg.positional
        self.grad(f"{prefix}embed", g)
        g_tok = self.grad(e["tok"], g.scaled(f[1]))
        if positional == "learned":
            gp = g.scaled(f[2])
            var = b * gp.total + b * (b - 1) * gp.m  # summed over the batch
            self.grad(f"{prefix}pos.table", math.sqrt(var), "Σ over the batch of α·g")
            rows = self.cfg.max_len
            alpha = R.unit_embedding_grad_scale(rows, self.t) if self.unit else 1.0
            self.wgrad(f"{prefix}pos.table.weight", alpha**2 * var * self.t / rows,
                       f"α²·(T/max_len)·σ_g², α = {alpha:.3g}")
        if positional == "relative":
            logit_vars = [v.rms**2 for k, v in self.grads.items()
                          if k.startswith(prefix) and k.endswith(".attn.scores")]
            var = b * sum(logit_vars)  # one bias feeds every layer and batch element
            self.grad(f"{prefix}pos.rel_bias", math.sqrt(var), "√(b·Σ_layers σ_g_logits²)")
            n = self.t * self.t
            alpha = R.unit_embedding_grad_scale(RELATIVE_BUCKETS, n) if self.unit else 1.0
            self.wgrad(f"{prefix}pos.rel_bias.weight", alpha**2 * var * n / RELATIVE_BUCKETS,
                       f"α²·(T²/buckets)·σ_g², α = {alpha:.3g}")
        return g_tok

    def tok_wgrad(self, g_tok: Sig) -> None:
        v, n = self.cfg.vocab_size, self.rows
        alpha = R.unit_embedding_grad_scale(v, n) if self.unit else 1.0
        # rows hit by the same id add; random ids coincide with probability 1/V
        pairs = self.pair_sum(g_tok, None) - n * g_tok.total
        var = alpha**2 * (n * g_tok.total + pairs / v) / v
        self.wgrad("tok_emb.weight", var, f"α²·(n/V)·σ_g², α = {alpha:.3g}")

    # -- the whole model -----------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        self.weight("tok_emb.weight", 1.0, "nn.Embedding N(0, 1)")
        if cfg.architecture == "encoder-decoder":
            x_enc, e_enc = self.embed_fwd("encoder.", "tok_emb")
            x_enc, enc_layers = self.stack("encoder.", cfg.encoder_layers, x_enc, False, None)
            memory, n_enc = self.norm_fwd("encoder.norm", x_enc)
            x, e_dec = self.embed_fwd("decoder.", "tok_emb@2")
            x, dec_layers = self.stack("decoder.", cfg.decoder_layers, x, True, memory)
            final, n_final = self.norm_fwd("decoder.norm", x)
        else:
            x, e = self.embed_fwd("", "tok_emb")
            x, layers = self.stack("", cfg.n_layers, x, cfg.architecture == "decoder", None)
            final, n_final = self.norm_fwd("norm", x)
        self.share /= max(n_final["x"].rms, 1e-30)  # the final norm
        logits, head = self.linear_fwd("head", final, self.c, cfg.vocab_size, role="readout")
        if cfg.tie_embeddings:
            self.weights.pop("head.weight")
        self_logit = 0.0
        if cfg.tie_embeddings:
            # the logit of the input token itself: α·d·σ_e²·(share of e in the normed stream)
            self_logit = head["f"].output * self.c * self.share
            rms = math.sqrt(logits.total + self_logit**2 / cfg.vocab_size)
            old = self.acts["head"]
            self.acts["head"] = TensorRow("head", "activation", rms, old.scales, None, (),
                                          ("{}; + self-logit {:.3g} (tied embedding)",
                                           (old._formula, self_logit)))
        ce = R.cross_entropy_rule(logits.rms, vocab=cfg.vocab_size, n_tokens=self.rows,
                                  unit=self.unit)
        loss = float(np.logaddexp(ce.loss, self_logit)) if self_logit > 0 else ce.loss
        self.act("loss", loss, "E[logsumexp(z)] − E[z_target] (exact quadrature)"
                 + ("; with the tied self-logit" if self_logit else ""))
        # ---- backward
        g = Sig(ce.grad_logits**2)
        self.grad("head", g, "(softmax(z) − onehot)/N"
                  + (" × V/√(V−1), sum reduction" if self.unit else ""))
        g = self.norm_bwd(n_final, self.linear_bwd(head, g))
        self._final_norm_coherence(n_final["name"], head, logits, ce, self_logit)
        if cfg.tie_embeddings:
            row = self.wgrads["tok_emb.weight"] = self.wgrads.pop("head.weight")
            row.name = "tok_emb.weight"
        if cfg.architecture == "encoder-decoder":
            memory_grads: list[Sig] = []
            g = self.stack_bwd(dec_layers, g, memory_grads)
            g_tok2 = self.embed_bwd(e_dec, g)
            g_mem = Sig(0.0)
            for mg in memory_grads:
                g_mem = g_mem.plus(mg)
            g = self.stack_bwd(enc_layers, self.norm_bwd(n_enc, g_mem), [])
            self.tok_wgrad(self.embed_bwd(e_enc, g))
            self.tok_wgrad(g_tok2)
        else:
            g = self.stack_bwd(layers, g, [])
            self.tok_wgrad(self.embed_bwd(e, g))

    def _final_norm_coherence(self, norm: str, head: dict, logits: Sig, ce, self_logit: float
                              ) -> None:
        """The final norm's gain gradient ``Σ_rows g ⊙ x̂`` has a mean the i.i.d. rule misses.

        The loss gradient ``Σ_v (p_v − y_v) w_v`` leans towards the token's own features:
        Stein's lemma gives ``E[Σ_v p_v w_v] = σ_w² α (1 − E Σp²) x̂`` (the softmax favours
        rows aligned with ``x̂``), and a tied head adds ``p_self · e_in``, of which a share
        ``c`` is in ``x̂``. Per element ``E[g ⊙ x̂] = κ = α_gx s [p_self c + (1 − p_self) σ_w²
        α (1 − E Σp²)]`` (``s`` the loss-gradient scale: 1/N, or V/√(V−1) unit-scaled), which
        adds ``(α_n N κ)²`` to the gradient's variance over ``N`` rows.
        """
        cfg, f = self.cfg, head["f"]
        v = cfg.vocab_size
        s = R.unit_cross_entropy_grad_scale(v) if self.unit else 1.0 / self.rows
        p_self = 0.0
        if self_logit > 0:
            p_self = 1.0 / (1.0 + math.exp(min(ce.loss - self_logit, 700.0)))
        sum_p2 = R.softmax_moments(logits.rms, v).sum_p2
        w2 = head["w"] ** 2
        kappa = f.grad_input * s * (p_self * self.share
                                    + (1 - p_self) * w2 * f.output * (1 - sum_p2))
        alpha = R.unit_layer_norm_grad_param_scale(self.c, self.rows) if self.unit else 1.0
        coherent = (alpha * self.rows * kappa) ** 2
        old = self.wgrads[f"{norm}.weight"]
        old.rms = math.sqrt(old.rms**2 + coherent)
        old.formula = ("{}; + (α·N·κ)², κ = {:.3g}: the loss gradient leans to x̂",
                       (old._formula, kappa))

    # -- rows ----------------------------------------------------------------------------------
    def to_rows(self) -> list[TensorRow]:
        order, grads, wgrads = self.order, self.grads, self.wgrads
        rows = [self.acts[name] for name in order]
        rows += [grads[name] for name in order if name in grads]
        rows += self.weights.values()
        rows += [wgrads[name] for name in self.weights if name in wgrads]
        return rows


def _attach_formats(rows: list[TensorRow], formats: tuple[str, ...]
                    ) -> dict[str, dict[str, np.ndarray]]:
    """Gaussian underflow/overflow fractions and headroom of every row, vectorised; returns
    the table (format → column → array in row order) the rows' ``formats`` read from.

    The table is computed once per distinct RMS (a stack's weights all share a few values).
    """
    tables: dict[str, dict[str, np.ndarray]] = {}
    if not rows or not formats:
        return tables
    rms = np.fromiter((r.rms for r in rows), dtype=np.float64, count=len(rows))
    rms[~np.isfinite(rms) | (rms < 0)] = 0.0
    distinct, index = np.unique(rms, return_inverse=True)
    for name in formats:
        table = gaussian_format_table(distinct, FORMATS[name])
        tables[name] = {k: table[k][index] for k in ("underflow", "subnormal", "overflow",
                                                     "headroom_max_log2", "headroom_min_log2")}
    for i, row in enumerate(rows):
        row.formats = (tables, i)  # a TableRow view, made when first read
    return tables


def predict(cfg: ModelConfig, formats: tuple[str, ...] = REPORTED_FORMATS) -> list[TensorRow]:
    """Predicted rows for ``cfg`` (see module docstring), with headroom in ``formats``.

    Cached per (config, formats): the rows returned are shared and must not be modified.
    """
    return list(_prediction(cfg, tuple(formats))[0])


def status_counts(cfg: ModelConfig, fmt: str) -> dict[str, int]:
    """How many predicted tensors are ``fine``, ``at_risk`` and ``lost`` in ``fmt``
    (:func:`~.formats.headroom_status` of each row, vectorised)."""
    _rows, tables = _prediction(cfg, (fmt,))
    table = tables[fmt]
    statuses = headroom_status_array(table["underflow"], table["subnormal"], table["overflow"])
    return {status: int(np.count_nonzero(statuses == status))
            for status in ("fine", "at_risk", "lost")}


def is_predicted(cfg: ModelConfig, formats: tuple[str, ...]) -> bool:
    """True when :func:`predict` would answer ``(cfg, formats)`` from its cache."""
    return (cfg, tuple(formats)) in _CACHE


def clear_cache() -> None:
    """Forget every cached prediction (benchmarks time cold predictions)."""
    with _CACHE_LOCK:
        _CACHE.clear()


#: The most recent predictions, least recently used first (an explicit LRU rather than
#: functools' so the panel can ask whether a prediction is ready without computing it).
_CACHE: OrderedDict[tuple, tuple] = OrderedDict()
_CACHE_SIZE = 16
_CACHE_LOCK = threading.Lock()


def _prediction(cfg: ModelConfig, formats: tuple[str, ...]
                ) -> tuple[tuple[TensorRow, ...], dict[str, dict[str, np.ndarray]]]:
    key = (cfg, formats)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    # A prediction allocates tens of thousands of small acyclic objects (rows, deferred
    # formulas, Sigs); the cyclic collector would rescan them over and over and cost a few
    # milliseconds of the frame, collecting nothing. Reference counting frees them as usual.
    collecting = gc.isenabled()
    gc.disable()
    try:
        p = _Predictor(cfg)
        p.run()
        rows = p.to_rows()
        tables = _attach_formats(rows, formats)
    finally:
        if collecting:
            gc.enable()
    result = tuple(rows), tables
    with _CACHE_LOCK:
        _CACHE[key] = result
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return result
