"""Pay torch's first-model costs before the user's first Measure.

The device lookup already runs torch's lazy imports off the GUI thread
(``app/device_info.warm_up_torch``). The first measurement of a session still ran 0.1–0.3 s
longer than the next ones, much of it holding the GIL in pure-Python torch code (the first
model built through the meta device, the first dispatch of each op; on a GPU the CUDA
context, seconds): the window's first repaint during it stalled 60–120 ms
(``benchmarks/ui_stall.py``, first round). The window runs :func:`warm_up` in the worker once
the device is known, while the user is still reading it.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import ConfigError, ModelConfig
from .sizing import count_parameters

#: Configs up to this size are warmed up as themselves (their model is then in the
#: measurement's cache); larger ones through a tiny model of the same kind.
WARM_UP_MAX_PARAMS = 20_000_000

_TINY = dict(d_model=32, n_heads=2, d_ff=64, n_layers=1, vocab_size=128, max_len=16,
             seq_len=8, batch_size=2, window=4)


def warm_up_config(cfg: ModelConfig) -> ModelConfig:
    """The config :func:`warm_up` measures: ``cfg`` itself at 8 tokens × 1 sequence when it
    has at most :data:`WARM_UP_MAX_PARAMS` parameters (sequence length and batch size do not
    change the cached model), else a tiny model with ``cfg``'s architecture, parametrization,
    positions, norm, activation, dtype and device."""
    if count_parameters(cfg)["total"] <= WARM_UP_MAX_PARAMS:
        return cfg.replace(seq_len=min(cfg.seq_len, 8), batch_size=1)
    tiny = dict(_TINY)
    if cfg.n_decoder_layers is not None:
        tiny["n_decoder_layers"] = 1
    try:
        return cfg.replace(**tiny)
    except ConfigError:  # some combination the tiny shape does not allow
        return ModelConfig(device=cfg.device, dtype=cfg.dtype)


def warm_up(cfg: ModelConfig, attention: bool = True,
            check_cancelled: Callable[[], None] | None = None) -> ModelConfig:
    """One measurement of :func:`warm_up_config` on ``cfg``'s device and, with ``attention``,
    one attention capture on the CPU (the bundled tokenizer and checkpoint read once);
    returns the config it used. Results are dropped: only the caches stay warm.
    ``check_cancelled`` is called between layers (the worker's, so closing the window does not
    wait for it)."""
    from .measure import measure

    used = warm_up_config(cfg)
    measure(used, check_cancelled=check_cancelled)
    if attention:
        from .attention_views import configured_attentions

        configured_attentions(used, "warm up", check_cancelled=check_cancelled)
    return used
