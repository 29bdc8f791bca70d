"""GPT-2: causal self-attention with a fused ``c_attn`` (Conv1D) projection.

Converts ``GPT2Attention`` modules that are not cross-attention. The output projection
``c_proj`` and residual dropout are the original's.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, LinearizedAttention, cache_kwargs, register_adapter
from .config import LinearizeConfig

__all__ = ["GPT2LinearAttention"]


class GPT2LinearAttention(LinearizedAttention):
    architecture = "gpt2"

    def project(self, hidden_states: torch.Tensor, **_) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        o = self.original
        q, k, v = o.c_attn(hidden_states).split(o.split_size, dim=2)
        shape = (*hidden_states.shape[:-1], -1, o.head_dim)
        return q.view(shape), k.view(shape), v.view(shape)  # (B, T, H, D) each

    def output(self, o: torch.Tensor) -> torch.Tensor:
        o = o.reshape(*o.shape[:2], -1)  # (B, T, H*D)
        return self.original.resid_dropout(self.original.c_proj(o))

    def forward(
        self,
        hidden_states,
        cache=None,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        output_attentions=False,
        past_key_values=None,
        **kwargs,
    ):
        if encoder_hidden_states is not None:
            raise ValueError("a converted GPT-2 self-attention got encoder_hidden_states (cross-attention)")
        cache = cache if cache is not None else past_key_values
        return self.attend(
            hidden_states,
            attention_mask,
            cache,
            lambda: self.original(
                hidden_states,
                attention_mask=attention_mask,
                output_attentions=output_attentions,
                **cache_kwargs(self.original, cache),
                **kwargs,
            ),
        )


def _build(original: nn.Module, *, name: str, layer_idx: int, config: LinearizeConfig) -> GPT2LinearAttention:
    return GPT2LinearAttention(
        original,
        name=name,
        layer_idx=layer_idx,
        num_heads=original.num_heads,
        num_kv_heads=original.num_heads,
        head_dim=original.head_dim,
        causal=True,
        scale=original.scaling,
        config=config,
    )


register_adapter(
    Adapter(
        name="gpt2",
        class_names=("GPT2Attention",),
        accepts=lambda m: not getattr(m, "is_cross_attention", False) and hasattr(m, "c_attn"),
        build=_build,
        # peft matches name suffixes: a bare "c_proj" would also adapt every MLP's c_proj; the
        # attention's projections sit under "attn." (softmax model) or "original." (converted layer)
        lora_targets=("attn.c_attn", "attn.c_proj", "original.c_attn", "original.c_proj"),
    )
)
