"""Linearize pretrained HF models: swap attention for Hedgehog (or any registered map), distill
(Eq. 3), finetune, save/load, generate with O(1) state.

    from hedgehog_attention.convert import LinearizeConfig, linearize, save_linearized, load_linearized
    from hedgehog_attention.convert.distill import distill

    report = linearize(model, LinearizeConfig(feature_map="hedgehog"))
    distill(model, train_batches, eval_batches)
    save_linearized(model, "out/")
    model = load_linearized("out/")

(``distill`` and ``finetune`` stay in their submodules so that ``convert.distill`` remains the module.)

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
from .distill import TeacherCapture, evaluate_fidelity
from .generation import LinearStateCacheLayer
from .serialization import CheckpointError, load_linearized, save_linearized

__all__ = [
    "Adapter",
    "CheckpointError",
    "ConversionReport",
    "DistillConfig",
    "FinetuneConfig",
    "LinearStateCacheLayer",
    "LinearizeConfig",
    "LinearizedAttention",
    "TeacherCapture",
    "available_adapters",
    "evaluate_fidelity",
    "feature_map_parameters",
    "find_targets",
    "key_padding_mask",
    "linearize",
    "linearized_modules",
    "load_linearized",
    "register_adapter",
    "save_linearized",
    "unlinearize",
]
