"""The training panel's worker jobs: the only code of the panel that touches torch.

Each function runs in the worker thread. A :class:`TrainingRun` is created by
:func:`create_run` and handed to the GUI wrapped in an opaque :class:`RunHandle`; the GUI passes
the handle back into later jobs and never looks inside. Because the worker runs one job at a
time, jobs of different runs (and the other panels' jobs) never touch a model concurrently.
What comes back is plain data: lists of ``StepRecord`` (floats, dicts, numpy arrays), numpy
attention maps, strings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from unitscale_core.attention_views import reduce_for_display
from unitscale_core.config import ModelConfig

Check = Callable[[], None]

#: Work per chunk (seconds): long enough that job overhead is negligible, short enough that
#: the other panels' jobs, pause and stop wait at most this long.
CHUNK_SECONDS = 0.3
THUMB_SIDE = 48  # longest side of an attention thumbnail
HEAD_SIDE = 128  # longest side of the enlarged head


class RunHandle:
    """An opaque reference to a TrainingRun living in the worker (never dereferenced by the
    GUI thread; only worker jobs call :meth:`run`)."""

    __slots__ = ("_run",)

    def __init__(self, run: Any):
        self._run = run

    def run(self) -> Any:
        return self._run

    def __repr__(self) -> str:
        return "<RunHandle>"


@dataclass
class RunInfo:
    """A run just created: its handle, resolved settings and tensor rows (plain data)."""

    handle: RunHandle
    config: ModelConfig  # with the run's parametrization and dtype applied
    parametrization: str
    dtype: str
    task: str
    steps: int
    lr: float
    loss_scaling: bool
    log_every: int
    tensor_names: list[str]
    tensor_kinds: list[str]
    seconds: float


@dataclass
class Chunk:
    """The records a chunk added (``records[i].step`` is 1-based) and where the run stands."""

    records: list
    step: int
    done: bool
    seconds: float
    diverged: str | None = None  # TrainingRun.diverged: why the run stopped early


@dataclass
class AttentionSnapshot:
    """Self-attention of one run at one step on the task's probe sequence.

    ``thumbs`` ``[layers, heads, a, b]`` and ``att`` ``[layers, heads, t, t]`` are
    block-averaged to display size (``factor``: tokens per shown cell in ``att``); cells the
    model's mask forbids are NaN (drawn grey).
    """

    step: int
    thumbs: np.ndarray
    att: np.ndarray
    tokens: list[str]
    factor: int
    seconds: float


def create_run(config: ModelConfig, settings: dict[str, Any], check: Check) -> RunInfo:
    """Build a TrainingRun for ``config`` with ``TrainSettings(**settings)`` (validates; raises
    TrainingError, a ValueError naming the field)."""
    from unitscale_core.measure import resolve_device
    from unitscale_core.training import TrainingRun, TrainSettings

    start = time.perf_counter()
    train_settings = TrainSettings(**settings)
    train_settings.validate()
    check()
    run = TrainingRun(config, train_settings, device=resolve_device(config.device))
    s = run.settings
    return RunInfo(handle=RunHandle(run), config=run.config, parametrization=s.parametrization,
                   dtype=s.dtype, task=s.task, steps=int(s.steps), lr=float(s.lr),
                   loss_scaling=bool(s.loss_scaling), log_every=int(s.log_every),
                   tensor_names=list(run.tensor_names), tensor_kinds=list(run.tensor_kinds),
                   seconds=time.perf_counter() - start)


def run_chunk(handle: RunHandle, known: int, check: Check,
              budget: float = CHUNK_SECONDS) -> Chunk:
    """Train one step at a time until ``budget`` seconds have passed or the run is done (all
    steps trained, or stopped because its loss stopped being finite: ``Chunk.diverged``);
    return every record after the first ``known`` (so steps done by a chunk that was
    cancelled part-way are not lost)."""
    run = handle.run()
    start = time.perf_counter()
    while not run.done:
        run.run(1, check_cancelled=check)
        if time.perf_counter() - start >= budget:
            break
    return Chunk(records=list(run.records[known:]), step=int(run.step), done=bool(run.done),
                 seconds=time.perf_counter() - start, diverged=run.diverged)


def _reduced_mask(allowed: np.ndarray | None, side: int) -> np.ndarray | None:
    if allowed is None:
        return None
    return reduce_for_display(allowed.astype(np.float32), side)[0] > 0


def run_attention(handle: RunHandle, check: Check) -> AttentionSnapshot:
    """``run.attention()`` summarised for the model view (masked cells NaN)."""
    from unitscale_core.model.masks import allowed as allowed_mask

    start = time.perf_counter()
    run = handle.run()
    att, tokens = run.attention()
    check()
    att = np.asarray(att, dtype=np.float32)
    t, s = att.shape[-2:]
    cfg = run.config
    mask = allowed_mask(t, s, cfg.attention, cfg.window, causal=cfg.architecture != "encoder")
    full = None if mask is None else mask.cpu().numpy()
    shown, factor = reduce_for_display(att, HEAD_SIDE)
    thumbs, _ = reduce_for_display(att, THUMB_SIDE)
    shown = np.array(shown, dtype=np.float32)
    thumbs = np.array(thumbs, dtype=np.float32)
    for values, side in ((shown, HEAD_SIDE), (thumbs, THUMB_SIDE)):
        m = _reduced_mask(full, side)  # the same blocks as the maps'
        if m is not None:
            values[..., ~m] = np.nan
    return AttentionSnapshot(step=int(run.step), thumbs=thumbs, att=shown,
                             tokens=[str(x) for x in tokens], factor=factor,
                             seconds=time.perf_counter() - start)
