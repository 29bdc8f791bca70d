"""Fused Triton kernels for Hedgehog linear attention (backend ``"triton"``).

Public entry points (all follow ``docs/architecture.md``: ``[B, T, H, D]`` layout, ``(o, final_state)``
returns, fp32 state ``(S [N, Hk, F', Dv], z [N, Hk, F'])``, the one masking rule):

* :func:`linear_attention_triton` -- chunked linear attention on precomputed features (the
  generic path, any feature map).
* :func:`fused_hedgehog_attention` -- the Hedgehog map (``softmax``/``exp``, negation) fused in
  the kernel: raw ``q, k`` plus per-head ``W [H, D, F]``, ``b [H, F]``; ``phi(q)``, ``phi(k)`` never
  reach global memory; the backward recomputes them and returns dq, dk, dv, dW, db.
* :func:`fused_hedgehog_decode_step` -- one token per sequence, state updated in place.

Both attention functions go through ``torch.library.custom_op`` ops with registered autograd
(``hedgehog_attention::triton_la_fwd`` / ``triton_la_bwd_q`` / ``triton_la_bwd_kv``), so ``torch.compile`` traces them
as opaque calls. Design, byte/FLOP counts and measured speed: ``docs/kernels.md``.
"""

from __future__ import annotations

import os

import torch

from ..recurrent import LinearAttentionState

__all__ = [
    "fused_hedgehog_attention",
    "fused_hedgehog_decode_step",
    "is_available",
    "linear_attention_triton",
]

_ACTIVATIONS = ("softmax", "exp")


def is_available() -> bool:
    """True when triton imports and there is a CUDA device or ``TRITON_INTERPRET=1`` is set."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _lm():
    from . import _launch as L

    return L


Tensor = torch.Tensor


def _ft(q: Tensor, wq: Tensor | None, negation: bool, fused: bool) -> int:
    if fused:
        return wq.shape[2] * (2 if negation else 1)
    return q.shape[-1]


@torch.library.custom_op("hedgehog_attention::triton_la_fwd", mutates_args=())
def _la_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    wq: Tensor | None,
    bq: Tensor | None,
    wk: Tensor | None,
    bk: Tensor | None,
    mask: Tensor | None,
    cu: Tensor,
    s0: Tensor | None,
    z0: Tensor | None,
    activation: str,
    negation: bool,
    causal: bool,
    eps: float,
    fused: bool,
    max_len: int,
    nc: int,
    varlen: bool,
    train: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _fwd_impl(q, k, v, wq, bq, wk, bk, mask, cu, s0, z0, activation, negation, causal, eps, fused, max_len, nc,
                     varlen, train)  # fmt: skip


def _fwd_impl(q, k, v, wq, bq, wk, bk, mask, cu, s0, z0, activation, negation, causal, eps, fused, max_len, nc, varlen,
              train):  # fmt: skip
    """The forward op's body: ``(o, den, h, hz, s_in, z_in, s_fin, z_fin)`` from the launcher."""
    return tuple(
        _lm().fwd(
            q, k, v, wq, bq, wk, bk, mask, cu, s0, z0,
            activation=activation, negation=negation, causal=causal, eps=eps, fused=fused, max_len=max_len, nc=nc,
            varlen=varlen, train=train,
        )
    )  # fmt: skip


@_la_fwd.register_fake
def _(q, k, v, wq, bq, wk, bk, mask, cu, s0, z0, activation, negation, causal, eps, fused, max_len, nc, varlen,
      train):  # fmt: skip
    L = _lm()
    B, T, H, _ = q.shape
    HK, DV = k.shape[2], v.shape[3]
    N = cu.shape[0] - 1
    FT = _ft(q, wq, negation, fused)
    bv = L._block(DV, q.device, L.CONFIG["state_bv"])
    F = wq.shape[2] if fused else q.shape[3]
    f32, hdt = torch.float32, L.state_dtype(v.dtype)
    D = wq.shape[1] if fused else q.shape[3]
    tma = L.tma_applies(q.device, v.dtype, D, F, DV, H, HK, bool(varlen))
    kw = dict(train=train, n_seq=N, H=H, max_len=max_len, init=s0 is not None, tma=tma)
    if L.uses_fused_chunk(causal, F, DV, v.dtype, **kw):  # as _launch._fc_fwd
        ns = L.segments(N, H, max_len, 1, L.fc_chunk_size(F, v.dtype, max_len), cap=int(L.CONFIG["fc_programs"]))[1]
        store_h = L.fc_stores_h(causal, F, DV, v.dtype, **kw)
        seg = (ns > 1 or s0 is not None) and not store_h
        return (
            q.new_empty(B, T, H, DV, dtype=v.dtype),
            q.new_empty(B * T, H, dtype=f32),
            q.new_empty(nc, HK, FT, DV, dtype=hdt) if store_h else q.new_empty(0, dtype=hdt),
            q.new_empty(nc, HK, FT, dtype=f32) if store_h else q.new_empty(0, dtype=f32),
            q.new_empty(N, HK, ns, FT, DV, dtype=f32) if seg else q.new_empty(0, dtype=f32),
            q.new_empty(N, HK, ns, FT, dtype=f32) if seg else q.new_empty(0, dtype=f32),
            q.new_empty(N, HK, FT, DV, dtype=f32),
            q.new_empty(N, HK, FT, dtype=f32),
        )
    bt = L.chunk_size(F, v.dtype, max_len)
    nj = 2 if (negation and fused and int(L.CONFIG["walk_halves"]) != 2) else 1  # walk programs per value block
    cap = L.tile_knob("min_programs", F, v.dtype, max_len)
    ns = L.segments(N, HK, max_len, nj * -(-DV // bv), bt, cap=cap)[1] if causal else 1
    seg = not causal or (ns > 1 and not L.CONFIG["seg_fold"])  # segment states returned (saved)
    return (
        q.new_empty(B, T, H, DV, dtype=v.dtype),
        q.new_empty(B * T, H, dtype=f32),
        q.new_empty(nc, HK, FT, DV, dtype=hdt) if causal else q.new_empty(0, dtype=hdt),
        q.new_empty(nc, HK, FT, dtype=f32) if causal else q.new_empty(0, dtype=f32),
        q.new_empty(N, HK, ns, FT, DV, dtype=f32) if seg else q.new_empty(0, dtype=f32),
        q.new_empty(N, HK, ns, FT, dtype=f32) if seg else q.new_empty(0, dtype=f32),
        q.new_empty(N, HK, FT, DV, dtype=f32),
        q.new_empty(N, HK, FT, dtype=f32),
    )


def _map_grad_like(t: Tensor | None, fused: bool, q: Tensor) -> Tensor:
    """Fake (meta) gradient of a map weight/bias: its shape when the map is fused and present, else empty."""
    return torch.empty_like(t) if (fused and t is not None) else q.new_empty(0)


@torch.library.custom_op("hedgehog_attention::triton_la_bwd_q", mutates_args=())
def _la_bwd_q(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    wq: Tensor | None,
    bq: Tensor | None,
    wk: Tensor | None,
    bk: Tensor | None,
    mask: Tensor | None,
    cu: Tensor,
    o: Tensor,
    den: Tensor,
    h: Tensor,
    hz: Tensor,
    s_in: Tensor,
    z_in: Tensor,
    activation: str,
    negation: bool,
    causal: bool,
    fused: bool,
    max_len: int,
    nc: int,
    varlen: bool,
) -> list[Tensor]:
    """Query side of the backward: ``[dq, dwq, dbq, cd]`` (empty tensors where n/a)."""
    return _bwd_q_impl(do, q, k, v, wq, bq, wk, bk, mask, cu, o, den, h, hz, s_in, z_in, activation, negation, causal,
                       fused, max_len, nc, varlen)  # fmt: skip


def _bwd_q_impl(do, q, k, v, wq, bq, wk, bk, mask, cu, o, den, h, hz, s_in, z_in, activation, negation, causal, fused,
                max_len, nc, varlen):  # fmt: skip
    g = _lm().bwd_q(
        do, q, k, v, wq, bq, wk, bk, mask, cu, o, den, h, hz, s_in, z_in,
        activation=activation, negation=negation, causal=causal, fused=fused, max_len=max_len, nc=nc, varlen=varlen,
    )  # fmt: skip
    # custom ops cannot return None: absent gradients travel as empty tensors
    return [x if x is not None else q.new_empty(0) for x in g]


@_la_bwd_q.register_fake
def _(do, q, k, v, wq, bq, wk, bk, mask, cu, o, den, h, hz, s_in, z_in, activation, negation, causal, fused, max_len,
      nc, varlen):  # fmt: skip
    return [torch.empty_like(q), _map_grad_like(wq, fused, q), _map_grad_like(bq, fused, q), torch.empty_like(den)]


@torch.library.custom_op("hedgehog_attention::triton_la_bwd_kv", mutates_args=())
def _la_bwd_kv(
    do: Tensor,
    ds_fin: Tensor | None,
    dz_fin: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    wq: Tensor | None,
    bq: Tensor | None,
    wk: Tensor | None,
    bk: Tensor | None,
    mask: Tensor | None,
    cu: Tensor,
    den: Tensor,
    cd: Tensor,
    s_in: Tensor,
    activation: str,
    negation: bool,
    causal: bool,
    fused: bool,
    max_len: int,
    nc: int,
    varlen: bool,
    need_ds0: bool,
) -> list[Tensor]:
    """Key side of the backward: ``[dk, dv, dwk, dbk, ds0, dz0]`` (empty tensors where n/a)."""
    return _bwd_kv_impl(do, ds_fin, dz_fin, q, k, v, wq, bq, wk, bk, mask, cu, den, cd, s_in, activation, negation,
                        causal, fused, max_len, nc, varlen, need_ds0)  # fmt: skip


def _bwd_kv_impl(do, ds_fin, dz_fin, q, k, v, wq, bq, wk, bk, mask, cu, den, cd, s_in, activation, negation, causal,
                 fused, max_len, nc, varlen, need_ds0):  # fmt: skip
    g = _lm().bwd_kv(
        do, ds_fin, dz_fin, q, k, v, wq, bq, wk, bk, mask, cu, den, cd, s_in,
        activation=activation, negation=negation, causal=causal, fused=fused, max_len=max_len, nc=nc,
        varlen=varlen, need_ds0=need_ds0,
    )  # fmt: skip
    return [x if x is not None else q.new_empty(0) for x in g]


@_la_bwd_kv.register_fake
def _(do, ds_fin, dz_fin, q, k, v, wq, bq, wk, bk, mask, cu, den, cd, s_in, activation, negation, causal, fused,
      max_len, nc, varlen, need_ds0):  # fmt: skip
    N, HK = cu.shape[0] - 1, k.shape[2]
    FT, DV = _ft(q, wq, negation, fused), v.shape[3]

    return [
        torch.empty_like(k),
        torch.empty_like(v),
        _map_grad_like(wk, fused, q),
        _map_grad_like(bk, fused, q),
        q.new_empty(N, HK, FT, DV, dtype=torch.float32) if need_ds0 else q.new_empty(0),
        q.new_empty(N, HK, FT, dtype=torch.float32) if need_ds0 else q.new_empty(0),
    ]


def _plain(t: Tensor) -> bool:
    """An eager, plain tensor (not a fake / functional tensor of a torch.compile trace)."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def _setup_context(ctx, inputs, output):
    q, k, v, wq, bq, wk, bk, mask, cu, s0, z0, activation, negation, causal, eps, fused, max_len, nc, varlen, _ = inputs
    o, den, h, hz, s_in, z_in, _, _ = output
    ctx.h = None
    if causal and s0 is None:
        # The chunk states are needed by the query side of the backward only. Eager: held on
        # ctx (not saved), handed to the query side and dropped before the key side allocates
        # its states (peak memory); a second backward (retain_graph) recomputes them, as does
        # CONFIG["recompute_h"] (never held). Under torch.compile they are saved as usual.
        if _lm().CONFIG["recompute_h"]:
            h, hz = h.new_empty(0), hz.new_empty(0)
        elif _plain(h):
            ctx.h = [h, hz]
            h, hz = h.new_empty(0), hz.new_empty(0)
    ctx.save_for_backward(q, k, v, wq, bq, wk, bk, mask, cu, o, den, h, hz, s_in, z_in)
    ctx.args = (activation, negation, causal, fused, max_len, nc, varlen)
    ctx.need_ds0 = s0 is not None and (ctx.needs_input_grad[9] or ctx.needs_input_grad[10])
    # outputs the loss does not use (the final state, usually) give None, not zeros: the reverse
    # walk then starts from nothing and the fold skips its last segment
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(den, output[2], output[3], s_in, z_in)


def _backward(ctx, do, _dden, _dh, _dhz, _ds_in, _dz_in, ds_fin, dz_fin):
    q, k, v, wq, bq, wk, bk, mask, cu, o, den, h, hz, s_in, z_in = ctx.saved_tensors
    activation, negation, causal, fused, max_len, nc, varlen = ctx.args
    if ctx.h is not None:  # held chunk states: taken (a later backward recomputes them)
        (h, hz), ctx.h = ctx.h, None
    if do is None:
        do = torch.zeros_like(o)
    a = (activation, negation, causal, fused, max_len, nc, varlen)
    # eager: the launchers directly (the custom ops' dispatch is host time; docs/kernels.md "Small
    # batches"); traced by torch.compile: the custom ops, opaque to the trace
    eager = _plain(o)
    gq = (_bwd_q_impl if eager else _la_bwd_q)(do, q, k, v, wq, bq, wk, bk, mask, cu, o, den, h, hz, s_in, z_in, *a)
    del h, hz  # the last references: the chunk states are freed before the key side runs
    gkv = (_bwd_kv_impl if eager else _la_bwd_kv)(do, ds_fin, dz_fin, q, k, v, wq, bq, wk, bk, mask, cu, den, gq[3],
                                                  s_in, *a, ctx.need_ds0)  # fmt: skip
    dq, dwq, dbq = (x if x.numel() or x.dim() != 1 else None for x in gq[:3])
    dk, dv, dwk, dbk, ds0, dz0 = (x if x.numel() or x.dim() != 1 else None for x in gkv)
    if not fused:
        dwq = dbq = dwk = dbk = None
    if bq is None:
        dbq = None
    if bk is None:
        dbk = None
    if not ctx.need_ds0:
        ds0 = dz0 = None
    return dq, dk, dv, dwq, dbq, dwk, dbk, None, None, ds0, dz0, None, None, None, None, None, None, None, None, None


_la_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerForward(torch.autograd.Function):
    """The forward op's autograd without the custom-op dispatch, for eager calls: the same body,
    context and backward (``_setup_context``, ``_backward``). Session 9 (CPU, launches stubbed):
    the custom ops and their autograd wrapper were most of the host time of a small call outside
    the launchers; torch.compile still traces the custom op (:func:`_la_apply`)."""

    @staticmethod
    def forward(*args):
        return _fwd_impl(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def _la_apply(*args):
    """The forward op for ``args`` (as :func:`_la_fwd`'s): the custom op under torch.compile, the
    same function and autograd through :class:`_EagerForward` in eager mode."""
    if torch.compiler.is_compiling():
        return _la_fwd(*args)
    return _EagerForward.apply(*args)


def _check_device(t: Tensor) -> None:
    """The kernels run on CUDA tensors, or on the CPU under the interpreter (``TRITON_INTERPRET=1``,
    set before triton is imported): anything else gets a clear error instead of triton's own
    ("0 active drivers", or a CPU pointer handed to a GPU kernel)."""
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {t.device}); on the CPU set TRITON_INTERPRET=1 before "
            "importing triton, or use another backend (linear_attention(..., backend='chunked'))"
        )


def _check_common(q, k, v, attention_mask, cu_seqlens, initial_state):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected q, k, v of shape [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    _check_device(q)
    B, T, H, _ = q.shape
    if k.shape[:2] != (B, T) or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"q, k, v must share B, T (and k, v the KV heads); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    HK = k.shape[2]
    if H % HK != 0:
        raise ValueError(f"query heads must be a multiple of KV heads; got H={H}, Hk={HK}")
    if attention_mask is not None and cu_seqlens is not None:
        raise ValueError("attention_mask and cu_seqlens are mutually exclusive; pass one of them")
    dev = q.device
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs B == 1 (sequences packed along T); got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be a 1-D tensor [N + 1], N >= 1; got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
            raise TypeError(f"cu_seqlens must be an integer tensor; got {cu_seqlens.dtype}")
        cu = cu_seqlens.to(device=dev, dtype=torch.int32).contiguous()
        # the offsets on the host in one transfer (one sync per call: the checks, the longest
        # sequence and the chunk count all come from it)
        offs = cu.tolist()
        lens = [b - a for a, b in zip(offs, offs[1:])]
        if offs[0] != 0 or offs[-1] != T or min(lens) < 0:
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={T}; got {offs}")
        max_len = max(lens, default=0)
    else:
        cu = (torch.arange(B + 1, device=dev, dtype=torch.int32) * T).contiguous()
        max_len, lens = T, None
    mask = None
    if attention_mask is not None:
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask must be [B, T] = {(B, T)}; got {tuple(attention_mask.shape)}")
        # True / nonzero = token: the kernels weight keys by the mask's value, so it must be 0/1
        mask = (attention_mask != 0).to(device=dev, dtype=torch.float32).reshape(B * T).contiguous()
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = initial_state
        s0 = s0.to(torch.float32).contiguous()
        z0 = z0.to(torch.float32).contiguous()
    return cu, max_len, lens, mask, s0, z0


def _check_state(s0: Tensor | None, z0: Tensor | None, cu: Tensor, HK: int, FT: int, DV: int) -> None:
    """``initial_state`` must be ``(S [N, Hk, F', Dv], z [N, Hk, F'])`` (the kernels read it unchecked)."""
    if s0 is None:
        return
    want_s, want_z = (cu.shape[0] - 1, HK, FT, DV), (cu.shape[0] - 1, HK, FT)
    if tuple(s0.shape) != want_s or tuple(z0.shape) != want_z:
        raise ValueError(
            f"initial_state must be S [N, Hk, F', Dv] = {want_s}, z [N, Hk, F'] = {want_z}; "
            f"got {tuple(s0.shape)}, {tuple(z0.shape)}"
        )


def _check_map_weights(q_weight, q_bias, k_weight, k_bias, H: int, HK: int, D: int) -> int:
    """``q_weight [H, D, F]``, ``k_weight [Hk, D, F]``, biases ``[H, F]`` / ``[Hk, F]`` or None; returns F."""
    if q_weight.dim() != 3 or q_weight.shape[:2] != (H, D):
        raise ValueError(f"q_weight must be [H, D, F] = [{H}, {D}, F]; got {tuple(q_weight.shape)}")
    F = q_weight.shape[2]
    if tuple(k_weight.shape) != (HK, D, F):
        raise ValueError(f"k_weight must be [Hk, D, F] = {(HK, D, F)}; got {tuple(k_weight.shape)}")
    if q_bias is not None and tuple(q_bias.shape) != (H, F):
        raise ValueError(f"q_bias must be [H, F] = {(H, F)}; got {tuple(q_bias.shape)}")
    if k_bias is not None and tuple(k_bias.shape) != (HK, F):
        raise ValueError(f"k_bias must be [Hk, F] = {(HK, F)}; got {tuple(k_bias.shape)}")
    return F


def _needs_grad(*xs) -> bool:
    """Whether autograd will record this call (the forward layout may differ for inference)."""
    if not torch.is_grad_enabled():
        return False
    flat = [t for x in xs if x is not None for t in (x if isinstance(x, (tuple, list)) else (x,))]
    return any(t.requires_grad for t in flat if isinstance(t, Tensor))


def _n_chunks(lens: list[int] | None, B: int, T: int, F: int, dtype: torch.dtype, max_len: int) -> int:
    """Chunks over all sequences (``lens``: the packed sequences' lengths, host ints; None: B x T)."""
    L = _lm()
    return L.n_chunks(lens, B, T, L.chunk_size(F, dtype, max_len))


def _zero_padding(attention_mask: Tensor | None, *xs: Tensor) -> tuple[Tensor, ...]:
    """``xs [B, T, ...]`` with the padded tokens' rows set to 0: the kernels drop padded keys by a
    product with the mask, which would turn NaN / inf there into NaN in real outputs, the state and
    the gradients (the PyTorch backends select them away too). One more pass over each input, only
    under a mask."""
    if attention_mask is None:
        return xs
    keep = (attention_mask != 0).to(xs[0].device)[:, :, None, None]
    return tuple(torch.where(keep, x, x.new_zeros(())) for x in xs)


def linear_attention_triton(
    fq: Tensor,
    fk: Tensor,
    v: Tensor,
    *,
    causal: bool,
    attention_mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
) -> tuple[Tensor, LinearAttentionState | None]:
    """Chunked linear attention on precomputed non-negative features (generic Triton path).

    Args:
        fq: query features ``[B, T, H, F]``.
        fk: key features ``[B, T, Hk, F]``, ``H % Hk == 0``.
        v: values ``[B, T, Hk, Dv]``; ``o`` has ``v.dtype``. Half-precision ``v`` makes the
            matrix products bf16/fp16 with fp32 accumulation; fp32 ``v`` keeps them in fp32.
        causal: causal (decoder) or bidirectional (encoder) attention.
        attention_mask: ``[B, T]`` bool/0-1, True = real token (padded keys leave numerator
            and normalizer; outputs at padded queries are 0).
        cu_seqlens: ``[N + 1]`` cumulative lengths of packed sequences (``B == 1``).
        initial_state: ``(S [N, Hk, F, Dv], z [N, Hk, F])`` fp32, added before the first token.
        output_final_state: also return ``(S, z)`` after the last token of each sequence.
        eps: added to the normalizer.

    Returns:
        ``(o [B, T, H, Dv], final_state or None)``.
    """
    cu, max_len, lens, mask, s0, z0 = _check_common(fq, fk, v, attention_mask, cu_seqlens, initial_state)
    if fk.shape[3] != fq.shape[3]:
        raise ValueError(f"fq and fk must have the same feature dim F; got {fq.shape[3]} and {fk.shape[3]}")
    _check_state(s0, z0, cu, fk.shape[2], fq.shape[3], v.shape[3])
    nc = _n_chunks(lens, fq.shape[0], fq.shape[1], fq.shape[3], v.dtype, max_len)
    fq, fk, v = _zero_padding(attention_mask, fq, fk, v)
    o, *_, s_fin, z_fin = _la_apply(
        fq.contiguous(), fk.contiguous(), v.contiguous(), None, None, None, None, mask, cu, s0, z0,
        "softmax", False, bool(causal), float(eps), False, max_len, nc, cu_seqlens is not None,
        _needs_grad(fq, fk, v, initial_state),
    )  # fmt: skip
    return o, (LinearAttentionState(s_fin, z_fin) if output_final_state else None)


def fused_hedgehog_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_weight: Tensor,
    q_bias: Tensor | None,
    k_weight: Tensor,
    k_bias: Tensor | None,
    *,
    activation: str = "softmax",
    negation: bool = True,
    causal: bool = True,
    attention_mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
) -> tuple[Tensor, LinearAttentionState | None]:
    """Linear attention with the Hedgehog feature map computed inside the kernel.

    ``phi(x) = [act(x W_h + b_h), act(-(x W_h + b_h))]`` (second half only with ``negation``),
    ``act`` = softmax over ``F`` (Eq. 4) or ``exp`` of the pre-activation clamped to [-30, 30]
    (Eq. 5), computed in fp32.

    Args:
        q: ``[B, T, H, D]``; k: ``[B, T, Hk, D]``; v: ``[B, T, Hk, Dv]`` (same dtype as q, k).
        q_weight: ``[H, D, F]``; q_bias: ``[H, F]`` or None; k_weight: ``[Hk, D, F]``;
            k_bias: ``[Hk, F]`` or None. Weights may be fp32 with half inputs.
        Other arguments as :func:`linear_attention_triton`; the state has ``F' = 2F`` rows
        with negation, ``F`` without.

    Returns:
        ``(o [B, T, H, Dv], final_state or None)``; differentiable w.r.t. q, k, v, weights,
        biases (and the initial state).

    On a GPU, fp16/fp32 inputs with ``F > 64`` run the map in PyTorch and the chunked PyTorch op
    instead (the kernels' fp32 tiles exceed the H200's shared memory there; bf16 at any ``F`` up
    to 128 and every dtype at ``F <= 64`` use the fused kernels).
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}; got {activation!r}")
    cu, max_len, lens, mask, s0, z0 = _check_common(q, k, v, attention_mask, cu_seqlens, initial_state)
    H, D = q.shape[2], q.shape[3]
    HK = k.shape[2]
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[3] != D:
        raise ValueError(f"q and k must share the head dim D; got {D} and {k.shape[3]}")
    F = _check_map_weights(q_weight, q_bias, k_weight, k_bias, H, HK, D)
    _check_state(s0, z0, cu, HK, 2 * F if negation else F, v.shape[3])
    if _lm().needs_fallback(F, q.dtype, q.device):
        return _fused_fallback(
            q, k, v, q_weight, q_bias, k_weight, k_bias, activation=activation, negation=negation, causal=causal,
            attention_mask=None if attention_mask is None else attention_mask != 0, cu_seqlens=cu_seqlens,
            initial_state=initial_state, output_final_state=output_final_state, eps=eps,
        )  # fmt: skip
    if q_weight.dtype != k_weight.dtype:
        # the kernels take one weight dtype (native half products when it is the inputs'): a common
        # one (exact: the pre-activation is fp32 anyway); autograd returns dW in each one's dtype
        wdt = torch.promote_types(q_weight.dtype, k_weight.dtype)
        q_weight, k_weight = q_weight.to(wdt), k_weight.to(wdt)
    nc = _n_chunks(lens, q.shape[0], q.shape[1], F, v.dtype, max_len)
    q, k, v = _zero_padding(attention_mask, q, k, v)
    o, *_, s_fin, z_fin = _la_apply(
        q.contiguous(), k.contiguous(), v.contiguous(),
        q_weight.contiguous(), None if q_bias is None else q_bias.contiguous(),
        k_weight.contiguous(), None if k_bias is None else k_bias.contiguous(),
        mask, cu, s0, z0, activation, bool(negation), bool(causal), float(eps), True, max_len, nc,
        cu_seqlens is not None, _needs_grad(q, k, v, q_weight, q_bias, k_weight, k_bias, initial_state),
    )  # fmt: skip
    return o, (LinearAttentionState(s_fin, z_fin) if output_final_state else None)


def _hedgehog_features(x: Tensor, w: Tensor, b: Tensor | None, activation: str, negation: bool) -> Tensor:
    """The map in PyTorch, as ``HedgehogFeatureMap``: fp32 pre-activation; softmax features in the
    input dtype, exp features in fp32 (e^30 does not fit fp16)."""
    z = torch.einsum("bthd,hdf->bthf", x.float(), w.float())
    if b is not None:
        z = z + b.float()
    halves = (z, -z) if negation else (z,)
    if activation == "softmax":
        return torch.cat([torch.softmax(h, dim=-1) for h in halves], dim=-1).to(x.dtype)
    return torch.cat([torch.exp(h.clamp(-30.0, 30.0)) for h in halves], dim=-1)


def _fused_fallback(q, k, v, wq, bq, wk, bk, *, activation, negation, causal, **kw):
    """fp16/fp32 inputs with more than 64 features per half on a GPU: the map in PyTorch and the
    chunked PyTorch op (the fused kernels' fp32 operand tiles need more shared memory than the
    H200's 227 KB there: 237-311 KB, ``docs/kernels.md``). Same signature and results."""
    from .. import linear_attention  # the core dispatcher (cu_seqlens, masks, states)

    fq = _hedgehog_features(q, wq, bq, activation, negation)
    fk = _hedgehog_features(k, wk, bk, activation, negation)
    o, st = linear_attention(fq, fk, v, causal=causal, backend="chunked", **kw)
    return o.to(v.dtype), st


def fused_hedgehog_decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_weight: Tensor,
    q_bias: Tensor | None,
    k_weight: Tensor,
    k_bias: Tensor | None,
    state: tuple[Tensor, Tensor],
    *,
    activation: str = "softmax",
    negation: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, LinearAttentionState]:
    """One decode step for a batch: add token ``k, v`` to the state, then read it with ``q``.

    Args:
        q: ``[B, H, D]``; k: ``[B, Hk, D]``; v: ``[B, Hk, Dv]``.
        state: ``(S [B, Hk, F', Dv], z [B, Hk, F'])`` fp32 contiguous. **Updated in place** and
            returned (the same tensor objects), so a CUDA graph can replay the step.

    Returns:
        ``(o [B, H, Dv], (S, z))``. Inference only: no autograd graph is recorded (the outputs do
        not require grad); use the chunked op for training.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}; got {activation!r}")
    S, z = state
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"expected q [B, H, D], k [B, Hk, D], v [B, Hk, Dv]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    _check_device(q)
    B, H, D = q.shape
    HK = k.shape[1]
    if tuple(k.shape) != (B, HK, D) or v.shape[:2] != (B, HK) or H % HK != 0:
        raise ValueError(
            f"q [B, H, D], k [B, Hk, D], v [B, Hk, Dv] with H % Hk == 0; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    F = _check_map_weights(q_weight, q_bias, k_weight, k_bias, H, HK, D)
    FT = 2 * F if negation else F
    if S.dtype != torch.float32 or z.dtype != torch.float32 or not S.is_contiguous() or not z.is_contiguous():
        raise ValueError("state (S, z) must be contiguous float32 tensors (it is updated in place)")
    if tuple(S.shape) != (B, HK, FT, v.shape[-1]) or tuple(z.shape) != (B, HK, FT):
        raise ValueError(
            f"state must be S [B, Hk, F', Dv] = {(B, HK, FT, v.shape[-1])}, z [B, Hk, F'] = {(B, HK, FT)}; "
            f"got {tuple(S.shape)}, {tuple(z.shape)}"
        )
    with torch.no_grad():
        o = _lm().decode(
            q.contiguous(), k.contiguous(), v.contiguous(), q_weight.contiguous(),
            None if q_bias is None else q_bias.contiguous(), k_weight.contiguous(),
            None if k_bias is None else k_bias.contiguous(), S, z,
            activation=activation, negation=bool(negation), eps=float(eps),
        )  # fmt: skip
    return o, LinearAttentionState(S, z)
