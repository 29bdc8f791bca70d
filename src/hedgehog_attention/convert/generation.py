"""O(1)-state decoding inside the standard ``transformers`` cache.

``model.generate`` creates a ``DynamicCache`` and passes it to every attention module. A converted
layer swaps its own slot in ``cache.layers`` for a :class:`LinearStateCacheLayer` on first use: the
slot keeps the layer's recurrent state ``(S [B, Hk, F, Dv], z [B, Hk, F])`` (float32) and the
number of tokens seen instead of growing keys/values. It reports that count as its sequence length
and mask size, so position ids, RoPE offsets and the masks of any layers kept as softmax (which
keep ordinary key/value slots in the same cache) come out as with the original model. Beam search
reordering, batch expansion and reset work on the state.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, EncoderDecoderCache, StaticLayer

from ..ops import LinearAttentionState

__all__ = ["LinearStateCacheLayer", "linear_state_layer"]


class LinearStateCacheLayer(CacheLayerMixin):
    """One converted layer's decode state in a ``transformers`` ``Cache``."""

    is_sliding = False
    is_croppable = False
    is_compileable = False
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.state: LinearAttentionState | None = None
        self.seen = 0

    # -- what the converted layer calls ----------------------------------------------------------
    def advance(self, state: LinearAttentionState, num_tokens: int) -> None:
        self.state = state
        self.seen += int(num_tokens)
        self.is_initialized = True

    # -- CacheLayerMixin -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "a linearized attention layer keeps a recurrent state (S, z), not keys/values; "
            "cache.update() was called on its slot by a module that is not the converted layer"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the same, under its name before transformers 5.13
        return -1

    def reset(self) -> None:
        self.state, self.seen, self.is_initialized = None, 0, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(beam_idx.to(self.state.S.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = LinearAttentionState(self.state.S[indices], self.state.z[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = LinearAttentionState(
                self.state.S.repeat_interleave(repeats, dim=0), self.state.z.repeat_interleave(repeats, dim=0)
            )

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise RuntimeError(
                "a recurrent linear-attention state cannot be cropped (assisted decoding is unsupported)"
            )

    def offload(self) -> None:
        if self.state is not None:
            self.device = self.state.S.device
            self.state = LinearAttentionState(self.state.S.to("cpu"), self.state.z.to("cpu"))

    def prefetch(self) -> None:
        if self.state is not None and getattr(self, "device", None) is not None and self.state.S.device != self.device:
            self.state = LinearAttentionState(self.state.S.to(self.device), self.state.z.to(self.device))


def linear_state_layer(cache: Cache, layer_idx: int) -> LinearStateCacheLayer:
    """The :class:`LinearStateCacheLayer` of ``layer_idx`` in ``cache``, installed on first use."""
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    if not isinstance(cache, Cache):
        raise TypeError(f"expected a transformers Cache, got {type(cache).__name__} (legacy tuple caches are gone)")
    layers = cache.layers
    while len(layers) <= layer_idx:
        factory = cache.layer_class_to_replicate or DynamicLayer
        layers.append(factory())
    slot = layers[layer_idx]
    if isinstance(slot, StaticLayer):
        raise TypeError(
            f"cache slot {layer_idx} is a preallocated {type(slot).__name__}: linearized layers keep a recurrent "
            "state in a DynamicCache; use cache_implementation='dynamic' (the default), not a static cache"
        )
    if not isinstance(slot, LinearStateCacheLayer):
        if slot.get_seq_length() > 0:
            raise RuntimeError(
                f"cache slot {layer_idx} already holds {slot.get_seq_length()} softmax keys/values; a cache "
                "filled by the softmax model cannot continue with the linearized one"
            )
        slot = layers[layer_idx] = LinearStateCacheLayer()
    return slot
