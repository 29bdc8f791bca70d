"""Small from-scratch models (App. B.2): a rotary decoder with pluggable attention."""

from .transformer import (
    SOFTMAX,
    KVCache,
    RotaryTransformer,
    TransformerConfig,
    TransformerOutput,
    apply_rotary,
    lm_labels,
    rotary_cos_sin,
)

__all__ = [
    "SOFTMAX",
    "KVCache",
    "RotaryTransformer",
    "TransformerConfig",
    "TransformerOutput",
    "apply_rotary",
    "lm_labels",
    "rotary_cos_sin",
]
