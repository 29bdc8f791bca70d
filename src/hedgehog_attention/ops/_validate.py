"""Input checks shared by every linear-attention backend (raised in the public wrapper)."""

from __future__ import annotations

import torch

from .recurrent import LinearAttentionState

BACKENDS = ("auto", "reference", "chunked", "recurrent", "triton")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_linear_attention_inputs(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None,
    backend: str,
    eps: float,
) -> None:
    """Raise ``ValueError``/``TypeError`` naming what was expected and what came."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    for name, t in (("fq", fq), ("fk", fk), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, T, H, D] (4 dims), got shape {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point (float16/bfloat16/float32/float64), got {t.dtype}")
        if t.device != fq.device:
            raise ValueError(f"all inputs must be on one device: fq is on {fq.device}, {name} on {t.device}")
    b, t_len, h, f = fq.shape
    if t_len < 1 or b < 1:
        raise ValueError(f"expected at least one batch row and one token, got fq of shape {_shape(fq)}")
    if fk.shape[:2] != (b, t_len) or v.shape[:2] != (b, t_len):
        raise ValueError(f"fq, fk, v must agree on [B, T]: got fq {_shape(fq)}, fk {_shape(fk)}, v {_shape(v)}")
    if fk.shape[3] != f:
        raise ValueError(f"fq and fk must have the same feature dim F: got fq F={f}, fk F={fk.shape[3]}")
    hk = fk.shape[2]
    if v.shape[2] != hk:
        raise ValueError(f"fk and v must have the same number of KV heads: got fk {hk}, v {v.shape[2]}")
    if h % hk != 0:
        raise ValueError(f"query heads H={h} must be a multiple of KV heads Hk={hk} (grouped-query attention)")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if attention_mask is not None and cu_seqlens is not None:
        raise ValueError("pass either attention_mask (padded batch) or cu_seqlens (packed), not both")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if attention_mask.shape != (b, t_len):
            raise ValueError(
                f"attention_mask must have shape [B, T] = {(b, t_len)} (1 = token, 0 = padding), "
                f"got {_shape(attention_mask)}"
            )
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(f"attention_mask must be bool or integer 0/1, got {attention_mask.dtype}")
    n_seq = b
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
            raise ValueError("cu_seqlens must be a 1-D integer tensor [N + 1] of cumulative lengths")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if b != 1:
            raise ValueError(f"with cu_seqlens the sequences are packed along T and B must be 1, got B={b}")
        cu = cu_seqlens.tolist()
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != t_len or any(x > y for x, y in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={t_len}, got {cu}")
        n_seq = len(cu) - 1
    if initial_state is not None:
        if not (isinstance(initial_state, tuple) and len(initial_state) == 2):
            raise TypeError("initial_state must be a tuple (S [N, Hk, F, Dv], z [N, Hk, F])")
        s, z = initial_state
        want_s, want_z = (n_seq, hk, f, v.shape[3]), (n_seq, hk, f)
        if _shape(s) != want_s or _shape(z) != want_z:
            raise ValueError(
                f"initial_state must be S {want_s} and z {want_z} (N sequences, KV heads, features, "
                f"value dim), got S {_shape(s)} and z {_shape(z)}"
            )


def as_bool_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if attention_mask is None else attention_mask.to(torch.bool)


def as_state(state) -> LinearAttentionState | None:
    return None if state is None else LinearAttentionState(*state)
