"""Quadratic references: the ground truth every fast path is tested against.

They materialize ``[B, H, T, T]`` weights, so use them for tests, distillation on short
sequences and plots. No preconditions on T (any length, including 1).
"""

from __future__ import annotations

import math

import torch

from .recurrent import LinearAttentionState


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def visibility_mask(
    batch: int,
    seq_len: int,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Which key each query sees: bool ``[B, T_q, T_k]`` (the one masking rule of every backend).

    Query ``i`` sees key ``j`` when both belong to the same sequence (``cu_seqlens``), key ``j`` is
    not padding (``attention_mask``), and ``j <= i`` if causal. Padded queries see nothing.
    """
    idx = torch.arange(seq_len, device=device)
    vis = torch.ones(batch, seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        vis = vis & (idx[None, :, None] >= idx[None, None, :])
    if cu_seqlens is not None:
        seg = torch.bucketize(idx, cu_seqlens[1:].to(device), right=True)  # [T] sequence id per token
        vis = vis & (seg[None, :, None] == seg[None, None, :])
    if attention_mask is not None:
        m = attention_mask.to(device=device, dtype=torch.bool)
        vis = vis & m[:, None, :] & m[:, :, None]
    return vis


def _zero_padded(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``x [B, T, ...]`` with padded positions set to 0 by selection, not by ``* 0``: garbage there
    (NaN / inf) must reach neither the outputs, the state nor the gradients of real tokens."""
    if attention_mask is None:
        return x
    m = attention_mask.to(device=x.device, dtype=torch.bool).view(*attention_mask.shape, *([1] * (x.dim() - 2)))
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _group(fq: torch.Tensor, hk: int) -> torch.Tensor:
    b, t, h, f = fq.shape
    return fq.view(b, t, hk, h // hk, f)  # (B, T, Hk, G, F)


def linear_attention_scores(
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unnormalized ``phi(q_i) . phi(k_j)`` with invisible pairs set to 0: ``[B, H, T, T]``."""
    b, t, h, _ = fq.shape
    hk = fk.shape[2]
    cd = _compute_dtype(fq, fk)
    fq, fk = _zero_padded(fq.to(cd), attention_mask), _zero_padded(fk.to(cd), attention_mask)
    a = torch.einsum("bikgf,bjkf->bkgij", _group(fq, hk), fk).reshape(b, h, t, t)
    vis = visibility_mask(b, t, causal=causal, attention_mask=attention_mask, cu_seqlens=cu_seqlens, device=fq.device)
    return a.masked_fill(~vis[:, None], 0.0)


def linear_attention_weights(
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Normalized linear-attention weights ``[B, H, T, T]`` (rows of padded queries are 0).

    ``w_ij = phi(q_i).phi(k_j) / (sum_m phi(q_i).phi(k_m) + eps)`` in float32 (float64 for float64).
    """
    a = linear_attention_scores(fq, fk, causal=causal, attention_mask=attention_mask, cu_seqlens=cu_seqlens)
    den = a.sum(-1, keepdim=True) + eps
    if attention_mask is not None:  # padded rows: 0 / 1, not 0 / 0 when eps = 0
        den = den + (~attention_mask.to(device=a.device, dtype=torch.bool))[:, None, :, None].to(a.dtype)
    return a / den


def linear_attention_reference(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """Quadratic linear attention (Eq. 2): ``o_i = (sum_j a_ij v_j + phi(q_i) S0) / (sum_j a_ij + phi(q_i) z0 + eps)``.

    Shapes as in :func:`hedgehog_attention.ops.linear_attention`.
    """
    b, t, h, f = fq.shape
    hk, dv = fk.shape[2], v.shape[3]
    cd = _compute_dtype(fq, fk, v)
    a = linear_attention_scores(fq, fk, causal=causal, attention_mask=attention_mask, cu_seqlens=cu_seqlens)
    a = a.view(b, hk, h // hk, t, t)
    num = torch.einsum("bkgij,bjkd->bikgd", a, _zero_padded(v.to(cd), attention_mask))  # (B, T, Hk, G, Dv)
    den = a.sum(-1).permute(0, 3, 1, 2)  # (B, T, Hk, G)
    if initial_state is not None:
        s0, z0 = (x.to(cd) for x in initial_state)
        if cu_seqlens is not None:  # each token reads its own sequence's initial state
            seg = torch.bucketize(torch.arange(t, device=fq.device), cu_seqlens[1:].to(fq.device), right=True)
            s0 = s0[seg].unsqueeze(0)  # (1, T, Hk, F, Dv)
            z0 = z0[seg].unsqueeze(0)
        else:
            s0, z0 = s0.unsqueeze(1), z0.unsqueeze(1)  # (B, 1, Hk, F, Dv)
        fqg = _group(_zero_padded(fq.to(cd), attention_mask), hk)
        num = num + torch.einsum("btkgf,btkfd->btkgd", fqg, s0.expand(b, t, -1, -1, -1))
        den = den + torch.einsum("btkgf,btkf->btkg", fqg, z0.expand(b, t, -1, -1))
    den = den + eps
    if attention_mask is not None:  # padded queries: num / 1 then zeroed, not 0 / 0 when eps = 0
        den = den + (1 - attention_mask.to(cd))[:, :, None, None]
    o = num / den.unsqueeze(-1)
    if attention_mask is not None:
        o = o * attention_mask.to(cd)[:, :, None, None, None]
    o = o.reshape(b, t, h, dv).to(v.dtype)
    final = None
    if output_final_state:
        final = _final_state_reference(fk, v, attention_mask, cu_seqlens, initial_state, cd)
    return o, final


def _final_state_reference(fk, v, attention_mask, cu_seqlens, initial_state, cd) -> LinearAttentionState:
    fk_ = _zero_padded(fk.to(cd), attention_mask)
    v = _zero_padded(v.to(cd), attention_mask)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        s = torch.stack(
            [torch.einsum("tkf,tkd->kfd", fk_[0, a:e], v[0, a:e].to(cd)) for a, e in zip(bounds, bounds[1:])]
        )
        z = torch.stack([fk_[0, a:e].sum(0) for a, e in zip(bounds, bounds[1:])])
    else:
        s = torch.einsum("btkf,btkd->bkfd", fk_, v.to(cd))
        z = fk_.sum(1)
    if initial_state is not None:
        s, z = s + initial_state[0].to(cd), z + initial_state[1].to(cd)
    return LinearAttentionState(s, z)


def softmax_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax weights of Eq. 1, ``softmax(q.k * scale)`` with scale ``1/sqrt(D)`` by default.

    ``q: [B, T, H, D]``, ``k: [B, T, Hk, D]`` -> ``[B, H, T, T]`` in float32 (float64 for float64).
    Rows of padded queries are 0.
    """
    b, t, h, d = q.shape
    hk = k.shape[2]
    cd = _compute_dtype(q, k)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k = _zero_padded(q.to(cd), attention_mask), _zero_padded(k.to(cd), attention_mask)
    s = torch.einsum("bikgd,bjkd->bkgij", _group(q, hk), k).reshape(b, h, t, t) * scale
    vis = visibility_mask(b, t, causal=causal, attention_mask=attention_mask, cu_seqlens=cu_seqlens, device=q.device)[
        :, None
    ]
    # Rows with no visible key (padded queries) -> 0, chosen by the mask: nan_to_num also zeroed rows
    # made NaN by NaN / inf in real inputs, hiding them.
    seen = vis.any(-1, keepdim=True)
    s = s.masked_fill(~vis, float("-inf")).masked_fill(~seen, 0.0)
    return torch.softmax(s, dim=-1).masked_fill(~seen, 0.0)


def softmax_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention (Eq. 1) with the same layout and masking rule: ``o: [B, T, H, Dv]``."""
    b, t, h, _ = q.shape
    hk = k.shape[2]
    w = softmax_attention_weights(
        q, k, causal=causal, attention_mask=attention_mask, cu_seqlens=cu_seqlens, scale=scale
    )
    v_ = _zero_padded(v.to(w.dtype), attention_mask)  # padding's NaN / inf must not reach real outputs
    o = torch.einsum("bkgij,bjkd->bikgd", w.view(b, hk, h // hk, t, t), v_)
    return o.reshape(b, t, h, v.shape[3]).to(v.dtype)
