"""Recurrent form of linear attention (Eq. 6): O(1) memory per step, state ``(S, z)`` in float32.

``S_t = S_{t-1} + phi(k_t) v_t^T``, ``z_t = z_{t-1} + phi(k_t)``,
``y_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LinearAttentionState(NamedTuple):
    """Decode state per sequence and KV head. ``S: [N, Hk, F, Dv]``, ``z: [N, Hk, F]``, float32."""

    S: torch.Tensor
    z: torch.Tensor

    @classmethod
    def zeros(
        cls,
        batch: int,
        num_kv_heads: int,
        feature_dim: int,
        value_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> LinearAttentionState:
        return cls(
            torch.zeros(batch, num_kv_heads, feature_dim, value_dim, device=device, dtype=dtype),
            torch.zeros(batch, num_kv_heads, feature_dim, device=device, dtype=dtype),
        )

    def detach(self) -> LinearAttentionState:
        return LinearAttentionState(self.S.detach(), self.z.detach())

    def index_select(self, index: torch.Tensor) -> LinearAttentionState:
        """Rows ``index`` (beam search / batch reordering)."""
        return LinearAttentionState(self.S.index_select(0, index), self.z.index_select(0, index))


def _state_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def recurrent_step(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    state: LinearAttentionState | None,
    *,
    eps: float,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """One decode step for a batch (Eq. 6); returns a new state (no in-place update).

    Args:
        fq: ``[B, H, F]`` query features of the new token.
        fk: ``[B, Hk, F]`` key features, ``v``: ``[B, Hk, Dv]``.
        state: previous ``(S [B, Hk, F, Dv], z [B, Hk, F])`` or None (zeros).
        key_mask: ``[B]`` bool, False = this token is padding (state unchanged, output 0).

    Returns:
        ``o: [B, H, Dv]`` in ``v.dtype`` and the updated state (float32, or float64 for float64 input).
    """
    b, h, f = fq.shape
    hk, dv = fk.shape[1], v.shape[-1]
    sd = _state_dtype(fq, fk, v)
    if state is None:
        state = LinearAttentionState.zeros(b, hk, f, dv, device=fq.device, dtype=sd)
    fq_, fk_, v_ = fq.to(sd), fk.to(sd), v.to(sd)
    if key_mask is not None:  # selected away, not multiplied by 0: NaN / inf in padding must not leak
        m = key_mask.to(torch.bool)[:, None, None]
        zero = torch.zeros((), dtype=sd, device=fq.device)
        fq_, fk_, v_ = (torch.where(m, x, zero) for x in (fq_, fk_, v_))
    s = state.S.to(sd) + fk_.unsqueeze(-1) * v_.unsqueeze(-2)
    z = state.z.to(sd) + fk_
    fq_ = fq_.view(b, hk, h // hk, f)  # (B, Hk, G, F): query heads grouped by their KV head
    num = torch.einsum("bkgf,bkfd->bkgd", fq_, s)
    den = torch.einsum("bkgf,bkf->bkg", fq_, z) + eps
    if key_mask is not None:  # padded tokens divide by 1 (output zeroed below), not 0 / 0 when eps = 0
        den = den + (~key_mask.to(torch.bool)).to(sd)[:, None, None]
    o = (num / den.unsqueeze(-1)).reshape(b, h, dv)
    if key_mask is not None:
        o = o * key_mask.to(o.dtype)[:, None, None]
    return o.to(v.dtype), LinearAttentionState(s, z)


def linear_attention_recurrent(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    initial_state: LinearAttentionState | None = None,
    output_final_state: bool = False,
    eps: float,
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """Token-by-token loop over ``[B, T, ...]`` (the decode path, used as a test rung).

    ``cu_seqlens`` is handled by the dispatcher (one call per sequence). Bidirectional attention
    first accumulates the whole sequence's state, then reads it out for every query.
    """
    b, t_len, h, _ = fq.shape
    state = initial_state
    outs = []
    if causal:
        for t in range(t_len):
            km = attention_mask[:, t] if attention_mask is not None else None
            o_t, state = recurrent_step(fq[:, t], fk[:, t], v[:, t], state, eps=eps, key_mask=km)
            outs.append(o_t)
        o = torch.stack(outs, dim=1) if outs else v.new_zeros(b, 0, h, v.shape[-1])
    else:
        zero_q = torch.zeros_like(fq[:, 0])
        for t in range(t_len):
            km = attention_mask[:, t] if attention_mask is not None else None
            _, state = recurrent_step(zero_q, fk[:, t], v[:, t], state, eps=eps, key_mask=km)
        if state is None:
            state = LinearAttentionState.zeros(
                b, fk.shape[2], fk.shape[3], v.shape[3], device=fq.device, dtype=_state_dtype(fq, fk, v)
            )
        sd = state.S.dtype
        fq_ = fq.to(sd)
        if attention_mask is not None:  # padded queries: garbage (NaN / inf) must not reach o or grads
            keep = attention_mask.to(torch.bool)[:, :, None, None]
            fq_ = torch.where(keep, fq_, torch.zeros((), dtype=sd, device=fq.device))
        fq_ = fq_.view(b, t_len, fk.shape[2], h // fk.shape[2], -1)
        num = torch.einsum("btkgf,bkfd->btkgd", fq_, state.S)
        den = torch.einsum("btkgf,bkf->btkg", fq_, state.z) + eps
        if attention_mask is not None:  # padded queries: num / 1 then zeroed, not 0 / 0 when eps = 0
            den = den + (1 - attention_mask.to(sd))[:, :, None, None]
        o = (num / den.unsqueeze(-1)).reshape(b, t_len, h, -1)
        if attention_mask is not None:
            o = o * attention_mask.to(o.dtype)[:, :, None, None]
        o = o.to(v.dtype)
    return o, (state if output_final_state else None)
