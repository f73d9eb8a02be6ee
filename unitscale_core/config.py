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
NORMS = ("pre", "post", "sandwich", "branch_output")
NORM_TYPES = ("layernorm", "rmsnorm")
QK_NORMS = ("none", "head", "all_heads")
ACTIVATIONS = ("gelu", "relu", "swiglu", "geglu")
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
#: Most experts a mixture-of-experts layer may have (the largest published MoE layers have
#: 256 routed experts, DeepSeek-V3; Switch-C 2,048). Each expert is a module in the torch model.
MAX_EXPERTS = 4096
#: Characters of a bad value quoted in an error message before "… (N characters)".
QUOTE_CHARS = 60

# Editors in the GUI and help in the CLI read these; one sentence each.
FIELD_HELP: dict[str, str] = {
    "architecture": "Encoder (BERT-like, bidirectional), decoder (GPT-like, autoregressive) "
    "or encoder-decoder (Vaswani et al. 2017 / T5) Transformer.",
    "d_model": "Width of the residual stream (hidden size h).",
    "n_heads": "Number of attention (query) heads a; each head has head_dim dimensions "
    "(d_model / n_heads unless head_dim is set).",
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
    "norm": "Where each sub-block's norm sits: pre (before the sub-block, GPT-2, Llama), "
    "post (after the residual add, BERT / original Transformer), sandwich (before the "
    "sub-block and on its output before the residual add, Gemma 2) or branch_output (only on "
    "the sub-block's output before the residual add, OLMo 2).",
    "norm_type": "layernorm (subtract the mean, divide by the standard deviation; gain and "
    "bias) or rmsnorm (divide by the root mean square, no mean removal; gain only, Zhang & "
    "Sennrich 2019; Llama, Mistral, Gemma, OLMo 2).",
    "n_kv_heads": "Key/value heads; empty means n_heads (multi-head attention). Fewer is "
    "grouped-query attention (Ainslie et al. 2023; Llama 3: 8 for 32 query heads), 1 is "
    "multi-query attention. n_heads must be divisible by it.",
    "head_dim": "Dimensions of each head; empty means d_model / n_heads. When set, q, k and v "
    "project to n_heads × head_dim (Gemma) and d_model need not be divisible by n_heads.",
    "qk_norm": "Normalise queries and keys (with norm_type) before the logits: none, head (per "
    "head over head_dim; Qwen 3, Gemma 3) or all_heads (over the whole q / k projection; "
    "OLMo 2).",
    "parallel_residual": "Attention and feed-forward read the same input and add to the "
    "stream together: x + attn(norm1(x)) + ffn(norm2(x)) (GPT-J, GPT-NeoX / Pythia).",
    "rotary_fraction": "Share of each head's dimensions that rope rotates (Pythia 0.25; 1 = "
    "all); the first floor(fraction × head_dim) dimensions are rotated.",
    "rope_base": "Rope's θ: pair i turns by pos · θ^(−2i/d) (10000 in Su et al. 2021; "
    "Llama 3 500000).",
    "n_experts": "Experts in each feed-forward block; 1 is a dense feed-forward, more is a "
    "routed mixture of experts (Mixtral: 8).",
    "experts_per_token": "Experts each token is routed to (top-k; Mixtral: 2): a linear "
    "router, softmax over all experts, the top k kept and renormalised.",
    "qkv_bias": "Biases on the q, k and v projections; empty follows bias (Qwen 2: true with "
    "no other biases).",
    "attn_softcap": "Attention-logit soft cap c: logits ← c·tanh(logits / c) before the "
    "softmax (Gemma 2: 50); empty for none.",
    "logit_softcap": "Final-logit soft cap c: logits ← c·tanh(logits / c) before the loss "
    "(Gemma 2: 30); empty for none.",
    "activation": "Feed-forward nonlinearity: GELU, ReLU, SwiGLU (silu gate, three matrices) "
    "or GeGLU (GELU-tanh gate, three matrices; Gemma).",
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
    # Modern-architecture fields (issue 21); the defaults are the models above.
    norm_type: str = "layernorm"
    n_kv_heads: int | None = None
    head_dim: int | None = None
    qk_norm: str = "none"
    parallel_residual: bool = False
    rotary_fraction: float = 1.0
    rope_base: float = 10000.0
    n_experts: int = 1
    experts_per_token: int = 1
    qkv_bias: bool | None = None
    attn_softcap: float | None = None
    logit_softcap: float | None = None

    def __post_init__(self) -> None:
        errors = _validate(self)
        if errors:
            raise ConfigError(errors)

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        """d_head: ``head_dim`` when set, else d_model / n_heads."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads`` when set, else ``n_heads``."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def attn_width(self) -> int:
        """Width of the q projection and of the attention context: n_heads × d_head."""
        return self.n_heads * self.head_size

    @property
    def kv_width(self) -> int:
        """Width of the k and v projections: kv_heads × d_head."""
        return self.kv_heads * self.head_size

    @property
    def rotary_dims(self) -> int:
        """Dimensions of each head that rope rotates: floor(rotary_fraction × d_head), as
        GPT-NeoX computes ``rotary_ndims`` (0 unless positional is rope)."""
        if self.positional != "rope":
            return 0
        return int(self.head_size * self.rotary_fraction)

    @property
    def has_qkv_bias(self) -> bool:
        """Whether q, k, v carry biases: ``qkv_bias`` when set, else ``bias``."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def is_moe(self) -> bool:
        """A routed mixture of experts in every feed-forward block."""
        return self.n_experts > 1

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
    "norm_type": NORM_TYPES,
    "qk_norm": QK_NORMS,
    "activation": ACTIVATIONS,
    "parametrization": PARAMETRIZATIONS,
    "dtype": DTYPES,
    "device": DEVICES,
}
POSITIVE_INTS = (
    "d_model", "n_heads", "d_ff", "n_layers", "vocab_size", "max_len", "seq_len",
    "batch_size", "window", "n_experts", "experts_per_token",
)
OPTIONAL_POSITIVE_INTS = ("n_decoder_layers", "n_kv_heads", "head_dim")
BOOLS = ("bias", "tie_embeddings", "parallel_residual")
OPTIONAL_BOOLS = ("qkv_bias",)
OPTIONAL_POSITIVE_FLOATS = ("attn_softcap", "logit_softcap")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: int | float) -> bool:
    """math.isfinite without OverflowError on a 401-digit int (an int is finite)."""
    return _is_int(value) or math.isfinite(value)


def _validate(cfg: ModelConfig) -> dict[str, str]:
    """Every problem with ``cfg``, keyed by field name; empty when valid."""
    errors: dict[str, str] = {}
    for name, choices in CHOICES.items():
        value = getattr(cfg, name)
        if value not in choices:
            errors[name] = f"{name}={quote(value)} is not one of {', '.join(choices)}"
    for name in POSITIVE_INTS + OPTIONAL_POSITIVE_INTS:
        value = getattr(cfg, name)
        optional = name in OPTIONAL_POSITIVE_INTS
        if value is None and optional:
            continue
        if not _is_int(value):
            empty = " or empty" if optional else ""
            errors[name] = f"{name}={quote(value)} must be a whole number{empty}"
        elif value <= 0:
            errors[name] = f"{name}={quote(value)} must be positive"
        elif value > MAX_SIZE:
            errors[name] = f"{name}={quote(value)} is above 2**53, beyond any size or index"
    if "n_experts" not in errors and cfg.n_experts > MAX_EXPERTS:
        errors["n_experts"] = (f"n_experts={quote(cfg.n_experts)} is above {MAX_EXPERTS:,}, "
                               "more experts than any published mixture")
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
    for name in OPTIONAL_BOOLS:
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, bool):
            errors[name] = f"{name}={quote(value)} must be true, false or empty"
    for name in OPTIONAL_POSITIVE_FLOATS:
        value = getattr(cfg, name)
        if value is None:
            continue
        if not _is_number(value):
            errors[name] = f"{name}={quote(value)} must be a number or empty"
        elif not (_finite(value) and value > 0):
            errors[name] = f"{name}={quote(value)} must be a positive finite number or empty"
    fraction = cfg.rotary_fraction
    if not _is_number(fraction):
        errors["rotary_fraction"] = f"rotary_fraction={quote(fraction)} must be a number"
    elif not (_finite(fraction) and 0 < fraction <= 1):
        errors["rotary_fraction"] = (f"rotary_fraction={quote(fraction)} must be above 0 and "
                                     "at most 1")
    base = cfg.rope_base
    if not _is_number(base):
        errors["rope_base"] = f"rope_base={quote(base)} must be a number"
    elif not (_finite(base) and 1 < base <= 1e12):
        errors["rope_base"] = f"rope_base={quote(base)} must be above 1 and at most 1e12"
    dropout = cfg.dropout
    if not _is_number(dropout):
        errors["dropout"] = f"dropout={quote(dropout)} must be a number"
    elif not (_finite(dropout) and 0 <= dropout < 1):
        errors["dropout"] = f"dropout={quote(dropout)} must be at least 0 and below 1"
    if errors:  # relations below need well-typed fields
        return errors
    d, h = quote(cfg.d_model), quote(cfg.n_heads)
    if cfg.head_dim is None and cfg.n_heads > cfg.d_model:
        errors["n_heads"] = (f"n_heads={h} is above d_model={d}; each head needs at least one "
                             "dimension")
    elif cfg.head_dim is None and cfg.d_model % cfg.n_heads:
        errors["d_model"] = f"d_model={d} is not divisible by n_heads={h}"
    elif cfg.positional == "rope" and cfg.rotary_dims % 2 and cfg.rotary_fraction == 1 \
            and cfg.head_dim is None:
        errors["d_model"] = (
            f"d_model={d} gives odd head size {quote(cfg.head_size)} with n_heads={h}; "
            "rope rotates pairs of dimensions and needs an even head size"
        )
    elif cfg.positional == "rope" and cfg.rotary_dims % 2:
        field_name = "rotary_fraction" if cfg.rotary_fraction < 1 else "head_dim"
        errors[field_name] = (
            f"{field_name}={quote(getattr(cfg, field_name))} gives an odd number of rotated "
            f"dimensions ({cfg.rotary_dims} of head size {cfg.head_size}); rope rotates pairs "
            "of dimensions"
        )
    elif cfg.positional == "rope" and cfg.rotary_dims == 0:
        errors["rotary_fraction"] = (f"rotary_fraction={quote(cfg.rotary_fraction)} rotates no "
                                     f"dimension of head size {cfg.head_size}")
    elif cfg.positional == "sinusoidal" and cfg.d_model % 2:
        errors["d_model"] = f"d_model={d} must be even for sinusoidal positions"
    if cfg.n_kv_heads is not None and cfg.n_heads % cfg.n_kv_heads:
        errors["n_kv_heads"] = (f"n_kv_heads={quote(cfg.n_kv_heads)} does not divide "
                                f"n_heads={h}; each key/value head serves a whole group of "
                                "query heads")
    if cfg.parallel_residual and cfg.norm != "pre":
        errors["parallel_residual"] = (
            f"parallel_residual=true needs norm='pre' (both sub-blocks read the normed stream; "
            f"norm={quote(cfg.norm)} has no parallel form in any published model)")
    if cfg.experts_per_token > cfg.n_experts:
        errors["experts_per_token"] = (
            f"experts_per_token={quote(cfg.experts_per_token)} is above "
            f"n_experts={quote(cfg.n_experts)}")
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
    sizes = ["d_model", "d_ff", "n_layers", "vocab_size", "seq_len", "batch_size", "max_len",
             "n_experts"]
    if cfg.head_dim is not None:
        sizes.append("head_dim")
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
    (a FIFO, a device or a folder is refused by name, never opened for a blocking read).
    A Hugging Face ``config.json`` (it has a ``model_type``), or a folder holding one, is
    imported by :func:`unitscale_core.hf_config.from_hf`; :func:`load_with_warnings` also
    returns what the import cannot compute faithfully."""
    return load_with_warnings(path)[0]


def load_with_warnings(path: str | os.PathLike[str]) -> tuple[ModelConfig, list[str]]:
    """:func:`load` and the import's warning lines (empty for the program's own files)."""
    path = Path(path)
    try:
        is_dir = path.is_dir()
    except (OSError, ValueError):  # a name too long, a NUL: read_regular_file names it below
        is_dir = False
    if is_dir:
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError({"file": f"{short_path(path.parent)} is a folder holding no "
                                       "config.json (a Hugging Face model folder has one)"})
    fmt = _format_of(path)
    try:
        raw = read_regular_file(path, MAX_CONFIG_BYTES, what=f"config {short_path(path)}")
    except FileProblem as exc:
        raise ConfigError({"file": str(exc)}) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError({"file": f"{short_path(path.name)} is not UTF-8 text"}) from None
    if fmt == "json" and '"model_type"' in text:
        try:
            data = json.loads(text)
        except ValueError:
            data = None  # loads() reports the syntax error below
        from .hf_config import from_hf, is_hf_config  # hf_config imports this module

        if is_hf_config(data):
            return from_hf(data)
    return loads(text, fmt, source=short_path(path.name)), []


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
    "MAX_CONFIG_BYTES", "MAX_EXPERTS", "MAX_LAYERS", "SCHEMA_VERSION", "quote", "backup_path",
    "from_dict",
    "load", "loads", "save", "dumps_json", "dumps_toml", "to_file_dict",
]
