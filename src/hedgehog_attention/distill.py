"""Attention distillation (Eq. 3): train feature maps so linear attention weights match softmax's.

``L_i = - sum_j p_ij log w_ij`` with ``p = softmax(q k^T * scale)`` from the frozen teacher and
``w_ij = phi(q_i).phi(k_j) / sum_m phi(q_i).phi(k_m)``, averaged over valid (non-padded) queries.
The loss is evaluated in chunks of queries under activation checkpointing, so memory stays
``O(T * query_chunk_size)`` per head instead of ``O(T^2)``, in the forward and the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from .ops.reference import visibility_mask

__all__ = [
    "attention_distillation_loss",
    "attention_output_mse",
    "DistillHistory",
    "fit_attention_to_softmax",
]


def _chunk_ce(q_c, k, fq_c, fk, hide_c, eps: float, group: int, padded: bool):
    """CE summed over the queries of one chunk.

    Shapes: ``q_c [B, c, H, D]`` (times the softmax scale), ``k [B, T, Hk, D]``, ``fq_c [B, c, H, F]``,
    ``fk [B, T, Hk, F]`` (``q_c``, ``k``, ``fk`` in the compute dtype), ``hide_c [B or 1, c, T]``
    (True = key not visible).
    ``padded``: some query may see no key at all (its softmax row is NaN and is zeroed).
    """
    b, c, h, _ = q_c.shape
    hk = k.shape[2]
    cd = k.dtype
    qg = q_c.view(b, c, hk, group, -1)
    s = torch.einsum("bikgd,bjkd->bkgij", qg, k).reshape(b, h, c, -1)
    hide = hide_c[:, None]  # (B or 1, 1, c, T)
    p = torch.softmax(s.masked_fill(hide, float("-inf")), dim=-1)
    if padded:
        p = torch.nan_to_num(p, nan=0.0)  # padded queries: no keys, no loss
    fqg = fq_c.to(cd).view(b, c, hk, group, -1)
    a = torch.einsum("bikgf,bjkf->bkgij", fqg, fk).reshape(b, h, c, -1)
    a = a.masked_fill(hide, 0.0)
    den = a.sum(-1, keepdim=True)
    # a query whose visible scores are all 0 (ReLU-type maps) has no linear weights: count them as 0
    # (log eps each, as metrics.cross_entropy does), not as log(eps) - log(eps) = 0, a perfect fit
    log_den = torch.where(den > 0, torch.log(den.clamp_min(eps)), 0.0)
    log_w = torch.log(a.clamp_min(eps)) - log_den
    return -(p * log_w).sum()


def attention_distillation_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    query_chunk_size: int = 256,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Cross-entropy between softmax weights of ``(q, k)`` and linear weights of ``(fq, fk)`` (Eq. 3).

    Args:
        q: ``[B, T, H, D]`` teacher queries (treated as constants: detached).
        k: ``[B, T, Hk, D]`` teacher keys (detached).
        fq: ``[B, T, H, F]`` student query features (gradients flow here).
        fk: ``[B, T, Hk, F]`` student key features.
        causal: causal (decoder) or bidirectional (encoder) weights.
        attention_mask: ``[B, T]``, 1 = token; padded keys and queries are excluded.
        scale: softmax temperature, ``1/sqrt(D)`` by default (Eq. 1).
        query_chunk_size: queries per chunk (memory ``O(T * chunk)`` per head).
        eps: floor inside the logarithms (a ReLU map can give exactly-zero weights).

    Returns:
        Scalar: the mean over valid queries and heads of ``-sum_j p_ij log w_ij``.
    """
    if q.shape[:3] != fq.shape[:3] or k.shape[:3] != fk.shape[:3] or q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"expected q [B,T,H,D], k [B,T,Hk,D], fq [B,T,H,F], fk [B,T,Hk,F] with matching B,T,H; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, fq {tuple(fq.shape)}, fk {tuple(fk.shape)}"
        )
    if fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"fq and fk need one feature dim, got {fq.shape[-1]} and {fk.shape[-1]}")
    b, t, h, d = q.shape
    if h % k.shape[2]:
        raise ValueError(f"H={h} must be a multiple of Hk={k.shape[2]}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k = q.detach(), k.detach()
    cd = torch.float64 if fq.dtype == torch.float64 else torch.float32
    # Computed once per call, not per chunk (and again in each chunk's checkpointed recompute): the
    # keys in the compute dtype and the hidden-key mask. Without padding the mask is the same for
    # every sequence: [1, T, T], broadcast over the batch.
    # the temperature goes on q (B*T*H*D products, not B*H*T*T per chunk and again in its
    # recompute); exact for a power-of-two scale such as 1/sqrt(64), float rounding otherwise
    q_, k_, fk_ = q.to(cd) * scale, k.to(cd), fk.to(cd)
    padded = attention_mask is not None
    vis = visibility_mask(b if padded else 1, t, causal=causal, attention_mask=attention_mask, device=q.device)
    if padded:
        n_valid = vis.any(-1).sum().clamp_min(1) * h  # queries with at least one visible key, x heads
    else:
        n_valid = max(b * t * h, 1)  # every query sees itself (causal) or all keys: no reduction kernel
    hide = ~vis
    group = h // k.shape[2]
    total = fq.new_zeros((), dtype=cd)
    use_ckpt = torch.is_grad_enabled() and (fq.requires_grad or fk.requires_grad) and t > query_chunk_size
    for i0 in range(0, t, query_chunk_size):
        i1 = min(t, i0 + query_chunk_size)
        args = (q_[:, i0:i1], k_, fq[:, i0:i1], fk_, hide[:, i0:i1], eps, group, padded)
        if use_ckpt:
            total = total + checkpoint(_chunk_ce, *args, use_reentrant=False)
        else:
            total = total + _chunk_ce(*args)
    return total / n_valid


def attention_output_mse(
    o_student: torch.Tensor, o_teacher: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error between attention outputs ``[B, T, H, Dv]`` over valid tokens (LoLCATs' loss)."""
    if o_student.shape != o_teacher.shape:
        raise ValueError(f"shape mismatch: student {tuple(o_student.shape)} vs teacher {tuple(o_teacher.shape)}")
    diff = (o_student.float() - o_teacher.detach().float()).pow(2)
    if attention_mask is None:
        return diff.mean()
    m = attention_mask.to(diff.dtype)[:, :, None, None]
    return (diff * m).sum() / (m.sum() * diff.shape[2] * diff.shape[3]).clamp_min(1)


@dataclass
class DistillHistory:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)


def fit_attention_to_softmax(
    attention: torch.nn.Module,
    train_qk: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    eval_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
    eval_every: int = 50,
    query_chunk_size: int = 256,
    callback=None,
) -> DistillHistory:
    """Train a :class:`~hedgehog_attention.attention.LinearAttention`'s maps on fixed (q, k) pairs.

    The simplest distillation loop (App. C.2 defaults: AdamW, lr 1e-2, wd 0): cycles over
    ``train_qk`` batches of ``(q [B,T,H,D], k [B,T,Hk,D])`` for ``steps`` steps. Used by the demo and
    tests; model conversion uses :mod:`hedgehog_attention.convert`'s trainer.
    """
    params = [p for p in attention.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the attention module has no trainable feature-map parameters to distill")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    batches = list(train_qk)
    if not batches:
        raise ValueError("train_qk is empty")
    hist = DistillHistory()
    causal = attention.causal
    for step in range(1, steps + 1):
        q, k = batches[(step - 1) % len(batches)]
        fq, fk = attention.features(q, k)
        loss = attention_distillation_loss(q, k, fq, fk, causal=causal, query_chunk_size=query_chunk_size)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1 or step % eval_every == 0 or step == steps:
            hist.steps.append(step)
            hist.train_loss.append(loss.item())
            if eval_qk is not None:
                with torch.no_grad():
                    eq, ek = eval_qk
                    efq, efk = attention.features(eq, ek)
                    hist.eval_loss.append(attention_distillation_loss(eq, ek, efq, efk, causal=causal).item())
            if callback is not None:
                callback(step, hist)
    return hist
