"""Hugging Face ``config.json`` → :class:`~unitscale_core.config.ModelConfig`.

Plain dictionary work (no torch, no transformers): :func:`from_hf` maps the keys of the
model types in :data:`MODEL_TYPES` onto the config fields and returns, with the config, one
warning line for each thing the program does not compute the way the checkpoint's model does
(rope scaling, Gemma's embedding multiplier, sliding windows that bind at the chosen seq_len,
BERT's extra embeddings and MLM head...). A model type not listed, or a key that would change
the computation and is not understood, is a :class:`~unitscale_core.config.ConfigError`
naming it: nothing is approximated silently.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, ModelConfig, quote

#: Measurement sequence length used when the caller gives none (capped by max_len).
DEFAULT_SEQ_LEN = 2048
#: Batch used when the caller gives none.
DEFAULT_BATCH_SIZE = 1

MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma2", "olmo2", "gpt_neox", "phi3", "mixtral",
               "gpt2", "bert")

#: Keys that never change what is computed: names, token ids, dtypes, caching, init, tooling.
COSMETIC_KEYS = frozenset({
    "_name_or_path", "architectures", "auto_map", "model_type", "torch_dtype", "dtype",
    "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "cls_token_id", "mask_token_id", "decoder_start_token_id", "use_cache", "initializer_range",
    "initializer_factor", "pretraining_tp", "rms_norm_eps", "layer_norm_eps",
    "layer_norm_epsilon", "output_router_logits", "router_aux_loss_coef", "cache_implementation",
    "classifier_dropout", "id2label", "label2id", "problem_type", "return_dict",
    "output_attentions", "output_hidden_states", "is_decoder", "add_cross_attention",
    "tokenizer_class", "task_specific_params", "summary_type", "summary_use_proj",
    "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
    "gradient_checkpointing", "quantization_config", "_attn_implementation",
    "attn_implementation", "use_flash_attn", "is_encoder_decoder", "tie_encoder_decoder",
    "chunk_size_feed_forward", "finetuning_task", "torchscript", "use_bfloat16",
    "embedding_dropout", "reorder_and_upcast_attn", "scale_attn_by_inverse_layer_idx",
    "n_ctx", "original_max_position_embeddings", "max_window_layers", "mlp_bias",
    "router_jitter_noise", "qkv_bias", "layer_types",
})

#: HF activation names → the program's, for gated (SwiGLU-family) FFNs.
_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu",
          "gelu_tanh": "geglu"}


def _need(data: dict, key: str, model_type: str) -> Any:
    if key not in data or data[key] is None:
        raise ConfigError({key: f"{model_type} config.json has no {key}"})
    return data[key]


def _rope_theta(data: dict, default: float = 10000.0) -> float:
    params = data.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    for key in ("rope_theta", "rotary_emb_base"):
        if data.get(key) is not None:
            return float(data[key])
    return default


def _rope_scaling(data: dict, warnings: list[str]) -> None:
    for key in ("rope_scaling", "rope_parameters"):
        scaling = data.get(key)
        if scaling is None:
            continue
        if not isinstance(scaling, dict):
            raise ConfigError({key: f"{key}={quote(scaling)} must be a table"})
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in (None, "default"):
            warnings.append(f"{key}: rope_type={kind!r} rescales the rope frequencies; "
                            "the program uses plain rope (θ = rope_theta), exact only for "
                            "positions before the original context")


def _sliding_window(data: dict, seq_len: int, warnings: list[str], layers: str) -> None:
    window = data.get("sliding_window")
    if data.get("use_sliding_window") is False or window is None:
        return
    if seq_len > window:
        warnings.append(f"sliding_window={window}: {layers} attend only to the last {window} "
                        f"positions, but the program computes full causal attention at "
                        f"seq_len={seq_len}")


def _seq_len(max_len: int, seq_len: int | None) -> int:
    return min(max_len, DEFAULT_SEQ_LEN) if seq_len is None else seq_len


def _llama_family(data: dict, model_type: str, seq_len: int | None,
                  warnings: list[str]) -> dict[str, Any]:
    """llama, mistral, qwen2, mixtral, phi3, olmo2, gemma2: RMSNorm, rope, gated FFN."""
    heads = int(_need(data, "num_attention_heads", model_type))
    d_model = int(_need(data, "hidden_size", model_type))
    kv = data.get("num_key_value_heads")
    act_key = "hidden_activation" if model_type == "gemma2" else "hidden_act"
    act = data.get(act_key) or data.get("hidden_act") or "silu"
    if act not in _GATED:
        raise ConfigError({act_key: f"{act_key}={quote(act)} of {model_type} is not one the "
                                    f"program computes ({', '.join(_GATED)})"})
    max_len = int(data.get("max_position_embeddings", 2048))
    attn_bias = bool(data.get("attention_bias", False))
    fields: dict[str, Any] = dict(
        architecture="decoder", d_model=d_model, n_heads=heads,
        d_ff=int(_need(data, "intermediate_size", model_type)),
        n_layers=int(_need(data, "num_hidden_layers", model_type)),
        vocab_size=int(_need(data, "vocab_size", model_type)),
        max_len=max_len, seq_len=_seq_len(max_len, seq_len), positional="rope",
        attention="causal", norm="pre", norm_type="rmsnorm", activation=_GATED[act],
        bias=False, rope_base=_rope_theta(data),
        tie_embeddings=bool(data.get("tie_word_embeddings", model_type == "gemma2")),
    )
    if attn_bias:  # Llama/OLMo's attention_bias: q, k, v AND o carry biases, the FFN none
        raise ConfigError({"attention_bias": "attention_bias=true (biases on q, k, v and o "
                                             "but not the FFN) is not a layout the program "
                                             "builds"})
    if data.get("mlp_bias"):
        raise ConfigError({"mlp_bias": "mlp_bias=true (FFN biases without attention "
                                       "biases) is not a layout the program builds"})
    if kv is not None and int(kv) != heads:
        fields["n_kv_heads"] = int(kv)
    head_dim = data.get("head_dim")
    if head_dim is not None and int(head_dim) != d_model // heads:
        fields["head_dim"] = int(head_dim)
    partial = data.get("partial_rotary_factor")
    if partial is not None and float(partial) != 1.0:
        fields["rotary_fraction"] = float(partial)
    if float(data.get("attention_dropout", 0.0) or 0.0) > 0:
        fields["dropout"] = float(data["attention_dropout"])
    _rope_scaling(data, warnings)
    if model_type == "qwen2":
        fields["qkv_bias"] = True  # Qwen2 always biases q, k, v (not o, not the FFN)
        _sliding_window(data, fields["seq_len"], warnings, "layers above max_window_layers")
    elif model_type in ("mistral", "mixtral", "phi3"):
        _sliding_window(data, fields["seq_len"], warnings, "all layers")
    if model_type == "mixtral":
        fields["n_experts"] = int(_need(data, "num_local_experts", model_type))
        fields["experts_per_token"] = int(_need(data, "num_experts_per_tok", model_type))
    if model_type == "olmo2":
        fields["qk_norm"] = "all_heads"
        fields["norm"] = "branch_output"
    if model_type == "phi3":
        for key in ("resid_pdrop", "embd_pdrop"):
            if float(data.get(key, 0.0) or 0.0) > 0:
                fields["dropout"] = max(fields.get("dropout", 0.0), float(data[key]))
    if model_type == "gemma2":
        if data.get("use_bidirectional_attention"):  # transformers 5 writes it (false)
            raise ConfigError({"use_bidirectional_attention": "use_bidirectional_attention="
                                                              "true (gemma2 without its causal "
                                                              "mask) is not computed"})
        fields["norm"] = "sandwich"
        if data.get("attn_logit_softcapping") is not None:
            fields["attn_softcap"] = float(data["attn_logit_softcapping"])
        if data.get("final_logit_softcapping") is not None:
            fields["logit_softcap"] = float(data["final_logit_softcapping"])
        warnings.append(f"gemma2 multiplies the token embedding by √hidden_size = "
                        f"{d_model ** 0.5:.4g}; the program does not")
        scalar = data.get("query_pre_attn_scalar")
        d_head = int(head_dim) if head_dim is not None else d_model // heads
        if scalar is not None and int(scalar) != d_head:
            warnings.append(f"query_pre_attn_scalar={scalar}: gemma2 scales attention logits "
                            f"by 1/√{scalar}, the program by 1/√head_dim = 1/√{d_head}")
        window = data.get("sliding_window")
        if window is not None and fields["seq_len"] > window:
            warnings.append(f"sliding_window={window}: gemma2's alternate layers attend only "
                            f"to the last {window} positions; the program computes full "
                            f"causal attention at seq_len={fields['seq_len']}")
    return fields


def _gpt_neox(data: dict, seq_len: int | None, warnings: list[str]) -> dict[str, Any]:
    mt = "gpt_neox"
    act = data.get("hidden_act", "gelu")
    if act not in ("gelu", "relu"):
        raise ConfigError({"hidden_act": f"hidden_act={quote(act)} of gpt_neox is not one the "
                                         "program computes (gelu, relu)"})
    max_len = int(data.get("max_position_embeddings", 2048))
    fields: dict[str, Any] = dict(
        architecture="decoder", d_model=int(_need(data, "hidden_size", mt)),
        n_heads=int(_need(data, "num_attention_heads", mt)),
        d_ff=int(_need(data, "intermediate_size", mt)),
        n_layers=int(_need(data, "num_hidden_layers", mt)),
        vocab_size=int(_need(data, "vocab_size", mt)), max_len=max_len,
        seq_len=_seq_len(max_len, seq_len), positional="rope", attention="causal", norm="pre",
        norm_type="layernorm", activation=act, bias=True,
        tie_embeddings=bool(data.get("tie_word_embeddings", False)),
        parallel_residual=bool(data.get("use_parallel_residual", True)),
        rope_base=_rope_theta(data),
    )
    if data.get("attention_bias") is False:
        raise ConfigError({"attention_bias": "gpt_neox attention_bias=false (no q/k/v/o "
                                             "biases, FFN biases kept) is not a layout the "
                                             "program builds"})
    frac = data.get("rotary_pct", data.get("partial_rotary_factor"))
    if isinstance(data.get("rope_parameters"), dict):
        frac = data["rope_parameters"].get("partial_rotary_factor", frac)
    if frac is not None and float(frac) != 1.0:
        fields["rotary_fraction"] = float(frac)
    _rope_scaling(data, warnings)
    drop = max(float(data.get("hidden_dropout", 0.0) or 0.0),
               float(data.get("attention_dropout", 0.0) or 0.0))
    if drop > 0:
        fields["dropout"] = drop
    return fields


def _gpt2(data: dict, seq_len: int | None, warnings: list[str]) -> dict[str, Any]:
    d_model = int(data.get("n_embd", 768))
    act = data.get("activation_function", "gelu_new")
    if act not in ("gelu", "gelu_new", "relu"):
        raise ConfigError({"activation_function": f"activation_function={quote(act)} is not "
                                                  "one the program computes"})
    if act == "gelu_new":
        warnings.append("activation_function='gelu_new' is GELU's tanh approximation; the "
                        "program computes the exact (erf) GELU")
    max_len = int(data.get("n_positions", 1024))
    inner = data.get("n_inner")
    drop = max(float(data.get(k, 0.1) or 0.0) for k in ("resid_pdrop", "embd_pdrop",
                                                         "attn_pdrop"))
    return dict(
        architecture="decoder", d_model=d_model, n_heads=int(data.get("n_head", 12)),
        d_ff=int(inner) if inner is not None else 4 * d_model,
        n_layers=int(data.get("n_layer", 12)), vocab_size=int(data.get("vocab_size", 50257)),
        max_len=max_len, seq_len=_seq_len(max_len, seq_len), positional="learned",
        attention="causal", norm="pre", norm_type="layernorm",
        activation="relu" if act == "relu" else "gelu", bias=True,
        tie_embeddings=bool(data.get("tie_word_embeddings", True)), dropout=drop,
    )


def _bert(data: dict, seq_len: int | None, warnings: list[str]) -> dict[str, Any]:
    mt = "bert"
    if data.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError({"position_embedding_type": "position_embedding_type="
                           f"{quote(data['position_embedding_type'])} is not computed"})
    act = data.get("hidden_act", "gelu")
    if act not in ("gelu", "relu"):
        raise ConfigError({"hidden_act": f"hidden_act={quote(act)} of bert is not one the "
                                         "program computes (gelu, relu)"})
    d_model = int(_need(data, "hidden_size", mt))
    max_len = int(data.get("max_position_embeddings", 512))
    types = int(data.get("type_vocab_size", 2))
    warnings.append(f"bert's token-type embeddings ({types}×{d_model}) and MLM head (dense + "
                    "LayerNorm + output bias) are not part of the program's encoder, and bert "
                    "normalises the embeddings where the program has a final LayerNorm")
    drop = max(float(data.get("hidden_dropout_prob", 0.1) or 0.0),
               float(data.get("attention_probs_dropout_prob", 0.1) or 0.0))
    return dict(
        architecture="encoder", d_model=d_model,
        n_heads=int(_need(data, "num_attention_heads", mt)),
        d_ff=int(_need(data, "intermediate_size", mt)),
        n_layers=int(_need(data, "num_hidden_layers", mt)),
        vocab_size=int(_need(data, "vocab_size", mt)), max_len=max_len,
        seq_len=_seq_len(max_len, seq_len), positional="learned", attention="full",
        norm="post", norm_type="layernorm", activation=act, bias=True,
        tie_embeddings=bool(data.get("tie_word_embeddings", True)), dropout=drop,
    )


#: Keys each model type's mapping reads (anything else non-cosmetic is refused by name).
_READ = {
    "llama": {"hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "num_hidden_layers", "vocab_size", "max_position_embeddings", "rope_theta",
              "rope_scaling", "rope_parameters", "tie_word_embeddings", "hidden_act",
              "attention_bias", "attention_dropout", "head_dim", "partial_rotary_factor"},
}
_READ["mistral"] = _READ["llama"] | {"sliding_window"}
_READ["mixtral"] = _READ["mistral"] | {"num_local_experts", "num_experts_per_tok"}
_READ["qwen2"] = _READ["mistral"] | {"use_sliding_window"}
_READ["olmo2"] = set(_READ["llama"])
_READ["phi3"] = _READ["mistral"] | {"resid_pdrop", "embd_pdrop"}
_READ["gemma2"] = _READ["mistral"] | {"hidden_activation", "attn_logit_softcapping",
                                      "final_logit_softcapping", "query_pre_attn_scalar",
                                      "use_bidirectional_attention"}
_READ["gpt_neox"] = {"hidden_size", "num_attention_heads", "intermediate_size",
                     "num_hidden_layers", "vocab_size", "max_position_embeddings",
                     "tie_word_embeddings", "use_parallel_residual", "rotary_emb_base",
                     "rope_theta", "rope_scaling", "rope_parameters", "rotary_pct",
                     "partial_rotary_factor", "hidden_act", "hidden_dropout",
                     "attention_dropout", "attention_bias"}
_READ["gpt2"] = {"n_embd", "n_head", "n_layer", "n_positions", "n_inner", "vocab_size",
                 "activation_function", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "tie_word_embeddings", "scale_attn_weights"}
_READ["bert"] = {"hidden_size", "num_attention_heads", "intermediate_size",
                 "num_hidden_layers", "vocab_size", "max_position_embeddings",
                 "type_vocab_size", "position_embedding_type", "hidden_act",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "tie_word_embeddings"}


def is_hf_config(data: Any) -> bool:
    """A Hugging Face config.json (it names its ``model_type``), not a program config."""
    return isinstance(data, dict) and "model_type" in data


def from_hf(data: dict, *, seq_len: int | None = None,
            batch_size: int | None = None) -> tuple[ModelConfig, list[str]]:
    """The ModelConfig of a Hugging Face ``config.json`` and one warning line for each thing
    the program does not compute as the checkpoint's model does.

    ``seq_len`` defaults to ``min(max_position_embeddings, DEFAULT_SEQ_LEN)``, ``batch_size``
    to ``DEFAULT_BATCH_SIZE``. ConfigError (one line) for an unsupported ``model_type`` or a
    key that would change the computation and is not understood.
    """
    if not isinstance(data, dict):
        raise ConfigError({"file": f"config.json must hold a table, not {type(data).__name__}"})
    model_type = data.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError({"model_type": f"model_type={quote(model_type)} is not supported "
                                         f"(supported: {', '.join(MODEL_TYPES)})"})
    unknown = sorted(k for k in data if k not in COSMETIC_KEYS and k not in _READ[model_type])
    if unknown:
        raise ConfigError({unknown[0]: f"{model_type} config.json key {quote(unknown[0])} "
                                       "is not understood by the importer"})
    if data.get("scale_attn_weights") is False:
        raise ConfigError({"scale_attn_weights": "scale_attn_weights=false (no 1/√d_head) "
                                                 "is not computed"})
    warnings: list[str] = []
    if model_type in ("gpt_neox",):
        fields = _gpt_neox(data, seq_len, warnings)
    elif model_type == "gpt2":
        fields = _gpt2(data, seq_len, warnings)
    elif model_type == "bert":
        fields = _bert(data, seq_len, warnings)
    else:
        fields = _llama_family(data, model_type, seq_len, warnings)
    fields["batch_size"] = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    return ModelConfig(**fields), warnings
