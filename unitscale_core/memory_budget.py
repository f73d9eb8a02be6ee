"""Will a measurement fit? Its peak memory, estimated before the run, against what is free.

One measurement (:func:`unitscale_core.measure.measure`) is one training step without an
optimizer. Its peak, in bytes, with ``N`` parameters, ``p`` bytes per stored element, batch
``b``, sequence ``s`` and vocabulary ``V``:

* ``weights = p·N`` and ``gradients = p·N`` (:func:`~unitscale_core.sizing.training_memory`);
* ``activations``: what the backward keeps (:func:`~unitscale_core.sizing.activation_bytes`,
  Korthikanti et al. 2022 §4.1, including the fp32 log-probabilities ``4·s·b·V``);
* ``loss_buffers = 2 · 4·s·b·V``: at the top of the backward the cross-entropy holds, besides
  its saved log-probabilities, the gradient arriving at them and the one it hands the logits
  (fp32 each, the largest tensors of a language model; the sizing model leaves them out);
* ``workspace``: what the statistics add while a tensor passes (a piece of
  :data:`~unitscale_core.measure.STATS_PIECE` elements as fp32 ``|x|`` and three one-byte
  masks; the hooks keep nothing else);
* over several seeds, ``other_models = p·N``: the cache keeps the previous seed's model.

FP8 configs are simulated on fp32 storage, so they are sized as fp32. Weights already
resident (the model is cached from an earlier measurement) are not needed again. Measured:
GPT-2 small at 1 × 1024 peaks at 0.98 of this estimate, the interpreter and torch included
(``benchmarks/measure_memory.py``).

What is free: host RAM (``psutil.virtual_memory().available``) for the CPU (and Apple's MPS,
which shares it); for CUDA the device's free memory plus what torch's allocator holds unused
(``torch.cuda.mem_get_info`` + reserved − allocated). A run fits when it needs at most
:data:`BUDGET_SHARE` of that: the rest is left to the system and the other programs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig
from .sizing import BYTES_PER_ELEMENT, activation_bytes, count_parameters, format_bytes

#: A run may use this share of the memory free when it starts.
BUDGET_SHARE = 0.9
#: Elements of one statistics piece (``measure.STATS_PIECE``; repeated here so that sizing a
#: run needs no torch) and its workspace: fp32 ``|x|`` plus three one-byte masks.
STATS_PIECE = 1 << 20
WORKSPACE_BYTES = STATS_PIECE * (4 + 3)
#: The CLI flags that shrink or force a measurement (named in the refusal).
BATCH_FLAG, SEQ_FLAG, FORCE_FLAG = "--batch-size", "--seq-len", "--ignore-memory-budget"
#: |log2| change of a predicted RMS below which a smaller batch × sequence leaves a row alone.
CHANGE_LOG2 = 0.01


@dataclass(frozen=True)
class MeasurementMemory:
    """Peak bytes of one measurement of a config, by part (see the module docstring)."""

    weights: int
    gradients: int
    activations: int
    loss_buffers: int
    workspace: int
    other_models: int = 0
    #: weights already held by a cached model (not needed again)
    resident: int = 0

    @property
    def total(self) -> int:
        """The whole peak: every part."""
        return (self.weights + self.gradients + self.activations + self.loss_buffers
                + self.workspace + self.other_models)

    @property
    def needed(self) -> int:
        """What the run needs on top of what it already holds: ``total − resident``."""
        return self.total - self.resident


def _storage_config(cfg: ModelConfig) -> ModelConfig:
    """The config as stored: FP8 is simulated on fp32 tensors."""
    return cfg.replace(dtype="fp32") if cfg.dtype.startswith("fp8") else cfg


def measurement_memory(cfg: ModelConfig, resident: bool = False,
                       seeds: int = 1) -> MeasurementMemory:
    """The peak memory of measuring ``cfg`` (over ``seeds`` initialisations; ``resident``: its
    weights are held already, e.g. by the measurement cache)."""
    stored = _storage_config(cfg)
    p = BYTES_PER_ELEMENT[stored.dtype]
    n = count_parameters(stored)["total"]
    logits = 4 * stored.seq_len * stored.batch_size * stored.vocab_size
    return MeasurementMemory(weights=p * n, gradients=p * n,
                             activations=activation_bytes(stored),
                             loss_buffers=2 * logits, workspace=WORKSPACE_BYTES,
                             other_models=p * n if seeds > 1 else 0,
                             resident=p * n if resident else 0)


def available_memory(device: str = "cpu") -> tuple[int, str]:
    """Bytes free for a run on ``device`` (a torch device string) and where: ``"host RAM"``
    or ``"memory on cuda:0"``."""
    if device.startswith("cuda"):
        import torch

        dev = torch.device(device)
        free, _total = torch.cuda.mem_get_info(dev)
        unused = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return int(free + unused), f"memory on cuda:{index}"
    import psutil

    return int(psutil.virtual_memory().available), "host RAM"


@dataclass(frozen=True)
class Budget:
    """A measurement's estimate against what is free, and the largest smaller batch ×
    sequence that fits (``smaller``; None when the run fits, or when nothing does)."""

    config: ModelConfig
    memory: MeasurementMemory
    available: int
    where: str
    smaller: ModelConfig | None = None
    seeds: int = 1

    @property
    def needed(self) -> int:
        return self.memory.needed

    @property
    def fits(self) -> bool:
        return self.needed <= BUDGET_SHARE * self.available

    def describe(self) -> str:
        """One line with both numbers: "needs about 13.1 GiB; 9.6 GiB of host RAM is free"."""
        cfg = self.config
        return (f"measuring batch {cfg.batch_size} × sequence {cfg.seq_len} needs about "
                f"{format_bytes(self.needed)}; {format_bytes(self.available)} of "
                f"{self.where} is free")


def fits(cfg: ModelConfig, available: int, resident: bool = False, seeds: int = 1) -> bool:
    """True when measuring ``cfg`` needs at most ``BUDGET_SHARE × available`` bytes."""
    return measurement_memory(cfg, resident, seeds).needed <= BUDGET_SHARE * available


def smaller_measurement(cfg: ModelConfig, available: int, resident: bool = False,
                        seeds: int = 1) -> ModelConfig | None:
    """The largest batch × sequence that fits in ``available``: the batch halved first (the
    statistics of a single row stay the same), then the sequence (fewer keys per query also
    changes the attention's own scales); None when even batch 1 × sequence 1 does not fit
    (the weights and their gradients alone are too much)."""
    b, s = cfg.batch_size, cfg.seq_len
    while True:
        trial = cfg.replace(batch_size=b, seq_len=s)
        if fits(trial, available, resident, seeds):
            return trial
        if b > 1:
            b = max(1, b // 2)
        elif s > 1:
            s = max(1, s // 2)
        else:
            return None


def check_budget(cfg: ModelConfig, device: str = "cpu", available: int | None = None,
                 where: str | None = None, resident: bool = False, seeds: int = 1) -> Budget:
    """``cfg``'s measurement (over ``seeds``) against what is free on ``device`` now
    (``available`` and ``where`` replace the reading, e.g. in tests), with a smaller batch ×
    sequence that fits when it does not."""
    if available is None:
        available, read_where = available_memory(device)
        where = where or read_where
    elif where is None:
        where = f"memory on {device}" if device.startswith("cuda") else "host RAM"
    memory = measurement_memory(cfg, resident, seeds)
    budget = Budget(cfg, memory, int(available), where or "memory", seeds=seeds)
    if budget.fits:
        return budget
    return Budget(cfg, memory, budget.available, budget.where,
                  smaller_measurement(cfg, budget.available, resident, seeds), seeds)


class MemoryBudgetError(ValueError):
    """A measurement that would not fit in the memory free (names both numbers, the flag
    that measures fewer rows and the one that goes on anyway)."""

    def __init__(self, budget: Budget):
        self.budget = budget
        smaller = budget.smaller
        if smaller is None:
            advice = ("even batch 1 × sequence 1 would not fit (the weights and their "
                      "gradients alone are too many)")
        else:
            flags = [f"{BATCH_FLAG} {smaller.batch_size}"]
            if smaller.seq_len != budget.config.seq_len:
                flags.append(f"{SEQ_FLAG} {smaller.seq_len}")
            need = measurement_memory(smaller, budget.memory.resident > 0, budget.seeds).needed
            advice = (f"{' '.join(flags)} would fit (about {format_bytes(need)}; the gradients "
                      f"depend on the rows it sums over)")
        super().__init__(f"{budget.describe()}: {advice}, or {FORCE_FLAG} to go on anyway")


def changed_rows(cfg: ModelConfig, smaller: ModelConfig) -> list[tuple[str, str]]:
    """The ``(name, kind)`` of every tensor whose predicted RMS moves by more than
    ``CHANGE_LOG2`` (log2) from ``cfg`` to ``smaller``: what measuring at the smaller batch ×
    sequence changes (standard: every gradient, the loss averaging over batch × sequence
    rows; unit-scaled: few with the batch, the weight gradients being scaled by
    ``rows^-½``; a shorter sequence also changes attention, which spreads over fewer keys).
    Uses the analytic predictor."""
    from .scaling.predict import predict

    after = {(r.name, r.kind): r.rms for r in predict(smaller)}
    out = []
    for r in predict(cfg):
        m = after.get((r.name, r.kind))
        if m is None or r.rms == m:
            continue
        if r.rms > 0 and m > 0 and math.isfinite(r.rms) and math.isfinite(m) and \
                abs(math.log2(m / r.rms)) <= CHANGE_LOG2:
            continue
        out.append((r.name, r.kind))
    return out


def count_by_kind(keys: list[tuple[str, str]]) -> dict[str, int]:
    """``{kind: how many}`` of ``(name, kind)`` keys, in first-seen order."""
    out: dict[str, int] = {}
    for _, kind in keys:
        out[kind] = out.get(kind, 0) + 1
    return out


#: How a kind reads in a sentence (plural).
KIND_WORDS = {"activation": "activations", "weight": "weights",
              "grad_activation": "activation gradients", "grad_weight": "weight gradients"}


def describe_changed(changed: dict[str, int]) -> str:
    """"173 activation gradients and 183 weight gradients" (or "no tensor")."""
    parts = [f"{n} {KIND_WORDS.get(kind, kind)}" for kind, n in changed.items() if n]
    if not parts:
        return "no tensor"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
