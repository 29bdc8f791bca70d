"""hedgehog-attention: learnable linear attention that mimics softmax (Zhang et al., ICLR 2024).

The public API is re-exported here; nothing else needs deep imports::

    from hedgehog_attention import LinearAttention, linear_attention, attention_distillation_loss

The training engine, the from-scratch model and the conversion entry points are heavier (they pull
in ``torch.distributed`` / ``transformers``), so they are loaded on first access::

    from hedgehog_attention import Trainer, TrainConfig, RotaryTransformer, linearize
"""

import importlib
from typing import Any

from .attention import LinearAttention, LinearAttentionOutput
from .distill import attention_distillation_loss, attention_output_mse, fit_attention_to_softmax
from .feature_maps import (
    FeatureMap,
    HedgehogFeatureMap,
    available_feature_maps,
    build_feature_map,
    register_feature_map,
)
from .metrics import attention_entropy, attention_fidelity, kl_divergence, monotonicity
from .ops import (
    DEFAULT_EPS,
    LinearAttentionState,
    linear_attention,
    linear_attention_weights,
    softmax_attention_reference,
    softmax_attention_weights,
)

__version__ = "0.1.0"

# name -> module that defines it; imported lazily by ``__getattr__`` (PEP 562).
_LAZY = {
    "Trainer": ".train",
    "TrainConfig": ".train",
    "TrainResult": ".train",
    "TrainerCallback": ".train",
    "RotaryTransformer": ".models",
    "TransformerConfig": ".models",
    "linearize": ".convert",
    "load_linearized": ".convert",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "DEFAULT_EPS",
    "FeatureMap",
    "HedgehogFeatureMap",
    "LinearAttention",
    "LinearAttentionOutput",
    "LinearAttentionState",
    "attention_distillation_loss",
    "attention_entropy",
    "attention_fidelity",
    "attention_output_mse",
    "available_feature_maps",
    "build_feature_map",
    "fit_attention_to_softmax",
    "kl_divergence",
    "linear_attention",
    "linear_attention_weights",
    "monotonicity",
    "register_feature_map",
    "softmax_attention_reference",
    "softmax_attention_weights",
]
