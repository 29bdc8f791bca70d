"""Linear attention ops: one signature, one set of defaults, one masking rule for every backend.

Backends (all return ``(o, final_state)``):

* ``"reference"``: quadratic, materializes ``[B, H, T, T]`` weights (the test oracle).
* ``"chunked"``: O(T) chunked PyTorch, causal and bidirectional (default on CPU).
* ``"recurrent"``: token-by-token recurrence (Eq. 6), the decode path.
* ``"triton"``: fused GPU kernels (``ops/triton``); runs on the CPU under ``TRITON_INTERPRET=1``.
* ``"auto"``: ``"triton"`` on CUDA when Triton is installed, else ``"chunked"``.
"""

from __future__ import annotations

import torch

from ._validate import BACKENDS, as_bool_mask, as_state, check_linear_attention_inputs
from .chunked import DEFAULT_CHUNK_SIZE, linear_attention_chunked
from .recurrent import LinearAttentionState, linear_attention_recurrent, recurrent_step
from .reference import (
    linear_attention_reference,
    linear_attention_scores,
    linear_attention_weights,
    softmax_attention_reference,
    softmax_attention_weights,
    visibility_mask,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_EPS",
    "DEFAULT_CHUNK_SIZE",
    "LinearAttentionState",
    "linear_attention",
    "linear_attention_chunked",
    "linear_attention_recurrent",
    "linear_attention_reference",
    "linear_attention_scores",
    "linear_attention_weights",
    "recurrent_step",
    "resolve_backend",
    "softmax_attention_reference",
    "softmax_attention_weights",
    "triton_available",
    "visibility_mask",
]

# Features are non-negative, so the normalizer phi(q).sum(phi(k)) is >= 0. eps is added to it (in
# float32) only to turn 0/0 into 0 where a query sees no mass (padding, empty prefix); it is far
# below any real normalizer (one key with softmax features already gives ~1/F).
DEFAULT_EPS = 1e-6


def triton_available() -> bool:
    """True when the Triton backend can run here (CUDA, or ``TRITON_INTERPRET=1`` on the CPU)."""
    try:
        from . import triton as triton_ops
    except ImportError:
        return False
    return triton_ops.is_available()


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and triton_available():
        return "triton"
    return "chunked"


def linear_attention(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    eps: float = DEFAULT_EPS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """Normalized linear attention (Eq. 2) on precomputed non-negative features.

    Args:
        fq: ``[B, T, H, F]`` query features phi(q).
        fk: ``[B, T, Hk, F]`` key features phi(k); ``H % Hk == 0`` (GQA without repeating K/V).
        v: ``[B, T, Hk, Dv]`` values.
        causal: query ``t`` sees keys ``<= t`` (decoder) or all keys (encoder).
        attention_mask: ``[B, T]`` bool/0-1, 1 = token, 0 = padding. Padded keys leave numerator
            and normalizer; outputs at padded positions are 0.
        cu_seqlens: ``[N + 1]`` int cumulative lengths of ``N`` sequences packed along T (B = 1).
        initial_state: ``(S [N, Hk, F, Dv], z [N, Hk, F])`` float32 sums of earlier tokens.
        output_final_state: also return the state after the last token (float32).
        backend: one of :data:`BACKENDS`.
        eps: added to the normalizer (see :data:`DEFAULT_EPS`).
        chunk_size: chunk length of the ``"chunked"`` backend.

    Returns:
        ``o [B, T, H, Dv]`` in ``v.dtype`` and ``LinearAttentionState(S, z)`` or None.

    Example::

        fq, fk = phi_q(q), phi_k(k)                      # [B, T, H, F], [B, T, Hk, F]
        o, state = linear_attention(fq, fk, v, causal=True, output_final_state=True)
        o2, _ = linear_attention(fq2, fk2, v2, causal=True, initial_state=state)  # resume
    """
    check_linear_attention_inputs(fq, fk, v, attention_mask, cu_seqlens, initial_state, backend, eps)
    backend = resolve_backend(backend, fq.device)
    mask = as_bool_mask(attention_mask)
    state = as_state(initial_state)
    if backend == "triton":
        from .triton import linear_attention_triton

        return linear_attention_triton(
            fq,
            fk,
            v,
            causal=causal,
            attention_mask=mask,
            cu_seqlens=cu_seqlens,
            initial_state=state,
            output_final_state=output_final_state,
            eps=eps,
        )
    if backend == "reference":
        return linear_attention_reference(
            fq,
            fk,
            v,
            causal=causal,
            attention_mask=mask,
            cu_seqlens=cu_seqlens,
            initial_state=state,
            output_final_state=output_final_state,
            eps=eps,
        )

    def run(fq_, fk_, v_, mask_, state_):
        if backend == "chunked":
            return linear_attention_chunked(
                fq_,
                fk_,
                v_,
                causal=causal,
                attention_mask=mask_,
                initial_state=state_,
                output_final_state=output_final_state,
                eps=eps,
                chunk_size=chunk_size,
            )
        return linear_attention_recurrent(
            fq_,
            fk_,
            v_,
            causal=causal,
            attention_mask=mask_,
            initial_state=state_,
            output_final_state=output_final_state,
            eps=eps,
        )

    if cu_seqlens is None:
        return run(fq, fk, v, mask, state)
    # Packed variable-length input: run each sequence on its own (the PyTorch paths are O(T) either way).
    bounds = cu_seqlens.tolist()
    # state dtype of the backends: float64 for float64 inputs, else float32 (whatever initial_state's dtype)
    sd = torch.float64 if torch.float64 in (fq.dtype, fk.dtype, v.dtype) else torch.float32
    outs, finals = [], []
    for i, (a, e) in enumerate(zip(bounds, bounds[1:])):
        st = None if state is None else LinearAttentionState(state.S[i : i + 1], state.z[i : i + 1])
        if e == a:
            if output_final_state:
                hk, f, dv = fk.shape[2], fk.shape[3], v.shape[3]
                finals.append(st or LinearAttentionState.zeros(1, hk, f, dv, device=fq.device, dtype=sd))
            continue
        o_i, fin = run(fq[:, a:e], fk[:, a:e], v[:, a:e], None, st)
        outs.append(o_i)
        if output_final_state:
            finals.append(fin)
    o = torch.cat(outs, dim=1)
    final = None
    if output_final_state:
        final = LinearAttentionState(torch.cat([s.S.to(sd) for s in finals]), torch.cat([s.z.to(sd) for s in finals]))
    return o, final
