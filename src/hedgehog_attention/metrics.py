"""Attention diagnostics: entropy ("spikiness"), monotonicity over q.k, fidelity to softmax.

All functions take normalized weights ``[B, H, Tq, Tk]`` whose rows sum to 1 over the visible keys
(padded query rows are all-zero and are skipped), plus an optional ``visible [B, Tq, Tk]`` mask.
"""

from __future__ import annotations

import math

import torch

from .ops.reference import linear_attention_weights, softmax_attention_weights, visibility_mask

__all__ = [
    "attention_entropy",
    "cross_entropy",
    "kl_divergence",
    "monotonicity",
    "attention_fidelity",
    "perplexity",
]


def perplexity(mean_nll: float) -> float:
    """``exp(mean_nll)``; ``inf`` past float range (``math.exp`` raises OverflowError above ~709.78,
    which a diverged or untrained model's loss can reach), NaN stays NaN."""
    mean_nll = float(mean_nll)
    return math.inf if mean_nll > 709.0 else math.exp(mean_nll)


def _valid_rows(weights: torch.Tensor) -> torch.Tensor:
    return weights.sum(-1) > 0  # [B, H, Tq]


def attention_entropy(weights: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean entropy ``-sum_j w_ij log w_ij`` per head over valid query rows: ``[H]`` (nats)."""
    w = weights.double()
    ent = -(w * torch.log(w.clamp_min(eps))).sum(-1)  # [B, H, Tq]
    valid = _valid_rows(weights)
    return (ent * valid).sum((0, 2)) / valid.sum((0, 2)).clamp_min(1)


def cross_entropy(p: torch.Tensor, w: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean ``-sum_j p_ij log w_ij`` per head over valid rows of ``p``: ``[H]``."""
    ce = -(p.double() * torch.log(w.double().clamp_min(eps))).sum(-1)
    valid = _valid_rows(p)
    return (ce * valid).sum((0, 2)) / valid.sum((0, 2)).clamp_min(1)


def kl_divergence(p: torch.Tensor, w: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean ``KL(p || w)`` per head (``p`` the softmax teacher): ``CE(p, w) - H(p)``, ``[H]``."""
    return cross_entropy(p, w, eps) - attention_entropy(p, eps)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """0-based ranks along the last dim; tied values share their mean rank (Spearman's convention)."""
    x = x.contiguous()
    s = x.sort(-1).values
    below = torch.searchsorted(s, x)  # values < x
    upto = torch.searchsorted(s, x, right=True)  # values <= x
    return (below + upto - 1).double() / 2


def monotonicity(dots: torch.Tensor, weights: torch.Tensor, visible: torch.Tensor, min_keys: int = 3) -> torch.Tensor:
    """Spearman rank correlation between ``q.k`` and the attention weight, per query, averaged per head.

    Args:
        dots: ``[B, H, Tq, Tk]`` raw dot products ``q_i . k_j``.
        weights: ``[B, H, Tq, Tk]`` attention weights.
        visible: ``[B, Tq, Tk]`` bool, which keys each query sees.
        min_keys: rows with fewer visible keys are skipped (a rank correlation needs a few points).

    Returns ``[H]``; 1.0 means the weights are a monotone increasing function of q.k (softmax).
    Tied values share their mean rank (a row of all-equal weights scores 0).
    Invisible keys get the lowest ranks in both orders, which shifts the visible ranks equally
    and leaves the correlation over the visible keys unchanged.
    """
    vis = visible[:, None].expand_as(dots)
    low = torch.finfo(torch.float64).min
    rd = _ranks(dots.double().masked_fill(~vis, low))
    rw = _ranks(weights.double().masked_fill(~vis, low))
    n = vis.sum(-1, keepdim=True).double()
    md = (rd * vis).sum(-1, keepdim=True) / n.clamp_min(1)
    mw = (rw * vis).sum(-1, keepdim=True) / n.clamp_min(1)
    cd, cw = (rd - md) * vis, (rw - mw) * vis
    corr = (cd * cw).sum(-1) / ((cd.pow(2).sum(-1) * cw.pow(2).sum(-1)).sqrt().clamp_min(1e-12))
    valid = n.squeeze(-1) >= min_keys
    return (corr * valid).sum((0, 2)) / valid.sum((0, 2)).clamp_min(1)


@torch.no_grad()
def attention_fidelity(
    q: torch.Tensor,
    k: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """All diagnostics of one attention layer at once, per head ``[H]``.

    Keys: ``ce`` (Eq. 3), ``kl`` (to softmax), ``entropy_softmax``, ``entropy_linear``,
    ``monotonicity_softmax`` (~1 by construction), ``monotonicity_linear``, ``uniform_entropy`` (the
    mean entropy of uniform weights over the keys each query sees: ``log T`` bidirectional, the mean
    of ``log(i)`` causal, less with padding).
    """
    b, t, h, d = q.shape
    p = softmax_attention_weights(q, k, causal=causal, attention_mask=attention_mask, scale=scale)
    w = linear_attention_weights(fq, fk, causal=causal, attention_mask=attention_mask, eps=0.0)
    w = torch.nan_to_num(w, nan=0.0)
    hk = k.shape[2]
    dots = torch.einsum("bikgd,bjkd->bkgij", q.double().view(b, t, hk, h // hk, d), k.double()).reshape(b, h, t, t)
    vis = visibility_mask(b, t, causal=causal, attention_mask=attention_mask, device=q.device)
    ce = cross_entropy(p, w)
    ent_p = attention_entropy(p)
    uniform = (vis.double() / vis.sum(-1, keepdim=True).clamp_min(1))[:, None]  # [B, 1, T, T]
    return {
        "ce": ce,
        "kl": ce - ent_p,
        "entropy_softmax": ent_p,
        "entropy_linear": attention_entropy(w),
        "monotonicity_softmax": monotonicity(dots, p, vis),
        "monotonicity_linear": monotonicity(dots, w, vis),
        # the reference point of "spikiness": uniform weights over the keys each query sees
        "uniform_entropy": attention_entropy(uniform).expand(h),
    }
