"""Llama family (Llama, SmolLM2, Mistral): RoPE and grouped-query attention.

The feature maps apply after RoPE (Hedgehog Sec. 3.2 footnote; LoLCATs ``process_qkv``). Keys and
values stay at ``num_key_value_heads`` (3 for SmolLM2-135M's 9 query heads): the key maps and the
decode state are per KV head, nothing is repeated. ``apply_rotary_pos_emb`` is taken from the
original module's own modeling file, so a family with its own rotary function uses it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .base import Adapter, LinearizedAttention, cache_kwargs, register_adapter
from .config import LinearizeConfig

__all__ = ["LlamaLinearAttention"]


class LlamaLinearAttention(LinearizedAttention):
    architecture = "llama"

    def __init__(self, original: nn.Module, **kwargs) -> None:
        super().__init__(original, **kwargs)
        module = sys.modules[type(original).__module__]
        if not hasattr(module, "apply_rotary_pos_emb"):
            raise ValueError(f"{type(original).__module__} has no apply_rotary_pos_emb; not a Llama-family module")
        self._rotary = module.apply_rotary_pos_emb

    def project(
        self, hidden_states: torch.Tensor, position_embeddings=None, **_
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        o = self.original
        shape = (*hidden_states.shape[:-1], -1, o.head_dim)
        q = o.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H, T, D)
        k = o.k_proj(hidden_states).view(shape).transpose(1, 2)  # (B, Hk, T, D)
        v = o.v_proj(hidden_states).view(shape)  # (B, T, Hk, D)
        if position_embeddings is None:
            raise ValueError("Llama attention needs position_embeddings (cos, sin) from the model's rotary embedding")
        cos, sin = position_embeddings
        q, k = self._rotary(q, k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v  # (B, T, H, D), (B, T, Hk, D), (B, T, Hk, D)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return self.original.o_proj(o.reshape(*o.shape[:2], -1))

    def forward(
        self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, past_key_values=None, **kwargs
    ):
        cache = cache if cache is not None else past_key_values
        return self.attend(
            hidden_states,
            attention_mask,
            cache,
            lambda: self.original(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                **cache_kwargs(self.original, cache),
                **kwargs,
            ),
            position_embeddings=position_embeddings,
        )


def _build(original: nn.Module, *, name: str, layer_idx: int, config: LinearizeConfig) -> LlamaLinearAttention:
    cfg = original.config
    return LlamaLinearAttention(
        original,
        name=name,
        layer_idx=layer_idx,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=original.head_dim,
        causal=True,
        scale=original.scaling,
        config=config,
    )


def _accepts(m: nn.Module) -> bool:
    # Sliding-window layers (Mistral with sliding_window set) see a banded mask that linear attention
    # cannot reproduce; key_padding_mask would raise on every call, so refuse them up front.
    return all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")) and not getattr(
        getattr(m, "config", None), "sliding_window", None
    )


register_adapter(
    Adapter(
        name="llama",
        class_names=("LlamaAttention", "MistralAttention"),
        accepts=_accepts,
        build=_build,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    )
)
