"""ModelConfig: the one description of a model, its validation, and JSON/TOML files.

A config is a frozen dataclass. Constructing one validates every field and raises
:class:`ConfigError` (a ``ValueError``) naming *every* offending field and why, so the GUI can
mark each editor and the CLI can print one line.

File format (JSON or TOML), flat, with a schema version::

    {"schema_version": 1, "architecture": "decoder", "d_model": 256, ...}

Missing keys take their defaults; unknown keys are rejected by name.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

from .atomic import atomic_open

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

SCHEMA_VERSION = 1

ARCHITECTURES = ("encoder", "decoder", "encoder-decoder")
POSITIONALS = ("sinusoidal", "learned", "relative", "rope", "alibi", "none")
ATTENTIONS = ("full", "causal", "local", "strided")
NORMS = ("pre", "post")
ACTIVATIONS = ("gelu", "relu", "swiglu")
PARAMETRIZATIONS = ("standard", "unit", "umup")
DTYPES = ("fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2")
DEVICES = ("auto", "cpu", "cuda")

#: Largest training-memory estimate (bytes) a config may have: 1 PiB. Far above any single
#: training run that exists (a 1T-parameter model needs ~16 TB of weights and optimizer state),
#: so every real model fits, while absurd sizes (d_model = 10**9) are refused with the estimate.
MAX_MEMORY_BYTES = 2**50

# Editors in the GUI and help in the CLI read these; one sentence each.
FIELD_HELP: dict[str, str] = {
    "architecture": "Encoder (BERT-like, bidirectional), decoder (GPT-like, autoregressive) "
    "or encoder-decoder (Vaswani et al. 2017 / T5) Transformer.",
    "d_model": "Width of the residual stream (hidden size h).",
    "n_heads": "Number of attention heads a; each head has d_model / n_heads dimensions.",
    "d_ff": "Hidden width of the feed-forward block (usually 4 × d_model).",
    "n_layers": "Number of layers in the encoder or decoder stack (both stacks for "
    "encoder-decoder unless n_decoder_layers is set).",
    "n_decoder_layers": "Decoder depth for encoder-decoder models; empty means n_layers. "
    "Ignored by the other architectures.",
    "vocab_size": "Number of tokens in the vocabulary V (rows of the embedding matrix).",
    "max_len": "Largest sequence length the positional scheme supports (rows of a learned "
    "position table).",
    "seq_len": "Sequence length s of the batch used for measurements and memory estimates.",
    "batch_size": "Batch size b of the batch used for measurements and memory estimates.",
    "positional": "How positions enter the model: sinusoidal (added), learned (added table), "
    "relative (T5 bucketed bias), rope (rotary), alibi (linear bias) or none.",
    "attention": "Attention pattern: full, causal, local (a window of keys around each query) "
    "or strided (local window plus every window-th key, Child et al. 2019).",
    "window": "Window size for local and strided attention, in tokens.",
    "norm": "Pre-norm (LayerNorm before each sub-block, GPT-2) or post-norm (after the "
    "residual add, BERT / original Transformer).",
    "activation": "Feed-forward nonlinearity: GELU, ReLU or SwiGLU (gated, three matrices).",
    "bias": "Add biases to linear layers and LayerNorms.",
    "tie_embeddings": "Share the output head's weights with the token embedding.",
    "dropout": "Dropout probability (0 ≤ p < 1); dropout masks add to activation memory.",
    "parametrization": "standard (PyTorch defaults), unit (Unit Scaling, Blake et al. 2023) "
    "or umup (u-μP, Blake et al. 2024).",
    "dtype": "Number format of weights and activations (FP8 is simulated on matmul inputs).",
    "device": "Where model runs go: auto (CUDA, then MPS, then CPU), cpu or cuda.",
    "seed": "Random seed for initialisation and the measurement batch.",
}


class ConfigError(ValueError):
    """A config that cannot be used. ``errors`` maps each field name to the reason."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        super().__init__("; ".join(self.errors.values()))


@dataclass(frozen=True)
class ModelConfig:
    """A Transformer, its training batch and its number format. All sizes are counts."""

    architecture: str = "decoder"
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    n_layers: int = 4
    n_decoder_layers: int | None = None
    vocab_size: int = 8192
    max_len: int = 512
    seq_len: int = 128
    batch_size: int = 8
    positional: str = "learned"
    attention: str = "causal"
    window: int = 64
    norm: str = "pre"
    activation: str = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    parametrization: str = "standard"
    dtype: str = "fp32"
    device: str = "auto"
    seed: int = field(default=0)

    def __post_init__(self) -> None:
        errors = _validate(self)
        if errors:
            raise ConfigError(errors)

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """d_head = d_model / n_heads."""
        return self.d_model // self.n_heads

    @property
    def encoder_layers(self) -> int:
        """Layers in the encoder stack (0 for a decoder-only model)."""
        return 0 if self.architecture == "decoder" else self.n_layers

    @property
    def decoder_layers(self) -> int:
        """Layers in the decoder stack (0 for an encoder-only model)."""
        if self.architecture == "encoder":
            return 0
        if self.architecture == "encoder-decoder" and self.n_decoder_layers is not None:
            return self.n_decoder_layers
        return self.n_layers

    # -- conversions -------------------------------------------------------------------------
    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with ``changes`` applied (raises ConfigError)."""
        return from_dict({**self.to_dict(), **changes}, versioned=False)

    def to_dict(self) -> dict[str, Any]:
        """Field values in declaration order (no schema version)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ModelConfig))
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ModelConfig)}

CHOICES: dict[str, tuple[str, ...]] = {
    "architecture": ARCHITECTURES,
    "positional": POSITIONALS,
    "attention": ATTENTIONS,
    "norm": NORMS,
    "activation": ACTIVATIONS,
    "parametrization": PARAMETRIZATIONS,
    "dtype": DTYPES,
    "device": DEVICES,
}
POSITIVE_INTS = (
    "d_model", "n_heads", "d_ff", "n_layers", "vocab_size", "max_len", "seq_len",
    "batch_size", "window",
)
BOOLS = ("bias", "tie_embeddings")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(cfg: ModelConfig) -> dict[str, str]:
    """Every problem with ``cfg``, keyed by field name; empty when valid."""
    errors: dict[str, str] = {}
    for name, choices in CHOICES.items():
        value = getattr(cfg, name)
        if value not in choices:
            errors[name] = f"{name}={value!r} is not one of {', '.join(choices)}"
    for name in POSITIVE_INTS:
        value = getattr(cfg, name)
        if not _is_int(value):
            errors[name] = f"{name}={value!r} must be a whole number"
        elif value <= 0:
            errors[name] = f"{name}={value} must be positive"
    if cfg.n_decoder_layers is not None:
        if not _is_int(cfg.n_decoder_layers):
            errors["n_decoder_layers"] = (
                f"n_decoder_layers={cfg.n_decoder_layers!r} must be a whole number or empty"
            )
        elif cfg.n_decoder_layers <= 0:
            errors["n_decoder_layers"] = f"n_decoder_layers={cfg.n_decoder_layers} must be positive"
    if not _is_int(cfg.seed):
        errors["seed"] = f"seed={cfg.seed!r} must be a whole number"
    elif not 0 <= cfg.seed < 2**63:
        errors["seed"] = f"seed={cfg.seed} must be between 0 and 2**63 - 1"
    for name in BOOLS:
        if not isinstance(getattr(cfg, name), bool):
            errors[name] = f"{name}={getattr(cfg, name)!r} must be true or false"
    dropout = cfg.dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        errors["dropout"] = f"dropout={dropout!r} must be a number"
    elif not (math.isfinite(dropout) and 0.0 <= dropout < 1.0):
        errors["dropout"] = f"dropout={dropout} must be at least 0 and below 1"
    if errors:  # relations below need well-typed fields
        return errors
    if cfg.d_model % cfg.n_heads:
        errors["d_model"] = f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}"
    elif cfg.positional == "rope" and cfg.head_dim % 2:
        errors["d_model"] = (
            f"d_model={cfg.d_model} gives odd head size {cfg.head_dim} with n_heads={cfg.n_heads}; "
            "rope rotates pairs of dimensions and needs an even head size"
        )
    elif cfg.positional == "sinusoidal" and cfg.d_model % 2:
        errors["d_model"] = f"d_model={cfg.d_model} must be even for sinusoidal positions"
    if cfg.vocab_size < 2:  # one token: the loss is identically 0, no gradient to predict
        errors["vocab_size"] = f"vocab_size={cfg.vocab_size} must be at least 2"
    if cfg.seq_len > cfg.max_len:
        errors["seq_len"] = f"seq_len={cfg.seq_len} is above max_len={cfg.max_len}"
    if not errors:
        errors.update(_memory_errors(cfg))
    return errors


def _memory_errors(cfg: ModelConfig) -> dict[str, str]:
    """Refuse configs whose training-memory estimate is beyond any real run (MAX_MEMORY_BYTES)."""
    from .sizing import format_bytes, training_memory  # sizing needs ModelConfig

    try:
        total = training_memory(cfg)["total"]
    except OverflowError:  # sizes beyond a float (d_model = 10**400): beyond any memory too
        total = math.inf
    if total <= MAX_MEMORY_BYTES:
        return {}
    # Blame the field that contributes most: the largest of the size fields relative to default
    # (exact fractions: a 400-digit size divided as floats would overflow).
    sizes = ["d_model", "d_ff", "n_layers", "vocab_size", "seq_len", "batch_size", "max_len"]
    if cfg.decoder_layers != cfg.n_layers:
        sizes.append("n_decoder_layers")
    culprit = max(sizes, key=lambda n: Fraction(getattr(cfg, n),
                                                DEFAULTS[n] or DEFAULTS["n_layers"]))
    return {
        culprit: f"{culprit}={getattr(cfg, culprit)} makes the training memory estimate "
        f"{format_bytes(total)}, above the {format_bytes(MAX_MEMORY_BYTES)} any run could allocate"
    }


# -- dictionaries and files ------------------------------------------------------------------


def from_dict(data: Any, *, versioned: bool = True) -> ModelConfig:
    """Build a config from a mapping; unknown keys and wrong schema versions are refused.

    Raises ConfigError naming the offending keys.
    """
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError({"config": f"a config must be a table of keys, not {kind}"})
    data = dict(data)
    errors: dict[str, str] = {}
    version = data.pop("schema_version", SCHEMA_VERSION)
    if versioned and (not _is_int(version) or version != SCHEMA_VERSION):
        errors["schema_version"] = (
            f"schema_version={version!r} is not supported (this program reads version "
            f"{SCHEMA_VERSION})"
        )
    for key in data:
        if key not in FIELD_NAMES:
            close = difflib.get_close_matches(str(key), FIELD_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors[str(key)] = f"unknown key {key!r}{hint}"
    if errors:
        raise ConfigError(errors)
    return ModelConfig(**data)


def to_file_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The mapping written to files: schema version first, then every field."""
    return {"schema_version": SCHEMA_VERSION, **cfg.to_dict()}


def dumps_json(cfg: ModelConfig) -> str:
    return json.dumps(to_file_dict(cfg), indent=2) + "\n"


def dumps_toml(cfg: ModelConfig) -> str:
    """Flat TOML: every value is a string, integer, float or boolean; ``None`` is omitted."""
    lines = []
    for key, value in to_file_dict(cfg).items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)  # a JSON string of our choice values is a valid TOML string
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix == ".toml":
        return "toml"
    raise ConfigError({"path": f"{path.name}: config files must end in .json or .toml"})


def loads(text: str, fmt: str, source: str = "config") -> ModelConfig:
    """Parse JSON or TOML text into a config; syntax errors become one-line ConfigErrors."""
    try:
        data = json.loads(text) if fmt == "json" else tomllib.loads(text)
    except ValueError as exc:  # JSONDecodeError, TOMLDecodeError, a >4300-digit integer
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError({"file": f"{source} is not valid {fmt.upper()}: {first_line}"}) from None
    except RecursionError:
        reason = f"{source} is not valid {fmt.upper()}: nested too deeply"
        raise ConfigError({"file": reason}) from None
    if not isinstance(data, dict):  # name the file, not just "a config"
        kind = type(data).__name__
        raise ConfigError({"file": f"{source} must hold a table of keys, not {kind}"})
    return from_dict(data)


def load(path: str | os.PathLike[str]) -> ModelConfig:
    """Read a .json or .toml config file."""
    path = Path(path)
    fmt = _format_of(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError({"file": f"cannot read {path}: {exc.strerror or exc}"}) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError({"file": f"{path.name} is not UTF-8 text"}) from None
    return loads(text, fmt, source=path.name)


def backup_path(path: Path) -> Path:
    """Where :func:`save` keeps the previous version of ``path``."""
    return path.with_name(f"{path.stem}.bak{path.suffix}")


def save(cfg: ModelConfig, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` atomically: a temporary file in the same folder, then ``os.replace``.

    An existing file is kept as ``<stem>.bak<suffix>`` (``model.bak.json``), itself loadable,
    so a bad save can be undone by hand.
    """
    path = Path(path)
    text = dumps_json(cfg) if _format_of(path) == "json" else dumps_toml(cfg)
    with atomic_open(path, "w", backup=backup_path(path)) as handle:
        handle.write(text)


__all__ = [
    "ConfigError", "ModelConfig", "FIELD_NAMES", "FIELD_HELP", "DEFAULTS", "CHOICES",
    "SCHEMA_VERSION", "backup_path", "from_dict", "load", "loads", "save", "dumps_json",
    "dumps_toml", "to_file_dict",
]
