"""Linearize pretrained HF models: swap attention for Hedgehog (or any registered map), distill
(Eq. 3), finetune, save/load, generate with O(1) state.

    from hedgehog_attention.convert import LinearizeConfig, linearize, distill, save_linearized
    report = linearize(model, LinearizeConfig(feature_map="hedgehog"))
    distill(model, train_batches, eval_batches)
    save_linearized(model, "out/")

Adapters: BERT family (``bert.py``), GPT-2 (``gpt2.py``), Llama family (``llama.py``).
"""

from .base import (
    Adapter,
    ConversionReport,
    LinearizedAttention,
    available_adapters,
    feature_map_parameters,
    find_targets,
    key_padding_mask,
    linearize,
    linearized_modules,
    register_adapter,
    unlinearize,
)
from .config import DistillConfig, FinetuneConfig, LinearizeConfig
from .generation import LinearStateCacheLayer

__all__ = [
    "Adapter",
    "ConversionReport",
    "DistillConfig",
    "FinetuneConfig",
    "LinearStateCacheLayer",
    "LinearizeConfig",
    "LinearizedAttention",
    "available_adapters",
    "feature_map_parameters",
    "find_targets",
    "key_padding_mask",
    "linearize",
    "linearized_modules",
    "register_adapter",
    "unlinearize",
]
