"""Launchers: ``_fwd`` / ``_bwd`` turn validated tensors into kernel grids and reduce the results.

Work split ("segmented walk", see ``docs/kernels.md``): each sequence is cut into ``NS`` segments
of ``CPS`` chunks of ``BT`` tokens. A first kernel sums each segment's keys (``sum phi_k^T v``,
``sum phi_k``); an exclusive cumulative sum over segments (PyTorch, tiny) gives each segment's
entering state; the output kernel then walks its segment's chunks in order. When one segment
per sequence already gives enough programs (``NS == 1``) the first kernel is skipped. The
backward pass mirrors this with the query-side sums ``sum phi_q^T g``, ``sum phi_q c`` walked
in reverse for dk/dv, and the forward states (saved) walked forward for dq.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _kernels as K

# Tunables. ``chunk``: tokens per chunk (BT). ``min_programs``: segments are added until
# N * HK * NS reaches this (2 waves over the H200's 132 SMs), so that long sequences with few
# heads still fill the chip. Tests shrink ``chunk`` to 16 to exercise many chunks on tiny inputs.
# ``poison``: fill every kernel-written buffer with NaN first (tests), so a skipped write shows.
# ``fwd_bv``: value columns per forward program (the forward can split V over programs like fla:
# fewer state registers per program, more programs; the backward keeps all of V). 64 (no split
# at Dv = 64) and the warp heuristic below are the configuration measured on the H200
# (BENCHMARKS.md); fwd_bv=32 and 8 warps spill less per ptxas but are not measured yet.
CONFIG = {"chunk": 64, "min_programs": 264, "num_warps": None, "num_stages": 1, "poison": False, "fwd_bv": 64}


_COMMON = ("BD", "BF", "BV", "FUSED", "HAS_MASK", "ACT", "NEG", "W_NATIVE", "MAP_PREC", "PREC", "DOT_DT", "EVEN")


def _empty(*shape, device, dtype) -> torch.Tensor:
    t = torch.empty(*shape, device=device, dtype=dtype)
    return t.fill_(float("nan")) if CONFIG["poison"] else t


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _plan(cu: torch.Tensor | None, n_seq: int, hk: int, max_len: int) -> tuple[int, int, int]:
    """Return ``(BT, CPS, NS)`` for ``n_seq`` sequences of at most ``max_len`` tokens."""
    bt = int(CONFIG["chunk"])
    n_chunks = max(1, triton.cdiv(max_len, bt))
    ns = max(1, min(n_chunks, triton.cdiv(int(CONFIG["min_programs"]), n_seq * hk)))
    cps = triton.cdiv(n_chunks, ns)
    ns = triton.cdiv(n_chunks, cps)
    return bt, cps, ns


def _warps(bf: int, bv: int) -> int:
    if CONFIG["num_warps"] is not None:
        return int(CONFIG["num_warps"])
    # ptxas (sm_90, D=64): every walk kernel sits at the 255-register cap and spills 1-3 KB a
    # thread at 4 warps, ~half that at 8 (docs/kernels.md); 4 warps is what was timed.
    return 4 if bf * bv <= 64 * 64 else 8


def _consts(q, v, wq, bq, bk, mask, fused, activation, negation, F, D, DV):
    half = v.dtype in (torch.float16, torch.bfloat16)
    return dict(
        BD=_pow2(D),
        BF=_pow2(F),
        BV=_pow2(DV),
        FUSED=fused,
        HAS_MASK=mask is not None,
        ACT=activation,
        NEG=bool(negation) and fused,
        W_NATIVE=bool(fused and half and wq.dtype == q.dtype),
        # fp32 inputs: exact fp32 products; half inputs: tf32 is exact for bf16/fp16 operands
        MAP_PREC="tf32" if half else "ieee",
        PREC="tf32" if half else "ieee",
        # every block dimension exactly the tensor's: only row masks are needed
        EVEN=_pow2(D) == D and _pow2(F) == F and _pow2(DV) == DV,
        # operand dtype of the attention products (fp32 accumulation always). fp16 cannot hold
        # the exp map's features (up to e^30) or their products: those run in tf32 instead.
        DOT_DT=tl.float32
        if (not half or (v.dtype == torch.float16 and activation == "exp" and fused))
        else (tl.bfloat16 if v.dtype == torch.bfloat16 else tl.float16),
    )


def fwd(
    q, k, v, wq, bq, wk, bk, mask, cu, s0, z0, *, activation, negation, causal, eps, fused, max_len
):  # fmt: skip
    """Forward launcher.

    Shapes: ``q [B, T, H, D]`` (or features ``[B, T, H, F]``), ``k [B, T, HK, D]``,
    ``v [B, T, HK, DV]``, ``cu [N + 1]`` int32 token offsets into the flattened ``B * T`` axis,
    ``s0 [N, HK, FT, DV]`` / ``z0 [N, HK, FT]`` fp32 or None.
    Returns ``(o, den, s_in, z_in, s_fin, z_fin, ns, cps)``: ``den [B*T, H]`` fp32 normalizers,
    ``s_in [N, HK, NS, FT, DV]`` the state entering each segment (saved for the backward).
    """
    B, T, H, Dq = q.shape
    HK, DV = k.shape[2], v.shape[3]
    N = cu.numel() - 1
    G = H // HK
    if fused:
        D, F = wq.shape[1], wq.shape[2]
        FT = 2 * F if negation else F
    else:
        D, F = Dq, Dq
        FT = F
    dev = q.device
    bt, cps, ns = _plan(cu, N, HK, max_len)
    c = _consts(q, v, wq, bq, bk, mask, fused, activation, negation, F, D, DV)
    bv = min(c["BV"], _pow2(CONFIG["fwd_bv"]))
    nv = triton.cdiv(DV, bv)
    c = dict(c, BV=bv, EVEN=c["EVEN"] and DV % bv == 0)
    nw = _warps(c["BF"], c["BV"])
    dummy = q
    wq_, bq_, wk_, bk_ = (
        (wq if fused else dummy),
        (bq if bq is not None else dummy),
        (wk if fused else dummy),
        (bk if bk is not None else dummy),
    )
    mask_ = mask if mask is not None else dummy

    if s0 is None:
        s0 = torch.zeros(N, HK, FT, DV, device=dev, dtype=torch.float32)
        z0 = torch.zeros(N, HK, FT, device=dev, dtype=torch.float32)
    need_local = (not causal) or ns > 1
    if need_local:
        sl = torch.zeros(N, HK, ns, FT, DV, device=dev, dtype=torch.float32)
        zl = torch.zeros(N, HK, ns, FT, device=dev, dtype=torch.float32)
        K._state_kernel[(ns, N * HK, nv)](
            k, v, wk_, bk_, mask_, cu, sl, zl, HK, D, F, DV, cps, ns,
            BT=bt, HAS_B=bk is not None,
            **{x: c[x] for x in _COMMON},
            num_warps=nw, num_stages=CONFIG["num_stages"],
        )  # fmt: skip
        if causal:
            s_in = torch.cumsum(sl, 2) - sl + s0[:, :, None]
            z_in = torch.cumsum(zl, 2) - zl + z0[:, :, None]
        else:
            s_fin = sl.sum(2) + s0
            z_fin = zl.sum(2) + z0
            s_in = s_fin[:, :, None].expand(N, HK, ns, FT, DV).clone()
            z_in = z_fin[:, :, None].expand(N, HK, ns, FT).clone()
    else:
        # a copy: custom-op outputs may not alias inputs (s_in is saved for the backward)
        s_in = s0[:, :, None].clone()
        z_in = z0[:, :, None].clone()
    o = _empty(B, T, H, DV, device=dev, dtype=v.dtype)
    den = _empty(B * T, H, device=dev, dtype=torch.float32)
    store_end = bool(causal)
    if store_end:
        se = _empty(N, HK, ns, FT, DV, device=dev, dtype=torch.float32)
        ze = _empty(N, HK, ns, FT, device=dev, dtype=torch.float32)
    else:
        se, ze = dummy, dummy
    K._fwd_kernel[(ns, N * HK, nv)](
        q, k, v, wq_, bq_, wk_, bk_, mask_, cu, s_in, z_in, o, den, se, ze,
        float(eps), H, HK, G, D, F, DV, cps, ns,
        s_in.stride(0), s_in.stride(1), s_in.stride(2), z_in.stride(0), z_in.stride(1), z_in.stride(2),
        BT=bt, HAS_BQ=bq is not None, HAS_BK=bk is not None, CAUSAL=bool(causal), STORE_END=store_end,
        **{x: c[x] for x in _COMMON},
        num_warps=nw, num_stages=CONFIG["num_stages"],
    )  # fmt: skip
    if causal:
        lens = (cu[1:] - cu[:-1]).long()
        last = (torch.div(lens + bt * cps - 1, bt * cps, rounding_mode="floor") - 1).clamp(min=0)
        idx = last.view(N, 1, 1, 1, 1).expand(N, HK, 1, FT, DV)
        s_fin = torch.gather(se, 2, idx).squeeze(2)
        z_fin = torch.gather(ze, 2, idx[..., 0]).squeeze(2)
        empty = (lens == 0).view(N, 1, 1)
        s_fin = torch.where(empty[..., None], s0, s_fin)
        z_fin = torch.where(empty, z0, z_fin)
    return o, den, s_in.contiguous(), z_in.contiguous(), s_fin, z_fin, ns, cps


def bwd(
    do, ds_fin, dz_fin, q, k, v, wq, bq, wk, bk, mask, cu, o, den, s_in, z_in,
    *, activation, negation, causal, fused, max_len, need_ds0,
):  # fmt: skip
    """Backward launcher; returns ``(dq, dk, dv, dwq, dbq, dwk, dbk, ds0, dz0)`` (None where n/a)."""
    B, T, H, Dq = q.shape
    HK, DV = k.shape[2], v.shape[3]
    N = cu.numel() - 1
    G = H // HK
    if fused:
        D, F = wq.shape[1], wq.shape[2]
        FT = 2 * F if negation else F
    else:
        D, F = Dq, Dq
        FT = F
    dev = q.device
    bt, cps, ns = _plan(cu, N, HK, max_len)
    c = _consts(q, v, wq, bq, bk, mask, fused, activation, negation, F, D, DV)
    nw = _warps(c["BF"], c["BV"])
    dummy = q
    wq_, bq_, wk_, bk_ = (
        (wq if fused else dummy),
        (bq if bq is not None else dummy),
        (wk if fused else dummy),
        (bk if bk is not None else dummy),
    )
    mask_ = mask if mask is not None else dummy
    do = do.contiguous()
    common = {
        x: c[x]
        for x in ("BD", "BF", "BV", "FUSED", "HAS_MASK", "ACT", "NEG", "W_NATIVE", "MAP_PREC", "PREC", "DOT_DT", "EVEN")
    }

    if ds_fin is None:
        ds_fin = torch.zeros(N, HK, FT, DV, device=dev, dtype=torch.float32)
    if dz_fin is None:
        dz_fin = torch.zeros(N, HK, FT, device=dev, dtype=torch.float32)
    need_local = (not causal) or ns > 1 or need_ds0
    if need_local:
        rl = torch.zeros(N, HK, ns, FT, DV, device=dev, dtype=torch.float32)
        rzl = torch.zeros(N, HK, ns, FT, device=dev, dtype=torch.float32)
        K._rstate_kernel[(ns, N * HK)](
            q, wq_, bq_, do, o, den, mask_, cu, rl, rzl, H, HK, G, D, F, DV, cps, ns,
            BT=bt, HAS_BQ=bq is not None, **common, num_warps=nw, num_stages=CONFIG["num_stages"],
        )  # fmt: skip
        tot = rl.sum(2) + ds_fin
        ztot = rzl.sum(2) + dz_fin
        if causal:
            r_in = tot[:, :, None] - torch.cumsum(rl, 2)
            rz_in = ztot[:, :, None] - torch.cumsum(rzl, 2)
        else:
            r_in = tot[:, :, None].expand(N, HK, ns, FT, DV)
            rz_in = ztot[:, :, None].expand(N, HK, ns, FT)
    else:
        tot, ztot = None, None
        r_in = ds_fin[:, :, None]
        rz_in = dz_fin[:, :, None]

    dq = _empty(q.shape, device=dev, dtype=q.dtype)
    dk = _empty(k.shape, device=dev, dtype=k.dtype)
    dv = _empty(v.shape, device=dev, dtype=v.dtype)
    if fused:
        dwq = torch.zeros(N, ns, H, D, F, device=dev, dtype=torch.float32)
        dbq = torch.zeros(N, ns, H, F, device=dev, dtype=torch.float32)
        dwk = torch.zeros(N, ns, HK, D, F, device=dev, dtype=torch.float32)
        dbk = torch.zeros(N, ns, HK, F, device=dev, dtype=torch.float32)
    else:
        dwq = dbq = dwk = dbk = dummy
    K._bwd_dq_kernel[(ns, N * H)](
        q, k, v, wq_, bq_, wk_, bk_, mask_, cu, s_in, z_in, do, o, den, dq, dwq, dbq,
        H, HK, G, D, F, DV, cps, ns,
        s_in.stride(0), s_in.stride(1), s_in.stride(2), z_in.stride(0), z_in.stride(1), z_in.stride(2),
        BT=bt, HAS_BQ=bq is not None, HAS_BK=bk is not None, CAUSAL=bool(causal),
        **common, num_warps=nw, num_stages=CONFIG["num_stages"],
    )  # fmt: skip
    K._bwd_dkv_kernel[(ns, N * HK)](
        q, k, v, wq_, bq_, wk_, bk_, mask_, cu, r_in, rz_in, do, o, den, dk, dv, dwk, dbk,
        H, HK, G, D, F, DV, cps, ns,
        r_in.stride(0), r_in.stride(1), r_in.stride(2), rz_in.stride(0), rz_in.stride(1), rz_in.stride(2),
        BT=bt, HAS_BQ=bq is not None, HAS_BK=bk is not None, CAUSAL=bool(causal),
        **common, num_warps=nw, num_stages=CONFIG["num_stages"],
    )  # fmt: skip
    ds0 = dz0 = None
    if need_ds0:
        ds0, dz0 = tot, ztot
    if fused:
        dwq_, dwk_ = dwq.sum((0, 1)).to(wq.dtype), dwk.sum((0, 1)).to(wk.dtype)
        dbq_ = dbq.sum((0, 1)).to(bq.dtype) if bq is not None else None
        dbk_ = dbk.sum((0, 1)).to(bk.dtype) if bk is not None else None
    else:
        dwq_ = dbq_ = dwk_ = dbk_ = None
    return dq, dk, dv, dwq_, dbq_, dwk_, dbk_, ds0, dz0


def decode(q, k, v, wq, bq, wk, bk, s, z, *, activation, negation, eps):
    """One decode step for ``q [B, H, D]``, ``k [B, HK, D]``, ``v [B, HK, DV]``; updates ``s``, ``z``."""
    B, H, D = q.shape
    HK, DV = k.shape[1], v.shape[2]
    F = wq.shape[2]
    o = _empty(B, H, DV, device=q.device, dtype=v.dtype)
    BF, BV = _pow2(F), _pow2(DV)
    K._decode_kernel[(B * HK,)](
        q, k, v, wq, bq if bq is not None else q, wk, bk if bk is not None else q, s, z, o,
        float(eps), H, HK, H // HK, D, F, DV,
        BD=_pow2(D), BF=BF, BV=BV, HAS_BQ=bq is not None, HAS_BK=bk is not None, ACT=activation,
        NEG=bool(negation), num_warps=4 if BF * BV <= 64 * 64 else 8,
    )  # fmt: skip
    return o
