"""Unit Scaling Explorer's headless core: configs, sizes, scale prediction, the torch model.

Never imports Qt. Heavy modules (torch) load only when ``build_model`` is first used, so the
CLI's analytic commands and the GUI start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ConfigError, ModelConfig, load, save
from .sizing import count_parameters, flops_per_token, kv_cache_bytes, size_report, training_memory

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .model import build_model


def __getattr__(name: str) -> Any:
    if name == "build_model":  # torch takes ~1 s to import; only pay for it when a model is built
        from .model import build_model

        return build_model
    raise AttributeError(f"module 'unitscale_core' has no attribute {name!r}")


__all__ = [
    "ConfigError", "ModelConfig", "build_model", "count_parameters", "flops_per_token",
    "kv_cache_bytes", "load", "save", "size_report", "training_memory", "__version__",
]
