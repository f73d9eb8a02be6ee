"""Analytic prediction of every tensor's RMS in one training step at initialisation.

A variance-propagation pass over exactly the op graph ``unitscale_core.model`` executes,
forward from the embeddings to the loss, then backward from the loss, composed from the per-op
rules in :mod:`.rules`. Rows carry the names measurement uses (``layers.0.attn.q``, …) so the
two line up row for row. Nothing is built and nothing touches torch.

Each tensor is tracked as a position-resolved covariance (:class:`~.covariance.Cov`): per
position the variance that belongs to the token alone, and for every pair of positions the
covariance of two tokens of one sequence and of two sequences. Attention averages values with
expected weights uniform over each query's allowed keys (each ALiBi head group's decaying
with distance on its own map; RoPE's rotation decorrelating what queries and keys share
across positions), so a causal stack keeps the early
tokens' own parts while later ones share almost everything, and its backward piles gradient
onto the first keys; biases and the mean of GELU/ReLU create parts shared by the whole batch;
sinusoidal encodings make near positions alike. Elementwise nonlinearities map every pair
through Mehler's formula, LayerNorm rescales each token by its own variance, and weight and
bias gradients are sums over rows, where the shared parts add coherently:
``E[ΔW²] = α² (b Σ_i σ_g,i² σ_x,i² + b Σ_{i≠j} C^g_ij C^x_ij + b(b−1) Σ_ij M^g_ij M^x_ij)``.

Further correlations are modelled: with tied embeddings, the logit of a token's own input
embedding is ``α_head · d · c`` where ``c`` is the share of that embedding left in the final
normalised stream (the "self-logit", which dominates the loss of a standard model with tied
N(0, 1) embeddings), and the gradient it sends back leans against the stream's shared parts
(``_self_logit_lean``), and keeps leaning on them down the stack, where each branch's
backward meets its own forward output (``_aligned_cross``); the key bias gets no gradient
(softmax ignores per-row shifts). Each
LayerNorm's input also records the token's own share of the stream, from which
:mod:`.collapse` finds where a deep stack's tokens fall below the resolution of its dtype.
The stream's token deviations are also tracked in feature space, by one number: their
anisotropy ``S = d·tr Σ²/(tr Σ)²`` (1 when isotropic), which every branch that maps a token's
own deviation linearly raises (``_mix_aniso``); keys and values are projections of one input,
so ``S`` scales what pairs of keys add to attention's output and to the query and key
gradients (:func:`.covariance.key_value_pairs`, :func:`shared_input_factor`).
"""

from __future__ import annotations

import gc
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from itertools import repeat
from operator import attrgetter

import numpy as np

from ..config import ConfigError, ModelConfig
from ..positional import alibi_slopes, sinusoidal_at
from ..sizing import RELATIVE_BUCKETS
from ..tensors import REPORTED_FORMATS, TensorRow
from . import covariance
from . import rules as R
from .collapse import Collapse, find_collapse
from .covariance import Cov, pair_sum
from .formats import FORMATS, gaussian_format_table, headroom_status_array
from .hermite import hermite_coefficients

LN_EPS = 1e-5
#: RMSNorm's ε in the torch model (``unitscale_core.model.layers.RMSNORM_EPS``)
RMS_EPS = 1e-6
#: ALiBi heads are predicted in at most this many groups of consecutive slopes, each on its
#: own attention map (the attention ops' cost times the number of groups).
MAX_ALIBI_MAPS = 4
#: The common key preference of a sequence's queries is evaluated on rows of at most this
#: many keys (see ``attention_fwd``).
COMMON_MAX_KEYS = 4096


#: probabilists' Gauss–Hermite nodes and weights (normalised): E f(N(0, 1)) ≈ w·f(x)
_GAUSS_HERMITE = (lambda x, w: (x, w / w.sum()))(*np.polynomial.hermite_e.hermegauss(24))


@lru_cache(maxsize=1024)
def _linear_factors(ops: str, fan_in: int, fan_out: int, rows: int, role: str) -> R.LinearFactors:
    """The factors ``unitscale_core.model.ops`` applies to a linear layer of this role."""
    if ops == "standard":
        return R.LinearFactors(1.0, 1.0, 1.0)
    if ops == "unit":  # the MoE router keeps its forward scale (``UnitOps.linear``)
        return R.unit_linear_scales(fan_in, fan_out, rows,
                                    "to_output_scale" if role == "router" else "gmean")
    if role == "readout":
        return R.unit_linear_readout_scales(fan_in, fan_out, rows)
    return R.unit_linear_scales(fan_in, fan_out, rows, None if role == "ffn" else
                                "to_output_scale")


@lru_cache(maxsize=1024)
def _linear_setup(ops: str, fan_in: int, fan_out: int, rows: int, role: str, bias: bool,
                  tied: bool) -> tuple[R.LinearFactors, float, float, float]:
    """A linear layer's factors, weight and bias RMS and forward gain (the same for every
    layer of a stack, so computed once): ``(f, w, bias, α·√fan_in·w)``."""
    f = _linear_factors(ops, fan_in, fan_out, rows, role)
    unit = ops != "standard"
    w = R.torch_default_linear_weight_rms(fan_in) if not (unit or tied) else 1.0
    b = R.torch_default_linear_bias_rms(fan_in) if bias and not unit else 0.0
    return f, w, b, f.output * math.sqrt(fan_in) * w


@lru_cache(maxsize=64)
def _unit_attention_factors(t_q: int, t_k: int, dh: int) -> tuple[float, ...]:
    """Unit scaling's attention factors (the same for every layer of a stack): output, q/k/v
    input-gradient, P·V left and right gradients, softmax output and input-gradient, and the
    logits' gradient factor."""
    sm = R.unit_softmax_scales(t_k, 1.0, "gmean")
    mm = R.unit_matmul_scales(t_q, t_k, dh, "gmean")
    logit_grad = R.unit_matmul_scales(t_q, dh, t_k, "to_output_scale")[1]
    return sm.output * mm[0], 1.0, mm[1], mm[2], sm.output, sm.grad_input, logit_grad


def shared_input_factor(sum_p2: float | np.ndarray, d: int, aniso: float = 1.0
                        ) -> float | np.ndarray:
    """How much more gradient reaches the queries because keys and values are projections of
    the same ``d``-wide input (self-attention, and cross-attention's memory), whose token
    deviations have anisotropy ``aniso`` (``S`` of :func:`stream_anisotropy`, 1: isotropic).

    ``gQ_i = m Σ_j gZ_ij K_j`` with ``gZ_ij = P_ij gY_i·(V_j − Σ_l P_il V_l)``, so
    ``E|gQ_i|² ∝ Σ_jl P_ij P_il (ṽ_j·ṽ_l)(k̃_j·k̃_l)``. With independent K and V only the
    diagonal ``j = l`` survives (the per-op rule). With ``K = W_k x``, ``V = W_v x`` each pair
    ``j ≠ l`` adds ``E(x̃_j·x̃_l)² ≈ S|x̃|⁴/d`` (``S = d·tr Σ²/(tr Σ)²`` of the deviations), and
    ``Σ_{j≠l} P_ij P_il = 1 − Σ_j P_ij²``: the variance is multiplied by
    ``1 + S(1 − EΣp²)/(d · EΣp²)``. Checked against a torch measurement of one attention op
    (``tests/core/test_predict.py``).
    """
    s = np.maximum(sum_p2, 1e-12)
    return 1.0 + aniso * np.maximum(1.0 - s, 0.0) / (d * s)


@lru_cache(maxsize=32)
def _sinusoidal_cov(d_model: int, t: int) -> tuple[Cov, tuple[np.ndarray, np.ndarray]]:
    """Sinusoidal encodings (Vaswani et al. 2017 §3.5) on :func:`.covariance.grid` ``(t)``:
    pair covariances ``PE_i·PE_j/d`` (identical in every sequence, so also ``M``), and those
    of the row means ``μ_i μ_j`` that a LayerNorm removes (distinct tokens, other
    sequences). Bins wider than 16 positions are sampled at 16."""
    g = covariance.grid(t)
    pos, onehot, cnt = covariance.sampled_positions(t)
    pe = sinusoidal_at(pos, d_model).astype(np.float64)
    mu = pe.mean(1)
    C, M, var = covariance.binned_pairs(pe @ pe.T / d_model, onehot, cnt)
    FC, FM, _ = covariance.binned_pairs(np.outer(mu, mu), onehot, cnt)
    u = np.maximum(var - np.diagonal(C), 0.0)
    return Cov(g, u, C, M), (FC, FM)


#: gated feed-forwards' gate nonlinearity
_GATES = {"swiglu": "silu", "geglu": "gelu_tanh"}
#: a sub-block's output norm (sandwich, branch_output) by its input norm's name
_OUT_NORMS = {"norm1": "attn_out_norm", "norm2": "ffn_out_norm", "cross_norm": "cross_out_norm"}


def _out_norm_name(norm_name: str) -> str:
    """``layers.0.norm1`` → ``layers.0.attn_out_norm`` (and ffn's, cross-attention's)."""
    head, _, last = norm_name.rpartition(".")
    return f"{head}.{_OUT_NORMS[last]}"


def _softcapped(var: np.ndarray, cap: float) -> tuple[np.ndarray, np.ndarray]:
    """Per bin: the variance of ``c·tanh(z/c)`` and ``E sech⁴(z/c)`` (the squared gain of
    its backward) for logits ``z`` of variance ``var`` (:func:`.rules.softcap_rule`)."""
    out, grad2 = np.empty_like(var), np.empty_like(var)
    for i, v in enumerate(np.maximum(var, 0.0).tolist()):
        r = R.softcap_rule(math.sqrt(v), 1.0, cap=cap)
        out[i], grad2[i] = r.output ** 2, r.grad_input ** 2
    return out, grad2


class UnpredictedFeature(ConfigError):
    """A config using a feature the analytic predictor has no rule for yet (issue 21's modern
    fields): refused by field name rather than predicted as if the feature were absent."""


def unpredicted_features(cfg: ModelConfig) -> dict[str, str]:
    """field → reason for each feature of ``cfg`` the predictor has no rule for (empty: every
    feature is predicted). Every field issue 21 added has its rules now (MoE, and
    ``parallel_residual`` under every parametrization and with cross-attention), so this is
    empty for every valid config; a later field the torch model builds before the predictor
    has its rule is refused here by name, never predicted as if it were absent (the
    Scaling panel then says "⚠ not predicted: …")."""
    del cfg  # no field is refused today
    return {}


def check_predictable(cfg: ModelConfig) -> None:
    """Raise :class:`UnpredictedFeature` naming each field of ``cfg`` the predictor cannot
    predict yet (:func:`unpredicted_features`)."""
    errors = unpredicted_features(cfg)
    if errors:
        raise UnpredictedFeature(errors)


class PredictionCancelled(Exception):
    """Raised by :func:`predict` when its ``should_stop`` says so (nothing is cached)."""


class _Predictor:
    """One pass over one config; fills ``acts``, ``grads``, ``weights``, ``wgrads``."""

    def __init__(self, cfg: ModelConfig, should_stop: Callable[[], bool] | None = None):
        check_predictable(cfg)  # never predict a feature as if it were absent
        self.cfg = cfg
        self.should_stop = should_stop
        self.p = cfg.parametrization
        self.unit = self.p != "standard"
        self.c = cfg.d_model
        self.dh = cfg.head_size
        self.b = cfg.batch_size
        self.t = cfg.seq_len
        self.rows = self.b * self.t
        #: the LayerNorm gain and bias gradients' factor (the same for every norm)
        self.ln_alpha = (R.unit_layer_norm_grad_param_scale(self.c, self.rows) if self.unit
                         else 1.0)
        self.grid = covariance.grid(self.t)
        # rows are made as the walk goes (no intermediate records: thousands per prediction)
        self.acts: dict[str, TensorRow] = {}
        self.grads: dict[str, TensorRow] = {}
        self.weights: dict[str, TensorRow] = {}
        self.wgrads: dict[str, TensorRow] = {}
        self.order: list[str] = []  # activation names in execution order
        self.drop = R.dropout_rule(1.0, 1.0, p=cfg.dropout, unit=self.unit).output \
            if cfg.dropout > 0 else 1.0
        #: dropout's factor on what tokens share (``_dropout``): ``s²`` of ``s·m/(1−p)``
        self.drop_shared = (R.unit_dropout_scale(cfg.dropout) ** 2
                            if cfg.dropout > 0 and self.unit else 1.0)
        #: ``E η² = p/(1−p)`` of a mask's noise ``m/(1−p) − 1``
        self._drop_noise = cfg.dropout / (1.0 - cfg.dropout)
        # Share of a token's own embedding in the (normalised) stream, for tied logits: every
        # residual add multiplies the skip by its weight, every norm divides by its input RMS.
        self.share = 1.0
        # The excess anisotropy e of the stream's token deviations in feature space (the
        # realised ``d·tr Σ²/(tr Σ)² − 1`` of their per-sequence covariance; 0: isotropic),
        # what a sub-block's branch reads (``_e_in``) and adds (``_e_branch``), and the
        # encoder output's for cross-attention (see ``_mix_aniso``).
        self.aniso = self._e_in = self._e_branch = self._e_memory = 0.0
        # the share of the branch's deviation variance that is linear in the token's own
        # input deviation (``_mix_aniso``)
        self._linear_share = 0.0
        #: pre-norm sub-blocks' norm name → the variance their branch adds to the stream
        #: (``_branch_scale_coherence``)
        self.branch_vars: dict[str, float] = {}
        # The residual stream's component along the all-ones feature direction (sinusoidal
        # positions' row means), as pair covariances (distinct tokens, other sequences):
        # every LayerNorm removes it, the skip keeps it.
        self.flat: tuple[np.ndarray, np.ndarray] | None = None
        #: (norm name, the token's own share of the stream's variance there) per LayerNorm
        #: that reads the residual stream, in execution order (:mod:`.collapse`)
        self.own_shares: list[tuple[str, float]] = []
        #: (norm name, 1 + the stream's excess anisotropy there) per LayerNorm, in execution
        #: order (:func:`stream_anisotropy`)
        self.anisotropies: list[tuple[str, float]] = []
        #: (name, kind) → Cov of every activation and activation gradient, when asked for
        #: (:func:`predicted_covariances`); None in a normal prediction.
        self.keep: dict[tuple[str, str], Cov] | None = None
        #: standard, tied: the gradient's part set against the stream's shared parts, as a
        #: coefficient per position bin on the stream's own shared parts where the backward
        #: stands (``_aligned_cross``); None until the tied self-logit sets it
        self.align: np.ndarray | None = None
        self._track_align = cfg.tie_embeddings and not self.unit
        #: the tied self-logit's spread between tokens (``_p_self``), set with the logit
        self._self_logit_sd = 0.0

    # -- bookkeeping -----------------------------------------------------------------------------
    def act(self, name: str, x: Cov | float, formula: str = "", scales: dict | None = None):
        rms = x.rms if isinstance(x, Cov) else x
        if self.keep is not None and isinstance(x, Cov):
            self.keep[(name, "activation")] = x
        self.acts[name] = TensorRow(name, "activation", rms, scales, None, (), formula)
        self.order.append(name)
        return x

    def grad(self, name: str, g: Cov | float, formula: str = ""):
        if self.keep is not None and isinstance(g, Cov):
            self.keep[(name, "grad_activation")] = g
        self.grads[name] = TensorRow(name, "grad_activation", g.rms if isinstance(g, Cov)
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

    def independent(self, var: float | np.ndarray) -> Cov:
        """Independent tokens of variance ``var`` (an array: a fresh one, taken as it is)."""
        if isinstance(var, np.ndarray) and var.ndim:
            return Cov.of(self.grid, var, self.grid.none)
        return Cov.independent(self.grid, var)

    # -- ops -----------------------------------------------------------------------------------
    def linear_fwd(self, name: str, x: Cov, fan_in: int, fan_out: int,
                   role: str = "hidden", bias: bool | None = None,
                   rows: int | None = None) -> tuple[Cov, dict]:
        """Forward of ``ops.linear`` over batch × sequence rows; ``bias`` (None: the config's
        ``bias``) says whether it has one (q, k, v: ``cfg.has_qkv_bias``); ``rows`` (None:
        batch × sequence) the rows unit scaling's weight gradient counts (an expert's)."""
        has_bias = (self.cfg.bias if bias is None else bias) and role != "readout"
        tied = role == "readout" and self.cfg.tie_embeddings  # the head is the N(0, 1) table
        f, w, bias, gain = _linear_setup(self.p, fan_in, fan_out,
                                         self.rows if rows is None else rows, role, has_bias,
                                         tied)
        # q, k and v of one input are the same tensor when their factors agree: share one
        # object, and with it everything derived from it (row variances, pair-sum weights)
        memo_key = ("linear", gain, (f.output * bias) ** 2)
        y = x.memo.get(memo_key)
        if y is None:
            y = x.memo[memo_key] = x.scaled(gain).plus_global(memo_key[2])
        scales = ({"forward": f.output, "grad_input": f.grad_input,
                   "grad_weight": f.grad_weight} if self.unit else None)
        self.act(name, y, ("α·√(fan_in·σ_x²·σ_w² + σ_b²) = {:.3g}·√({}·{:.3g}²·{:.3g}² + "
                           "{:.3g}²)", (f.output, fan_in, x.rms, w, bias)), scales)
        self.weight(name + ".weight", w, "N(0, 1)" if self.unit else
                    ("nn.Linear default U(±1/√fan_in): 1/√(3·{})", (fan_in,)))
        if has_bias:
            self.weight(name + ".bias", bias, "zeros" if self.unit else
                        ("nn.Linear default: 1/√(3·{})", (fan_in,)))
        return y, {"name": name, "x": x, "w": w, "fan_out": fan_out, "f": f, "bias": has_bias,
                   "x_fan_in": fan_in}

    def linear_bwd(self, ctx: dict, g: Cov, zero_bias_grad: bool = False,
                   extra: float = 0.0) -> Cov:
        """Backward of ``ops.linear``; ``extra`` adds to ``E[(Σ_rows g·x)²]`` what a gradient
        that depends on its own input adds (attention's keys and values)."""
        name, f = ctx["name"], ctx["f"]
        self.grad(name, g)
        aw2 = f.grad_weight**2
        self.wgrad(name + ".weight", aw2 * (pair_sum(self.b, g, ctx["x"]) + extra),
                   ("α_w²·E[(Σ_rows g·x)²], α_w = {:.3g}", (f.grad_weight,)) if not extra else
                   ("α_w²·(E[(Σ_rows g·x)²] + {:.3g}, the mean part of g·x), α_w = {:.3g}",
                    (extra, f.grad_weight)))
        if ctx["bias"]:
            if zero_bias_grad:
                self.wgrad(name + ".bias", 0.0, "0: softmax ignores a shift shared by all keys")
            else:
                self.wgrad(name + ".bias", aw2 * pair_sum(self.b, g, None),
                           ("α_w²·E[(Σ_rows g)²], α_w = {:.3g}", (f.grad_weight,)))
        return g.scaled(f.grad_input * math.sqrt(ctx["fan_out"]) * ctx["w"])

    def norm_fwd(self, name: str, x: Cov, d: int | None = None, stream: bool = True
                 ) -> tuple[Cov, dict]:
        """LayerNorm of the residual stream: each token to unit RMS. It subtracts each row's
        mean, so the stream's flat part (``self.flat``) never reaches the output and does not
        count in the variance it divides by.

        RMSNorm (``cfg.norm_type``, :func:`.rules.rms_norm_rule`) removes no mean: what the
        tokens share is kept — the flat part passes through (scaled with the token) and
        counts in the variance it divides by — so downstream the normalised stream keeps
        every shared part of the stream in its ``C``/``M``, exactly as a LayerNorm keeps the
        shared parts in random directions (only the all-ones direction differs), and the
        backward projects out one direction (``x̂``), not two.

        ``d`` (default ``d_model``) is the normalised width and ``stream=False`` marks a norm
        that does not read the residual stream (QK-norm, a sub-block's output norm): no flat
        part to remove, nothing recorded for :mod:`.collapse` or the anisotropy."""
        rms_norm = self.cfg.norm_type == "rmsnorm"
        d = self.c if d is None else d
        if self.flat is not None and stream and not rms_norm:
            x = x.minus_shared(*self.flat)
        total = x.total
        if stream:
            self.own_shares.append((name, float(self.grid.w @ x.u) / total if total > 0
                                    else 1.0))
            self.anisotropies.append((name, 1.0 + self.aniso))
        if rms_norm:
            r = R.rms_norm_rule(x.rms, 1.0, d=d, b_rows=self.rows, eps=RMS_EPS)
        else:
            r = R.layer_norm_rule(x.rms, 1.0, d=d, b_rows=self.rows, eps=LN_EPS)
        y = x.normalised(r.output)
        if rms_norm:
            self.act(name, y, ("RMSNorm: √(ms/(ms+ε)), input σ = {:.3g} (no mean removed: "
                               "what tokens share is kept), over {} features", (x.rms, d)))
        elif stream:
            self.act(name, y, ("LayerNorm: √(v/(v+ε)), input σ = {:.3g} (row mean removed); "
                               "the tokens' own share {:.3g}, their deviations' anisotropy "
                               "S = {:.3g}", (x.rms, self.own_shares[-1][1], 1.0 + self.aniso)))
        else:
            self.act(name, y, ("LayerNorm: √(v/(v+ε)), input σ = {:.3g}, over {} features",
                               (x.rms, d)))
        self.weight(name + ".weight", 1.0, "norm gain: ones")
        if self.cfg.bias and not rms_norm:
            self.weight(name + ".bias", 0.0, "LayerNorm bias: zeros")
        # the input itself is not kept (a 96-layer forward would hold every stream state):
        # the backward needs only its variance per position
        return y, {"name": name, "x_var": x.var, "x_rms": x.rms, "y": y, "d": d}

    def norm_bwd(self, ctx: dict, g: Cov) -> Cov:
        """Per token ``g_x = (g − mean g − x̂ mean(g x̂))/σ``: :func:`.rules.layer_norm_rule`
        at each position's own input variance."""
        alpha = self.ln_alpha
        name = ctx["name"]
        self.grad(name, g)
        # a gain shared by ``heads`` independent heads (per-head QK-norm) sums their rows
        heads = ctx.get("heads", 1)
        if heads > 1 and self.unit:  # unit_scaling's (d/numel)^½ counts the heads' rows
            alpha = alpha / math.sqrt(heads)
        self.wgrad(name + ".weight", heads * alpha**2 * pair_sum(self.b, g, ctx["y"]),
                   ("α²·E[(Σ_rows g·x̂)²], α = {:.3g}", (alpha,)) if heads == 1 else
                   ("{}·α²·E[(Σ_rows g·x̂)²] (a gain shared by {} heads), α = {:.3g}",
                    (heads, heads, alpha)))
        rms_norm = self.cfg.norm_type == "rmsnorm"
        if self.cfg.bias and not rms_norm:
            self.wgrad(name + ".bias", heads * alpha**2 * pair_sum(self.b, g, None),
                       ("α²·E[(Σ_rows g)²], α = {:.3g}", (alpha,)))
        if rms_norm or ctx["d"] != self.c:
            # RMSNorm projects out x̂ only; a QK-norm's width is d_head or the projection's
            ctx["bwd"] = factor = R.norm_backward_factor(
                ctx["x_var"], ctx["d"], self.cfg.norm_type, RMS_EPS if rms_norm else LN_EPS)
            return g.rescaled(factor)
        d = self.c
        var = np.maximum(ctx["x_var"], 0.0)
        var_bar = var * (d - 1) / d
        r = var_bar / (var_bar + LN_EPS)
        inv_var = 1.0 / (var * max(d - 3, 1) / d + LN_EPS)
        ctx["bwd"] = factor = np.sqrt(((d - 2) + (1 - r) ** 2) / d * inv_var)
        return g.rescaled(factor)

    def _residual_weights(self, tau: float) -> tuple[float, float]:
        """``(w_r, w_s)``, the branch's and skip's weights of a residual add: unit scaling's
        τ rule (:func:`.rules.residual_weights`), plain ``(1, 1)`` in a standard model."""
        return R.residual_weights(tau) if self.unit else (1.0, 1.0)

    def _dropout(self, x: Cov) -> Cov:
        """``y = s·x ⊙ m/(1−p)`` with a fresh Bernoulli(1 − p) mask per element and token
        (``s`` 1, unit-scaled ``√(1−p)``): each token's variance gains ``1/(1−p)``, but two
        tokens' masks are independent (``E[m m'] = (1−p)²``), so what they share only gets
        ``s²`` — the extra ``p/(1−p)`` of the variance is the token's own. The backward
        masks the gradient alike. As one scalar gain the shared parts came out ``1/(1−p)``
        high, so the predicted stream collapsed too fast under unit scaling: a 3-layer unit
        decoder with p = 0.1 (d 96, 8 seeds) went from 84.8% to 92.8% within 25% per seed,
        and its deeper layers' query and key gradients from 0.7 log2 low to within 0.3."""
        if self.cfg.dropout == 0:
            return x
        var = x.var * self.drop**2
        S = x.S * self.drop_shared if len(x.S) else x.S
        own = var - S[0].diagonal() if len(S) else var
        return Cov.of(x.g, np.maximum(own, 0.0), S)

    def residual_add(self, branch: Cov, skip: Cov, tau: float) -> Cov:
        w_r, w_s = self._residual_weights(tau)
        return branch.scaled(w_r).plus(skip.scaled(w_s))

    def residual_split_bwd(self, g_branch: Cov, g_skip: Cov, tau: float) -> Cov:
        w_r, w_s = self._residual_weights(tau)
        return g_branch.scaled(w_r).plus(g_skip.scaled(w_s))

    # -- attention -----------------------------------------------------------------------------
    @staticmethod
    def _logit_bias_vars(kind: str) -> list[float]:
        """The within-row variance a positional logit bias adds to the random logits (ALiBi's
        fixed ramps are not spread but each head group's own map: ``_head_groups``)."""
        if kind == "relative":
            return [1.0]  # T5 table entries N(0, 1); a row spans many buckets
        return [0.0]

    def _row_stats(self, sigma2: np.ndarray, keys: np.ndarray, bias_vars: list[float]
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Per query bin ``E Σ_j p_j²`` and the softmax-Jacobian factor, for logits of
        variance ``sigma2`` over rows of ``keys`` keys (averaged over the bias groups)."""
        g = len(bias_vars)
        if g == 1 and bias_vars[0] == 0.0:  # no positional bias: σ² as it is
            sigma = np.sqrt(np.maximum(sigma2, 0.0))
        else:
            sigma = np.sqrt(np.maximum(sigma2[:, None] + np.asarray(bias_vars), 0.0)).ravel()
            keys = np.repeat(keys, g)
        sum_p2, gf = R.softmax_row_stats(R._keys(sigma), keys, self.dh)
        if g > 1:
            sum_p2, gf = sum_p2.reshape(-1, g).mean(1), gf.reshape(-1, g).mean(1)
        return sum_p2, gf

    def _head_groups(self, t: int, pattern: str, causal: bool, positional: str
                     ) -> list[tuple[covariance.AttentionMap, list[float], float]]:
        """``(map, logit bias variances, share of the heads)`` per group of heads with one
        expected-weight pattern: one group (uniform weights over the allowed keys, a T5
        relative bias counted as extra logit spread) except for ALiBi, whose heads' fixed
        slopes make each one's expected weights decay with distance at its own rate: up to
        :data:`MAX_ALIBI_MAPS` groups of consecutive slopes, each on the map of their
        geometric mean.

        (Per-head maps of drawn T5 biases were tried: a 6-layer unit encoder's share rose from
        77% to 83%, but causal decoders' score, key and query gradients came out 0.3–0.4
        log2 high and a unit encoder-decoder fell from 94% to 88%, so a T5 bias stays spread.)
        """
        window = self.cfg.window
        if positional != "alibi":
            return [(covariance.attention_map(t, pattern, window, causal),
                     self._logit_bias_vars(positional), 1.0)]
        slopes = alibi_slopes(self.cfg.n_heads)
        chunks = np.array_split(np.sort(slopes), min(len(slopes), MAX_ALIBI_MAPS))
        return [(covariance.attention_map(t, pattern, window, causal,
                                          float(np.exp(np.log(chunk).mean()))),
                 [0.0], len(chunk) / len(slopes)) for chunk in chunks]

    def attention_fwd(self, prefix: str, xq: Cov, xkv: Cov, causal: bool, pattern: str,
                      positional: str) -> tuple[Cov, dict]:
        c, dh, t = self.c, self.dh, self.t
        cfg = self.cfg
        qkv_bias = cfg.has_qkv_bias
        # q: d → H·D, k and v: d → H_kv·D (grouped-query attention, decoupled head size)
        q, lq = self.linear_fwd(f"{prefix}.q", xq, c, cfg.attn_width, bias=qkv_bias)
        k, lk = self.linear_fwd(f"{prefix}.k", xkv, c, cfg.kv_width, bias=qkv_bias)
        v, lv = self.linear_fwd(f"{prefix}.v", xkv, c, cfg.kv_width, bias=qkv_bias)
        nq = nk = None
        if cfg.qk_norm != "none":  # after the projections, before rope
            q, nq = self._qk_norm(f"{prefix}.q_norm", q, cfg.n_heads)
            k, nk = self._qk_norm(f"{prefix}.k_norm", k, cfg.kv_heads)
        kv_fwd, kv_bwd = self._kv_repeat_scales()
        if kv_fwd != 1.0:  # unit scaling's repeat: g^-¼ forward (ops.repeat_kv)
            k, v = k.scaled(kv_fwd), v.scaled(kv_fwd)
        q_plain = q  # before the rotation: the key gradient rotates it band by band
        if positional == "rope":
            # rotated by position, what queries and keys share across positions decorrelates:
            # a shared part then moves the weights along a row like a token's own part
            base, rot = self.cfg.rope_base, self.cfg.rotary_dims
            q = covariance.partially_rotated(q, dh, rot, base)
            k = covariance.partially_rotated(k, dh, rot, base)
        m = 1.0 / dh if self.p == "umup" else 1.0 / math.sqrt(dh)
        cap = self.cfg.attn_softcap
        raw = R.attention_logits_rms(q.rms, k.rms, dh, m)
        self.act(prefix + ".scores", R.softcap_rule(raw, 1.0, cap=cap).output,
                 ("m·√d_head·σ_q·σ_k, m = {:.3g}, d_head = {}", (m, dh)) if cap is None else
                 ("c·√E tanh²(z/c), σ_z = m·√d_head·σ_q·σ_k = {:.3g}, m = {:.3g}, c = {}",
                  (raw, m, cap)))
        is_causal = causal or pattern == "causal"
        if self.p == "unit":
            (out_scale, grad_qkv, grad_left, grad_right, sm_out, grad_sm_in,
             logit_grad) = _unit_attention_factors(t, t, dh)
        else:
            out_scale = 1.0
            if self.p == "umup" and (t > 1 or not is_causal):
                out_scale = R.unit_sdpa_scale(t, dh, is_causal)
            grad_qkv, grad_left, grad_right, sm_out, grad_sm_in = out_scale, 1.0, 1.0, 1.0, 1.0
            logit_grad = m
        # Queries of one sequence share q's per-sequence part, so q_s·k_j is a key preference
        # common to all of them: their probabilities overlap more than uniform ones would.
        q_same, k_u = q.same, max(k.total - k.same, 0.0)
        sigma_a = m * math.sqrt(dh * max(q_same, 0.0) * k_u)
        own_input = xkv is xq  # self-attention: keys and values of the queries' own stream
        e_q = self._e_in
        e_kv = e_q if own_input else self._e_memory
        w = self.grid.w
        groups, parts, mean_p2, e_branch, linear = [], [], 0.0, 0.0, 0.0
        for amap, bias_vars, share in self._head_groups(t, pattern, is_causal, positional):
            # Only the keys' spread about the row's mean moves probabilities (shared parts
            # of k shift a whole row, which softmax ignores); per query bin.
            rowvar_k = covariance.row_variance(amap, k)
            logit_var = m * m * dh * q.var * rowvar_k
            cap_grad2 = 1.0
            if cap is not None:  # the softmax reads c·tanh(z/c) (Gemma 2): per query bin
                logit_var, cap_grad2 = _softcapped(logit_var, cap)
            sum_p2, grad_factor = self._row_stats(logit_var, amap.keys, bias_vars)
            if positional == "alibi":
                # the row statistics are those of uniform rows of the effective length; the
                # softmax Jacobian's Σp̄² − 2Σp̄³ + (Σp̄²)² of the biased weights is smaller
                # (a peaked row: 0.17 against 0.25 at 2.3 effective keys)
                r0 = amap.r0
                uniform = np.maximum(r0 - r0 * r0, 1e-300)
                grad_factor = grad_factor * np.maximum(r0 - 2.0 * amap.r3 + r0 * r0,
                                                       0.0) / uniform
            mean_p2 += share * float(w @ sum_p2)
            common = 1.0
            if sigma_a > 1e-3:
                # rows longer than COMMON_MAX_KEYS are taken at that length: the quadrature
                # for a sharp preference over 10⁵ keys takes seconds, and this factor is a
                # first-order correction to the overlap of two queries' weights; a biased
                # head's rows count as its mean effective keys
                rows, rows_causal = (t, is_causal) if positional != "alibi" else (
                    max(round(float(w @ amap.counts)), 1), False)
                n = min(rows, COMMON_MAX_KEYS)
                common = R.softmax_moments(sigma_a, n, rows_causal).sum_p2 / \
                    R.softmax_moments(0.0, n, rows_causal).sum_p2
            # E Σp² beyond the expected weights' own Σ p̄²: the spread of the probabilities
            excess = np.maximum(sum_p2 - amap.r0, 0.0)
            pairs = covariance.key_value_pairs(amap, self.c, logit_var, excess, 1.0 + e_kv)
            attended = covariance.attend(amap, v, excess, common, pairs)
            e_branch += share * self._attention_aniso(amap, v, excess, pairs, attended, e_q,
                                                      e_kv, own_input)
            linear += share * self._linear_share
            if self.cfg.dropout > 0:
                # a mask on each weight: s·Σ_j p_ij (1 + η_ij) v_j, E η² = p/(1−p): what the
                # tokens share gets s², and the noise is the query's own, s²·Σ_j E p_ij²
                # E v_j² (E p² = p̄²·EΣp²/Σp̄²); as one gain s²/(1−p) on everything, the
                # shared part was 1/(1−p) high
                noise = self._drop_noise * (amap.R0 @ v.var) * sum_p2 / np.maximum(
                    amap.r0, 1e-300)
                attended = attended.scaled(math.sqrt(self.drop_shared)).plus(
                    self.independent(noise * self.drop_shared))
            parts.append((attended, share))
            groups.append({"amap": amap, "sum_p2": sum_p2, "gf": grad_factor,
                           "excess": excess, "common": common, "share": share,
                           "cap_grad2": cap_grad2})
        self._e_branch, self._linear_share = e_branch, linear
        self.act(prefix + ".probs", math.sqrt(mean_p2 / t),
                 ("√(E Σp²/S), E Σp² = {:.3g}, S = {}", (mean_p2, t)))
        ctx_cov = covariance.mixture(parts).scaled(out_scale)  # (dropout: above)
        scales = {"forward": out_scale, "grad_input": grad_qkv if self.p == "umup" else
                  grad_left} if self.unit else None
        self.act(prefix + ".context", ctx_cov,
                 ("α·Σ_j p_ij v_j: expected weights p̄ over the allowed keys, E Σp² = {:.3g}, "
                  "α = {:.3g}", (mean_p2, out_scale)), scales)
        out, lo = self.linear_fwd(f"{prefix}.o", ctx_cov, cfg.attn_width, c)
        return out, {"prefix": prefix, "lq": lq, "lk": lk, "lv": lv, "lo": lo, "q": q, "k": k,
                     "q_plain": q_plain, "nq": nq, "nk": nk, "kv_bwd": kv_bwd,
                     "v": v, "groups": groups, "aniso_kv": 1.0 + e_kv,
                     "rope": positional == "rope",
                     "rotary_share": (self.cfg.rotary_dims / dh if positional == "rope"
                                      else 0.0),
                     "m": logit_grad, "m_fwd": m, "x_kv": xkv, "self": xkv is xq,
                     "grad_qkv": grad_qkv,
                     "grad_left": grad_left,
                     "grad_right": grad_right, "grad_sm_in": grad_sm_in, "sm_out": sm_out}

    def _qk_norm(self, name: str, x: Cov, heads: int) -> tuple[Cov, dict]:
        """QK-norm (OLMo 2 ``all_heads``: over the whole projection, ``heads·D`` wide; Qwen 3 /
        Gemma 3 ``head``: over each head's ``D`` dims, one gain shared by the ``heads``):
        :meth:`norm_fwd` of that width off the stream (each token to unit RMS; the gain's
        gradient sums every head's rows, :func:`.rules.qk_norm_gain_grad_rows`)."""
        per_head = self.cfg.qk_norm == "head"
        y, n = self.norm_fwd(name, x, d=self.dh if per_head else heads * self.dh,
                             stream=False)
        n["heads"] = heads if per_head else 1
        return y, n

    def _kv_repeat_scales(self) -> tuple[float, float]:
        """GQA's repeat of each K/V head to its ``G`` query heads (``ops.repeat_kv``):
        ``(forward factor on k and v, factor on the K/V gradient)``. The backward sums the
        ``G`` query heads' gradients, uncorrelated at initialisation, ``√G``
        (:func:`.rules.gqa_kv_grad_gain`); unit scaling constrains the broadcast's
        ``(1, G^-½)`` by the geometric mean, ``G^-¼`` both ways (so ``√G·G^-¼``); standard
        and u-μP copy exactly. ``(1, 1)`` without GQA."""
        g = self.cfg.n_heads // self.cfg.kv_heads
        if g == 1:
            return 1.0, 1.0
        gain = R.gqa_kv_grad_gain(self.cfg.n_heads, self.cfg.kv_heads)
        if self.p == "unit":
            s = g ** -0.25
            return s, gain * s
        return 1.0, gain

    def _attention_aniso(self, amap, v: Cov, excess: np.ndarray, pairs: np.ndarray,
                         out: Cov, e_q: float, e_kv: float, own_input: bool) -> float:
        """Excess anisotropy of an attention branch's output deviations (after ``W_o``).

        A random linear map ``d_in → d_out`` of deviations with ``S = 1 + e`` gives
        ``S' = (d_out/d_in) S + 1`` (``E tr(WΣWᵀ)²`` over Gaussian ``W``); a fixed matrix
        of excess ``e_M`` free of them adds ``e_M`` (free multiplicative convolution).

        * The weights' spread (first order ``δp_ij ∝ q_i·k̃_j``) gives query ``i`` the
          output ``W_o W_v Σ̂ W_kᵀ W_q x̃_i``, ``Σ̂`` the keys' weighted covariance (``Σ̂ =
          Σ^{1/2} Ŵ Σ^{1/2}``, ``Ŵ`` a Wishart of ``1/r0`` samples): through the chain,
          ``e = 2 + (d_h/d)(3 + d r0) + 2 e_kv + e_q``.
        * The expected weights' average of the values: ``W_o W_v`` of averaged tokens,
          ``e = e_kv + 2``.

        Mixed by their token-deviation variances (as in ``_mix_aniso``); sets the spread's
        share as the branch's part linear in the query's own deviation (self-attention).
        With the residual adds, checked against measured encoders under all three
        parametrizations (``tests/core/test_anisotropy.py``: within 20%).
        """
        w = self.grid.w
        spread = excess * covariance.row_variance(amap, v) * pairs
        t_spread = float(w @ spread)
        t_all = max(out.total - out.same, 0.0)
        t_mean = max(t_all - t_spread, 0.0)
        total = t_spread + t_mean
        if total <= 0:
            self._linear_share = 0.0
            return e_kv + 2.0
        # the spread is linear in the query's own deviation (through q_i), to first order
        self._linear_share = t_spread / total if own_input else 0.0
        r0 = float(w @ (spread * amap.r0)) / t_spread if t_spread > 0 else float(w @ amap.r0)
        e_spread = 2.0 + (self.dh / self.c) * (3.0 + self.c * r0) + 2.0 * e_kv + e_q
        return (e_spread * t_spread**2 + (e_kv + 2.0) * t_mean**2) / (total * total)

    def attention_bwd(self, a: dict, g: Cov) -> tuple[Cov, Cov, Cov]:
        """Backward from the output projection's gradient; returns the gradients reaching
        the query input and the key and value inputs (each head group's, mixed by their
        shares of the heads)."""
        prefix, dh, v, t = a["prefix"], self.dh, a["v"], self.t
        g_ctx = self.linear_bwd(a["lo"], g)
        self.grad(f"{prefix}.context", g_ctx)
        self.grad(f"{prefix}.probs", a["grad_left"] * self.drop * math.sqrt(
            dh * g_ctx.total * v.total), "g_P = α·gY·Vᵀ: √(d_head·σ_gy²·σ_v²)")
        # dropout on the weights, s·p ⊙ (1 + η): the mean path carries s. The noise η
        # (E η² = p/(1−p)) also lets what is constant along a row, g_i·v̄, through the
        # softmax Jacobian; taking g and v̄ independent that term put a tied 8-layer unit
        # decoder's score, query and key gradients 1–1.5 log2 high (the gradient is nearly
        # orthogonal to what the tokens share, as in docs/predictor.md's rounding-noise finding),
        # so it is left out: without it that decoder is at 86.9% per seed (80.8% before)
        s_drop = math.sqrt(self.drop_shared)  # 1 without dropout
        gl = a["grad_left"] * s_drop
        s = a["grad_qkv"]  # the q, k and v input-gradient factor, applied with the others
        gain_v = a["grad_right"] * a["sm_out"] * s_drop * s
        # gQ = m·gZ·K and gK = m·gZᵀ·Q, with their covariance between tokens (the centred
        # keys and values of a correlated stream add coherently over keys; the queries
        # attending to a key add coherently); K and V come from the same input, which adds the
        # pairs of keys (shared_input_factor)
        gain = math.sqrt(a["m"] ** 2 * dh) * gl * a["grad_sm_in"] * s
        w = self.grid.w
        gz2_mean, coherent, cap2 = 0.0, 0.0, 0.0
        g_vs, g_qs, g_ks, g_ks_plain = [], [], [], []
        for grp in a["groups"]:
            amap, share = grp["amap"], grp["share"]
            # the softmax Jacobian removes what is constant along a row: only the values'
            # spread about the row mean moves g_Z; per query bin, Σ over keys of g_Z²
            rowvar_v = covariance.row_variance(amap, v)
            gz2 = (gl * a["grad_sm_in"]) ** 2 * dh * g_ctx.var * rowvar_v * grp["gf"]
            gz2_mean += share * float(w @ gz2)
            g_vs.append((covariance.attend_transposed(amap, g_ctx, grp["excess"],
                                                      grp["common"]), share))
            sum_p2 = np.maximum(grp["sum_p2"], 1e-12)
            gf_qk = grp["gf"]
            # the soft cap's sech²(z/c) multiplies the logits' whole gradient on its way to
            # q and k (as one gain: on the Jacobian's own part alone it unbalanced the keys'
            # anti-correlation, and the key bias gradient came out negative)
            cap2 += share * float(np.sum(w * grp["cap_grad2"]))
            g_qs.append((covariance.query_gradient(
                amap, g_ctx, v, a["k"], sum_p2, gf_qk,
                shared_input_factor(sum_p2, self.c, a["aniso_kv"]), a["aniso_kv"] / self.c),
                share))
            # (under RoPE band by band over the rotated dims, rotated back)
            g_ks.append((self._key_gradient(a, amap, g_ctx, sum_p2, grp, gf_qk), share))
            if a["rope"] and a["rotary_share"] < 1.0:  # partial: the unrotated dims' sums vanish
                g_ks_plain.append((covariance.key_gradient(
                    amap, g_ctx, v, a["q"], sum_p2, gf_qk, grp["excess"], zero_sum=True),
                    share))
            # K and V are projections of one input, so the gradient reaching a key (through
            # its value) and reaching a value (through its key's logits) both depend on that
            # input: the weight gradients have a mean part besides the products pair_sum
            # counts (its Σ_j x̃_j x_jᵀ has |·|² = tr Σ², S times the isotropic value: the
            # input's anisotropy multiplies it; measured on the unit encoder of
            # test_anisotropy.py, the key weight gradients of layers 1–4 rose by 0.45 log2
            # towards measurement with it)
            coherent += share * covariance.shared_projection_term(
                amap, a["x_kv"], g_ctx, a["q"], grp["sum_p2"]) * a["aniso_kv"]
        self.grad(f"{prefix}.scores", math.sqrt(max(gz2_mean, 0.0) / t),
                  "softmax Jacobian: g_P·√((EΣp² − 2EΣp³ + E(Σp²)²)/S), per query position")
        gain *= math.sqrt(cap2)  # 1 without a soft cap
        g_v = covariance.mixture(g_vs).scaled(gain_v)
        g_q = covariance.mixture(g_qs).scaled(gain)
        g_k = covariance.mixture(g_ks).scaled(gain)
        f_rot = a["rotary_share"]
        if a["rope"]:  # back through the rotation (its own transpose; _key_gradient's g_k is)
            base, rot = self.cfg.rope_base, self.cfg.rotary_dims
            g_q = covariance.partially_rotated(g_q, dh, rot, base)
            if f_rot < 1.0:  # the rotated dims' key gradient beside the unrotated dims'
                g_k_rot = g_k
                g_k = covariance.mixture([(g_k_rot, f_rot), (
                    covariance.mixture(g_ks_plain).scaled(gain), 1.0 - f_rot)])
        kvb = a["kv_bwd"]
        if kvb != 1.0:  # GQA: each K/V head's gradient sums its query heads' (√G)
            g_k, g_v = g_k.scaled(kvb), g_v.scaled(kvb)
            if f_rot < 1.0 and a["rope"]:
                g_k_rot = g_k_rot.scaled(kvb)
        fk = 1.0
        if a["nq"] is not None:  # back through the QK-norms
            g_q = self.norm_bwd(a["nq"], g_q)
            g_k = self.norm_bwd(a["nk"], g_k)
            fk = math.sqrt(float(self.grid.w @ (a["nk"]["bwd"] ** 2)))
            if f_rot < 1.0 and a["rope"]:
                g_k_rot = g_k_rot.rescaled(a["nk"]["bwd"])
        gq = self.linear_bwd(a["lq"], g_q)
        x_tot = max(a["x_kv"].total, 1e-300)
        kappa_v, kappa_k = v.total / (x_tot * self.c), a["k"].total / (x_tot * self.c)
        extra_k = self.b * gain * gain * kappa_v * coherent * (kvb * fk) ** 2
        extra_v = (self.b * gain_v * gain_v * a["m_fwd"] ** 2 * dh * kappa_k * coherent
                   * kvb * kvb)
        # the key bias shifts every logit of a row equally, which softmax ignores — unless
        # RoPE rotates it differently at each position; this attention's own positional
        # (cross-attention is never rotated, whatever the config's self-attention uses)
        gk = self.linear_bwd(a["lk"], g_k, zero_bias_grad=not a["rope"],
                             extra=extra_k)
        if a["rope"] and f_rot < 1.0 and a["lk"]["bias"]:
            # partial rotary: only the rotated share of the key bias reaches the logits
            # unevenly along a row (the rest is a shift softmax ignores)
            bname = a["lk"]["name"] + ".bias"
            var = f_rot * a["lk"]["f"].grad_weight ** 2 * pair_sum(self.b, g_k_rot, None)
            self.wgrads[bname] = TensorRow(bname, "grad_weight", math.sqrt(max(var, 0.0)),
                                           None, None, (), ("f_rot·α_w²·E[(Σ_rows g)²] of the "
                                                            "rotated dims, f_rot = {:.3g}",
                                                            (f_rot,)))
        gv = self.linear_bwd(a["lv"], g_v, extra=extra_v)
        return gq, gk, gv

    def _key_gradient(self, a: dict, amap, g_ctx: Cov, sum_p2: np.ndarray, grp: dict,
                      gf: np.ndarray) -> Cov:
        """The gradient reaching the keys before their rotation (per unit of the
        attention's gain): :func:`.covariance.key_gradient`, or under RoPE
        :func:`.covariance.rope_key_gradient` (each band of frequencies rotates the queries
        and back on its own). With one mean rotation of all frequencies the encoder
        self-attentions' key-bias gradients of a RoPE encoder-decoder (d 128, 3 layers,
        64 tokens, 4 seeds) were +0.2…0.3 (standard), +0.45…0.53 (unit), +0.8…0.9 (u-μP)
        log2 high: the low frequencies' part, which softmax ignores, was left in them.
        Partial rotary (the rotated dims' own frequencies θ_f = base^(−2f/R)): a unit d 256
        decoder's key-bias gradients, a quarter of each head rotated (2 seeds), were
        +0.06/+0.61/+0.39/+0.01 with one mean rotation, −0.12/−0.06/−0.09/−0.03 band by
        band (u-μP +0.26/+0.19 → +0.04/+0.05 in layers 1/2; standard +0.19 → +0.13 there,
        layer 0 −0.18 → −0.24)."""
        if not a["rope"]:
            return covariance.key_gradient(amap, g_ctx, a["v"], a["q"], sum_p2, gf,
                                           grp["excess"])
        # partial rotary: the rotated dims' own frequencies θ_f = base^(−2f/R) (the
        # unrotated dims' key gradient is taken beside it)
        return covariance.rope_key_gradient(amap, g_ctx, a["v"], a["q_plain"], sum_p2,
                                            gf, grp["excess"], self.cfg.rotary_dims,
                                            self.cfg.rope_base)

    # -- feed-forward --------------------------------------------------------------------------
    def ffn_fwd(self, prefix: str, x: Cov, rows: int | None = None) -> tuple[Cov, dict]:
        """The feed-forward sub-block (``layers.{i}.ffn``), or with experts the routed
        mixture (``layers.{i}.moe``, :meth:`moe_fwd`); ``rows``: an expert's (dense, over
        the rows it received)."""
        if self.cfg.is_moe and rows is None:
            return self.moe_fwd(prefix.rpartition(".")[0] + ".moe", x)
        c, f, kind = self.c, self.cfg.d_ff, self.cfg.activation
        up, lu = self.linear_fwd(f"{prefix}.up", x, c, f, role="ffn", rows=rows)
        ctx: dict = {"prefix": prefix, "lu": lu, "up": up, "kind": kind}
        if kind in _GATES:
            # SwiGLU silu(gate) ⊙ up; GeGLU gelu_tanh(gate) ⊙ up (:func:`.rules.geglu_rule`)
            gate, lg = self.linear_fwd(f"{prefix}.gate", x, c, f, role="ffn", rows=rows)
            fn = _GATES[kind]
            alpha = 1.0
            if self.unit:
                alpha = R.unit_silu_glu_scale() if kind == "swiglu" else R.unit_geglu_scale()
            h = covariance.gated(up, covariance.kernels(fn, gate)[0], alpha)
            self.act(prefix + ".act", h, ("α·σ_up·rms({}(gate)), α = {:.3g}", (fn, alpha)),
                     {"forward": alpha, "grad_input": alpha} if self.unit else None)
            ctx.update(lg=lg, gate=gate, alpha=alpha)
        else:
            factors = R.ElementwiseFactors(1.0, 1.0)
            if self.unit:
                constraint = "gmean" if self.p == "unit" else "to_output_scale"
                factors = (R.unit_gelu_scales(1.0, constraint) if kind == "gelu"
                           else R.unit_relu_scales(constraint))
            h = covariance.elementwise(kind, up, factors.output)
            self.act(prefix + ".act", h, ("α·rms({}(x)), x ~ N(0, {:.3g}²); mean and "
                                          "correlations by Hermite expansion", (kind, up.rms)),
                     {"forward": factors.output, "grad_input": factors.grad_input}
                     if self.unit else None)
            ctx["factors"] = factors
        out, ld = self.linear_fwd(f"{prefix}.down", h, f, c, role="ffn", rows=rows)
        ctx["ld"] = ld
        # two random maps, d → d_ff → d (``_attention_aniso``), of the input's deviations,
        # of which the activation's first Hermite order is linear
        self._e_branch = self._e_in + 1.0 + c / f
        coef = hermite_coefficients(_GATES.get(kind, kind), R._key(max(up.rms, 1e-12)))[0]
        energy = float(coef[1:] @ coef[1:])
        self._linear_share = float(coef[1] ** 2) / energy if energy > 0 else 0.0
        return out, ctx

    def ffn_bwd(self, a: dict, g: Cov) -> Cov:
        if "experts" in a:
            return self.moe_bwd(a, g)
        g_act = self.linear_bwd(a["ld"], g)
        self.grad(f"{a['prefix']}.act", g_act)
        if a["kind"] in _GATES:
            alpha = a["alpha"]
            silu, dsilu = covariance.kernels(_GATES[a["kind"]], a["gate"])
            g_up = covariance.gated(g_act, silu, alpha)
            g_gate = covariance.gated(covariance.product(g_act, a["up"]), dsilu, alpha)
            return self.linear_bwd(a["lu"], g_up).plus(self.linear_bwd(a["lg"], g_gate))
        g_up = covariance.elementwise_grad(a["kind"], a["up"], g_act, a["factors"].grad_input)
        return self.linear_bwd(a["lu"], g_up)

    # -- mixture of experts --------------------------------------------------------------------
    def _copy_expert_rows(self, store: dict, names: list[str], prefix: str,
                          rescale: float = 1.0) -> None:
        """Copy expert 0's rows ``names`` (of ``store``) to experts 1 … E−1: the experts are
        alike in distribution, so their predictions are one; ``rescale`` multiplies RMSs
        (expert 0's included)."""
        head = f"{prefix}.experts.0."
        if rescale != 1.0:
            for name in names:
                store[name].rms *= rescale
        # expert by expert, each in its own order (as the model runs them and the
        # measurement lists them), not every expert's `up`, then every expert's `gate`…
        for e in range(1, self.cfg.n_experts):
            for name in names:
                row = store[name]
                other = f"{prefix}.experts.{e}." + name[len(head):]
                store[other] = TensorRow(other, row.kind, row.rms, row.scales, None, (),
                                         row._formula)
                if store is self.acts:
                    self.order.append(other)
                if self.keep is not None and (name, row.kind) in self.keep:
                    self.keep[(other, row.kind)] = self.keep[(name, row.kind)]

    def _expert_wgrads(self, ctx: dict, routed: Cov) -> dict[str, float]:
        """The weight-gradient variances an expert's backward (``ctx``) makes of ``routed``,
        without recording anything."""
        kept = self.grads, self.wgrads, self.keep
        self.grads, self.wgrads, self.keep = {}, {}, None
        try:
            self.ffn_bwd(ctx, routed)
            return {n: r.rms ** 2 for n, r in self.wgrads.items()}
        finally:
            self.grads, self.wgrads, self.keep = kept

    def moe_fwd(self, prefix: str, x: Cov) -> tuple[Cov, dict]:
        """Mixtral's routed feed-forward (``unitscale_core.model.layers.MoE``): router logits
        ``z = router(x)`` (``Linear(C, E)``, no bias; forward-scaled under unit / u-μP),
        top-k of ``softmax(z)`` renormalised, ``y = Σ_k p̂_k expert_k(x)``
        (:func:`.rules.moe_combine_rule`).

        Each expert sees ``π = k/E`` of the rows (:func:`.rules.moe_rule`), a subset that
        leaves every row's statistics as they are: its activations are the dense
        feed-forward's on ``x`` (one prediction for all E; unit scaling's weight gradient
        counts the expert's rows). What two tokens of ``y`` share is
        :func:`.rules.routed_pair_overlap` ``Q(ρ)`` of what one expert's outputs share, ``ρ``
        the two router inputs' correlation (``Q(1) = m``, ``Q(0) = 1/E``): a token's own part
        gets ``m``, a part tokens share far less when they choose different experts."""
        cfg, c = self.cfg, self.c
        n_e, k = cfg.n_experts, cfg.experts_per_token
        z, lr = self.linear_fwd(f"{prefix}.router", x, c, n_e, role="router", bias=False)
        rows_e = max(int(round(R.moe_rule(1.0, n_experts=n_e, top_k=k, rows=self.rows)[2])),
                     1)
        seen = (len(self.order), set(self.weights))
        o, fctx = self.ffn_fwd(f"{prefix}.experts.0", x, rows=rows_e)
        self._copy_expert_rows(self.acts, self.order[seen[0]:], prefix)
        self._copy_expert_rows(self.weights, [n for n in self.weights if n not in seen[1]],
                               prefix)
        scales = (R.unit_moe_combine_scales(n_e, k, c, "gmean" if self.p == "unit"
                                            else "to_output_scale") if self.unit
                  else (1.0, 1.0, 1.0))
        sigma_r = z.rms
        rule = R.moe_combine_rule(o.rms, 1.0, n_experts=n_e, top_k=k, d=c,
                                  router_rms=sigma_r, scales=scales)
        _sd, rho_c, rho_m = x.correlations()
        n_s = len(o.S)
        overlap = np.stack([R.routed_pair_overlap(n_e, k, sigma_r, r)
                            for r in (rho_c, rho_m)[:max(n_s, 1)]])
        s_o2 = scales[0] ** 2
        S = o.S * overlap[:n_s] * s_o2 if n_s else o.S
        var = o.var * (rule.m * s_o2)
        y = Cov.of(self.grid, np.maximum(var - S[0].diagonal(), 0.0) if n_s else var, S)
        # how unevenly the rows fall to the experts, from what the router inputs share
        total = max(x.total, 1e-300)
        loads = R.routed_loads(n_e, k, sigma_r, self.b, self.t, x.same / total,
                               x.m / total)
        return y, {"prefix": prefix, "experts": fctx, "lr": lr, "o": o, "rule": rule,
                   "scales": scales, "overlap": overlap, "rows_e": rows_e, "loads": loads}

    def moe_bwd(self, a: dict, g: Cov) -> Cov:
        """Backward of :meth:`moe_fwd`. Expert ``e``'s routed gradient ``s_g p̂_e g`` over all
        rows (0 where it was not chosen) has per token ``s_g² m/E`` of ``g``'s variance and
        per pair ``s_g² Q(ρ)/E`` of what ``g`` shares: summed over the expert's rows (its
        weight gradients) what tokens share is summed over fewer rows than what is their
        own. Its rows' gradients are recorded on the rows it chose (``/π``: RMS
        ``s_g √(m/k) σ_g``); the experts' input gradients add (E of them, independent
        weights); the router's logits get ``√(r A/E)`` (:func:`.rules.moe_combine_rule`)."""
        cfg, prefix = self.cfg, a["prefix"]
        n_e, k = cfg.n_experts, cfg.experts_per_token
        rule, (_s_o, s_g, s_w), overlap = a["rule"], a["scales"], a["overlap"]
        n_s = len(g.S)
        if n_s > len(overlap):  # (g shares across sequences what x did not: none routed)
            overlap = np.concatenate((overlap, np.zeros((n_s - len(overlap),
                                                         *overlap.shape[1:]))))
        S = g.S * overlap[:n_s] * (s_g * s_g / n_e) if n_s else g.S
        var = g.var * (rule.m * s_g * s_g / n_e)
        routed = Cov.of(self.grid, np.maximum(var - S[0].diagonal(), 0.0) if n_s else var, S)
        seen = (set(self.grads), set(self.wgrads))
        gx = self.ffn_bwd(a["experts"], routed)
        new_w = [n for n in self.wgrads if n not in seen[1]]
        # the same backward with only the rows' own products, and without what two
        # sequences share: each weight gradient's sum split into own / pairs of one
        # sequence / of two, which each expert's own rows weigh (routed_weight_grad_gain)
        parts = [self._expert_wgrads(a["experts"], Cov.of(self.grid, routed.var,
                                                          self.grid.none))]
        parts.append(self._expert_wgrads(a["experts"], Cov.of(
            self.grid, routed.u, routed.S[:1])) if n_s > 1 else
            {n: self.wgrads[n].rms ** 2 for n in new_w})
        loads, unit = a["loads"], self.unit
        for name in new_w:
            row = self.wgrads[name]
            own, no_m, full = parts[0][name], parts[1][name], row.rms ** 2
            gain = R.routed_weight_grad_gain(loads, own, max(no_m - own, 0.0),
                                             max(full - no_m, 0.0), unit)
            row.rms *= gain
            row._formula = ("{} × {:.3g} (summed over each expert's own rows: "
                            "routed_weight_grad_gain)", (row._formula, gain))
        share = k / n_e
        row_gain = R.routed_row_gain(loads, rule.m, k)
        self._copy_expert_rows(self.grads, [n for n in self.grads if n not in seen[0]],
                               prefix, rescale=row_gain / math.sqrt(share))
        self._copy_expert_rows(self.wgrads, new_w, prefix)
        gx = gx.scaled(math.sqrt(n_e))
        # router logits: a_e = s_w g·o_e per token, p̂_e(a_e − Σ p̂ a) for the chosen; two
        # tokens' a_e share s_w² c C^g C^o, counted as far as they chose alike (Q(ρ)/m of r)
        o, scale = a["o"], rule.r / n_e * s_w * s_w * self.c
        n_s = min(len(g.S), len(o.S))
        S = g.S[:n_s] * o.S[:n_s] * overlap[:n_s] * (scale / rule.m) if n_s else g.S[:0]
        var = g.var * o.var * scale
        g_z = Cov.of(self.grid, np.maximum(var - S[0].diagonal(), 0.0) if n_s else var, S)
        return gx.plus(self.linear_bwd(a["lr"], g_z))

    # -- layers --------------------------------------------------------------------------------
    def _check(self) -> None:
        """Between sub-blocks: stop when asked (a long prediction in a GUI's thread)."""
        if self.should_stop is not None and self.should_stop():
            raise PredictionCancelled(self.cfg)

    def block_fwd(self, x: Cov, norm_name: str, tau: float, branch_fwd) -> tuple[Cov, dict]:
        """One residual sub-block; returns (new stream, context for backward)."""
        self._check()
        placement = self.cfg.norm
        pre = placement in ("pre", "sandwich", "branch_output")
        w_r, w_s = self._residual_weights(tau)
        self.share *= w_s
        self._e_in = self.aniso
        n_out = None
        if pre:
            # the norm reads the stream as it is; the skip weight applies to the new stream
            # (branch_output: no input norm, the branch reads the stream itself)
            h, n = (self.norm_fwd(norm_name, x) if placement != "branch_output"
                    else (x, None))
            self._scale_flat(w_s)
            inner, ctx = branch_fwd(h)
            if placement != "pre":
                # Gemma 2 / OLMo 2: a norm on the branch's output before the add, each token
                # to unit RMS (``_OUT_NORMS`` names it after the input norm's place)
                inner, n_out = self.norm_fwd(_out_norm_name(norm_name), inner, stream=False)
            out = self.residual_add(self._dropout(inner), x, tau)
            self._mix_aniso(inner, x, tau)
            self.branch_vars[norm_name] = (w_r * self.drop) ** 2 * inner.total
        else:
            inner, ctx = branch_fwd(x)
            y = self.residual_add(self._dropout(inner), x, tau)
            self._mix_aniso(inner, x, tau)
            self._scale_flat(w_s)
            out, n = self.norm_fwd(norm_name, y)
            self.flat = None  # the stream is now a LayerNorm output
            self.share /= max(n["x_rms"], 1e-30)
        blk = {"norm": n, "branch": ctx, "tau": tau, "pre": pre, "out_norm": n_out}
        if self._track_align and len(x.S) and placement in ("pre", "post"):
            gain = self._shared_gain(ctx) * self.drop_shared
            if pre:
                # the branch reads the normed stream: x̄/σ, less its share ρ along each
                # token's own x̂ (the norm's Jacobian, P x̄/σ ≈ (1 − ρ) x̄/σ), ρ the batch
                # mean's share of a token's variance
                total = max(x.total, 1e-300)
                rho = min((x.same + (self.b - 1) * x.m) / (self.b * total), 1.0)
                gain *= (1.0 - rho) ** 2 / total
            if gain > 0:
                blk["skip_S"], blk["shared_gain"] = x.S, gain
        return out, blk

    def _shared_gain(self, ctx: dict) -> float:
        """``|J x̄|²/|x̄|²``: what a branch makes of a vector every token shares, through its
        linear response (its biases and an activation's mean add constants, not ``J x̄``).

        Attention passes such a vector whole through its values (``Σ_j p_ij = 1``):
        ``γ_v γ_o``, ``γ = α²·fan_in·σ_w²`` per linear map (cross-attention: 0, its values
        are the memory's); a GELU/ReLU feed-forward ``γ_up (c₁/σ)² γ_down``, ``c₁/σ`` the
        activation's mean slope (its first Hermite coefficient at the input's RMS ``σ``;
        E[GELU′] = ½ exactly). Measured (post-norm tied encoder, d 256): the summed
        gradient's lean on the stream's mean grows by 1.107 through an attention sub-block
        (``1 + 1/9``: two ``U(±1/√fan_in)`` maps) and 1.038 through a feed-forward one
        (``1 + 1/36``). 0 for SwiGLU (not modelled). A pre-norm branch reads the normed
        stream: :meth:`block_fwd` divides by its variance and takes off the norm's share."""
        def gamma(lin: dict) -> float:
            return lin["f"].output ** 2 * lin["x_fan_in"] * lin["w"] ** 2
        if "lo" in ctx:  # cross-attention's values are the memory's, not this stream's
            return gamma(ctx["lv"]) * gamma(ctx["lo"]) if ctx["self"] else 0.0
        if ctx.get("kind") in ("gelu", "relu") and "lu" in ctx:
            up = ctx["up"]
            coef = hermite_coefficients(ctx["kind"], R._key(max(up.rms, 1e-12)))[0]
            slope = float(coef[1]) / max(up.rms, 1e-300) * ctx["factors"].output
            return gamma(ctx["lu"]) * slope * slope * gamma(ctx["ld"])
        return 0.0

    def _mix_aniso(self, branch: Cov, skip: Cov, tau: float) -> None:
        """The stream's excess anisotropy after a residual add of skip ``s`` and branch
        ``b`` with token-deviation variances ``T`` (after the add's weights)::

            e = (e_s T_s² + e_b T_b² + 2 λ T_s T_b (1 + e_s)) / (T_s + T_b)²

        Independent parts with unrelated feature directions add ``e T²`` (the cross terms of
        ``tr Σ²`` are the isotropic ones). The branch's share ``λ`` that is a random linear
        map ``M`` of the token's own deviation (attention's spread through ``q_i``, the
        activation's first Hermite order) makes the stream ``(I + βM) x̃``, ``β² = λT_b/T_s``,
        whose ``β(M + Mᵀ)`` adds ``2β²(1 + e_s)`` more (free multiplicative convolution).
        Without it the unit-scaled encoder of ``tests/core/test_anisotropy.py`` came out at
        ``S`` ≤ 1.9 against 2.8–4.7 measured. ``S`` is at most ``d`` (one direction)."""
        w_r, w_s = self._residual_weights(tau)
        t_s = w_s * w_s * max(skip.total - skip.same, 0.0)
        t_b = w_r * w_r * self.drop * self.drop * max(branch.total - branch.same, 0.0)
        total = t_s + t_b
        if total > 0:
            e_s = self.aniso
            # the part of the branch that is a random linear map M of the token's own
            # deviation (share λ of it) makes the skip (I + βM)x̃, whose cross terms add
            # 2β²(1 + e_s) to the excess of x̃ (free multiplicative), β² = λ t_b / t_s; over
            # the mixed stream's (t_s + t_b)², as the other terms
            cross = 2.0 * self._linear_share * t_s * t_b * (1.0 + e_s)
            # (d·tr Σ²/(tr Σ)² is at most d: one direction)
            self.aniso = min((e_s * t_s * t_s + self._e_branch * t_b * t_b + cross)
                             / (total * total), self.c - 1.0)

    def _scale_flat(self, w_s: float) -> None:
        """The stream's flat part after a residual add that weighs the skip path by ``w_s``."""
        if self.flat is not None and w_s != 1.0:
            self.flat = (self.flat[0] * w_s**2, self.flat[1] * w_s**2)

    def block_bwd(self, blk: dict, g_out: Cov, branch_bwd) -> Cov:
        """Backward of a residual sub-block from the gradient at its output."""
        self._check()
        tau = blk["tau"]
        if blk["pre"]:
            g_branch = self._dropout(g_out)
            if blk["out_norm"] is not None:
                g_branch = self.norm_bwd(blk["out_norm"], g_branch)
            g_inner = branch_bwd(blk["branch"], g_branch)
            if blk["norm"] is not None:  # (branch_output: no input norm)
                g_inner = self.norm_bwd(blk["norm"], g_inner)
            g = self.residual_split_bwd(g_inner, g_out, tau)
            return self._aligned_cross(blk, g)
        g_y = self.norm_bwd(blk["norm"], g_out)
        if self.align is not None:
            # the norm's backward rescales each position; the stream below it is the norm's
            # input, ȳ = ū/σ per position
            n = blk["norm"]
            self.align = self.align * n["bwd"] / np.sqrt(np.maximum(n["x_var"], 1e-300))
        g_branch_in = branch_bwd(blk["branch"], self._dropout(g_y))
        return self._aligned_cross(blk, self.residual_split_bwd(g_branch_in, g_y, tau))

    def _aligned_cross(self, blk: dict, g: Cov) -> Cov:
        """Standard, tied: the cross term of a residual add's backward between the part of
        the gradient set against the stream's shared parts and the branch it came through.

        Below the tied head the gradient holds ``−a ⊙ z̄`` (``_self_logit_lean``: ``z̄`` the
        parts of the stream ``z`` its tokens share, ``a`` per position). Where ``z = x + B``
        (a sub-block's output), the branch's backward ``Jᵀ`` meets that same ``B``: for
        shared parts the branch is linear, ``B̄ ⊃ J x̄`` (attention passes a vector every
        token shares through its values, ``Σ_j p_ij = 1``), so
        ``2⟨−a z̄, Jᵀ(−a z̄)⟩ = 2a²⟨J x̄, B̄⟩ = 2a²β²|x̄|²`` on average (``β² = |J x̄|²/|x̄|²``,
        :meth:`_shared_gain`) — not the zero two independent terms give. So the gradient's
        shared parts gain ``2β² a_i a_j (C, M)[x]``, which the bias and weight gradients sum
        over every row; and the lean on the skip's shared parts grows to ``a(1 + β²)``
        (``−a(x̄ + J x̄) − a JᵀJ x̄`` along ``x̄``); a post-norm's backward then divides it
        by the norm's input variance (``ȳ = ū/σ``). Measured (post-norm tied encoder, d 256,
        8 layers, 96 tokens × 4, 8 seeds): the summed gradient's lean ``a`` on the batch
        mean of the stream, 0.55 at the top growing to 0.89 at layer 1, and the cross term,
        1.19 predicted against 1.15 measured at the top attention sub-block, 0.56 against
        0.57 at layer 1; without it the lower layers' bias gradients were 0.4–0.5 log2 low.
        Pre-norm stacks get the same. The lean starts at :meth:`_p_self`'s weight on the
        input token (with ``σ`` at the mean self-logit it started 33% high in a d-64, 24-layer
        decoder, whose bias gradients then came out 0.2–0.4 log2 high; now within 0.05).
        """
        a = self.align
        if a is None or "skip_S" not in blk:
            return g
        X, beta2 = blk["skip_S"], blk["shared_gain"]
        aa = (2.0 * beta2) * (a[:, None] * a)
        S = g.S
        if len(S) < len(X):
            S = np.concatenate((S, np.zeros((len(X) - len(S), *X.shape[1:]))))
        else:
            S = S.copy()
        S[:len(X)] += aa * X
        self.align = a * (1.0 + beta2)
        return Cov.of(g.g, g.u, S)

    def _taus(self, kinds: list[str]) -> list[float]:
        """u-μP's depth rule (Appendix G, as ``unitscale_core.model.ops.UmupOps.taus``)."""
        if self.p == "umup":
            n = len(kinds)
            return [1.0 / math.sqrt(n / 2 + k) for k in range(n)]
        return [1.0] * len(kinds)

    def stack(self, prefix: str, n_layers: int, x: Cov, causal: bool,
              memory: Cov | None) -> tuple[Cov, list]:
        """Forward through a stack's layers; returns the output and backward contexts."""
        cfg = self.cfg
        kinds = ["attn", "attn", "mlp"] if memory is not None else ["attn", "mlp"]
        taus = self._taus(kinds * n_layers)
        layers = []
        for i in range(n_layers):
            lp = f"{prefix}layers.{i}"
            tau = taus[i * len(kinds):(i + 1) * len(kinds)]
            if cfg.parallel_residual:  # one block, every branch reads x (no after_attn)
                branches = [("attn", f"{lp}.norm1", tau[0], lambda h, lp=lp: (
                    self.attention_fwd(f"{lp}.attn", h, h, causal, cfg.attention,
                                       cfg.positional)))]
                if memory is not None:  # the model's order: self, cross, feed-forward
                    branches.append(("cross", f"{lp}.cross_norm", tau[1], lambda h, lp=lp: (
                        self.attention_fwd(f"{lp}.cross_attn", h, memory, False, "full",
                                           "none"))))
                branches.append(("ffn", f"{lp}.norm2", tau[-1], lambda h, lp=lp: (
                    self.ffn_fwd(f"{lp}.ffn", h))))
                x, pb = self.parallel_block_fwd(x, branches)
                self.act(lp, x, "layer output (residual stream): x + attn(norm1 x) + "
                         + ("cross(cross_norm x) + " if memory is not None else "")
                         + "ffn(norm2 x)")
                layers.append([("parallel", pb, lp)])
                continue
            x, sa = self.block_fwd(x, f"{lp}.norm1", tau[0], lambda h, lp=lp: (
                self.attention_fwd(f"{lp}.attn", h, h, causal, cfg.attention,
                                   cfg.positional)))
            self.act(f"{lp}.after_attn", x, "residual stream after self-attention")
            blocks = [("attn", sa, f"{lp}.after_attn")]
            if memory is not None:
                x, ca = self.block_fwd(x, f"{lp}.cross_norm", tau[1], lambda h, lp=lp: (
                    self.attention_fwd(f"{lp}.cross_attn", h, memory, False, "full", "none")))
                self.act(f"{lp}.after_cross", x, "residual stream after cross-attention")
                blocks.append(("cross", ca, f"{lp}.after_cross"))
            x, fb = self.block_fwd(x, f"{lp}.norm2", tau[-1], lambda h, lp=lp: (
                self.ffn_fwd(f"{lp}.ffn", h)))
            self.act(lp, x, "layer output (residual stream)")
            blocks.append(("ffn", fb, lp))
            layers.append(blocks)
        return x, layers

    def stack_bwd(self, layers: list, g: Cov, memory_grads: list) -> Cov:
        for blocks in reversed(layers):
            for kind, blk, tap in reversed(blocks):
                self.grad(tap, g)
                if kind == "parallel":
                    g = self.parallel_block_bwd(blk, g, memory_grads)
                elif kind == "ffn":
                    g = self.block_bwd(blk, g, self.ffn_bwd)
                elif kind == "attn":
                    g = self.block_bwd(blk, g, self._self_attn_bwd)
                else:
                    g = self.block_bwd(blk, g, lambda a, gy: self._cross_attn_bwd(
                        a, gy, memory_grads))
        return g

    def parallel_block_fwd(self, x: Cov, branches: list) -> tuple[Cov, dict]:
        """GPT-J / GPT-NeoX's parallel layer: branches ``(kind, norm name, τ, fwd)`` (kind
        ``attn``, ``cross`` or ``ffn``), each ``b_i = f_i(norm_i x)`` reading the stream as
        it is, added to it one after another in the given order,
        ``s ← add(b_i, s, τ_i)`` (``layers.EncoderLayer._parallel``; standard
        ``x + Σ b_i``). :func:`.rules.parallel_residual_rule` gives the weights: the skip
        ``Π w_s,i``, branch i ``c_i = w_r,i Π_{j>i} w_s,j``. The branches are taken
        independent of each other and of the skip (as a sequential block's branch and
        skip); the stream's anisotropy mixes in one branch after the other."""
        self._check()
        taus = [tau for _k, _n, tau, _f in branches]
        ones = [1.0] * len(taus)
        weights = R.parallel_residual_rule(1.0, ones, 1.0, ones, taus=taus, unit=self.unit)
        self._e_in = self.aniso
        done = []  # (kind, norm ctx, branch output, branch ctx, e_branch, linear share)
        for kind, norm_name, _tau, fwd in branches:
            h, n = self.norm_fwd(norm_name, x)
            b, ctx = fwd(h)
            done.append((kind, n, b, ctx, self._e_branch, self._linear_share))
        out = x
        for (_kind, _n, b, _ctx, e_b, lin), (_k, norm_name, tau, _f), c in zip(
                done, branches, weights.branch_weights):
            skip = out
            out = self.residual_add(self._dropout(b), skip, tau)
            self._e_branch, self._linear_share = e_b, lin
            self._mix_aniso(b, skip, tau)
            self.branch_vars[norm_name] = (c * self.drop) ** 2 * b.total
        self._scale_flat(weights.skip_weight)
        self.share *= weights.skip_weight
        return out, {"branches": [(kind, n, ctx) for kind, n, _b, ctx, _e, _l in done],
                     "weights": weights}

    def parallel_block_bwd(self, blk: dict, g_out: Cov, memory_grads: list) -> Cov:
        """Backward of :meth:`parallel_block_fwd`: each branch gets the output's gradient
        unscaled (unit scaling's ``residual_add`` weighs with ``scale_fwd``; standard weights
        are 1), its input gradient comes back through its norm, and the splits (taken in
        the reverse order, ``layers.EncoderLayer._parallel``) weigh it by the branch's own
        forward weight ``c_i`` and the skip's gradient by ``Π w_s``
        (:func:`.rules.parallel_residual_rule`): the true gradient of the weighted sum."""
        self._check()
        w = blk["weights"]
        g_branch = self._dropout(g_out)
        g = g_out.scaled(w.skip_weight)
        for (kind, n, ctx), c in zip(reversed(blk["branches"]), reversed(w.branch_weights)):
            if kind == "ffn":
                gi = self.ffn_bwd(ctx, g_branch)
            elif kind == "attn":
                gi = self._self_attn_bwd(ctx, g_branch)
            else:
                gi = self._cross_attn_bwd(ctx, g_branch, memory_grads)
            g = g.plus(self.norm_bwd(n, gi).scaled(c))
        return g

    def _self_attn_bwd(self, a: dict, g: Cov) -> Cov:
        gq, gk, gv = self.attention_bwd(a, g)
        return gq.plus(gk).plus(gv)

    def _cross_attn_bwd(self, a: dict, g: Cov, memory_grads: list) -> Cov:
        gq, gk, gv = self.attention_bwd(a, g)
        memory_grads.append(gk.plus(gv))
        return gq

    # -- embeddings and positions --------------------------------------------------------------
    def _sinusoidal_cov(self) -> tuple[Cov, tuple[np.ndarray, np.ndarray]]:
        """The sinusoidal table's pair covariances ``PE_i·PE_j/d`` on the grid (the same
        for every sequence), and those of its row means ``μ_i μ_j`` (the flat part)."""
        return _sinusoidal_cov(self.c, self.t)

    def embed_fwd(self, prefix: str, tok_name: str) -> tuple[Cov, dict]:
        """Token lookup, absolute positions, the ``embed`` tap."""
        positional = self.cfg.positional
        self.act(tok_name, 1.0, "embedding rows N(0, 1)")
        factors = (1.0, 1.0, 1.0)
        embed = self.independent(1.0)  # token rows: independent draws
        flat = None
        if positional in ("learned", "sinusoidal"):
            if positional == "learned":
                self.act(f"{prefix}pos.table", 1.0, "learned table N(0, 1)")
                self.weight(f"{prefix}pos.table.weight", 1.0, "nn.Embedding N(0, 1)")
                # one row per position, shared by every sequence at that position
                g = self.grid
                k = len(g.n)
                pos = Cov(g, np.ones(k), np.zeros((k, k)), np.diag(1.0 / g.n))
            else:
                pos, flat = self._sinusoidal_cov()
            embed = embed.plus(pos)
            if self.unit:
                constraint = "gmean" if self.p == "unit" else "to_output_scale"
                factors = R.apply_constraint(constraint, 2**-0.5, 1.0, self.b**-0.5)
        embed = embed.scaled(factors[0])
        f2 = factors[0] ** 2
        self.flat = None if flat is None else (flat[0] * f2, flat[1] * f2)
        self.act(f"{prefix}embed", embed, f"α·√(σ_tok² + σ_pos²), α = {factors[0]:.3g}",
                 {"forward": factors[0], "grad_input": factors[1]} if self.unit else None)
        if positional == "relative":
            self.act(f"{prefix}pos.rel_bias", 1.0, "T5 bias table N(0, 1)")
            self.weight(f"{prefix}pos.rel_bias.weight", 1.0, "nn.Embedding N(0, 1)")
        self.share = factors[0]
        self.aniso = 0.0  # independent, isotropic token and position vectors
        return embed, {"prefix": prefix, "tok": tok_name, "factors": factors}

    def embed_bwd(self, e: dict, g: Cov) -> Cov:
        """Gradients of the embed tap, the positions, and the token-embedding output."""
        prefix, f, b = e["prefix"], e["factors"], self.b
        positional = self.cfg.positional
        self.grad(f"{prefix}embed", g)
        g_tok = self.grad(e["tok"], g.scaled(f[1]))
        if positional == "learned":
            gp = g.scaled(f[2])
            # a position's row collects that position of every sequence (M_aa: tokens of
            # bin a in two sequences, the same position when the bin is one position wide)
            var = float(self.grid.w @ (b * gp.var + b * (b - 1) * np.diagonal(gp.M)))
            self.grad(f"{prefix}pos.table", math.sqrt(max(var, 0.0)),
                      "Σ over the batch of α·g")
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

    def tok_wgrad(self, g_tok: Cov) -> None:
        v, n = self.cfg.vocab_size, self.rows
        alpha = R.unit_embedding_grad_scale(v, n) if self.unit else 1.0
        # rows hit by the same id add; random ids coincide with probability 1/V
        pairs = pair_sum(self.b, g_tok, None) - n * g_tok.total
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
            self._e_memory = self.aniso
            x, e_dec = self.embed_fwd("decoder.", "tok_emb@2")
            x, dec_layers = self.stack("decoder.", cfg.decoder_layers, x, True, memory)
            final, n_final = self.norm_fwd("decoder.norm", x)
        else:
            x, e = self.embed_fwd("", "tok_emb")
            x, layers = self.stack("", cfg.n_layers, x, cfg.architecture == "decoder", None)
            final, n_final = self.norm_fwd("norm", x)
        self.share /= max(n_final["x_rms"], 1e-30)  # the final norm
        logits, head = self.linear_fwd("head", final, self.c, cfg.vocab_size, role="readout")
        if cfg.tie_embeddings:
            self.weights.pop("head.weight")
        self_logit = 0.0
        if cfg.tie_embeddings:
            # the logit of the input token itself: α·d·σ_e²·(share of e in the normed stream)
            self_logit = head["f"].output * self.c * self.share
            self._self_logit_sd = head["f"].output * math.sqrt(self.c * (1 + self.share**2))
            rms = math.sqrt(logits.total + self_logit**2 / cfg.vocab_size)
            old = self.acts["head"]
            self.acts["head"] = TensorRow("head", "activation", rms, old.scales, None, (),
                                          ("{}; + self-logit {:.3g} (tied embedding)",
                                           (old._formula, self_logit)))
        cap, cap_mom = cfg.logit_softcap, None
        if cap is None:
            ce = R.cross_entropy_rule(logits.rms, vocab=cfg.vocab_size, n_tokens=self.rows,
                                      unit=self.unit)
        else:
            # a final soft cap c·tanh(z/c) (Gemma 2): the loss reads the capped logits, and
            # its gradient reaches the head's (uncapped) output through sech²(z/c)
            v = cfg.vocab_size
            cap_mom = R.softcap_softmax_moments(logits.rms, v, cap)
            per_row = cap_mom.slope2 * (1.0 - 2.0 / v) + cap_mom.sum_p2_slope2
            ce = R.CrossEntropyScales(cap_mom.logsumexp,
                                      self._loss_grad_scale() * math.sqrt(per_row / v))
        loss_self = (self_logit if cfg.logit_softcap is None
                     else cfg.logit_softcap * math.tanh(self_logit / cfg.logit_softcap))
        loss = float(np.logaddexp(ce.loss, loss_self)) if self_logit > 0 else ce.loss
        self.act("loss", loss, "E[logsumexp(z)] − E[z_target] (exact quadrature)"
                 + ("; with the tied self-logit" if self_logit else ""))
        # ---- backward
        grad_logits, formula = ce.grad_logits, "(softmax(z) − onehot)/N"
        if self_logit > 0 and cap_mom is None:
            # the input token's own logit takes p_self of each row's softmax (its p_self²
            # in the gradient's square, the other logits only the rest)
            p1, p2 = self._p_self_moments(ce, self_logit)
            grad_logits = R.tied_cross_entropy_grad(logits.rms, vocab=cfg.vocab_size,
                                                    n_tokens=self.rows, p_self=p1,
                                                    p_self_sq=p2, unit=self.unit)
            formula += f"; tied: the own logit's p_self = {p1:.3g} (E p_self² = {p2:.3g})"
        g = self.independent(grad_logits**2)
        if cap_mom is not None and self_logit > 0:
            g = self.independent(self._capped_tied_head_grad2(ce, cap_mom, self_logit))
        self.grad("head", g, formula
                  + (" × V/√(V−1), sum reduction" if self.unit else "")
                  + ("" if cap is None else " ⊙ sech²(z/c) of the capped softmax"))
        g_normed = self.linear_bwd(head, g)
        g = self.norm_bwd(n_final, g_normed)
        if self_logit > 0:
            g = self._self_logit_lean(g, g_normed, final, head, ce, self_logit,
                                      n_final["x_var"])
        self._final_norm_coherence(n_final["name"], head, logits, ce, self_logit)
        if cfg.tie_embeddings:
            row = self.wgrads["tok_emb.weight"] = self.wgrads.pop("head.weight")
            row.name = "tok_emb.weight"
        if cfg.architecture == "encoder-decoder":
            memory_grads: list[Cov] = []
            g = self.stack_bwd(dec_layers, g, memory_grads)
            # the encoder's gradient arrives through cross-attention's keys and values, not
            # set against its own stream's shared parts
            self.align = None
            g_tok2 = self.embed_bwd(e_dec, g)
            g_mem = self.independent(0.0)
            for mg in memory_grads:
                g_mem = g_mem.plus(mg)
            g = self.stack_bwd(enc_layers, self.norm_bwd(n_enc, g_mem), [])
            self.tok_wgrad(self.embed_bwd(e_enc, g))
            self.tok_wgrad(g_tok2)
        else:
            g = self.stack_bwd(layers, g, [])
            self.tok_wgrad(self.embed_bwd(e, g))
        self._branch_scale_coherence(n_final, ce, self_logit)

    def _capped_tied_head_grad2(self, ce, mom, self_logit: float) -> float:
        """The head's output gradient's variance per logit with tied embeddings and a final
        soft cap: :func:`.rules.capped_tied_cross_entropy_grad` squared, of the self-logit's
        ``E p_self``, ``E p_self²`` and ``E (p_self sech²(z/c))²`` (:meth:`_p_self_moments`)
        and ``mom`` (:func:`.rules.softcap_softmax_moments` of the other logits)."""
        p1, p2 = self._p_self_moments(ce, self_logit)
        q2 = self._p_self_moments(ce, self_logit, slope=True)[1]
        return R.capped_tied_cross_entropy_grad(mom, vocab=self.cfg.vocab_size,
                                                n_tokens=self.rows, p_self=p1, p_self_sq=p2,
                                                q_self_sq=q2, unit=self.unit) ** 2

    def _loss_grad_scale(self) -> float:
        """The loss gradient's scale per logit: ``1/N`` (mean reduction), or unit scaling's
        ``V/√(V−1)``."""
        return (R.unit_cross_entropy_grad_scale(self.cfg.vocab_size) if self.unit
                else 1.0 / self.rows)

    def _p_self(self, ce, self_logit: float, slope: bool = False) -> float:
        """The softmax weight on the input token's own (tied) logit, ``E σ(z_self − L)``
        over the self-logit's spread between tokens (Gauss–Hermite, 24 nodes).

        ``z_self = α e·x̂ = α(c|e|² + e·r)`` (``x̂ = c e + r``, ``|x̂|² = d``, ``e`` the
        N(0, 1) embedding): mean ``α d c``, variance ``α² d (1 + c²)`` (``|e|²`` is
        χ²_d, ``e·r`` has ``|r|² = d(1 − c²)``); ``L`` the other logits' log-sum-exp, taken
        at its mean. Measured on a tied 24-layer decoder at d 64 (6 seeds): ``p_self`` 0.83,
        where ``σ`` at the mean self-logit (32.7 against ``L`` ≈ 28) gave 0.9997 — the
        spread, ±7 here, matters at narrow widths (it grows as √d, the mean as d)."""
        return self._p_self_moments(ce, self_logit, slope)[0]

    def _p_self_moments(self, ce, self_logit: float, slope: bool = False
                        ) -> tuple[float, float]:
        """``(E q, E q²)`` over the self-logit's spread, ``q = p_self`` (:meth:`_p_self`), or
        with ``slope`` and a logit soft cap ``q = p_self·sech²(z/c)``: the self entry of the
        gradient reaching the head's (uncapped) output. Both moments take the same ``q``:
        under the cap the self-logit saturates (``sech² → 0``) while ``p_self → 1``, so the
        uncapped ``E p_self²`` in place of ``E (p_self sech²)²`` took out of the stream
        gradient what the head never sent (``_self_logit_lean``: gemma-softcaps' stream
        gradients 8.3 log2 low)."""
        if self_logit <= 0:
            return 0.0, 0.0
        nodes, weights = _GAUSS_HERMITE
        z = self_logit + self._self_logit_sd * nodes
        gain = 1.0
        cap = self.cfg.logit_softcap
        if cap is not None:
            # the softmax reads the capped self-logit c·tanh(z/c), and (``slope``) what the
            # self-logit sends back is its weight times the cap's slope sech²(z/c), both
            # averaged over the spread (at the mean self-logit the slope is far from its
            # average: the spread is ±√d against c)
            th = np.tanh(z / cap)
            z = cap * th
            if slope:
                gain = 1.0 - th * th
        z = z - ce.loss
        q = gain / (1.0 + np.exp(np.minimum(-z, 700.0)))
        return float(weights @ q), float(weights @ (q * q))

    def _self_logit_lean(self, g: Cov, g_normed: Cov, final: Cov, head: dict, ce,
                         self_logit: float, x_var: np.ndarray) -> Cov:
        """The stream gradient below the final norm, with the part that leans against the
        stream's shared parts.

        With tied embeddings the softmax puts ``p_self`` on the input token itself, so the
        gradient into the normed stream holds ``κ e_t``, ``κ = α_gx s p_self`` (``e_t`` the
        token's own embedding, a share ``c`` of ``x̂_t = c e_t + r_t``). The norm's backward
        takes out the component along ``x̂_t``: ``κ (e_t − c x̂_t) = κ ((1 − c²) e_t − c r_t)``.
        ``e_t`` is the token's own, but ``r_t`` carries everything the stream shares between
        tokens and sequences (positions, biases, attention averages), so the gradient gets
        pair covariances ``(κ c)² D_a D_b (C, M)[x̂]`` (``D`` the norm's per-position
        backward factor) — small per token, but weight and bias gradients sum them over all
        rows. The token's own variance loses ``E p_self²·(α_gx s c D)²`` (``|κ e_t − κ c x̂_t|²
        = κ²(1 − c²)``) of the ``κ²`` the head's gradient puts in
        (:func:`.rules.tied_cross_entropy_grad`: the own logit's ``p_self²``): with the head
        rule's ``EΣp̂²`` of i.i.d. logits in its place and nothing taken out, the tied
        ALiBi/no-position decoders' stream gradients were +0.35 log2 high (``c`` ≈ 0.92), and
        subtracting ``c²`` of that put learned-position ones (``c`` ≈ 0.68) 0.1 log2 low
        (``test_tied_final_norm_takes_the_self_logit_part_out_of_the_stream_gradient``,
        ``tests/core/test_predict_tied_rope.py``). Measured (standard, tied, 4 layers, d 128,
        t 128): without the pair covariances the bias gradients were 0.5–0.8 log2 low.
        ``x_var`` (the final norm's input variance per position) turns the part's coefficient
        into one on that input's own shared parts, for :meth:`_aligned_cross`.
        """
        lean = (head["f"].grad_input * self._loss_grad_scale()
                * self._p_self(ce, self_logit, slope=True) * self.share)
        if lean == 0:
            return g
        ok = g_normed.var > 0
        D = np.sqrt(np.where(ok, g.var / np.where(ok, g_normed.var, 1.0), 0.0))
        # the norm's backward takes κ c x̂ out with the projection on x̂: per element
        # ``|κ e − κ c x̂|²/d = κ²(1 − c²)`` of the ``κ²`` (``E p_self²`` of it: the head's
        # gradient, R.tied_cross_entropy_grad) the gradient held, ``c²`` of it less; under a
        # logit soft cap the self entry the head sent is p_self·sech²(z/c), so E (p_self·sech²)²
        own = head["f"].grad_input * self._loss_grad_scale() * self.share
        p_sq = self._p_self_moments(ce, self_logit, slope=True)[1]
        var = np.maximum(g.var - own * own * p_sq * D * D, 0.0)
        if not len(final.S):
            return Cov.of(g.g, np.maximum(var - (g.S[0].diagonal() if len(g.S) else 0.0),
                                          0.0), g.S)
        DD = lean * lean * (D[:, None] * D)
        S = np.concatenate((g.S, np.zeros((2 - len(g.S), *DD.shape)))) if len(g.S) < 2 \
            else g.S.copy()
        S[0] += DD * final.C
        S[1] += DD * final.M
        if self._track_align:
            # that part, −lean·D ⊙ x̂̄, on the final norm's input's own shared parts
            # (x̂ = x/σ per position): :meth:`_aligned_cross` carries it down the stack
            self.align = lean * D / np.sqrt(np.maximum(x_var, 1e-300))
        return Cov.of(g.g, np.maximum(var - S[0].diagonal(), 0.0), S)

    def _final_norm_coherence(self, norm: str, head: dict, logits: Cov, ce, self_logit: float
                              ) -> None:
        """The final norm's gain gradient ``Σ_rows g ⊙ x̂`` has a mean the i.i.d. rule misses.

        The loss gradient ``Σ_v (p_v − y_v) w_v`` leans towards the token's own features:
        Stein's lemma gives ``E[Σ_v p_v w_v] = σ_w² α (1 − E Σp²) x̂`` (the softmax favours
        rows aligned with ``x̂``), and a tied head adds ``p_self · e_in``, of which a share
        ``c`` is in ``x̂``. Per element ``E[g ⊙ x̂] = κ = α_gx s [p_self c + (1 − p_self) σ_w²
        α (1 − E Σp²)]`` (``s`` the loss-gradient scale: 1/N, or V/√(V−1) unit-scaled), which
        adds ``(α_n N κ)²`` to the gradient's variance over ``N`` rows. Under a final soft cap
        ``1 − EΣp²`` is :func:`.rules.softcap_softmax_moments`' ``lean`` (``p_self`` times the
        slope: :meth:`_p_self`): with ``(1 − EΣp²)·√E sech⁴`` in its place (one logit's slope,
        where the softmax's weight sits on the top logits, whose slope is small) the tied
        Gemma-like final ``norm.weight`` gradients were +1.03 (gemma-like-wide, cap 30) and
        +1.79 log2 (gemma-softcaps at cap 10) high.
        """
        cfg, f = self.cfg, head["f"]
        v = cfg.vocab_size
        s = self._loss_grad_scale()
        p_self = self._p_self(ce, self_logit)
        if cfg.logit_softcap is None:
            lean = 1.0 - R.softmax_moments(logits.rms, v).sum_p2
        else:  # through the cap: E Σ ∂(p s)/∂z, the top logits' small slope (rules)
            lean = R.softcap_softmax_moments(logits.rms, v, cfg.logit_softcap).lean
        w2 = head["w"] ** 2
        kappa = f.grad_input * s * (self._p_self(ce, self_logit, slope=True) * self.share
                                    + (1 - p_self) * w2 * f.output * lean)
        alpha = R.unit_layer_norm_grad_param_scale(self.c, self.rows) if self.unit else 1.0
        coherent = (alpha * self.rows * kappa) ** 2
        old = self.wgrads[f"{norm}.weight"]
        old.rms = math.sqrt(old.rms**2 + coherent)
        old.formula = ("{}; + (α·N·κ)², κ = {:.3g}: the loss gradient leans to x̂",
                       (old._formula, kappa))

    def _branch_scale_coherence(self, n_final: dict, ce, self_logit: float) -> None:
        """Standard, tied, pre-norm: each sub-block's norm gain gradient has a mean.

        ``Σ_rows Σ_f g_f y_f`` (``y`` the norm's output, ``g`` its gradient) is ``dL/dλ`` for
        the norm's output scaled by ``λ``: the branch's output grows, the final stream's
        variance ``σ_F²`` by ``2V`` (``V`` the branch's share of it, its output taken as
        linear in ``λ``), and the tied self-logit ``z = α d c ∝ 1/σ_F`` falls by ``z V/σ_F²``,
        which lowers the loss by ``p_self`` per unit (self-attention's output is linear in
        ``λ`` through its values: at initialisation the weights are near uniform). Spread over
        the ``d`` gains::

            μ = −p_self · z · V / (σ_F² d)

        added in quadrature to the gain gradient's RMS (the same for every feature). Left
        out under unit scaling and u-μP, whose backward scale factors make ``g`` other than
        ``∂L/∂y``, and for post-norm, whose norm scales the whole stream."""
        if self.unit or self_logit <= 0 or self.cfg.norm != "pre":
            return
        sigma2 = max(n_final["x_rms"] ** 2, 1e-300)
        p_self = self._p_self(ce, self_logit, slope=True)  # (a soft cap: times its slope)
        prefix = "decoder." if self.cfg.architecture == "encoder-decoder" else ""
        for norm, var in self.branch_vars.items():
            if not norm.startswith(prefix) or norm.endswith("cross_norm"):
                # the encoder's norms reach the tied head only through memory; a cross-norm
                # scales the queries alone, which sharpens the weights but not the output
                continue
            mean = -p_self * self_logit * var / (sigma2 * self.c)
            old = self.wgrads[f"{norm}.weight"]
            old.rms = math.sqrt(old.rms**2 + mean * mean)
            old.formula = ("{}; + μ², μ = {:.3g}: the tied self-logit falls as the branch grows",
                           (old._formula, mean))

    # -- rows ----------------------------------------------------------------------------------
    def to_rows(self) -> list[TensorRow]:
        order, grads, wgrads = self.order, self.grads, self.wgrads
        rows = [self.acts[name] for name in order]
        rows += [grads[name] for name in order if name in grads]
        rows += self.weights.values()
        rows += [wgrads[name] for name in self.weights if name in wgrads]
        return rows


class _Pass:
    """One predictor run: what every ``(config, formats)`` that differs from it only in
    :data:`UNPREDICTED_FIELDS` shares. ``rows`` carry no formats (each answer copies them and
    attaches its own); ``tables`` holds each format's columns over ``rows``, made when first
    asked for (a format's table is computed once per distinct RMS: a stack's weights all
    share a few values)."""

    __slots__ = ("rows", "own_shares", "distinct", "index", "tables", "rms", "columns",
                 "counts")

    def __init__(self, rows: list[TensorRow], own_shares: list[tuple[str, float]]):
        self.rows, self.own_shares = tuple(rows), tuple(own_shares)
        self.rms = np.fromiter(map(_RMS, rows), dtype=np.float64, count=len(rows))
        rms = self.rms.copy()
        rms[~np.isfinite(rms) | (rms < 0)] = 0.0
        self.distinct, self.index = np.unique(rms, return_inverse=True)
        self.tables: dict[str, dict[str, np.ndarray]] = {}
        #: each attribute of the rows, column by column, for :meth:`answer`'s copies
        self.columns = tuple(tuple(map(attrgetter(a), rows)) for a in (
            "name", "kind", "rms", "scales", "shape", "_formula"))
        self.counts: dict[str, dict[str, int]] = {}  # status_counts per format

    def table(self, fmt: str) -> dict[str, np.ndarray]:
        """Gaussian underflow/overflow fractions and headroom of every row in ``fmt``,
        vectorised (column → array in row order)."""
        out = self.tables.get(fmt)
        if out is None:  # (two threads may both compute it: the same values, either kept)
            table = gaussian_format_table(self.distinct, FORMATS[fmt])
            out = self.tables[fmt] = {k: table[k][self.index] for k in (
                "underflow", "subnormal", "overflow", "headroom_max_log2",
                "headroom_min_log2")}
        return out

    def answer(self, cfg: ModelConfig, formats: tuple[str, ...]
               ) -> tuple[tuple[TensorRow, ...], dict[str, dict[str, np.ndarray]],
                          Collapse | None]:
        """Fresh rows with headroom in ``formats``, their table, and ``cfg``'s collapse."""
        tables = {fmt: self.table(fmt) for fmt in formats}
        names, kinds, rms, scales, shapes, formulas = self.columns
        # row i reads entry i: ``formats=(tables, i)``, a TableRow view made when first read;
        # the rows made column by column in one ``map`` (a Python function per row, reading
        # the pass's row attribute by attribute, cost twice as long)
        entries = zip(repeat(tables), range(len(names))) if tables else repeat(None)
        rows = tuple(map(TensorRow, names, kinds, rms, scales, entries, shapes, formulas))
        return rows, tables, find_collapse(self.own_shares, cfg.dtype, cfg.seq_len)


_RMS = attrgetter("rms")

#: Config fields the prediction does not depend on: the dtype only decides where a deep
#: stack's tokens collapse (:mod:`.collapse`, from the pass's own shares), and the seed and
#: device change the measured draw, not its expectation. Configs that differ only in these
#: share one predictor pass.
UNPREDICTED_FIELDS = {"dtype": "fp32", "device": "auto", "seed": 0}


def pass_key(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with :data:`UNPREDICTED_FIELDS` at fixed values: the key of its pass."""
    return cfg.replace(**UNPREDICTED_FIELDS)


def predict(cfg: ModelConfig, formats: tuple[str, ...] = REPORTED_FORMATS,
            should_stop: Callable[[], bool] | None = None) -> list[TensorRow]:
    """Predicted rows for ``cfg`` (see module docstring), with headroom in ``formats``.

    Cached per (config, formats): the rows returned are shared and must not be modified.
    Another format, dtype, seed or device of a predicted config reuses its pass (a few
    milliseconds for a 96-layer model instead of a new pass).
    ``should_stop`` (optional) is asked between sub-blocks; when it returns True the pass
    raises :class:`PredictionCancelled` (a thread can give up a stale or long prediction).
    """
    return list(_prediction(cfg, tuple(formats), should_stop)[0])


def stream_collapse(cfg: ModelConfig) -> Collapse | None:
    """The first LayerNorm of ``cfg`` whose input tokens differ by less than the resolution
    of ``cfg.dtype`` (:mod:`.collapse`): from the own shares of any earlier pass for ``cfg``
    (whatever its formats or dtype; kept after its rows leave the cache), else from a new
    pass."""
    key = pass_key(cfg)
    with _CACHE_LOCK:
        shares = _OWN_SHARES.get(key)
    if shares is None:
        shares = _pass(cfg).own_shares
    return find_collapse(shares, cfg.dtype, cfg.seq_len)


def stream_anisotropy(cfg: ModelConfig) -> list[tuple[str, float]]:
    """``(norm name, S)`` at every LayerNorm that reads a residual stream, in execution
    order: the predicted feature-space anisotropy ``S = d·tr Σ²/(tr Σ)²`` of the tokens'
    deviations from their sequence's mean (``Σ`` their covariance within a sequence, for the
    model's drawn weights; 1 when isotropic, at most ``d``). Keys and values are projections of
    the attention's input, so it multiplies what the pairs of keys add to the attention's
    output and to the query and key gradients. Not cached."""
    p = _Predictor(pass_key(cfg))
    p.run()
    return p.anisotropies


def predicted_covariances(cfg: ModelConfig) -> dict[tuple[str, str], Cov]:
    """``(name, kind) → Cov`` of every activation and activation gradient of ``cfg``: the
    position-resolved structure behind :func:`predict`'s RMS (``Cov.parts()`` gives the
    independent / per-sequence / batch-wide split measurement can check). Not cached."""
    p = _Predictor(cfg)
    p.keep = {}
    p.run()
    return p.keep


def status_counts(cfg: ModelConfig, fmt: str) -> dict[str, int]:
    """How many predicted tensors are ``zero`` (exactly: representable, so never lost),
    ``fine``, ``at_risk`` and ``lost`` in ``fmt`` (:func:`~.formats.headroom_status` of each
    row, vectorised; from the pass's table, with no rows made)."""
    p = _pass(cfg)
    counts = p.counts.get(fmt)
    if counts is None:  # once per pass and format (a summary asks on every change)
        table = p.table(fmt)
        statuses = headroom_status_array(table["underflow"], table["subnormal"],
                                         table["overflow"], p.rms)
        counts = p.counts[fmt] = {status: int(np.count_nonzero(statuses == status))
                                  for status in ("zero", "fine", "at_risk", "lost")}
    return dict(counts)


def is_predicted(cfg: ModelConfig, formats: tuple[str, ...]) -> bool:
    """True when :func:`predict` would answer ``(cfg, formats)`` without a new pass: from its
    cache, or by giving a cached pass's rows these formats (~6 ms for 96 layers)."""
    with _CACHE_LOCK:
        return (cfg, tuple(formats)) in _CACHE or pass_key(cfg) in _PASSES


def clear_cache() -> None:
    """Forget every cached prediction and pass (benchmarks time cold predictions)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _PASSES.clear()
        _OWN_SHARES.clear()


#: The most recent answers (rows with formats), least recently used first (an explicit LRU
#: rather than functools' so the panel can ask whether a prediction is ready without
#: computing it).
_CACHE: OrderedDict[tuple, tuple] = OrderedDict()
_CACHE_SIZE = 16
#: The most recent passes, by :func:`pass_key`.
_PASSES: OrderedDict[ModelConfig, _Pass] = OrderedDict()
_CACHE_LOCK = threading.Lock()
#: Each pass's own shares (a few hundred floats), kept longer than the passes: the panel asks
#: for the shown config's :func:`stream_collapse` after other predictions may have pushed its
#: pass out, and must not redo a 96-layer prediction on the GUI thread for it.
_OWN_SHARES: OrderedDict[ModelConfig, tuple[tuple[str, float], ...]] = OrderedDict()
_OWN_SHARES_SIZE = 512


def _remember(cache: OrderedDict, key, value, size: int) -> None:
    """Put ``value`` in the LRU ``cache`` and drop its oldest beyond ``size`` (under the
    lock)."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


def _pass(cfg: ModelConfig, should_stop: Callable[[], bool] | None = None) -> _Pass:
    """The predictor pass of ``cfg`` (cached by :func:`pass_key`)."""
    key = pass_key(cfg)
    with _CACHE_LOCK:
        done = _PASSES.get(key)
        if done is not None:
            _PASSES.move_to_end(key)
            return done
    # A prediction allocates tens of thousands of small acyclic objects (rows, deferred
    # formulas, covariances); the cyclic collector would rescan them over and over and cost a few
    # milliseconds of the frame, collecting nothing. Reference counting frees them as usual.
    collecting = gc.isenabled()
    gc.disable()
    try:
        p = _Predictor(key, should_stop)
        p.run()
        done = _Pass(p.to_rows(), p.own_shares)
    finally:
        if collecting:
            gc.enable()
    with _CACHE_LOCK:
        _remember(_PASSES, key, done, _CACHE_SIZE)
        _remember(_OWN_SHARES, key, done.own_shares, _OWN_SHARES_SIZE)
    return done


def _prediction(cfg: ModelConfig, formats: tuple[str, ...],
                should_stop: Callable[[], bool] | None = None
                ) -> tuple[tuple[TensorRow, ...], dict[str, dict[str, np.ndarray]],
                           Collapse | None]:
    key = (cfg, formats)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    result = _pass(cfg, should_stop).answer(cfg, formats)
    with _CACHE_LOCK:
        _remember(_CACHE, key, result, _CACHE_SIZE)
    return result
