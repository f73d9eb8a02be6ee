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
import reprlib
import sys
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

from .atomic import FileProblem, atomic_open, read_regular_file, short_path

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
#: Deepest stack (``n_layers``, ``n_decoder_layers``) a config may have. The deepest published
#: Transformer has 1,000 layers (DeepNet, Wang et al. 2022); GPT-3 has 96, PaLM 118. The
#: predictor walks every layer (about 3-10 ms and 0.3-0.8 MB a layer), so 1,024 layers predict
#: in seconds, while 100,000 took minutes and gigabytes.
MAX_LAYERS = 1024
#: Largest config file read (a config is a few hundred bytes; this refuses /dev/zero-like input).
MAX_CONFIG_BYTES = 1 << 20
#: Largest value of any size field (2**53: the integers a float64 holds exactly; a window or
#: max_len beyond it overflowed torch's int64 masks). Real sizes are far below; the memory
#: bound refuses most large ones first.
MAX_SIZE = 2**53
#: Characters of a bad value quoted in an error message before "… (N characters)".
QUOTE_CHARS = 60

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


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = QUOTE_CHARS
_REPR.maxlevel = 3


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """A short ``repr`` of ``value`` for error messages: at most about ``limit`` characters,
    a longer string cut to its first ``limit`` and ``… (N characters)`` (a 100 MB value must
    not make a 100 MB message); integers beyond ``limit`` digits as their first digits and
    ``… (N digits)``, without converting integers too long for ``str``."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            text = repr(value)
        except ValueError:  # beyond sys.get_int_max_str_digits()
            digits = int(value.bit_length() * math.log10(2)) + 1
            return f"<an integer of about {digits:,} digits>"
        return text if len(text) <= limit else f"{text[:limit // 2]}… ({len(text):,} digits)"
    if isinstance(value, str):
        if len(value) > limit:
            return f"{value[:limit]!r}… ({len(value):,} characters)"
        text = repr(value)  # whole, unless escapes (\U0001f600) make it long
        return text if len(text) <= 3 * limit else _REPR.repr(value)
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):  # a huge integer inside, or nested too deeply
        return f"<a {type(value).__name__}>"


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
            errors[name] = f"{name}={quote(value)} is not one of {', '.join(choices)}"
    for name in POSITIVE_INTS:
        value = getattr(cfg, name)
        if not _is_int(value):
            errors[name] = f"{name}={quote(value)} must be a whole number"
        elif value <= 0:
            errors[name] = f"{name}={quote(value)} must be positive"
        elif value > MAX_SIZE:
            errors[name] = f"{name}={quote(value)} is above 2**53, beyond any size or index"
    if cfg.n_decoder_layers is not None:
        if not _is_int(cfg.n_decoder_layers):
            errors["n_decoder_layers"] = (
                f"n_decoder_layers={quote(cfg.n_decoder_layers)} must be a whole number or empty"
            )
        elif cfg.n_decoder_layers <= 0:
            errors["n_decoder_layers"] = (f"n_decoder_layers={quote(cfg.n_decoder_layers)} "
                                          "must be positive")
    for name in ("n_layers", "n_decoder_layers"):
        value = getattr(cfg, name)
        if name not in errors and _is_int(value) and value > MAX_LAYERS:
            errors[name] = (f"{name}={quote(value)} is above {MAX_LAYERS:,}, the deepest stack "
                            "this program predicts or builds (the deepest published "
                            "Transformer has 1,000 layers)")
    if not _is_int(cfg.seed):
        errors["seed"] = f"seed={quote(cfg.seed)} must be a whole number"
    elif not 0 <= cfg.seed < 2**63:
        errors["seed"] = f"seed={quote(cfg.seed)} must be between 0 and 2**63 - 1"
    for name in BOOLS:
        if not isinstance(getattr(cfg, name), bool):
            errors[name] = f"{name}={quote(getattr(cfg, name))} must be true or false"
    dropout = cfg.dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        errors["dropout"] = f"dropout={quote(dropout)} must be a number"
    # compared as it is: math.isfinite(a 401-digit int) would raise OverflowError
    elif not ((_is_int(dropout) or math.isfinite(dropout)) and 0 <= dropout < 1):
        errors["dropout"] = f"dropout={quote(dropout)} must be at least 0 and below 1"
    if errors:  # relations below need well-typed fields
        return errors
    d, h = quote(cfg.d_model), quote(cfg.n_heads)
    if cfg.n_heads > cfg.d_model:
        errors["n_heads"] = (f"n_heads={h} is above d_model={d}; each head needs at least one "
                             "dimension")
    elif cfg.d_model % cfg.n_heads:
        errors["d_model"] = f"d_model={d} is not divisible by n_heads={h}"
    elif cfg.positional == "rope" and cfg.head_dim % 2:
        errors["d_model"] = (
            f"d_model={d} gives odd head size {quote(cfg.head_dim)} with n_heads={h}; "
            "rope rotates pairs of dimensions and needs an even head size"
        )
    elif cfg.positional == "sinusoidal" and cfg.d_model % 2:
        errors["d_model"] = f"d_model={d} must be even for sinusoidal positions"
    if cfg.vocab_size < 2:  # one token: the loss is identically 0, no gradient to predict
        errors["vocab_size"] = f"vocab_size={cfg.vocab_size} must be at least 2"
    if cfg.seq_len > cfg.max_len:
        errors["seq_len"] = (f"seq_len={quote(cfg.seq_len)} is above "
                             f"max_len={quote(cfg.max_len)}")
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
    if cfg.architecture == "encoder-decoder" and cfg.n_decoder_layers is not None:
        sizes.append("n_decoder_layers")  # (None for the other architectures: no fraction)
    culprit = max(sizes, key=lambda n: Fraction(getattr(cfg, n),
                                                DEFAULTS[n] or DEFAULTS["n_layers"]))
    estimate = format_bytes(total) if total < 2**1000 else "beyond any float"  # int or inf
    return {
        culprit: f"{culprit}={quote(getattr(cfg, culprit))} makes the training memory estimate "
        f"{estimate}, above the {format_bytes(MAX_MEMORY_BYTES)} any run could allocate"
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
            f"schema_version={quote(version)} is not supported (this program reads version "
            f"{SCHEMA_VERSION})"
        )
    for key in data:
        if key not in FIELD_NAMES:
            # the key itself, unless it is too long to name whole (then its short quote)
            name = key if isinstance(key, str) and quote(key) == repr(key) else quote(key)
            close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors[name] = f"unknown key {quote(key)}{hint}"
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
    raise ConfigError({"path": f"{short_path(path.name)}: config files must end in .json or "
                               ".toml"})


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
    """Read a .json or .toml config file: a regular file of at most ``MAX_CONFIG_BYTES``
    (a FIFO, a device or a folder is refused by name, never opened for a blocking read)."""
    path = Path(path)
    fmt = _format_of(path)
    try:
        raw = read_regular_file(path, MAX_CONFIG_BYTES, what=f"config {short_path(path)}")
    except FileProblem as exc:
        raise ConfigError({"file": str(exc)}) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError({"file": f"{short_path(path.name)} is not UTF-8 text"}) from None
    return loads(text, fmt, source=short_path(path.name))


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
    "MAX_CONFIG_BYTES", "MAX_LAYERS", "SCHEMA_VERSION", "quote", "backup_path", "from_dict",
    "load", "loads", "save", "dumps_json", "dumps_toml", "to_file_dict",
]
