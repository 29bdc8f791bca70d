"""A small decoder-only Transformer with rotary embeddings and pluggable attention (App. B.2).

Every block is pre-norm ``x + attn(norm(x))``, ``x + mlp(norm(x))`` (as Pythia / Llama); only the
attention differs between variants:

* ``attention="softmax"``: causal softmax attention through ``F.scaled_dot_product_attention``.
* any feature-map name of :func:`hedgehog_attention.available_feature_maps` (``hedgehog``, ``elu``,
  ``relu``, ``performer``, ``cosformer``, ``exp_t``, ``taylor2``, ``t2r``, ...): the same
  projections and rotary embeddings feed :class:`~hedgehog_attention.LinearAttention`.

With ``distill_weight > 0`` a linear model also returns the auxiliary attention-distillation term
(Eq. 3): the cross-entropy between the softmax of its *own* rotated ``q, k`` (detached: a fixed
teacher per step) and its linear weights, averaged over layers. Only the feature maps learn from
it (their input ``q, k`` is detached too), so the task loss alone shapes the projections.

Example::

    cfg = TransformerConfig(vocab_size=40, d_model=128, n_layers=4, n_heads=4, attention="hedgehog")
    model = RotaryTransformer(cfg)
    out = model(input_ids, labels=labels)          # out.loss, out.logits, out.aux_loss
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import LinearAttention
from ..distill import attention_distillation_loss
from ..feature_maps import available_feature_maps
from ..ops import LinearAttentionState, softmax_attention_weights

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

SOFTMAX = "softmax"


@dataclass
class TransformerConfig:
    """Shape and attention of :class:`RotaryTransformer`.

    Args:
        vocab_size: token ids are ``0 .. vocab_size - 1``.
        d_model: residual width; ``head_dim = d_model // n_heads``.
        n_layers: number of blocks.
        n_heads: attention heads per block.
        max_seq_len: longest sequence (rotary table size, cosFormer's ``M``).
        attention: ``"softmax"`` or a feature-map registry name.
        feature_map_kwargs: passed to the feature-map registry (e.g. ``{"temperature": 2.0}``).
        tie_qk: one feature map for queries and keys (the paper's Sec. 3 choice).
        distill_weight: weight of the auxiliary Eq. 3 term (linear attention only; 0 = off).
        mlp_ratio: MLP hidden width over ``d_model``.
        rope_base: rotary base frequency.
        dropout: dropout on residual branches.
        tie_embeddings: share the input embedding with the output head.
        backend: linear-attention op backend (``"auto"``, ``"chunked"``, ``"triton"``, ...).
        init_std: std of the normal init of projections and embeddings; None = ``sqrt(2 / (5 d))``
            (GPT-NeoX's "small init"; GPT-2's fixed 0.02 is ~6x too small at d=64 and slows the
            formation of induction heads on associative recall).
    """

    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 1024
    attention: str = SOFTMAX
    feature_map_kwargs: dict[str, Any] = field(default_factory=dict)
    tie_qk: bool = False
    distill_weight: float = 0.0
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    backend: str = "auto"
    init_std: float | None = None

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.d_model // self.n_heads}")
        valid = [SOFTMAX, *available_feature_maps()]
        if self.attention not in valid:
            raise ValueError(f"unknown attention {self.attention!r}; valid: {', '.join(valid)}")
        if self.distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if self.distill_weight > 0 and self.attention == SOFTMAX:
            raise ValueError("distill_weight > 0 needs a linear attention (softmax has nothing to distill)")
        for name in ("vocab_size", "n_layers", "max_seq_len", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_linear(self) -> bool:
        return self.attention != SOFTMAX


@dataclass
class TransformerOutput:
    """``logits [B, T, V]``; ``loss`` (task CE, when labels are given); ``aux_loss`` (Eq. 3 term, or
    None); ``cache`` (per layer, when ``use_cache``); ``attentions`` (per layer ``[B, H, T, T]``)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    cache: list | None = None
    attentions: list[torch.Tensor] | None = None

    @property
    def total_loss(self) -> torch.Tensor:
        """Task loss plus the (already weighted) auxiliary term."""
        if self.loss is None:
            raise ValueError("no labels were given, so there is no loss")
        return self.loss if self.aux_loss is None else self.loss + self.aux_loss


@dataclass
class KVCache:
    """Softmax decode cache of one layer: ``k, v [B, T_seen, H, D]``."""

    k: torch.Tensor
    v: torch.Tensor


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float32 for half/float32, float64 stays float64 (a float32 round trip fails gradcheck)
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [B, T, 1, D/2]`` (float32, or ``dtype``) for integer ``positions [B, T]``."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim)
    ang = positions.to(dtype)[..., None] * inv_freq  # (B, T, D/2)
    return ang.cos()[:, :, None], ang.sin()[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` by position (GPT-NeoX half-split layout), in ``x.dtype``.

    Computed in float32 (float64 for float64 ``x``)."""
    cd = _compute_dtype(x)
    x1, x2 = x.to(cd).chunk(2, dim=-1)  # (B, T, H, D/2) each
    cos, sin = cos.to(cd), sin.to(cd)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal attention with rotary q, k; softmax (SDPA) or :class:`LinearAttention`."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.linear: LinearAttention | None = None
        if cfg.is_linear:
            kwargs = dict(cfg.feature_map_kwargs)
            if cfg.attention == "cosformer":
                # cosFormer's re-weighting cos(pi i / 2M) should span the model's context, not 4096.
                kwargs.setdefault("max_length", cfg.max_seq_len)
            self.linear = LinearAttention(
                cfg.n_heads,
                cfg.head_dim,
                feature_map=cfg.attention,
                feature_map_kwargs=kwargs,
                tie_qk=cfg.tie_qk,
                causal=True,
                backend=cfg.backend,
            )

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).unbind(2)  # (B, T, H, D) each
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.cfg.rope_base, dtype=_compute_dtype(q))
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def weights(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[B, H, T, T]`` (float32) of this layer for input ``x`` (no cache)."""
        q, k, _ = self._qkv(x, positions)
        if self.linear is None:
            return softmax_attention_weights(q, k, causal=True)
        return self.linear.attention_weights(q, k, positions=self._map_positions(positions)).float()

    def _map_positions(self, positions: torch.Tensor) -> torch.Tensor | None:
        # Only cosFormer's features depend on position; passing None elsewhere keeps fused kernels on.
        return positions if self.cfg.attention == "cosformer" else None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | LinearAttentionState | None = None,
        use_cache: bool = False,
        want_aux: bool = False,
    ):
        b, t, _ = x.shape
        q, k, v = self._qkv(x, positions)
        aux = None
        if self.linear is None:
            if cache is not None:
                k = torch.cat([cache.k, k], dim=1)
                v = torch.cat([cache.v, v], dim=1)
            new_cache = KVCache(k, v) if use_cache else None
            # SDPA wants (B, H, T, D). With a cache and several new tokens the causal mask must be
            # offset by the cached length, so build it explicitly then.
            qh, kh, vh = (z.transpose(1, 2) for z in (q, k, v))
            if cache is None:
                o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
            else:
                past = k.shape[1] - t
                mask = torch.ones(t, k.shape[1], dtype=torch.bool, device=x.device).tril(past)
                o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
            o = o.transpose(1, 2)  # (B, T, H, D)
        else:
            res = self.linear(q, k, v, positions=self._map_positions(positions), state=cache, use_cache=use_cache)
            o, new_cache = res.o, res.state
            if want_aux:
                qd, kd = q.detach(), k.detach()
                fq, fk = self.linear.features(qd, kd, self._map_positions(positions))
                aux = attention_distillation_loss(qd, kd, fq, fk, causal=True)
        return self.out(o.reshape(b, t, -1)), new_cache, aux


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        hidden = cfg.mlp_ratio * cfg.d_model
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, positions, cache=None, use_cache=False, want_aux=False):
        a, new_cache, aux = self.attn(self.norm1(x), positions, cache, use_cache, want_aux)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x, new_cache, aux


class RotaryTransformer(nn.Module):
    """Decoder-only Transformer of :class:`TransformerConfig` (token ids in, next-token logits out)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        std = cfg.init_std if cfg.init_std is not None else math.sqrt(2.0 / (5.0 * cfg.d_model))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        # Scaled init of the residual projections (GPT-2) keeps the residual stream's variance flat.
        for name, p in self.named_parameters():
            if name.endswith("attn.out.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=std / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        cache: list | None = None,
        use_cache: bool = False,
        position_offset: int | None = None,
        return_aux: bool | None = None,
    ) -> TransformerOutput:
        """Logits for ``input_ids [B, T]``.

        Args:
            labels: ``[B, T]`` targets *aligned with the inputs* (``labels[:, t]`` is the token that
                should follow ``input_ids[:, t]``); ``-100`` = ignored. Give ``input_ids`` as labels
                for plain LM and shift them yourself: see :func:`lm_labels`.
            cache: per-layer state from an earlier call with ``use_cache=True`` (decoding).
            use_cache: return the per-layer state after these tokens.
            position_offset: position of ``input_ids[:, 0]`` = the tokens the cache has seen (default:
                0 without a cache, the softmax cache's length with one; a linear-attention state does
                not record its length, so a cache of only linear layers needs it). A value that
                disagrees with a softmax cache's length raises ``ValueError``.
            return_aux: compute the Eq. 3 term (default: when ``distill_weight > 0`` and training).
        """
        b, t = input_ids.shape
        if cache is not None and len(cache) != self.cfg.n_layers:
            raise ValueError(f"cache must have one entry per layer ({self.cfg.n_layers}), got {len(cache)}")
        position_offset = self._position_offset(cache, position_offset)
        if position_offset + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {position_offset + t} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        if return_aux is None:
            return_aux = self.cfg.distill_weight > 0 and self.training
        if return_aux and not self.cfg.is_linear:
            raise ValueError("return_aux needs a linear-attention model")
        positions = torch.arange(position_offset, position_offset + t, device=input_ids.device).expand(b, t)
        x = self.embed(input_ids)
        new_cache, auxes = [], []
        for i, block in enumerate(self.blocks):
            x, c, aux = block(x, positions, None if cache is None else cache[i], use_cache, return_aux)
            new_cache.append(c)
            if aux is not None:
                auxes.append(aux)
        logits = self.head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.to(_compute_dtype(logits)).flatten(0, 1), labels.flatten(), ignore_index=-100)
        aux_loss = None
        if auxes:
            aux_loss = self.cfg.distill_weight * torch.stack(auxes).mean()
        return TransformerOutput(logits, loss, aux_loss, new_cache if use_cache else None)

    @staticmethod
    def _position_offset(cache: list | None, given: int | None) -> int:
        """The position of the first new token: ``given``, checked against a softmax cache's length."""
        if cache is None:
            return 0 if given is None else int(given)
        seen = {c.k.shape[1] for c in cache if isinstance(c, KVCache)}
        if given is None:
            if not seen:
                raise ValueError(
                    "position_offset is needed with a cache of linear-attention states (they do not record "
                    "how many tokens they have seen): pass the number of tokens before input_ids"
                )
            return seen.pop()
        if seen and seen != {int(given)}:
            raise ValueError(f"position_offset={given} but the softmax cache holds {sorted(seen)} tokens")
        return int(given)

    @torch.no_grad()
    def attention_weights(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer attention weights ``[B, H, T, T]`` (float32) for ``input_ids [B, T]``."""
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        x = self.embed(input_ids)
        out = []
        for block in self.blocks:
            out.append(block.attn.weights(block.norm1(x), positions))
            x, _, _ = block(x, positions)
        return out


def lm_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token labels aligned with the inputs: ``labels[:, t] = input_ids[:, t + 1]``, last = -100."""
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    return labels
