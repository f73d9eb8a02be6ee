"""The torch Transformer: ``build_model(config)`` and its modules."""

from .layers import Attention, DecoderLayer, EncoderLayer, FeedForward, PositionContext
from .masks import allowed
from .transformer import (
    Decoder,
    DecoderOnlyModel,
    Encoder,
    EncoderDecoderModel,
    EncoderOnlyModel,
    Positions,
    build_model,
    unsupported_fields,
)

__all__ = [
    "Attention", "Decoder", "DecoderLayer", "DecoderOnlyModel", "Encoder", "EncoderDecoderModel",
    "EncoderLayer", "EncoderOnlyModel", "FeedForward", "PositionContext", "Positions", "allowed",
    "build_model", "unsupported_fields",
]
