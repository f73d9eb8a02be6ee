"""One forward and backward pass, and the RMS of every activation, weight and gradient.

Hooks on the model's own modules record each output and, through a tensor hook, the gradient
that reaches it in the backward pass; weights and their ``.grad`` are read after backward. No
second copy of the model is made. Names are module paths (``layers.0.attn.q``,
``layers.0.attn.probs``, ``layers.0`` for a layer's output, ``head`` for the logits); a module
that runs twice in one pass (the shared token embedding of an encoder-decoder) reports its
second call as ``name@2``. A mixture-of-experts layer's tensors are ``layers.{i}.moe.router``
(the router's logits, one row per token) and ``layers.{i}.moe.experts.{e}.up`` / ``.gate`` /
``.down``; an expert no token of the batch chose does not run, so it has weight rows only (no
activation, activation-gradient or weight-gradient rows), as any tensor the pass never made.

Format columns are counted on the actual values: ``underflow`` is the fraction of the
tensor's elements that are non-zero but round to zero in the format (``0 < |x| ≤ s/2``),
``overflow`` the fraction at or beyond the overflow threshold or already non-finite.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .memory_budget import Budget, check_budget
from .model import build_model
from .model.layers import NORM_CLASSES, Embedding, EncoderLayer, Linear, Tap
from .scaling.formats import FORMATS
from .tensors import AGREEMENT_LOG2, REPORTED_FORMATS, TensorRow, headroom_log2

log = logging.getLogger(__name__)

RECORDED = (Tap, Linear, Embedding, *NORM_CLASSES, EncoderLayer)
#: Built models kept for reuse (key: everything that decides the weights, and the device).
MODEL_CACHE_SIZE = 2
_models: OrderedDict[tuple, nn.Module] = OrderedDict()


def cached_model(cfg: ModelConfig, device: torch.device) -> nn.Module:
    """``build_model(cfg)`` on ``device``, reused while the weights would be the same.

    Sequence length and batch size do not change a model, so editing them re-measures
    without rebuilding; any other field (or the seed) builds afresh. Measurement never
    updates weights, only ``.grad``, which is cleared here.
    """
    key = _cache_key(cfg, device)
    model = _models.pop(key, None)
    if model is None:
        while len(_models) >= MODEL_CACHE_SIZE:  # before building: never one model too many
            _models.popitem(last=False)
        model = build_model(cfg, device=device)
    _models[key] = model
    model.zero_grad(set_to_none=True)
    return model


def _cache_key(cfg: ModelConfig, device: torch.device) -> tuple:
    return (cfg.replace(seq_len=1, batch_size=1, device="auto"), str(device))


def is_cached(cfg: ModelConfig, device: str | torch.device) -> bool:
    """True when :func:`cached_model` would reuse a model for ``cfg`` on ``device`` (its
    weights are in memory already)."""
    return _cache_key(cfg, torch.device(device)) in _models


def resolve_device(preference: str) -> torch.device:
    """``auto``: CUDA, then MPS, then CPU; ``cuda`` without a device is a ValueError."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA device is available")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if preference == "auto" and mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def measurement_batch(cfg: ModelConfig, device: torch.device) -> dict[str, Tensor]:
    """Seeded uniform random token ids and targets, ``(batch_size, seq_len)`` each."""
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, cfg.seq_len)
    batch = {name: torch.randint(0, cfg.vocab_size, shape, generator=gen)
             for name in ("ids", "targets", "src")}
    return {k: v.to(device) for k, v in batch.items()}


def _row_name(module_name: str) -> str:
    return module_name.replace("probs_tap", "probs") or "model"


#: Values that can underflow in some reported format lie at or below this; values that can
#: overflow, at or above the other. Counting on these (small) subsets instead of the whole
#: tensor once per format and comparison makes a measurement ~2× faster overall.
_UNDER_MAX = max(FORMATS[name].underflow_threshold for name in REPORTED_FORMATS)
_OVER_MIN = min(FORMATS[name].overflow_threshold for name in REPORTED_FORMATS)


#: Tensors with more elements than this are reduced one piece of ``STATS_PIECE`` elements at
#: a time, so measuring a tensor needs at most a piece's workspace (``|x|`` in fp32 and its
#: masks, ~8 MiB) instead of full-size copies: GPT-2 small's logits at batch 8 × 1024 are
#: 1.6 GB, and their copies came on top of the training step's own peak (issue 19). Smaller
#: tensors take the one-shot path (their results are unchanged to the bit). Pieces that fit
#: in a cache are also faster: 100 M elements take 0.7 s instead of 1.4 s on one core.
STATS_CHUNK = 1 << 22
STATS_PIECE = 1 << 20


def _pieces(x: Tensor, size: int) -> Iterator[Tensor]:
    """``x``'s elements as 1-D pieces of at most ``size`` elements (at least one row of the
    innermost dimension), each a view of ``x`` or a copy of that piece alone."""
    if x.dim() <= 1 or x.is_contiguous():
        flat = x.reshape(-1)  # a view
        for i in range(0, flat.numel(), size):
            yield flat[i:i + size]
        return
    inner = x[0].numel()
    if inner > size:  # one row of dimension 0 is too big: split it further
        for row in x:
            yield from _pieces(row, size)
        return
    step = max(1, size // max(inner, 1))
    for i in range(0, x.shape[0], step):
        yield x[i:i + step].reshape(-1)  # (a strided or expanded gradient: copies one piece)


def _counts(a: Tensor) -> tuple[list[int], list[int]]:
    """Per reported format, how many of ``|x|`` (``a``) underflow and how many overflow."""
    small = a[a <= _UNDER_MAX]
    small = small[small > 0]
    big = a[~(a < _OVER_MIN)]  # at or above the lowest overflow threshold, and NaN
    under, over = [], []
    for name in REPORTED_FORMATS:
        fmt = FORMATS[name]
        under.append(int((small <= fmt.underflow_threshold).sum()))
        over.append(int((~(big < fmt.overflow_threshold)).sum()))
    return under, over


@torch.no_grad()
def tensor_stats(x: Tensor) -> tuple[float, dict[str, dict[str, float]]]:
    """RMS of ``x`` and its measured underflow/overflow fractions in each reported format.

    ``underflow = #{0 < |x| ≤ threshold}/n``; ``overflow = #{|x| ≥ threshold or NaN}/n``
    (thresholds of :mod:`~unitscale_core.scaling.formats`); ``rms = ‖x‖₂/√n``. A tensor of
    more than :data:`STATS_CHUNK` elements is reduced piece by piece (counts summed exactly,
    ``‖x‖₂² = Σ ‖piece‖₂²`` accumulated in fp64), so no full-size copy is ever made.
    """
    x = x.detach()
    n = max(x.numel(), 1)
    if x.numel() <= STATS_CHUNK:
        a = x.float().abs().flatten()
        rms = float(torch.linalg.vector_norm(a)) / math.sqrt(n) if a.numel() else 0.0
        under, over = _counts(a)
    else:
        sumsq = 0.0
        under = [0] * len(REPORTED_FORMATS)
        over = [0] * len(REPORTED_FORMATS)
        for piece in _pieces(x, STATS_PIECE):
            a = piece.float().abs()
            sumsq += float(torch.linalg.vector_norm(a, dtype=torch.float64)) ** 2
            u, o = _counts(a)
            under = [s + c for s, c in zip(under, u)]
            over = [s + c for s, c in zip(over, o)]
            del a  # before the next piece's copy
        rms = math.sqrt(sumsq / n)
    formats = {}
    for i, name in enumerate(REPORTED_FORMATS):
        fmt = FORMATS[name]
        hmax, hmin = headroom_log2(rms, fmt.max_normal, fmt.min_subnormal)
        formats[name] = {"underflow": under[i] / n, "overflow": min(over[i] / n, 1.0),
                         "headroom_max_log2": hmax, "headroom_min_log2": hmin}
    return rms, formats


@contextmanager
def record_tensors(model: nn.Module, on_tensor: Callable[[str, str, Tensor], None],
                   check_cancelled: Callable[[], None] | None = None) -> Iterator[None]:
    """Hook every recorded module of ``model`` while the block runs.

    ``on_tensor(name, "activation", output)`` is called for each module output in execution
    order, and ``on_tensor(name, "grad_activation", grad)`` when that output's gradient arrives
    in the backward pass. Names are :func:`measure`'s (``layers.0.attn.q``, ``tok_emb@2`` for a
    module's second call). ``check_cancelled`` runs after every recorded tensor, so a cancelled
    job stops part-way. The hooks are removed when the block ends.
    """
    calls: dict[str, int] = {}

    def grad_hook(row_name: str):
        def on_grad(grad: Tensor) -> None:
            on_tensor(row_name, "grad_activation", grad)
            if check_cancelled is not None:
                check_cancelled()

        return on_grad

    def hook(name: str):
        def on_forward(module: nn.Module, _inputs, output) -> None:
            if not isinstance(output, Tensor):
                return
            count = calls[name] = calls.get(name, 0) + 1
            row_name = name if count == 1 else f"{name}@{count}"
            on_tensor(row_name, "activation", output)
            if output.requires_grad:
                output.register_hook(grad_hook(row_name))
            if check_cancelled is not None:
                check_cancelled()  # a cancelled job stops at the next recorded tensor

        return on_forward

    handles = [m.register_forward_hook(hook(_row_name(name)))
               for name, m in model.named_modules() if isinstance(m, RECORDED)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


#: Shares of a measurement's progress: the forward pass up to the first, the backward pass up
#: to the second, then the weights and their gradients (backward costs about twice the
#: forward; each phase also takes the statistics of the tensors it passes).
FORWARD_SHARE, BACKWARD_SHARE = 0.3, 0.9

#: ``report(fraction, text)``: progress of a long job, ``fraction`` from 0 to 1 (the worker's
#: ``Worker.report``).
Report = Callable[[float, str], None]
#: The text of a measurement's last report.
DONE = "done"


class _Recorder:
    """Collects a :class:`TensorRow` (full format statistics) per recorded tensor, and says
    how far the pass has come: layers done of the total, forward then backward.

    Nothing but the rows is kept: each tensor is reduced to its statistics as it passes.
    """

    def __init__(self, model: nn.Module, report: Report | None = None) -> None:
        self.activations: dict[str, TensorRow] = {}
        self.grads: dict[str, TensorRow] = {}
        self.report = report
        self.layers = {_row_name(n) for n, m in model.named_modules()
                       if isinstance(m, EncoderLayer)}
        #: tensors the forward pass will record (a module called twice records once more)
        self.expected = sum(isinstance(m, RECORDED) for m in model.modules())
        self._layers_done = 0
        self._last = (-1.0, "")

    def _say(self, fraction: float, text: str) -> None:
        if self.report is not None and text != self._last[1]:
            fraction = max(fraction, self._last[0])  # monotone, whatever the counts
            self._last = (fraction, text)
            self.report(fraction, text)

    def __call__(self, name: str, kind: str, x: Tensor) -> None:
        rms, formats = tensor_stats(x)
        row = TensorRow(name, kind, rms, {}, formats, tuple(x.shape))
        forward = kind == "activation"
        (self.activations if forward else self.grads)[name] = row
        if self.report is None or name.split("@")[0] not in self.layers:
            return
        total = max(len(self.layers), 1)
        if forward:
            self._layers_done += 1  # a layer's output: that layer is done
            share = min(len(self.activations) / max(self.expected, 1), 1.0)
            self._say(FORWARD_SHARE * share, f"forward: {self._layers_done} of {total} layers")
        else:  # a layer's output gradient: the layers above it are done
            done = sum(n.split("@")[0] in self.layers for n in self.grads) - 1
            share = min(len(self.grads) / max(len(self.activations), 1), 1.0)
            self._say(FORWARD_SHARE + (BACKWARD_SHARE - FORWARD_SHARE) * share,
                      f"backward: {done} of {total} layers")

    def weights_progress(self, i: int, n: int) -> None:
        """``i`` of ``n`` weights (and their gradients) reduced."""
        step = max(n // 20, 1)  # ~5% steps: a report per weight would be hundreds
        if i == n or i % step == 0:
            self._say(BACKWARD_SHARE + (1.0 - BACKWARD_SHARE) * i / max(n, 1),
                      f"weights and gradients: {i} of {n}")


def measure(cfg: ModelConfig, device: str | torch.device | None = None,
            check_cancelled: Callable[[], None] | None = None,
            report: Report | None = None) -> list[TensorRow]:
    """Rows for every activation, weight, activation gradient and weight gradient.

    One training step at initialisation (``model.train()``: dropout on) on
    :func:`measurement_batch`. Order: activations in execution order, their gradients in the
    same order, then weights and weight gradients in parameter order. A tied output head shares
    the embedding's weight row.

    Memory: what the training step itself needs and no more. Each tensor is reduced to its
    statistics in the hooks as it passes (:func:`tensor_stats`, in pieces for a large one);
    the logits are let go once the loss has what its backward needs; the graph lives for one
    backward; the gradients are released when the rows are made (the cached model keeps its
    weights only). ``check_cancelled`` runs after every recorded tensor (a cancel stops within
    a layer, forward or backward); ``report(fraction, text)`` hears the layers done, forward
    then backward, then the weights, ending at 1.
    """
    dev = resolve_device(cfg.device) if device is None else torch.device(device)
    model = cached_model(cfg, dev)
    model.train()
    batch = measurement_batch(cfg, dev)
    rec = _Recorder(model, report)
    rec._say(0.0, "forward")
    try:
        with record_tensors(model, rec, check_cancelled), \
                torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(cfg.seed)  # dropout masks
            if cfg.architecture == "encoder-decoder":
                logits = model(batch["src"], batch["ids"])
            else:
                logits = model(batch["ids"])
            loss = model.loss(logits, batch["targets"])
            # the loss's graph keeps what its backward needs (the log-probabilities); holding
            # the logits as well would add a full fp32 (batch, seq, vocab) copy to the peak
            del logits
            rec._say(FORWARD_SHARE, "backward")
            loss.backward()
        del batch
        rows = list(rec.activations.values())
        loss_rms, loss_formats = tensor_stats(loss)
        rows.append(TensorRow("loss", "activation", loss_rms, {}, loss_formats, ()))
        rows += [rec.grads[name] for name in rec.activations if name in rec.grads]
        params = list(model.named_parameters())
        for name, p in params:
            rms, formats = tensor_stats(p)
            rows.append(TensorRow(name, "weight", rms, {}, formats, tuple(p.shape)))
        for i, (name, p) in enumerate(params):
            if p.grad is not None:
                rms, formats = tensor_stats(p.grad)
                rows.append(TensorRow(name, "grad_weight", rms, {}, formats, tuple(p.shape)))
            rec.weights_progress(i + 1, len(params))
            if check_cancelled is not None:
                check_cancelled()
    finally:
        # a cached model holds its weights only: gradients (as large as the weights) would
        # otherwise stay allocated until the next measurement, for every model in the cache
        model.zero_grad(set_to_none=True)
    rec._say(1.0, DONE)
    log.debug("measured %d tensors on %s", len(rows), dev)
    return rows


class SeedSpread(NamedTuple):
    """How one tensor's RMS varied over the seeds of :func:`measure_seeds`: the smallest and
    largest draw, and the standard deviation of ``log2 rms`` (0 for one seed)."""

    low: float
    high: float
    log2_std: float


def one_seed_ceiling(spreads: Iterable[SeedSpread], tolerance: float = AGREEMENT_LOG2) -> float:
    """The share of tensors that even an exact prediction of each one's typical draw would
    have within ``tolerance`` (log2) of a single draw: the mean over tensors of
    ``2Φ(tol/s) − 1 = erf(tol/(s√2))``, ``s`` the draws' log2 std (1 where it is 0), taking
    log RMS as Gaussian between seeds. Where it is below a goal, one seed cannot meet the
    goal (``benchmarks/agreement_seeds.py`` reports the same from the draws themselves)."""
    shares = [1.0 if s.log2_std <= 0 else math.erf(tolerance / (s.log2_std * math.sqrt(2.0)))
              for s in spreads]
    return sum(shares) / len(shares) if shares else 1.0


def measure_seeds(cfg: ModelConfig, seeds: int, device: str | torch.device | None = None,
                  check_cancelled: Callable[[], None] | None = None,
                  progress: Callable[[float], None] | None = None,
                  report: Report | None = None) -> list[TensorRow]:
    """:func:`measure` over ``seeds`` initialisations (``cfg.seed``, ``cfg.seed + 1``, …),
    combined per tensor: the RMS is the geometric mean ``exp(mean log rms)`` (the typical
    draw; one draw of a deep or strongly correlated stack scatters ±1–2 log₂ around it), the
    format fractions the arithmetic mean, and each format's headroom is taken at the combined
    RMS. A tensor that is zero in any draw keeps the arithmetic mean of its RMS. ``seeds = 1``
    is :func:`measure` itself.

    The predictor propagates second moments, so strictly it predicts the ensemble RMS
    ``√(mean rms²)``, which sits ``s²·ln 2`` log₂ above the geometric mean of log-normal draws
    of log₂ spread ``s``. With the few seeds one measures, the ensemble RMS is the noisier
    comparison where a rare draw is large: over seeds 100–103 of the held-out configs, 94.1% of
    the unit-scaled tensors' predictions are within 25% of the geometric mean and 90.2% of the
    ensemble RMS; only with 16 seeds of the tied 32-layer unit decoder does the ensemble RMS
    agree better (86% against 70%). ``benchmarks/agreement_seeds.py`` reports both.
    """
    return measure_seeds_with_spread(cfg, seeds, device, check_cancelled, progress, report)[0]


def measure_seeds_with_spread(cfg: ModelConfig, seeds: int,
                              device: str | torch.device | None = None,
                              check_cancelled: Callable[[], None] | None = None,
                              progress: Callable[[float], None] | None = None,
                              report: Report | None = None
                              ) -> tuple[list[TensorRow], dict[tuple[str, str], SeedSpread]]:
    """:func:`measure_seeds`' rows and, per ``(name, kind)``, how the draws spread
    (:class:`SeedSpread`): whether a tensor's disagreement with the prediction is the luck of
    the draw or a bias. ``progress(fraction)`` hears each seed's end; ``report(fraction,
    text)`` every layer of every pass (:func:`measure`), over all seeds from 0 to 1."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, not {seeds}")
    runs = []
    for i in range(seeds):
        if check_cancelled is not None:
            check_cancelled()
        within = None
        if report is not None:
            def within(f: float, text: str, i: int = i) -> None:
                if seeds > 1:
                    text = f"measured {i + 1} of {seeds} seeds" if text == DONE else \
                        f"seed {i + 1} of {seeds}: {text}"
                report((i + f) / seeds, text)
        runs.append(measure(cfg.replace(seed=cfg.seed + i), device, check_cancelled, within))
        if progress is not None:
            progress((i + 1) / seeds)
    return combine_seeds(runs)


def combine_seeds(runs: list[list[TensorRow]]
                  ) -> tuple[list[TensorRow], dict[tuple[str, str], SeedSpread]]:
    """Combine measurements of several seeds (:func:`measure_seeds`); one run is returned
    as it is, with zero spread."""
    if len(runs) == 1:
        return runs[0], {(r.name, r.kind): SeedSpread(r.rms, r.rms, 0.0) for r in runs[0]}
    by_key = [{(r.name, r.kind): r for r in rows} for rows in runs]
    out, spread = [], {}
    for row in runs[0]:
        key = (row.name, row.kind)
        draws = [rows[key] for rows in by_key if key in rows]
        values = [r.rms for r in draws]
        if all(v > 0 and math.isfinite(v) for v in values):
            rms = math.exp(sum(math.log(v) for v in values) / len(values))
        else:
            rms = sum(values) / len(values)
        logs = [math.log2(v) for v in values if v > 0 and math.isfinite(v)]
        if len(logs) == len(values):
            mean = sum(logs) / len(logs)
            std = math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs))
        else:  # a zero or non-finite draw: no log spread, unless every draw is the same
            std = 0.0 if min(values) == max(values) else math.nan
        spread[key] = SeedSpread(min(values), max(values), std)
        formats = {}
        for name in row.formats:
            fmt = FORMATS[name]
            hmax, hmin = headroom_log2(rms, fmt.max_normal, fmt.min_subnormal)
            formats[name] = {
                "underflow": sum(r.formats[name]["underflow"] for r in draws) / len(draws),
                "overflow": sum(r.formats[name]["overflow"] for r in draws) / len(draws),
                "headroom_max_log2": hmax, "headroom_min_log2": hmin}
        out.append(TensorRow(row.name, row.kind, rms, {}, formats, row.shape))
    return out, spread


def measurement_budget(cfg: ModelConfig, seeds: int = 1,
                       device: str | torch.device | None = None,
                       available: int | None = None) -> Budget:
    """Will measuring ``cfg`` (over ``seeds``) fit in what is free on its device now?
    (:mod:`~unitscale_core.memory_budget`; a model cached already needs no new weights.)
    ``available`` replaces the reading of the free memory."""
    dev = resolve_device(cfg.device) if device is None else torch.device(device)
    return check_budget(cfg, str(dev), available=available,
                        resident=is_cached(cfg, dev), seeds=seeds)
