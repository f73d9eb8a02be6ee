"""Training lab: train any ModelConfig on a task and watch every tensor's scale while it trains.

The point (Blake et al. 2023, "Unit Scaling", §1 and §6; Blake et al. 2024, "u-μP", §5): a
unit-scaled model trains in FP16 / FP8 without loss scaling, while a standard one loses its
gradients to underflow. :class:`TrainingRun` trains one configuration step by step and records,
per step, the loss and, on logged steps, the RMS of every tensor and the fraction of values that
would underflow in FP8 / FP16.

**Number formats** (``dtype``), all with fp32 master weights and fp32 AdamW state:

* ``fp32``: the model is the master copy.
* ``bf16`` / ``fp16``: a working copy of the model in that format does the forward and backward
  pass (weights, activations, activation and weight gradients all bf16 / fp16; only the loss
  is computed in fp32, from fp32 logits). Each step copies the fp32 master weights into it
  (round to nearest), and its gradients are copied back to fp32 for the optimizer — mixed
  precision as Micikevicius et al. 2018 ("Mixed Precision Training") describe it.
* ``fp8_e4m3`` / ``fp8_e5m2``: simulated FP8 as the model does it (:mod:`.model.ops`): weights
  and activations stay fp32, every matmul input is rounded to E4M3 (E5M2) in the forward pass
  and every gradient reaching a matmul input to E5M2 in the backward pass. The model's
  parameters are the master copy.

**Loss scaling** is off unless ``loss_scaling=True``; then it is dynamic loss scaling as
``torch.amp.GradScaler`` does it: the loss is multiplied by S (initially 2¹⁶) before backward;
if any gradient is inf/NaN the update is skipped and S ← S/2, otherwise the gradients are
divided by S, the optimizer steps, and after ``growth_interval`` (2000, GradScaler's default)
good steps in a row S ← 2S. S is a power of two, so unscaling is exact.

**Optimizer**: ``torch.optim.AdamW`` (β = (0.9, 0.999), ε = 1e-8, weight decay 0 by default,
constant learning rate, no gradient clipping unless ``grad_clip`` is set). For ``umup`` each
parameter gets u-μP's Adam learning-rate rule from ``unit_scaling.optim`` (0.3.x): the
parameters are tagged as the library's own modules tag theirs (:func:`mup_tags`) and
``unit_scaling.optim.scaled_parameters(..., lr_scale_func_adam)`` builds the groups::

    lr_p = η · (L^-½ if p is inside a stack of L layers else 1) · (fan_in^-½ for a weight,
           1 for a bias, a norm gain or the output head)

(fan_in of an embedding table is its width d_model, the library's convention.)

**Default learning rates** (``lr=None``), Adam's η per parametrization (:data:`DEFAULT_LR`):
standard 1e-3, the usual Adam LR for small Transformers; unit 1e-2: unit-scaled weights start
at RMS 1 instead of ~1/√(3·fan_in), and Adam's update size does not depend on the weight's
scale, so the same *relative* update needs an LR about √fan_in larger (the unit-scaling paper
re-tunes the LR for this reason); umup 2^0.5 ≈ 1.41: u-μP's global η multiplies the
per-parameter rule above, and the u-μP paper's LR sweeps put its optimum near 2^0–2^1.5.
These are starting points taken from that reasoning, not values tuned on this program.

**Statistics** on logged steps (step 1, every ``log_every``-th step and the last): the RMS
``√(Σx²/n)`` of every tensor :func:`.measure.measure` reports, under the same names, and per
kind the RMS over all its elements and the fraction of *nonzero* values that would round to
zero in E4M3 / E5M2 / FP16, i.e. ``0 < |x| ≤ s/2`` with s the format's smallest subnormal
(:attr:`.scaling.formats.NumberFormat.underflow_threshold`). Gradients are recorded as the
backward pass carries them: multiplied by the loss scale when loss scaling is on (that is
what the low-precision format has to hold). Each tensor is reduced on its device (a dot
product and four clamp-and-sum passes in float64, :class:`_Reducer`); one transfer per step
brings the numbers back.

**Divergence**: a step whose loss is not finite (NaN or ±inf) ends the run. Its record is
kept, its update is not applied (``skipped``), and :attr:`TrainingRun.diverged` says at which
step, after how many updates at which learning rate, the largest weight then, and what to
change; loss scaling cannot mend it, because the loss is computed before it is scaled.

**Determinism**: initialisation uses the seed; the batch of step k and its dropout masks are
drawn from generators seeded with ``(seed, k)`` alone, so the same seed gives bit-identical
losses on CPU, and a run resumed from a checkpoint continues exactly as if uninterrupted.

**Checkpoints** are safetensors files: ``param/<name>`` (fp32 master weights),
``adam/<name>/{exp_avg,exp_avg_sq,step}``, ``stats/tensor_rms`` (logged steps × tensors) and
the metadata key ``unitscale_training``: JSON with the config, the settings, the step, the
loss-scale state and the per-step records. Written atomically; loading never runs code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .atomic import FileProblem, atomic_open, read_regular_file
from .config import DTYPES, PARAMETRIZATIONS, ConfigError, ModelConfig, from_dict
from .measure import RECORDED, record_tensors
from .model import build_model
from .model.layers import NORM_CLASSES
from .scaling.formats import FORMATS
from .tasks import TASKS, Batch, batch_rng, make_batch, probe, required_vocab, toy_length
from .tensors import KINDS

log = logging.getLogger(__name__)

TRAIN_DTYPES = DTYPES
UNDERFLOW_FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp16")
#: Adam's η when ``TrainSettings.lr`` is None (see the module docstring for the reasons).
DEFAULT_LR = {"standard": 1e-3, "unit": 1e-2, "umup": 2**0.5}
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: torch.amp.GradScaler's defaults.
INIT_LOSS_SCALE = 2.0**16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000
MAX_STEPS = 1_000_000
CHECKPOINT_FORMAT = "unitscale-training"
CHECKPOINT_VERSION = 1
METADATA_KEY = "unitscale_training"

__all__ = [
    "TASKS", "TRAIN_DTYPES", "KINDS", "UNDERFLOW_FORMATS", "DEFAULT_LR", "TrainingError",
    "TrainSettings", "StepRecord", "TrainingRun", "train", "mup_tags", "underflow_counts",
    "default_training_config",
]


class TrainingError(ValueError):
    """A training request that cannot run. ``errors`` maps each field name to the reason;
    the message joins the reasons, each of which names its field."""

    def __init__(self, errors: dict[str, str] | str):
        if isinstance(errors, str):
            errors = {"training": errors}
        self.errors = dict(errors)
        super().__init__("; ".join(self.errors.values()))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainSettings:
    """How to train. ``None`` fields are resolved from the config (:meth:`resolve`)."""

    parametrization: str | None = None  # None → the config's
    dtype: str | None = None  # None → the config's
    task: str = "lm"
    steps: int = 80
    lr: float | None = None  # None → DEFAULT_LR[parametrization]
    loss_scaling: bool = False  # dynamic loss scaling as torch's GradScaler does it
    log_every: int = 1  # per-tensor statistics every this many steps (and step 1, the last)
    seed: int | None = None  # None → config.seed
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    grad_clip: float | None = None  # max global gradient norm; None → no clipping
    growth_interval: int = GROWTH_INTERVAL  # good steps before the loss scale doubles

    def validate(self) -> None:
        """Raise :class:`TrainingError` naming every invalid field."""
        errors: dict[str, str] = {}
        if self.parametrization is not None and self.parametrization not in PARAMETRIZATIONS:
            errors["parametrization"] = (f"parametrization={self.parametrization!r} is not one "
                                         f"of {', '.join(PARAMETRIZATIONS)}")
        if self.dtype is not None and self.dtype not in TRAIN_DTYPES:
            errors["dtype"] = f"dtype={self.dtype!r} is not one of {', '.join(TRAIN_DTYPES)}"
        if self.task not in TASKS:
            errors["task"] = f"task={self.task!r} is not one of {', '.join(TASKS)}"
        for name, low, high in (("steps", 1, MAX_STEPS), ("log_every", 1, MAX_STEPS),
                                ("growth_interval", 1, MAX_STEPS)):
            value = getattr(self, name)
            if not _is_int(value):
                errors[name] = f"{name}={value!r} must be a whole number"
            elif not low <= value <= high:
                errors[name] = f"{name}={value} must be between {low} and {high:,}"
        if self.lr is not None and not (_is_number(self.lr) and math.isfinite(self.lr)
                                        and self.lr > 0):
            errors["lr"] = f"lr={self.lr!r} must be a positive number"
        if not isinstance(self.loss_scaling, bool):
            errors["loss_scaling"] = f"loss_scaling={self.loss_scaling!r} must be true or false"
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            errors["seed"] = f"seed={self.seed!r} must be a whole number in [0, 2**63)"
        if not (_is_number(self.weight_decay) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            errors["weight_decay"] = f"weight_decay={self.weight_decay!r} must be ≥ 0"
        if self.grad_clip is not None and not (_is_number(self.grad_clip)
                                               and math.isfinite(self.grad_clip)
                                               and self.grad_clip > 0):
            errors["grad_clip"] = f"grad_clip={self.grad_clip!r} must be a positive number"
        if errors:
            raise TrainingError(errors)

    def resolve(self, config: ModelConfig) -> TrainSettings:
        """A copy with no None left: parametrization, dtype and seed from ``config``, lr from
        :data:`DEFAULT_LR`. Validates first."""
        self.validate()
        param = self.parametrization or config.parametrization
        return dataclasses.replace(
            self, parametrization=param, dtype=self.dtype or config.dtype,
            seed=config.seed if self.seed is None else self.seed,
            lr=DEFAULT_LR[param] if self.lr is None else float(self.lr))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> TrainSettings:
        """Settings from a mapping; unknown keys are refused by name."""
        if not isinstance(data, dict):
            raise TrainingError({"settings": "settings must be a table of keys"})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainingError({k: f"unknown setting {k!r}" for k in unknown})
        out = cls(**data)
        out.validate()
        return out


@dataclass
class StepRecord:
    """One training step, as plain Python / numpy (it crosses threads)."""

    step: int  # 1-based
    loss: float  # the unscaled loss of this step's batch (before the update)
    loss_scale: float  # the scale this step used; 1.0 without loss scaling
    skipped: bool  # update skipped (non-finite gradients under loss scaling)
    kind_rms: dict[str, float] | None  # KINDS → RMS over all elements of that kind
    underflow: dict[str, dict[str, float]] | None  # KINDS → UNDERFLOW_FORMATS → fraction
    tensor_rms: np.ndarray | None  # float32 (len(run.tensor_names),), logged steps only
    seconds: float = 0.0  # wall time of the step, statistics included

    def to_json(self, with_tensors: bool = False) -> dict[str, Any]:
        """JSON-safe dict (non-finite numbers become None)."""
        out: dict[str, Any] = {"step": self.step, "loss": _finite(self.loss),
                               "loss_scale": self.loss_scale, "skipped": self.skipped,
                               "seconds": self.seconds}
        if self.kind_rms is not None:
            out["kind_rms"] = {k: _finite(v) for k, v in self.kind_rms.items()}
        if self.underflow is not None:
            out["underflow"] = {k: {f: _finite(v) for f, v in d.items()}
                                for k, d in self.underflow.items()}
        if with_tensors and self.tensor_rms is not None:
            out["tensor_rms"] = [_finite(float(v)) for v in self.tensor_rms]
        return out


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _unfinite(x: float | None) -> float:
    return math.nan if x is None else float(x)


# -- statistics --------------------------------------------------------------------------------

#: Count thresholds, increasing: 0 and each format's underflow threshold t = s/2.
_EDGE_FORMATS = ("fp16", "fp8_e5m2", "fp8_e4m3")
_EDGES = [0.0] + [FORMATS[f].underflow_threshold for f in _EDGE_FORMATS]
#: The fp32 number just above each edge, and the gap between them (one fp32 ulp).
_ABOVE = [float(np.nextafter(np.float32(e), np.float32(1.0))) for e in _EDGES]
_ULPS = np.array([hi - lo for lo, hi in zip(_EDGES, _ABOVE)], dtype=np.float64)


class _Reducer:
    """``[Σx², #(|x| > 0), #(|x| > t_fp16), #(|x| > t_e5m2), #(|x| > t_e4m3)]`` of a tensor,
    computed on its device (float64, counts in units of :data:`_ULPS`).

    Counting trick, exact: for a = |x| (an fp32 value) and an edge e with next fp32 number e⁺,
    ``clamp(a, e, e⁺) − e`` is 0 where a ≤ e and exactly e⁺ − e where a > e, so its sum is
    (count) · (e⁺ − e). The work is done in float64, where every such gap (down to 2⁻¹⁴⁹) and
    the squares of tiny gradients are normal numbers: fp32 subnormals are very slow on CPUs,
    and sums stay exact far beyond any tensor's size. Two scratch buffers are reused across
    tensors, because allocating per tensor costs more on CPU than the arithmetic.
    """

    def __init__(self, device: torch.device):
        self.a = torch.empty(0, dtype=torch.float64, device=device)
        self.b = torch.empty(0, dtype=torch.float64, device=device)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        flat = x.detach().reshape(-1)
        n = flat.numel()
        if self.a.numel() < n:
            self.a = torch.empty(n, dtype=torch.float64, device=flat.device)
            self.b = torch.empty(n, dtype=torch.float64, device=flat.device)
        a, b = self.a[:n], self.b[:n]
        a.copy_(flat).abs_()
        values = [torch.dot(a, a)]
        for lo, hi in zip(_EDGES, _ABOVE):
            torch.clamp(a, lo, hi, out=b)
            if lo:
                b.sub_(lo)
            values.append(b.sum())
        return torch.stack(values)


def underflow_counts(sums: np.ndarray, numel: float) -> tuple[float, dict[str, float]]:
    """From :class:`_Reducer`'s numbers (summed over tensors): RMS ``√(Σx²/n)`` and, per
    UNDERFLOW_FORMATS, the fraction of nonzero values with ``|x| ≤ s/2`` (0 when none is
    nonzero)."""
    sumsq = float(sums[0])
    nonzero, above16, above52, above43 = (float(v) for v in np.asarray(sums[1:]) / _ULPS)
    rms = math.sqrt(sumsq / numel) if numel else 0.0
    under = {"fp16": nonzero - above16, "fp8_e5m2": nonzero - above52,
             "fp8_e4m3": nonzero - above43}
    return rms, {f: (under[f] / nonzero if nonzero > 0 else 0.0) for f in UNDERFLOW_FORMATS}


class _StepStats:
    """Collects the :class:`_Reducer` numbers of every recorded tensor of one step."""

    def __init__(self, reducer: _Reducer):
        self.reduce = reducer
        self.rows: dict[tuple[str, str], tuple[Tensor, int]] = {}

    def __call__(self, name: str, kind: str, x: Tensor) -> None:
        self.rows[(name, kind)] = (self.reduce(x), x.numel())


class _Names:
    """Records only the (name, kind) of each tensor, in order (the discovery pass)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, name: str, kind: str, x: Tensor) -> None:
        self.seen.append((name, kind))


# -- u-μP learning-rate rules --------------------------------------------------------------------


def mup_tags(config: ModelConfig, model: nn.Module) -> dict[str, tuple[str, int | None]]:
    """``name → (mup_type, mup_scaling_depth)`` for every parameter, as ``unit_scaling``'s own
    modules tag theirs (``unit_scaling._modules``):

    * LayerNorm and RMSNorm gains (QK-norms too) → ``norm``, every bias → ``bias``, the
      untied output head → ``output``; T5 relative-position biases (an additive logit bias
      per head) → ``bias``;
    * everything else (linear weights, token and learned position tables, a tied
      embedding/head) → ``weight``;
    * depth: the number of layers of the stack a parameter sits in (``layers.*``,
      ``encoder.layers.*``, ``decoder.layers.*``), as ``DepthSequential`` sets it; None outside.
    """
    norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, NORM_CLASSES)}
    tags: dict[str, tuple[str, int | None]] = {}
    for name, _ in model.named_parameters():
        if name.endswith(".bias") or "rel_bias" in name:
            kind = "bias"
        elif name in norms:
            kind = "norm"
        elif name == "head.weight":  # tied heads are named tok_emb.weight (deduplicated)
            kind = "output"
        else:
            kind = "weight"
        if name.startswith("layers."):
            depth: int | None = config.n_layers
        elif name.startswith("encoder.layers."):
            depth = config.encoder_layers
        elif name.startswith("decoder.layers."):
            depth = config.decoder_layers
        else:
            depth = None
        tags[name] = (kind, depth)
    return tags


def _param_groups(config: ModelConfig, model: nn.Module, lr: float,
                  weight_decay: float) -> list[dict[str, Any]]:
    named = list(model.named_parameters())
    if config.parametrization != "umup":
        return [{"params": [p for _, p in named], "lr": lr, "weight_decay": weight_decay}]
    from unit_scaling.optim import lr_scale_func_adam, scaled_parameters

    tags = mup_tags(config, model)
    for name, p in named:
        p.mup_type, p.mup_scaling_depth = tags[name]
    return scaled_parameters([p for _, p in named], lr_scale_func_adam, lr=lr,
                             weight_decay=weight_decay)


def _step_seed(seed: int, step: int) -> int:
    """Dropout seed of step ``step``: 63 bits of ``SeedSequence([seed, step, 1])``."""
    state = np.random.SeedSequence([seed, step, 1]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


# -- the run -------------------------------------------------------------------------------------


class TrainingRun:
    """One configuration being trained; :meth:`run` advances it, :attr:`records` keeps the
    history. Attributes: ``config`` (with the settings' parametrization, dtype and seed
    applied), ``settings`` (resolved), ``step`` (steps done), ``tensor_names`` /
    ``tensor_kinds`` (the rows of ``StepRecord.tensor_rms``, :func:`.measure.measure`'s names
    and order), ``records``, ``loss_scale``."""

    def __init__(self, config: ModelConfig, settings: TrainSettings = TrainSettings(),
                 device: str | torch.device = "cpu"):
        settings = settings.resolve(config)
        try:
            config = config.replace(parametrization=settings.parametrization,
                                    dtype=settings.dtype, seed=settings.seed)
        except ConfigError as exc:  # e.g. a seed the config refuses
            raise TrainingError(exc.errors) from None
        _check_task(config, settings.task)
        self.config = config
        self.settings = settings
        self.device = torch.device(device)
        self.step = 0
        self.records: list[StepRecord] = []
        #: why the run stopped early (its loss stopped being finite), else None
        self.diverged: str | None = None
        self.loss_scale = INIT_LOSS_SCALE if settings.loss_scaling else 1.0
        self._growth_tracker = 0
        self._reducer = _Reducer(self.device)
        self.model = build_model(config, device=self.device)
        if config.dtype in ("bf16", "fp16"):
            # fp32 master copy; self.model is the low-precision working copy
            self._master_model: nn.Module = build_model(config.replace(dtype="fp32"),
                                                        device=self.device)
            self._working = list(self.model.parameters())
        else:
            self._master_model = self.model
            self._working = None
        self._master_named = list(self._master_model.named_parameters())
        self._dirty = True  # master changed since the working copy was filled
        self.optimizer = torch.optim.AdamW(
            _param_groups(config, self._master_model, settings.lr, settings.weight_decay),
            lr=settings.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=settings.weight_decay,
            foreach=False)
        self.tensor_names, self.tensor_kinds = self._discover_names()
        self._index = {key: i for i, key in enumerate(zip(self.tensor_names, self.tensor_kinds))}

    # -- public -------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Every step trained, or the run stopped because it diverged (:attr:`diverged`)."""
        return self.step >= self.settings.steps or self.diverged is not None

    @property
    def lrs(self) -> dict[str, float]:
        """Each parameter's learning rate (``name → lr``), from the optimizer's groups."""
        by_id = {id(p): n for n, p in self._master_named}
        return {by_id[id(p)]: float(g["lr"]) for g in self.optimizer.param_groups
                for p in g["params"]}

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.records]

    def run(self, n: int, check_cancelled: Callable[[], None] | None = None) -> list[StepRecord]:
        """Train up to ``n`` more steps (never past ``settings.steps``); the new records.

        ``check_cancelled`` is called before each step and after its forward and backward
        passes; whatever it raises propagates, and the run stays consistent (completed steps
        are kept, the interrupted one left no trace). A step whose loss is not finite ends
        the run: it is recorded, its update is not applied, and :attr:`diverged` says why.
        """
        new: list[StepRecord] = []
        for _ in range(max(0, min(n, self.settings.steps - self.step))):
            if self.diverged is not None:
                break
            if check_cancelled is not None:
                check_cancelled()
            new.append(self._train_step(check_cancelled))
        return new

    def attention(self) -> tuple[np.ndarray, list[str]]:
        """``(layers, heads, T, T)`` float32 self-attention probabilities on the task's fixed
        probe (:func:`.tasks.probe`; the decoder's self-attention in an encoder-decoder model),
        and the probe's token labels. Dropout off; the weights are the current ones."""
        batch, labels = probe(self.settings.task, self.config.architecture, self.config.seq_len)
        self._sync_working()
        model = self.model
        mods = [m for name, m in model.attention_modules()
                if name.endswith(".attn") and not name.startswith("encoder.")]
        was_training = model.training
        model.eval()
        for m in mods:
            m.capture, m.capture_fn = True, None
        try:
            with torch.no_grad():
                self._logits(self._to_device(batch))
            maps = torch.stack([m.probs[0].float() for m in mods])  # (L, H, T, T)
        finally:
            for m in mods:
                m.capture, m.probs = False, None
            model.train(was_training)
        return maps.cpu().numpy().astype(np.float32), labels

    # -- one step -----------------------------------------------------------------------------
    def _to_device(self, b: Batch) -> dict[str, Tensor | int | None]:
        def t(a: np.ndarray | None) -> Tensor | None:
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(
                self.device)

        return {"inputs": t(b.inputs), "targets": t(b.targets), "src": t(b.src),
                "answer_from": b.answer_from, "loss_mask": t(b.loss_mask)}

    def _batch(self, step: int) -> dict[str, Tensor | int | None]:
        cfg = self.config
        return self._to_device(make_batch(self.settings.task, cfg.architecture, cfg.seq_len,
                                          cfg.batch_size, batch_rng(self.settings.seed, step)))

    def _logits(self, b: dict) -> Tensor:
        if self.config.architecture == "encoder-decoder":
            return self.model(b["src"], b["inputs"])
        return self.model(b["inputs"])

    def _loss(self, b: dict) -> Tensor:
        """The parametrization's cross-entropy over the task's answer positions."""
        logits, targets = self._logits(b), b["targets"]
        a = b["answer_from"]
        if a:
            logits, targets = logits[:, a:], targets[:, a:]
        if b["loss_mask"] is not None:
            mask = b["loss_mask"]
            logits, targets = logits[mask][None], targets[mask][None]  # (1, N, V), (1, N)
        return self.model.loss(logits, targets)

    def _sync_working(self) -> None:
        """Round the fp32 master weights into the bf16/fp16 working copy."""
        if self._working is not None and self._dirty:
            with torch.no_grad():
                for w, (_, m) in zip(self._working, self._master_named):
                    w.copy_(m)
        self._dirty = False

    def _rng_context(self, step: int):
        devices = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _discover_names(self) -> tuple[list[str], list[str]]:
        """One forward/backward on step 1's batch recording only the tensors' names (no update,
        no RNG consumed, gradients cleared): measure()'s rows and order, then the tensors of
        any MoE expert that step did not run."""
        names = _Names()
        self._sync_working()
        self.model.train()
        with record_tensors(self.model, names), self._rng_context(1):
            torch.manual_seed(_step_seed(self.settings.seed, 1))
            self._loss(self._batch(1)).backward()
        self.model.zero_grad(set_to_none=True)
        acts = [n for n, k in names.seen if k == "activation"]
        grads = {n for n, k in names.seen if k == "grad_activation"}
        # MoE experts no token of step 1 chose ran on no tensor: their names still get rows
        # (NaN at a step that does not run them), so a later step's tensors are kept
        seen = set(acts)
        unseen = [n for n, m in self.model.named_modules()
                  if ".moe.experts." in n and isinstance(m, RECORDED) and n not in seen]
        acts += unseen + ["loss"]
        grads |= set(unseen)
        params = [n for n, _ in self.model.named_parameters()]
        with_grad = [n for n, p in self.model.named_parameters() if p.requires_grad]
        out = ([(n, "activation") for n in acts]
               + [(n, "grad_activation") for n in acts if n in grads]
               + [(n, "weight") for n in params] + [(n, "grad_weight") for n in with_grad])
        return [n for n, _ in out], [k for _, k in out]

    def _is_logged(self, step: int) -> bool:
        return step == 1 or step % self.settings.log_every == 0 or step == self.settings.steps

    def _train_step(self, check: Callable[[], None] | None = None) -> StepRecord:
        """One step. ``check`` is also called after the forward and after the backward pass
        (a Stop need not wait for a whole step): until the update nothing of the run has
        changed (gradients are cleared at the next step, the RNG state is restored on the
        way out), so whatever it raises leaves the run as it was before the step."""
        check = check or (lambda: None)
        t0 = time.perf_counter()
        s = self.settings
        step = self.step + 1
        logged = self._is_logged(step)
        batch = self._batch(step)
        self._sync_working()
        model = self.model
        model.train()
        model.zero_grad(set_to_none=True)
        self._master_model.zero_grad(set_to_none=True)
        stats = _StepStats(self._reducer) if logged else None
        scale = self.loss_scale
        with contextlib.ExitStack() as stack:
            if stats is not None:
                stack.enter_context(record_tensors(model, stats))
            stack.enter_context(self._rng_context(step))
            torch.manual_seed(_step_seed(s.seed, step))  # dropout masks of this step
            loss = self._loss(batch)
            check()
            (loss * scale if s.loss_scaling else loss).backward()
        check()
        if stats is not None:
            stats("loss", "activation", loss)
            for name, p in model.named_parameters():
                stats(name, "weight", p)
                if p.grad is not None:
                    stats(name, "grad_weight", p.grad)
        master = [p for _, p in self._master_named]
        if self._working is not None:
            for m, w in zip(master, self._working):
                m.grad = None if w.grad is None else w.grad.float()
        grads = [p.grad for p in master if p.grad is not None]
        loss_value = float(loss.detach())
        skipped = False
        if not math.isfinite(loss_value):
            # Diverged: no scale or update can mend a non-finite forward pass. The weights stay
            # as they were before this step, and the run ends (see _divergence).
            skipped = True
            self.diverged = self._divergence(step, loss_value)
            log.info("training stopped: %s", self.diverged)
        elif s.loss_scaling:
            finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
            if not finite:
                skipped = True
                self.loss_scale *= BACKOFF_FACTOR
                self._growth_tracker = 0
            else:
                torch._foreach_mul_(grads, 1.0 / scale)  # exact: scale is a power of two
        if not skipped:
            if s.grad_clip is not None:
                nn.utils.clip_grad_norm_(master, s.grad_clip)
            self.optimizer.step()
            self._dirty = True
            if s.loss_scaling:
                self._growth_tracker += 1
                if self._growth_tracker == s.growth_interval:
                    self.loss_scale *= GROWTH_FACTOR
                    self._growth_tracker = 0
        record = StepRecord(step, loss_value, scale if s.loss_scaling else 1.0, skipped,
                            None, None, None)
        if stats is not None:
            self._summarise(stats, record)
        self.step = step
        record.seconds = time.perf_counter() - t0
        self.records.append(record)
        return record

    def _divergence(self, step: int, loss: float) -> str:
        """Why the run stopped at ``step``: the loss's value, how many updates at which learning
        rate led there, the largest weight now, and what to change."""
        s = self.settings
        what = "NaN" if math.isnan(loss) else "infinite"
        if step == 1:
            return (f"loss became {what} at step 1, before any update: the initial model "
                    f"overflows in {s.dtype}; run stopped")
        with torch.no_grad():
            largest = max(float(p.detach().abs().max()) for _, p in self._master_named)
        default = DEFAULT_LR[s.parametrization]
        if s.lr > default:
            advice = (f"the learning rate {s.lr:g} is too large (the default for "
                      f"{s.parametrization} is {default:g})")
        else:
            advice = "try a smaller learning rate" + (
                "" if s.dtype == "fp32" else f", loss scaling or a wider format than {s.dtype}")
        updates = f"{step - 1} update" + ("s" if step > 2 else "")
        return (f"loss became {what} at step {step} after {updates} at learning rate {s.lr:g} "
                f"(largest weight now {largest:.3g}): {advice}; run stopped")

    def _summarise(self, stats: _StepStats, record: StepRecord) -> None:
        """Per-tensor RMS and per-kind RMS / underflow fractions from one device transfer."""
        keys = [k for k in stats.rows if k in self._index]
        sums = torch.stack([stats.rows[k][0] for k in keys]).cpu().numpy()  # (n, 5)
        numel = np.array([stats.rows[k][1] for k in keys], dtype=np.float64)
        rms = np.full(len(self.tensor_names), np.nan, dtype=np.float32)
        rms[[self._index[k] for k in keys]] = np.sqrt(sums[:, 0] / np.maximum(numel, 1))
        kinds = np.array([k[1] for k in keys])
        record.kind_rms, record.underflow = {}, {}
        for kind in KINDS:
            sel = kinds == kind
            k_rms, under = underflow_counts(sums[sel].sum(axis=0), float(numel[sel].sum()))
            record.kind_rms[kind] = k_rms
            record.underflow[kind] = under
        record.tensor_rms = rms

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, path: str) -> None:
        """Write weights, optimizer state and metadata to a safetensors file, atomically."""
        from safetensors.torch import save

        tensors: dict[str, Tensor] = {}
        with_state = []
        for name, p in self._master_named:
            tensors[f"param/{name}"] = p.detach().float().cpu().contiguous()
            state = self.optimizer.state.get(p)
            if state:
                with_state.append(name)
                for key in ("exp_avg", "exp_avg_sq"):
                    tensors[f"adam/{name}/{key}"] = state[key].detach().float().cpu()
                tensors[f"adam/{name}/step"] = state["step"].detach().float().cpu().reshape(1)
        logged = [r for r in self.records if r.tensor_rms is not None]
        if logged:
            tensors["stats/tensor_rms"] = torch.from_numpy(np.stack([r.tensor_rms
                                                                     for r in logged]))
        meta = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(), "settings": self.settings.to_dict(),
            "step": self.step, "loss_scale": self.loss_scale,
            "growth_tracker": self._growth_tracker, "optimizer_state": with_state,
            "tensor_names": self.tensor_names, "tensor_kinds": self.tensor_kinds,
            "data": "batch and dropout of step k drawn from SeedSequence([seed, k]); "
                    "resuming needs only the step",
            "records": [r.to_json() for r in self.records],
        }
        blob = save(tensors, metadata={METADATA_KEY: json.dumps(meta)})
        with atomic_open(path, "wb") as handle:
            handle.write(blob)

    @classmethod
    def load_checkpoint(cls, path: str, device: str | torch.device = "cpu") -> TrainingRun:
        """A run restored from :meth:`save_checkpoint`'s file, ready to continue.

        Refuses (TrainingError naming the problem) a file that is not safetensors, lacks the
        metadata or a tensor, or holds tensors whose shapes do not fit the config."""
        tensors, meta = _read_checkpoint(Path(path))
        try:
            config = from_dict(meta["config"], versioned=False)
        except ConfigError as exc:
            raise TrainingError({"checkpoint": f"checkpoint {Path(path).name}: config: {exc}"})\
                from None
        settings = TrainSettings.from_dict(meta["settings"])
        run = cls(config, settings, device)
        run._restore(tensors, meta, Path(path).name)
        return run

    def _restore(self, tensors: dict[str, Tensor], meta: dict[str, Any], source: str) -> None:
        def fail(reason: str) -> TrainingError:
            return TrainingError({"checkpoint": f"checkpoint {source}: {reason}"})

        step = meta["step"]
        if not _is_int(step) or not 0 <= step <= self.settings.steps:
            raise fail(f"step={step!r} is not between 0 and steps={self.settings.steps}")
        if meta["tensor_names"] != self.tensor_names or \
                meta["tensor_kinds"] != self.tensor_kinds:
            raise fail("its tensor names do not match the model its config builds")
        expected: dict[str, tuple[int, ...]] = {}
        for name, p in self._master_named:
            expected[f"param/{name}"] = tuple(p.shape)
        for name in meta["optimizer_state"]:
            if f"param/{name}" not in expected:
                raise fail(f"optimizer state for unknown parameter {name!r}")
            shape = expected[f"param/{name}"]
            expected[f"adam/{name}/exp_avg"] = shape
            expected[f"adam/{name}/exp_avg_sq"] = shape
            expected[f"adam/{name}/step"] = (1,)
        logged = [r for r in meta["records"] if "kind_rms" in r]
        if logged:
            expected["stats/tensor_rms"] = (len(logged), len(self.tensor_names))
        missing = [k for k in expected if k not in tensors]
        if missing:
            raise fail(f"missing tensor {missing[0]!r}"
                       + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise fail(f"unexpected tensor {extra[0]!r}")
        for key, shape in expected.items():
            t = tensors[key]
            if tuple(t.shape) != shape:
                raise fail(f"tensor {key!r} has shape {list(t.shape)}, the config needs "
                           f"{list(shape)}")
            if t.dtype != torch.float32:
                raise fail(f"tensor {key!r} is {t.dtype}, not float32")
        with torch.no_grad():
            by_name = dict(self._master_named)
            for name, p in self._master_named:
                p.copy_(tensors[f"param/{name}"])
            for name in meta["optimizer_state"]:
                self.optimizer.state[by_name[name]] = {
                    "step": tensors[f"adam/{name}/step"].reshape(()).clone(),
                    "exp_avg": tensors[f"adam/{name}/exp_avg"].to(self.device).clone(),
                    "exp_avg_sq": tensors[f"adam/{name}/exp_avg_sq"].to(self.device).clone(),
                }
        self._dirty = True
        self.step = step
        self.loss_scale = float(meta["loss_scale"])
        self._growth_tracker = int(meta["growth_tracker"])
        rms_rows = iter(tensors["stats/tensor_rms"].numpy()) if logged else iter(())
        self.records = []
        for r in meta["records"]:
            has = "kind_rms" in r
            self.records.append(StepRecord(
                int(r["step"]), _unfinite(r["loss"]), float(r["loss_scale"]), bool(r["skipped"]),
                {k: _unfinite(v) for k, v in r["kind_rms"].items()} if has else None,
                {k: {f: _unfinite(v) for f, v in d.items()} for k, d in r["underflow"].items()}
                if has else None,
                np.array(next(rms_rows), dtype=np.float32) if has else None,
                float(r.get("seconds", 0.0))))
        if len(self.records) != step:
            raise fail(f"it holds {len(self.records)} step records for step={step}")
        last = self.records[-1] if self.records else None
        if last is not None and not math.isfinite(last.loss):  # it stopped there
            self.diverged = self._divergence(last.step, last.loss)


#: Largest training checkpoint read back (the training lab's models are megabytes).
MAX_CHECKPOINT_BYTES = 8 << 30


def _read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the parsed metadata of a checkpoint file (TrainingError if unusable)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    def fail(reason: str) -> TrainingError:
        return TrainingError({"checkpoint": f"checkpoint {path.name}: {reason}"})

    try:
        # a regular file only (a FIFO would block, /dev/zero read without end), size capped
        raw = read_regular_file(path, MAX_CHECKPOINT_BYTES, what=f"checkpoint {path.name}")
    except FileProblem as exc:
        raise TrainingError({"checkpoint": str(exc)}) from None
    except OSError as exc:
        raise TrainingError({"checkpoint": f"cannot read checkpoint {path}: "
                                           f"{exc.strerror or exc}"}) from None
    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
    except (SafetensorError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise fail(f"not a readable safetensors file (truncated or corrupt?): {reason}") \
            from None
    text = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if text is None:
        raise fail(f"no {METADATA_KEY!r} metadata: not a training checkpoint")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise fail("metadata is not a unitscale training checkpoint's")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise fail(f"version={meta.get('version')!r} is not supported "
                   f"(this program reads {CHECKPOINT_VERSION})")
    needed = ("config", "settings", "step", "loss_scale", "growth_tracker", "optimizer_state",
              "tensor_names", "tensor_kinds", "records")
    absent = [k for k in needed if k not in meta]
    if absent:
        raise fail(f"metadata lacks {', '.join(absent)}")
    return tensors, meta


def _check_task(config: ModelConfig, task: str) -> None:
    """The config can hold the task's tokens and strings (TrainingError naming the field)."""
    need = required_vocab(task)
    if config.vocab_size < need:
        what = "256 byte tokens" if task == "lm" else f"{need} toy tokens (16 letters and |)"
        raise TrainingError({"vocab_size": f"vocab_size={config.vocab_size} is below the "
                                           f"{what} task {task!r} needs"})
    if task != "lm" and toy_length(config.architecture, config.seq_len) < 2:
        need_len = 4 if config.architecture == "decoder" else 2
        raise TrainingError({"seq_len": f"seq_len={config.seq_len} is too short for task "
                                        f"{task!r} (at least {need_len})"})


def default_training_config() -> ModelConfig:
    """The tiny preset with byte-level vocabulary (``vocab_size`` 256): the CLI's and the
    panel's default; an 80-step run takes tens of seconds on a laptop CPU."""
    from .presets import load_preset

    return load_preset("tiny").replace(vocab_size=256)


def train(config: ModelConfig, settings: TrainSettings = TrainSettings(),
          device: str | torch.device = "cpu",
          progress: Callable[[float, str], None] | None = None,
          check_cancelled: Callable[[], None] | None = None) -> TrainingRun:
    """Run every step of ``settings``; ``progress(fraction, text)`` after each step."""
    run = TrainingRun(config, settings, device)
    while not run.done:
        (record,) = run.run(1, check_cancelled)
        if progress is not None:
            progress(run.step / run.settings.steps,
                     f"step {run.step}/{run.settings.steps}: loss {record.loss:.4f}")
    return run
