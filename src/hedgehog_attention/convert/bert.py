"""BERT family (MiniLM, BERT, RoBERTa-shaped): bidirectional self-attention with padding masks.

Converts ``BertSelfAttention`` (not cross-attention). ``q, k, v`` come from the original's
``query``/``key``/``value`` projections; the head outputs go back un-projected, because
``BertSelfOutput`` (dense + LayerNorm) follows outside the converted module.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, LinearizedAttention, cache_kwargs, register_adapter
from .config import LinearizeConfig

__all__ = ["BertLinearAttention"]


class BertLinearAttention(LinearizedAttention):
    architecture = "bert"

    def project(self, hidden_states: torch.Tensor, **_) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        o = self.original
        shape = (*hidden_states.shape[:-1], -1, o.attention_head_size)
        q = o.query(hidden_states).view(shape)  # (B, T, H, D)
        k = o.key(hidden_states).view(shape)
        v = o.value(hidden_states).view(shape)
        return q, k, v

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return o.reshape(*o.shape[:2], -1)  # (B, T, H*D)

    def forward(self, hidden_states, attention_mask=None, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        return self.attend(
            hidden_states,
            attention_mask,
            cache,
            lambda: self.original(
                hidden_states, attention_mask=attention_mask, **cache_kwargs(self.original, cache), **kwargs
            ),
        )


def _build(original: nn.Module, *, name: str, layer_idx: int, config: LinearizeConfig) -> BertLinearAttention:
    return BertLinearAttention(
        original,
        name=name,
        layer_idx=layer_idx,
        num_heads=original.num_attention_heads,
        num_kv_heads=original.num_attention_heads,
        head_dim=original.attention_head_size,
        causal=bool(getattr(original, "is_causal", False)),
        scale=original.scaling,
        config=config,
    )


register_adapter(
    Adapter(
        name="bert",
        class_names=("BertSelfAttention", "RobertaSelfAttention", "XLMRobertaSelfAttention"),
        accepts=lambda m: all(hasattr(m, a) for a in ("query", "key", "value", "attention_head_size", "scaling")),
        build=_build,
        lora_targets=("query", "key", "value"),
    )
)
