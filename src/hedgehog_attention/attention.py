"""``LinearAttention``: an nn.Module that owns the q/k feature maps and calls the op.

It takes already-projected (and, for rotary models, already-rotated) ``q, k, v`` so that the same
module serves from-scratch models and converted HuggingFace attention layers alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .feature_maps import CosFormerFeatureMap, FeatureMap, HedgehogFeatureMap, PerformerFeatureMap, build_feature_map
from .ops import (
    DEFAULT_EPS,
    LinearAttentionState,
    linear_attention,
    linear_attention_weights,
    recurrent_step,
    resolve_backend,
)
from .ops._validate import check_linear_attention_inputs

__all__ = ["LinearAttention", "LinearAttentionOutput"]


@dataclass
class LinearAttentionOutput:
    """``o [B, T, H, Dv]``; ``state`` when asked for (decode); ``weights [B, H, T, T]`` when asked for."""

    o: torch.Tensor
    state: LinearAttentionState | None = None
    weights: torch.Tensor | None = None


class LinearAttention(nn.Module):
    """Linear attention with trainable (or fixed) feature maps for queries and keys.

    Args:
        num_heads: query heads H.
        head_dim: D of q and k.
        num_kv_heads: KV heads Hk (GQA); defaults to H. Key maps are per KV head and the state is
            kept per KV head, so K/V are never repeated.
        feature_map: a registry name (``hedgehog``, ``elu``, ``t2r``, ...) or a ``FeatureMap``.
        feature_map_kwargs: passed to the registry (e.g. ``{"activation": "exp"}``).
        tie_qk: one map for q and k (the paper's choice in Sec. 4; needs Hk == H). Default False
            (separate maps, as LoLCATs).
        causal: decoder (True) or encoder (False) attention.
        backend: op backend, see :func:`hedgehog_attention.ops.linear_attention`.
        eps: normalizer epsilon.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int | None = None,
        feature_map: str | FeatureMap = "hedgehog",
        feature_map_kwargs: dict | None = None,
        tie_qk: bool = False,
        causal: bool = True,
        backend: str = "auto",
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if tie_qk and num_kv_heads != num_heads:
            raise ValueError(
                f"tie_qk=True needs one map per head for q and k alike, but num_heads={num_heads} != "
                f"num_kv_heads={num_kv_heads}; use tie_qk=False with grouped-query attention"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.causal, self.backend, self.eps, self.tie_qk = causal, backend, eps, tie_qk
        kwargs = dict(feature_map_kwargs or {})
        if isinstance(feature_map, FeatureMap):
            if tie_qk is False and num_kv_heads != num_heads:
                raise ValueError("pass a registry name (not an instance) to build maps for GQA")
            self.feature_map_q = feature_map
            self.feature_map_k = feature_map if tie_qk else _clone(feature_map)
            self.feature_map_name = feature_map.name
        else:
            self.feature_map_name = feature_map
            if feature_map == "performer" and num_kv_heads != num_heads:
                kwargs["head_groups"] = num_heads // num_kv_heads  # a query group shares its KV head's draw
            self.feature_map_q = build_feature_map(feature_map, num_heads=num_heads, head_dim=head_dim, **kwargs)
            if tie_qk:
                self.feature_map_k = self.feature_map_q
            elif not isinstance(self.feature_map_q, PerformerFeatureMap):
                self.feature_map_k = build_feature_map(feature_map, num_heads=num_kv_heads, head_dim=head_dim, **kwargs)
        if isinstance(self.feature_map_q, PerformerFeatureMap):
            # Performer estimates exp(q.k) only if q and k take the same random features: the key map
            # reads the query map's projection (KV head j: its query group's), and a redraw, counted
            # once per q/k pair, changes both
            self.feature_map_k = self.feature_map_q.key_map(num_heads // num_kv_heads)
        self.feature_dim = self.feature_map_q.feature_dim

    # ------------------------------------------------------------------ features
    def features(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``phi_q(q) [B, T, H, F]`` and ``phi_k(k) [B, T, Hk, F]``."""
        return self.feature_map_q(q, positions), self.feature_map_k(k, positions)

    def attention_weights(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalized linear weights ``[B, H, T, T]`` (quadratic: for analysis and distillation)."""
        fq, fk = self.features(q, k, positions)
        return linear_attention_weights(fq, fk, causal=self.causal, attention_mask=attention_mask, eps=self.eps)

    def _fused_hedgehog(self) -> bool:
        return isinstance(self.feature_map_q, HedgehogFeatureMap) and isinstance(self.feature_map_k, HedgehogFeatureMap)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        state: LinearAttentionState | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
    ) -> LinearAttentionOutput:
        """Attend ``q [B, T, H, D]`` over ``k [B, T, Hk, D]``, ``v [B, T, Hk, Dv]``.

        ``state`` continues from earlier tokens (causal only); ``use_cache`` returns the new state.
        A single new token with a state takes the O(1) recurrent step (Eq. 6).
        """
        if state is not None and not self.causal:
            raise ValueError("a decode state only makes sense for causal attention (causal=True)")
        if (
            state is not None
            and positions is None
            and any(isinstance(m, CosFormerFeatureMap) for m in (self.feature_map_q, self.feature_map_k))
        ):
            # the default positions 0..T-1 would restart the cosFormer re-weighting at the state
            raise ValueError(
                "cosFormer features depend on the token positions: after a state pass positions [B, T] "
                "(the new tokens' absolute positions, continuing from the tokens the state has seen)"
            )
        backend = resolve_backend(self.backend, q.device)
        if (
            backend == "triton"
            and self._fused_hedgehog()
            and not output_attentions
            and positions is None
            and q.shape[1] > 1
        ):
            return self._forward_fused(q, k, v, attention_mask, cu_seqlens, state, use_cache)
        fq, fk = self.features(q, k, positions)
        if q.shape[1] == 1 and state is not None and cu_seqlens is None:
            # the checks of the full path: a mask of another shape ([B, past + 1]) must not be read
            # at its first column
            check_linear_attention_inputs(fq, fk, v, attention_mask, None, state, backend, self.eps)
            km = None if attention_mask is None else attention_mask[:, 0].to(torch.bool)
            o, new_state = recurrent_step(fq[:, 0], fk[:, 0], v[:, 0], state, eps=self.eps, key_mask=km)
            o = o.unsqueeze(1)
        else:
            o, new_state = linear_attention(
                fq,
                fk,
                v,
                causal=self.causal,
                attention_mask=attention_mask,
                cu_seqlens=cu_seqlens,
                initial_state=state,
                output_final_state=use_cache,
                backend=backend,
                eps=self.eps,
            )
        weights = None
        if output_attentions:
            weights = linear_attention_weights(
                fq, fk, causal=self.causal, attention_mask=attention_mask, cu_seqlens=cu_seqlens, eps=self.eps
            )
        return LinearAttentionOutput(o, new_state if use_cache else None, weights)

    def _forward_fused(self, q, k, v, attention_mask, cu_seqlens, state, use_cache) -> LinearAttentionOutput:
        from .ops.triton import fused_hedgehog_attention

        mq, mk = self.feature_map_q, self.feature_map_k
        if mq.activation != mk.activation or mq.negation != mk.negation:
            raise ValueError("the fused kernel needs the same activation/negation for the q and k maps")
        o, new_state = fused_hedgehog_attention(
            q,
            k,
            v,
            mq.weight,
            mq.bias,
            mk.weight,
            mk.bias,
            activation=mq.activation,
            negation=mq.negation,
            causal=self.causal,
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
            initial_state=state,
            output_final_state=use_cache,
            eps=self.eps,
        )
        return LinearAttentionOutput(o, new_state if use_cache else None, None)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"feature_map={self.feature_map_name!r}, tie_qk={self.tie_qk}, causal={self.causal}, "
            f"backend={self.backend!r}"
        )


def _clone(fm: FeatureMap) -> FeatureMap:
    import copy

    return copy.deepcopy(fm)
