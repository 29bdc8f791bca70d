"""Triton kernels for chunked linear attention with an optional fused Hedgehog feature map.

Layout of the work (like fla's ``chunk_fwd_h`` / ``chunk_fwd_o`` / ``chunk_bwd_dh`` /
``chunk_bwd_dqkv``; design and numbers in ``docs/kernels.md``):

* ``_state_kernel`` walks the chunks (``BT`` tokens) of one *segment* (``CPS`` chunks) of one
  sequence for one KV head, one feature half and one block of value columns, with a small fp32
  state tile ``[BF, BV]`` in registers, and stores the state *entering* every chunk (relative to
  the segment start) plus the segment's total. Forward: keys and values (``sum phi_k^T v``,
  ``sum phi_k``); backward (``REVERSE``): queries and ``do / den`` walked from the segment's end,
  summed over the query heads of a GQA group.
* ``_out_kernel``: one program per (chunk, query head, value block), no loop: the chunk's state
  (segment state + local state), the intra-chunk ``tril(phi_q phi_k^T)`` and the normalizer.
* ``_bwd_kernel``: one program per (chunk, query head), no loop; dq and the map's pre-activation
  gradient from the stored forward states (one launch), dk, dv from the reverse states (a
  second launch), maps recomputed; dW/db are a batched matmul over the stored ``dz``.
* ``_delta_kernel`` (``-(do . o) / den`` per query), ``_decode_kernel`` (one token, in place).

Features: ``FUSED`` kernels read raw ``x [tokens, NH, D]``, ``W [NH, D, F]``, ``b [NH, F]`` and
compute ``z = x W + b`` (fp32 accumulation), then the half ``act(sign * z)`` (``sign`` = +1, and
-1 for the negated half with ``NEG``); ``act`` = softmax over ``F`` or ``exp`` of ``sign * z``
clamped to ``[-30, 30]``. The generic path reads precomputed features ``[tokens, NH, F]``.
States and normalizers accumulate in fp32; ``DOT_DT`` is the operand dtype of the attention
products (bf16 for bf16 inputs, fp32 otherwise with ``PREC`` = tf32 for fp16, ieee for fp32).
Sizes that change with T (segments, chunk counts) are not specialized on (``do_not_specialize``),
so a new sequence length does not recompile a kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rc(r_ok, c_ok, EVEN: tl.constexpr):
    """``[R, C]`` mask from row and column masks; rows only when every column is real (``EVEN``):
    a full-tile i1 mask costs registers."""
    if EVEN:
        return r_ok[:, None]
    else:
        return r_ok[:, None] & c_ok[None, :]


@triton.jit
def _tile_mask(rows, cols, R, C, CHECK_R: tl.constexpr, CHECK_C: tl.constexpr):
    # a full-tile i1 mask costs a register per element and gets hoisted out of loops: build
    # only the checks that can fail (``EVEN`` shapes need row checks on token tiles only)
    if CHECK_R:
        if CHECK_C:
            return (rows < R)[:, None] & (cols < C)[None, :]
        else:
            return (rows < R)[:, None]
    else:
        return (cols < C)[None, :]


@triton.jit
def _ld(ptr, R, C, stride, r0, c0, BR: tl.constexpr, BC: tl.constexpr, CHECK_R: tl.constexpr, CHECK_C: tl.constexpr):
    """Load the ``[BR, BC]`` tile at ``(r0, c0)`` of a row-major ``[R, C]`` matrix (row stride
    ``stride``) that starts at the scalar ``ptr`` (64-bit offsets folded in by the caller);
    zero outside (only the ``CHECK_*`` dimensions are checked)."""
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    if CHECK_R or CHECK_C:
        m = _tile_mask(rows, cols, R, C, CHECK_R, CHECK_C)
        return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=m, other=0.0)
    else:
        return tl.load(ptr + rows[:, None] * stride + cols[None, :])


@triton.jit
def _st(ptr, val, R, C, stride, r0, c0, BR: tl.constexpr, BC: tl.constexpr, CHECK_R: tl.constexpr,
        CHECK_C: tl.constexpr):  # fmt: skip
    """Store ``val [BR, BC]`` at ``(r0, c0)`` of a row-major ``[R, C]`` matrix, inside only."""
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    if CHECK_R or CHECK_C:
        m = _tile_mask(rows, cols, R, C, CHECK_R, CHECK_C)
        tl.store(ptr + rows[:, None] * stride + cols[None, :], val.to(ptr.dtype.element_ty), mask=m)
    else:
        tl.store(ptr + rows[:, None] * stride + cols[None, :], val.to(ptr.dtype.element_ty))


@triton.jit
def _e0(N: tl.constexpr, DT: tl.constexpr):
    """``[N, 16]`` tile with ones in column 0 (zeros elsewhere): ``x @ _e0`` holds ``x``'s row
    sums in its column 0 (16 columns: ``tl.dot``'s smallest tile)."""
    col = tl.arange(0, 16)[None, :]
    return tl.where((col == 0) & (tl.arange(0, N)[:, None] >= 0), 1.0, 0.0).to(DT)


@triton.jit
def _rowsum(x, SUMS: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """``sum(x, 1)`` (fp32) of a ``[M, N]`` tile. ``SUMS`` (bits: 1 column sums, 2 ``_rowdot``,
    4 ``_rowsum``; ``_launch.sums_mode``) bit 4 set: on the tensor cores, as the product ``x @ e0``
    of ``x`` in the products' dtype (the same rounded values the attention products use) and a
    16-column reduction; otherwise fp32 adds per element."""
    if (SUMS & 4) != 0:
        return tl.sum(tl.dot(x.to(DOT_DT), _e0(x.shape[1], DOT_DT), input_precision=PREC), 1)
    else:
        return tl.sum(x.to(tl.float32), 1)


@triton.jit
def _rowdot(x, z, SUMS: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """``sum(x * z[None, :], 1)`` (fp32) of a ``[M, N]`` tile and an ``[N]`` fp32 vector (the
    normaliser ``phi_q . z``); ``SUMS`` bit 2: the products in ``DOT_DT`` (packed bf16 pairs; ``z``
    rounded as the numerator's state is), summed by ``_rowsum``'s ones column. (Not ``x @ [z, 0,
    ..., 0]``: that operand, built from a vector, gave NaN in the 4-warp fused-chunk forward on the
    H200 with triton 3.6, 2026-11-28, session 5.)"""
    if (SUMS & 2) != 0:
        return _rowsum(x.to(DOT_DT) * z.to(DOT_DT)[None, :], 4, DOT_DT, PREC)
    else:
        return tl.sum(x.to(tl.float32) * z[None, :], 1)


@triton.jit
def _colsum(x, SUMS: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """``sum(x, 0)`` (fp32) of a ``[M, N]`` tile: a chunk's ``sum phi_k`` over its tokens, which
    as fp32 adds crosses the warps (shuffles and shared memory); ``SUMS`` bit 1: ``x^T @ e0``."""
    if (SUMS & 1) != 0:
        return tl.sum(tl.dot(tl.trans(x.to(DOT_DT)), _e0(x.shape[0], DOT_DT), input_precision=PREC), 1)
    else:
        return tl.sum(x.to(tl.float32), 0)


@triton.jit
def _coldot(x, c, SUMS: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """``sum(x * c[:, None], 0)`` (fp32): the reverse normaliser state's ``sum phi_q cd``; ``SUMS``
    bit 1: the products in ``DOT_DT`` (``c`` rounded as ``do / den`` is in the reverse state's
    product), summed by ``_colsum``'s ones column (see ``_rowdot`` for why not ``x^T @ [c, 0..]``)."""
    if (SUMS & 1) != 0:
        return _colsum(x.to(DOT_DT) * c.to(DOT_DT)[:, None], 1, DOT_DT, PREC)
    else:
        return tl.sum(x.to(tl.float32) * c[:, None], 0)


@triton.jit
def _act(z, sign, f_ok, ACT: tl.constexpr, EVEN: tl.constexpr, t_ok=None):
    """``act(sign * z)`` of a ``[M, BF]`` fp32 pre-activation; padded feature columns (and, given
    ``t_ok``, padded rows) give 0. Written for instruction count (the kernels issue-bound on this
    elementwise work, ncu 2026-11-28): ``exp2`` with ``log2 e`` folded into the sign, softmax
    rows normalised by one reciprocal per row (with the row mask folded in) and a multiply,
    not a division per element."""
    if ACT == "softmax":
        zs = z * sign  # (a literal sign folds into the next instruction)
        if not EVEN:
            zs = tl.where(f_ok[None, :], zs, float("-inf"))
        # exp(zs - max) = exp2(zs log2 e - max log2 e): one fused multiply-add per element
        m = tl.max(zs, 1) * 1.4426950408889634
        e = tl.exp2(zs * 1.4426950408889634 - m[:, None])
        r = 1.0 / tl.sum(e, 1)
        if t_ok is not None:
            r = tl.where(t_ok, r, 0.0)
        p = e * r[:, None]
    else:
        p = tl.exp2(tl.minimum(tl.maximum(z * sign, -30.0), 30.0) * 1.4426950408889634)
        if not EVEN:
            p = tl.where(f_ok[None, :], p, 0.0)
        if t_ok is not None:
            p = tl.where(t_ok[:, None], p, 0.0)
    return p


@triton.jit
def _act_bwd(z, sign, p, dp, ACT: tl.constexpr):
    """Gradient w.r.t. ``z`` of ``p = act(sign * z)`` given ``dp`` (0 where ``p`` is 0)."""
    if ACT == "softmax":
        dz = p * (dp - tl.sum(dp * p, 1)[:, None])
    else:
        zs = z * sign
        # torch.clamp passes the gradient where min <= z <= max (inclusive)
        dz = tl.where((zs >= -30.0) & (zs <= 30.0), dp * p, 0.0)
    return dz * sign


@triton.jit
def _load_wb(
    w_ptr,
    b_ptr,
    i_w,
    D,
    F,
    BD: tl.constexpr,
    BF: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_B: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Map weights of head ``i_w``: ``W [BD, BF]`` (native dtype) and ``b [BF]`` fp32 (0 without bias)."""
    offs_f = tl.arange(0, BF)
    f_ok = offs_f < F
    if FUSED:
        w = _ld(w_ptr + i_w * D * F, D, F, F, 0, 0, BD, BF, not EVEN, not EVEN)
    else:
        w = tl.zeros([BD, BF], dtype=tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + i_w * F + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BF], dtype=tl.float32)
    return w, b


@triton.jit
def _ld_x(
    x_ptr,
    bos,
    L,
    t0,
    i_h,
    NH,
    D,
    F,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BF: tl.constexpr,
    FUSED: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Chunk of head ``i_h``: raw ``x [BT, BD]`` (fused) or the features ``[BT, BF]`` (generic),
    tokens ``t0 + i`` of the sequence starting at token ``bos`` (length ``L``); 0 past ``L``."""
    if FUSED:
        return _ld(x_ptr + bos * (NH * D) + i_h * D, L, D, NH * D, t0, 0, BT, BD, True, not EVEN)
    else:
        return _ld(x_ptr + bos * (NH * F) + i_h * F, L, F, NH * F, t0, 0, BT, BF, True, not EVEN)


@triton.jit
def _preact(x, w, b, FUSED: tl.constexpr, W_NATIVE: tl.constexpr, MAP_PREC: tl.constexpr):
    """``z = x W + b`` (fp32 accumulation; fused) or the features as fp32 (generic)."""
    if FUSED:
        if W_NATIVE:
            # bf16/fp16 x bf16/fp16 products are exact in the fp32 accumulator
            z = tl.dot(x, w)
        else:
            z = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=MAP_PREC)
        return z + b[None, :]
    else:
        return x.to(tl.float32)


@triton.jit
def _feat(z, sign, t_ok, F, BF: tl.constexpr, FUSED: tl.constexpr, ACT: tl.constexpr, EVEN: tl.constexpr):
    """Feature half ``act(sign * z)`` (fused) or the features themselves; padded rows are 0."""
    if FUSED:
        offs_f = tl.arange(0, BF)
        return _act(z, sign, offs_f < F, ACT, EVEN, t_ok)
    else:
        return z


@triton.jit
def _map_bwd(
    z,
    p,
    n,
    dp,
    dn,
    t_ok,
    w,
    x,
    dx_ptr,
    dz_ptr,
    dw_ptr,
    db_ptr,
    bos,
    L,
    t0,
    i_h,
    i_w,
    NH,
    D,
    F,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BF: tl.constexpr,
    FUSED: tl.constexpr,
    ACT: tl.constexpr,
    NEG: tl.constexpr,
    MAP_PREC: tl.constexpr,
    EVEN: tl.constexpr,
    DW_ATOMIC: tl.constexpr,
    HAS_B: tl.constexpr,
):
    """Store the input gradient of one chunk (``dx = dz W^T``) and the pre-activation gradient
    ``dz [tokens, NH, F]`` (the launcher forms ``dW = x^T dz``, ``db = sum dz`` with one batched
    matmul: no per-program partials; per-chunk ``sum dz`` partials written here measured no faster,
    H200 run 15, 2026-11-29); ``DW_ATOMIC``: instead of storing ``dz``, add this chunk's
    ``x^T dz`` / ``sum dz`` to the fp32 accumulators ``dw [NW, D, F]`` / ``db [NW, F]`` of map head
    ``i_w`` (atomics; the same operand precision as the batched matmul). Generic path: the
    feature gradient is the input gradient."""
    if FUSED:
        dz = _act_bwd(z, 1.0, p, dp, ACT)
        if NEG:
            dz += _act_bwd(z, -1.0, n, dn, ACT)
        dz = tl.where(t_ok[:, None], dz, 0.0)
        dx = tl.dot(dz, tl.trans(w.to(tl.float32)), input_precision=MAP_PREC)
        _st(dx_ptr + bos * (NH * D) + i_h * D, dx, L, D, NH * D, t0, 0, BT, BD, True, not EVEN)
        if DW_ATOMIC:
            if x.dtype == tl.bfloat16:  # bf16 operands as in the batched matmul over stored bf16 dz
                dwt = tl.dot(tl.trans(x), dz.to(tl.bfloat16))
            else:
                dwt = tl.dot(tl.trans(x.to(tl.float32)), dz, input_precision="ieee")
            offs_d = tl.arange(0, BD)
            offs_f = tl.arange(0, BF)
            m = (offs_d < D)[:, None] & (offs_f < F)[None, :]
            tl.atomic_add(dw_ptr + i_w * D * F + offs_d[:, None] * F + offs_f[None, :], dwt, mask=m)
            if HAS_B:
                tl.atomic_add(db_ptr + i_w * F + offs_f, tl.sum(dz, 0), mask=offs_f < F)
        else:
            _st(dz_ptr + bos * (NH * F) + i_h * F, dz, L, F, NH * F, t0, 0, BT, BF, True, not EVEN)
    else:
        _st(dx_ptr + bos * (NH * F) + i_h * F, dp, L, F, NH * F, t0, 0, BT, BF, True, not EVEN)


@triton.jit
def _load_half(ptr, zptr, row0, F, DV, v0, BF: tl.constexpr, BV: tl.constexpr, EVEN: tl.constexpr):
    """Rows ``row0 .. row0 + F`` and columns ``v0 .. v0 + BV`` of a ``[FT, DV]`` state (as fp32),
    and the same rows of its ``[FT]`` normalizer."""
    offs_f = tl.arange(0, BF)
    s = _ld(ptr + row0 * DV, F, DV, DV, 0, v0, BF, BV, not EVEN, not EVEN)
    z = tl.load(zptr + row0 + offs_f, mask=offs_f < F, other=0.0)
    return s.to(tl.float32), z.to(tl.float32)


@triton.jit
def _chunk_state(
    s_ptr,
    sz_ptr,
    h_ptr,
    hz_ptr,
    row0,
    F,
    DV,
    v0,
    BF: tl.constexpr,
    BV: tl.constexpr,
    LOCAL: tl.constexpr,
    SEG: tl.constexpr,
    EVEN: tl.constexpr,
):
    """State of a chunk = (``SEG``) its segment's entering state (fp32) + (``LOCAL``) the stored
    local state relative to the segment start. At least one of the two is set."""
    if SEG:
        s, z = _load_half(s_ptr, sz_ptr, row0, F, DV, v0, BF, BV, EVEN)
        if LOCAL:
            hs, hz = _load_half(h_ptr, hz_ptr, row0, F, DV, v0, BF, BV, EVEN)
            s += hs
            z += hz
    else:
        s, z = _load_half(h_ptr, hz_ptr, row0, F, DV, v0, BF, BV, EVEN)
    return s, z


@triton.jit
def _seq(cu_ptr, i_n, T, VARLEN: tl.constexpr):
    """First token and length of sequence ``i_n``; equal lengths ``T`` need no loads."""
    if VARLEN:
        bos = tl.load(cu_ptr + i_n).to(tl.int64)
        L = tl.load(cu_ptr + i_n + 1).to(tl.int64) - bos
    else:
        bos = i_n.to(tl.int64) * T
        L = bos * 0 + T  # int64 like the loaded lengths (both branches must return one type)
    return bos, L


@triton.jit
def _chunk(cidx_ptr, cu_ptr, i_c, T, BT: tl.constexpr, VARLEN: tl.constexpr):
    """Sequence, chunk-in-sequence, first token and length of global chunk ``i_c``. Without
    ``cu_seqlens`` this is arithmetic: no chain of dependent loads before the tile loads."""
    if VARLEN:
        i_n = tl.load(cidx_ptr + 2 * i_c)
        i_t = tl.load(cidx_ptr + 2 * i_c + 1)
    else:
        nt = tl.cdiv(T, BT)
        i_n = i_c // nt
        i_t = i_c % nt
    bos, L = _seq(cu_ptr, i_n, T, VARLEN)
    return i_n, i_t, bos, L


@triton.jit(do_not_specialize=["T", "CPS", "NS"])
def _state_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    u_ptr,
    den_ptr,
    cd_ptr,
    mask_ptr,
    cu_ptr,
    coff_ptr,
    h_ptr,
    hz_ptr,
    st_ptr,
    stz_ptr,
    s0_ptr,
    z0_ptr,
    T,
    NH,
    HK,
    D,
    F,
    FT,
    DV,
    CPS,
    NS,
    G: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_MASK: tl.constexpr,
    REVERSE: tl.constexpr,
    STORE_H: tl.constexpr,
    INIT: tl.constexpr,
    VARLEN: tl.constexpr,
    ACT: tl.constexpr,
    W_NATIVE: tl.constexpr,
    MAP_PREC: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
    EVEN: tl.constexpr,
    BOTH: tl.constexpr,
    SUMS: tl.constexpr,
):
    """Chunk states of one segment, one KV head, one feature half, one value block.

    Forward: ``x = k``, ``u = v`` (``NH = HK``, ``G = 1``); ``h[c] = sum_{chunks c' < c of the
    segment} phi_k^T v``, ``hz[c] = sum phi_k`` (keys masked by ``attention_mask``).
    Backward (``REVERSE``): ``x = q``, ``u = do`` (``NH = H``), walked from the segment's end over
    the ``G`` query heads of the KV head: ``h[c] = sum_{c' > c} phi_q^T (do / den)``,
    ``hz[c] = sum phi_q * cd`` with ``cd = -(do . o) / den``.
    ``h [NC, HK, FT, DV]`` is indexed by the global chunk (``coff[n] + chunk``); ``st [N, HK, NS,
    FT, DV]`` gets the segment's total. ``INIT``: start every segment from its entering state
    ``s0 [N, HK, NS, FT, DV]`` / ``z0`` instead of 0 (one segment: the initial state ``[N, HK, FT,
    DV]``); the chunk states are then complete. Grid: ``(N * HK * NS, halves * NV)``. ``BOTH``
    (with negation): one program walks both feature halves (grid ``(N * HK * NS, NV)``): the
    chunk's loads and its pre-activation ``x W + b`` once for the two halves, two independent
    products per step.
    """
    i_nhs = tl.program_id(0)
    i_jv = tl.program_id(1)
    NV = tl.cdiv(DV, BV)
    if BOTH:
        j = i_jv * 0  # the positive half here; the negated half (rows F..2F) alongside
        i_v = i_jv
    else:
        j = i_jv // NV
        i_v = i_jv % NV
    i_s = i_nhs % NS
    i_nh = i_nhs // NS
    i_n = i_nh // HK
    i_hk = i_nh % HK
    bos, L = _seq(cu_ptr, i_n, T, VARLEN)
    c0 = i_s * CPS
    c1 = tl.minimum(c0 + CPS, tl.cdiv(L, BT))
    if VARLEN:
        coff = tl.load(coff_ptr + i_n).to(tl.int64)
    else:
        coff = i_n.to(tl.int64) * tl.cdiv(T, BT)
    sign = 1.0 - 2.0 * j.to(tl.float32)
    row0 = j * F
    offs_i = tl.arange(0, BT)
    offs_f = tl.arange(0, BF)
    v0 = i_v * BV
    if INIT:
        sb0 = ((i_n * HK + i_hk) * NS + i_s).to(tl.int64) * FT
        b_h, b_z = _load_half(s0_ptr + sb0 * DV, z0_ptr + sb0, row0, F, DV, v0, BF, BV, EVEN)
        if BOTH:
            b_h2, b_z2 = _load_half(s0_ptr + sb0 * DV, z0_ptr + sb0, F, F, DV, v0, BF, BV, EVEN)
    else:
        b_h = tl.zeros([BF, BV], dtype=tl.float32)
        b_z = tl.zeros([BF], dtype=tl.float32)
        if BOTH:
            b_h2 = tl.zeros([BF, BV], dtype=tl.float32)
            b_z2 = tl.zeros([BF], dtype=tl.float32)
    for jj in range(c0, c1):
        if REVERSE:
            ic = c1 - 1 - (jj - c0)
        else:
            ic = jj
        if STORE_H:
            hb = ((coff + ic) * HK + i_hk) * FT + row0
            _st(h_ptr + hb * DV, b_h, F, DV, DV, 0, v0, BF, BV, not EVEN, not EVEN)
            tl.store(hz_ptr + hb + offs_f, b_z, mask=offs_f < tl.where(i_v == 0, F, 0))  # one value block writes z
            if BOTH:
                _st(h_ptr + (hb + F) * DV, b_h2, F, DV, DV, 0, v0, BF, BV, not EVEN, not EVEN)
                tl.store(hz_ptr + hb + F + offs_f, b_z2, mask=offs_f < tl.where(i_v == 0, F, 0))
        t0 = ic * BT
        offs_t = t0 + offs_i
        t_ok = offs_t < L
        tok = bos + offs_t
        for g in tl.static_range(G):  # G is a constexpr: with G == 1 the weights load once
            i_x = i_hk * G + g
            # every load of the step first: one memory latency per step, not one per load
            x = _ld_x(x_ptr, bos, L, t0, i_x, NH, D, F, BT, BD, BF, FUSED, EVEN)
            u = _ld(u_ptr + bos * (NH * DV) + i_x * DV, L, DV, NH * DV, t0, v0, BT, BV, True, not EVEN)
            w, b = _load_wb(w_ptr, b_ptr, i_x, D, F, BD, BF, FUSED, HAS_B, EVEN)
            z = _preact(x, w, b, FUSED, W_NATIVE, MAP_PREC)
            p = _feat(z, sign, t_ok, F, BF, FUSED, ACT, EVEN)
            if BOTH:
                p2 = _feat(z, -1.0, t_ok, F, BF, FUSED, ACT, EVEN)
            if REVERSE:
                den = tl.load(den_ptr + tok * NH + i_x, mask=t_ok, other=1.0)
                cd = tl.load(cd_ptr + tok * NH + i_x, mask=t_ok, other=0.0)
                u = u.to(tl.float32) * (1.0 / den)[:, None]  # one reciprocal per row
                b_z += _coldot(p, cd, SUMS, DOT_DT, PREC)
                if BOTH:
                    b_z2 += _coldot(p2, cd, SUMS, DOT_DT, PREC)
            else:
                if HAS_MASK:
                    mk = tl.load(mask_ptr + tok, mask=t_ok, other=0.0)
                    p = p * mk[:, None]
                    if BOTH:
                        p2 = p2 * mk[:, None]
                b_z += _colsum(p, SUMS, DOT_DT, PREC)
                if BOTH:
                    b_z2 += _colsum(p2, SUMS, DOT_DT, PREC)
            u_d = u.to(DOT_DT)
            b_h += tl.dot(tl.trans(p.to(DOT_DT)), u_d, input_precision=PREC)
            if BOTH:
                b_h2 += tl.dot(tl.trans(p2.to(DOT_DT)), u_d, input_precision=PREC)
    sb = ((i_n * HK + i_hk) * NS + i_s).to(tl.int64) * FT + row0
    _st(st_ptr + sb * DV, b_h, F, DV, DV, 0, v0, BF, BV, not EVEN, not EVEN)
    tl.store(stz_ptr + sb + offs_f, b_z, mask=offs_f < tl.where(i_v == 0, F, 0))  # one value block writes z
    if BOTH:
        _st(st_ptr + (sb + F) * DV, b_h2, F, DV, DV, 0, v0, BF, BV, not EVEN, not EVEN)
        tl.store(stz_ptr + sb + F + offs_f, b_z2, mask=offs_f < tl.where(i_v == 0, F, 0))


@triton.jit
def _out_item(
    i_c,
    i_sub,
    i_vh,
    q_ptr,
    k_ptr,
    v_ptr,
    wq_ptr,
    bq_ptr,
    wk_ptr,
    bk_ptr,
    mask_ptr,
    cu_ptr,
    cidx_ptr,
    h_ptr,
    hz_ptr,
    si_ptr,
    zi_ptr,
    o_ptr,
    den_ptr,
    eps,
    T,
    H,
    HK,
    G,
    D,
    F,
    FT,
    DV,
    CPS,
    NSI,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_BQ: tl.constexpr,
    HAS_BK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    SEG: tl.constexpr,
    VARLEN: tl.constexpr,
    ACT: tl.constexpr,
    NEG: tl.constexpr,
    BS: tl.constexpr,
    W_NATIVE: tl.constexpr,
    MAP_PREC: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Outputs of one chunk, one query head, one value block (grid ``(NC, NV * H)``).

    ``o = (phi_q S + tril(phi_q phi_k^T) v) / (phi_q z + rowsum(tril(...)) + eps)`` with
    ``S = si[n, hk, segment] + h[chunk]`` (causal) or ``si[n, hk, 0]`` (bidirectional: the whole
    sequence's state, no intra-chunk part). Also stores the normalizer ``den`` (fp32). Without
    ``SEG`` (causal, one segment, no initial state) ``si`` is zero and not read.
    ``BS`` < ``BT``: the program computes the ``BS`` queries of sub-block ``i_sub`` of the chunk
    (keys: the whole chunk, causally masked): smaller tiles, more programs, same chunk states.
    """
    i_h = i_vh % H
    i_v = i_vh // H
    i_hk = i_h // G
    i_n, i_t, bos, L = _chunk(cidx_ptr, cu_ptr, i_c, T, BT, VARLEN)
    offs_i = tl.arange(0, BT)  # keys: the whole chunk
    t0 = i_t * BT
    offs_t = t0 + offs_i
    t_ok = offs_t < L
    tok = bos + offs_t
    offs_s = i_sub * BS + tl.arange(0, BS)  # queries: this program's sub-block
    tq = t0 + offs_s
    tq_ok = tq < L
    tokq = bos + tq
    v0 = i_v * BV
    i_s = tl.minimum(i_t // CPS, NSI - 1)
    sb = ((i_n * HK + i_hk) * NSI + i_s).to(tl.int64) * FT
    hb = (i_c.to(tl.int64) * HK + i_hk) * FT

    # every load first (one memory latency per program instead of one per stage), then compute
    xq = _ld_x(q_ptr, bos, L, t0 + i_sub * BS, i_h, H, D, F, BS, BD, BF, FUSED, EVEN)
    wq, bq = _load_wb(wq_ptr, bq_ptr, i_h, D, F, BD, BF, FUSED, HAS_BQ, EVEN)
    if CAUSAL:
        xk = _ld_x(k_ptr, bos, L, t0, i_hk, HK, D, F, BT, BD, BF, FUSED, EVEN)
        wk, bk = _load_wb(wk_ptr, bk_ptr, i_hk, D, F, BD, BF, FUSED, HAS_BK, EVEN)
        vv = _ld(v_ptr + bos * (HK * DV) + i_hk * DV, L, DV, HK * DV, t0, v0, BT, BV, True, not EVEN)
        if HAS_MASK:
            mk = tl.load(mask_ptr + tok, mask=t_ok, other=0.0)
    sp, zp = _chunk_state(si_ptr + sb * DV, zi_ptr + sb, h_ptr + hb * DV, hz_ptr + hb, 0, F, DV, v0, BF, BV, CAUSAL,
                          SEG, EVEN)  # fmt: skip
    if NEG:
        sn, zn = _chunk_state(si_ptr + sb * DV, zi_ptr + sb, h_ptr + hb * DV, hz_ptr + hb, F, F, DV, v0, BF, BV,
                              CAUSAL, SEG, EVEN)  # fmt: skip

    zq = _preact(xq, wq, bq, FUSED, W_NATIVE, MAP_PREC)
    qp = _feat(zq, 1.0, tq_ok, F, BF, FUSED, ACT, EVEN)
    qp_d = qp.to(DOT_DT)
    num = tl.dot(qp_d, sp.to(DOT_DT), input_precision=PREC)
    den = tl.sum(qp * zp[None, :], 1)
    if NEG:
        qn = _feat(zq, -1.0, tq_ok, F, BF, FUSED, ACT, EVEN)
        qn_d = qn.to(DOT_DT)
        num += tl.dot(qn_d, sn.to(DOT_DT), input_precision=PREC)
        den += tl.sum(qn * zn[None, :], 1)
    if CAUSAL:
        zk = _preact(xk, wk, bk, FUSED, W_NATIVE, MAP_PREC)
        kp = _feat(zk, 1.0, t_ok, F, BF, FUSED, ACT, EVEN)
        if HAS_MASK:
            kp = kp * mk[:, None]
        a = tl.dot(qp_d, tl.trans(kp.to(DOT_DT)), input_precision=PREC)
        if NEG:
            kn = _feat(zk, -1.0, t_ok, F, BF, FUSED, ACT, EVEN)
            if HAS_MASK:
                kn = kn * mk[:, None]
            a += tl.dot(qn_d, tl.trans(kn.to(DOT_DT)), input_precision=PREC)
        a = tl.where(offs_s[:, None] >= offs_i[None, :], a, 0.0)
        num += tl.dot(a.to(DOT_DT), vv.to(DOT_DT), input_precision=PREC)
        den += tl.sum(a, 1)
    den = den + eps
    o = num * (1.0 / den)[:, None]  # one reciprocal per row, not a division per element
    if HAS_MASK:
        mq = tl.load(mask_ptr + tokq, mask=tq_ok, other=0.0)
        o = tl.where(mq[:, None] != 0, o, 0.0)
    _st(o_ptr + bos * (H * DV) + i_h * DV, o, L, DV, H * DV, t0 + i_sub * BS, v0, BS, BV, True, not EVEN)
    tl.store(den_ptr + tokq * H + i_h, den, mask=tq < tl.where(i_v == 0, L, 0))  # one value block


@triton.jit(do_not_specialize=["T", "CPS", "NSI", "NITEMS"])
def _out_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    wq_ptr,
    bq_ptr,
    wk_ptr,
    bk_ptr,
    mask_ptr,
    cu_ptr,
    cidx_ptr,
    h_ptr,
    hz_ptr,
    si_ptr,
    zi_ptr,
    o_ptr,
    den_ptr,
    eps,
    T,
    H,
    HK,
    G,
    D,
    F,
    FT,
    DV,
    CPS,
    NSI,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_BQ: tl.constexpr,
    HAS_BK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    SEG: tl.constexpr,
    VARLEN: tl.constexpr,
    ACT: tl.constexpr,
    NEG: tl.constexpr,
    W_NATIVE: tl.constexpr,
    MAP_PREC: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
    EVEN: tl.constexpr,
    NITEMS,
    PERSIST: tl.constexpr,
    P_STAGES: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Grid ``(NC * SPLIT, NV * H)``: one (chunk, query sub-block of ``BT // SPLIT`` tokens, query
    head, value block) per program (``_out_item``).
    ``PERSIST``: a 1-D grid of fewer programs, each looping over items ``i = pid, pid + P, ...``
    (``i % NC`` chunk, ``i // NC`` head/value block) with ``P_STAGES`` software-pipeline stages,
    so that the loads of the next item can be issued under the math of the current one."""
    if PERSIST:
        NC = NITEMS // (H * tl.cdiv(DV, BV))  # chunks x sub-blocks
        for it in tl.range(tl.program_id(0), NITEMS, tl.num_programs(0), num_stages=P_STAGES):
            _out_item(
                (it % NC) // SPLIT, (it % NC) % SPLIT, it // NC,
                q_ptr, k_ptr, v_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, mask_ptr, cu_ptr, cidx_ptr, h_ptr, hz_ptr, si_ptr,
                zi_ptr, o_ptr, den_ptr, eps, T, H, HK, G, D, F, FT, DV, CPS, NSI, BT, BD, BF, BV, FUSED, HAS_BQ, HAS_BK,
                HAS_MASK, CAUSAL, SEG, VARLEN, ACT, NEG, BT // SPLIT, W_NATIVE, MAP_PREC, PREC, DOT_DT, EVEN,
            )  # fmt: skip
    else:
        _out_item(
            tl.program_id(0) // SPLIT, tl.program_id(0) % SPLIT, tl.program_id(1),
            q_ptr, k_ptr, v_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, mask_ptr, cu_ptr, cidx_ptr, h_ptr, hz_ptr, si_ptr,
            zi_ptr, o_ptr, den_ptr, eps, T, H, HK, G, D, F, FT, DV, CPS, NSI, BT, BD, BF, BV, FUSED, HAS_BQ, HAS_BK,
            HAS_MASK, CAUSAL, SEG, VARLEN, ACT, NEG, BT // SPLIT, W_NATIVE, MAP_PREC, PREC, DOT_DT, EVEN,
        )  # fmt: skip


@triton.jit(do_not_specialize=["NS", "M1", "M2"])
def _seg_scan_kernel(x1_ptr, l1_ptr, o1_ptr, x2_ptr, l2_ptr, o2_ptr, NS, M1, M2, NSP: tl.constexpr,
                     BM: tl.constexpr, REVERSE: tl.constexpr, HAS_LAST: tl.constexpr):  # fmt: skip
    """What enters each segment: exclusive sums over the segment axis of ``x [R, NS, M]``,
    ``out[r, s] = sum_{j < s} x[r, j]`` or (``REVERSE``) ``last[r] + sum_{j > s} x[r, j]``. The
    ``[NSP, BM]`` tile of every segment is loaded at once, shifted by one segment (row ``s`` holds
    ``x[s - 1]``, or ``x[s + 1]`` when ``REVERSE``), and scanned with ``tl.cumsum``: inclusive sums
    of the shifted rows are the exclusive sums, never a total minus a running sum. Two tensors per
    launch (a state and its normaliser): grid ``(R, cdiv(M1, BM) + cdiv(M2, BM))``. It replaces
    PyTorch's zeros + (flip +) cumsum (+ flip) + copy (+ add): 0.05-0.12 ms per fwd+bwd at 32K-128K
    tokens (H200 run 53), mostly a strided scan."""
    i_r = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1)
    nb1 = tl.cdiv(M1, BM)
    if i_m < nb1:
        x_ptr, l_ptr, o_ptr, M, m0 = x1_ptr, l1_ptr, o1_ptr, M1, i_m * BM
    else:
        x_ptr, l_ptr, o_ptr, M, m0 = x2_ptr, l2_ptr, o2_ptr, M2, (i_m - nb1) * BM
    offs = m0 + tl.arange(0, BM)
    ok = offs < M
    rows = tl.arange(0, NSP)
    if REVERSE:
        src = rows + 1
    else:
        src = rows - 1
    base = i_r * NS * M
    x = tl.load(x_ptr + base + src[:, None] * M + offs[None, :],
                mask=((src >= 0) & (src < NS))[:, None] & ok[None, :], other=0.0)  # fmt: skip
    out = tl.cumsum(x, 0, reverse=REVERSE)
    if HAS_LAST:
        out += tl.load(l_ptr + i_r * M + offs, mask=ok, other=0.0)[None, :]
    tl.store(o_ptr + base + rows[:, None] * M + offs[None, :], out, mask=(rows < NS)[:, None] & ok[None, :])


@triton.jit(do_not_specialize=["T", "CPS", "NS", "SKIP"])
def _fold_kernel(
    h_ptr, hz_ptr, si_ptr, zi_ptr, cu_ptr, cidx_ptr, T, HK, FT, DV, CPS, NS, SKIP,
    BT: tl.constexpr, BFT: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """``h[c] += si[segment of c]`` (and ``hz``) in place, grid ``(NC, HK)``: the chunk states of a
    walk over several segments, local to their segment, made complete, so that the kernels that
    read them load one tile instead of two (the output kernel and the backward: ``SEG`` off).
    ``h [NC, HK, FT, DV]`` (bf16 for bf16 inputs: the sum rounded once, as the reading kernels
    rounded it for their products), ``si [N, HK, NS, FT, DV]`` fp32. Segment ``SKIP`` (-1: none) is
    left as it is: its entering state is zero (the first going forward without an initial state,
    the last going backward without a final-state gradient)."""
    i_c = tl.program_id(0)
    i_hk = tl.program_id(1)
    i_n, i_t, bos, L = _chunk(cidx_ptr, cu_ptr, i_c, T, BT, VARLEN)
    i_s = tl.minimum(i_t // CPS, NS - 1)
    if i_s != SKIP:
        hb = (i_c * HK + i_hk).to(tl.int64) * FT
        sb = ((i_n * HK + i_hk) * NS + i_s).to(tl.int64) * FT
        rows = tl.arange(0, BFT)
        cols = tl.arange(0, BV)
        r_ok = rows < FT
        m = r_ok[:, None] & (cols < DV)[None, :]
        off = rows[:, None] * DV + cols[None, :]
        h = tl.load(h_ptr + hb * DV + off, mask=m, other=0.0).to(tl.float32)
        s = tl.load(si_ptr + sb * DV + off, mask=m, other=0.0)
        tl.store(h_ptr + hb * DV + off, (h + s).to(h_ptr.dtype.element_ty), mask=m)
        hz = tl.load(hz_ptr + hb + rows, mask=r_ok, other=0.0)
        tl.store(hz_ptr + hb + rows, hz + tl.load(zi_ptr + sb + rows, mask=r_ok, other=0.0), mask=r_ok)


@triton.jit(do_not_specialize=["NTOK"])
def _delta_kernel(do_ptr, o_ptr, den_ptr, cd_ptr, NTOK, H, DV, BT: tl.constexpr, BV: tl.constexpr):
    """``cd = -(do . o) / den`` per (token, query head): the normalizer's share of the gradient."""
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    i_h = tl.program_id(1)
    offs_v = tl.arange(0, BV)
    t_ok = offs_t < NTOK
    m2 = t_ok[:, None] & (offs_v < DV)[None, :]
    off = offs_t.to(tl.int64)[:, None] * (H * DV) + i_h * DV + offs_v[None, :]
    do = tl.load(do_ptr + off, mask=m2, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + off, mask=m2, other=0.0).to(tl.float32)
    den = tl.load(den_ptr + offs_t * H + i_h, mask=t_ok, other=1.0)
    tl.store(cd_ptr + offs_t * H + i_h, -tl.sum(do * o, 1) / den, mask=t_ok)


@triton.jit(do_not_specialize=["T", "CPS", "NSI"])
def _bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    wq_ptr,
    bq_ptr,
    wk_ptr,
    bk_ptr,
    mask_ptr,
    cu_ptr,
    cidx_ptr,
    h_ptr,
    hz_ptr,
    si_ptr,
    zi_ptr,
    do_ptr,
    den_ptr,
    cd_ptr,
    o_ptr,
    dx_ptr,
    dz_ptr,
    dv_ptr,
    dw_ptr,
    db_ptr,
    T,
    H,
    HK,
    G,
    D,
    F,
    FT,
    DV,
    CPS,
    NSI,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    KV_SIDE: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_BQ: tl.constexpr,
    HAS_BK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    SEG: tl.constexpr,
    VARLEN: tl.constexpr,
    ACT: tl.constexpr,
    NEG: tl.constexpr,
    W_NATIVE: tl.constexpr,
    MAP_PREC: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
    EVEN: tl.constexpr,
    FUSE_CD: tl.constexpr,
    SPLIT: tl.constexpr,
    DW_ATOMIC: tl.constexpr,
):
    """Gradients of one chunk and one query head (grid ``(NC, H)``, all of Dv, no loop).

    With ``g = do / den``, ``cd = -(do . o) / den``, ``A = tril(phi_q phi_k^T)`` and
    ``dA = tril(g v^T + cd)``:

    * query side (``KV_SIDE`` False; ``(h, si)`` = forward state entering the chunk):
      ``dphi_q = g S^T + cd z^T + dA phi_k`` -> ``dx = dq`` and ``dz`` (map pre-activation);
    * key side (``KV_SIDE``; ``(h, si)`` = reverse state: queries after the chunk plus the
      final-state gradient): ``dphi_k = dA^T phi_q + v R^T + e``, ``dv = A^T g + phi_k R``.
      The ``R``-terms belong to the KV head and are added by the group's first query head only;
      ``dk``/``dv``/``dz_k`` are per query head (``[tokens, H, .]``; the launcher sums a GQA
      group).

    The two sides are two launches of this kernel (fewer live tiles than one kernel doing both;
    each recomputes both maps). ``dW = x^T dz`` and ``db`` are one batched matmul in the launcher.
    ``SPLIT`` > 1 (grid ``(NC * SPLIT, H)``): the program's own rows (queries on the query side,
    keys on the key side) are the ``BS = BT // SPLIT`` tokens of sub-block ``i_sub`` of the chunk;
    the other side's rows are the whole chunk (causally masked): smaller tiles, more programs,
    the same chunk states.
    """
    i_c = tl.program_id(0) // SPLIT
    i_sub = tl.program_id(0) % SPLIT
    i_h = tl.program_id(1)
    BS: tl.constexpr = BT // SPLIT
    i_hk = i_h // G
    first = (i_h % G) == 0
    i_n, i_t, bos, L = _chunk(cidx_ptr, cu_ptr, i_c, T, BT, VARLEN)
    t0 = i_t * BT
    # rows of the query-type tiles (q, do, den, cd) and of the key-type tiles (k, v, mask):
    # the own side is sub-block i_sub (BS rows), the other side the whole chunk (BT rows)
    if KV_SIDE:
        BQ: tl.constexpr = BT
        BK: tl.constexpr = BS
        q0 = t0
        k0 = t0 + i_sub * BS
    else:
        BQ: tl.constexpr = BS
        BK: tl.constexpr = BT
        q0 = t0 + i_sub * BS
        k0 = t0
    offs_q = q0 + tl.arange(0, BQ)
    offs_k = k0 + tl.arange(0, BK)
    tq_ok = offs_q < L
    tk_ok = offs_k < L
    tokq = bos + offs_q
    tokk = bos + offs_k
    i_s = tl.minimum(i_t // CPS, NSI - 1)
    sb = ((i_n * HK + i_hk) * NSI + i_s).to(tl.int64) * FT
    hb = (i_c * HK + i_hk).to(tl.int64) * FT

    # every load first (one memory latency per program instead of one per stage), then compute;
    # (s, z) = the forward state entering the chunk (query side) or the reverse state (key side)
    xq = _ld_x(q_ptr, bos, L, q0, i_h, H, D, F, BQ, BD, BF, FUSED, EVEN)
    xk = _ld_x(k_ptr, bos, L, k0, i_hk, HK, D, F, BK, BD, BF, FUSED, EVEN)
    do = _ld(do_ptr + bos * (H * DV) + i_h * DV, L, DV, H * DV, q0, 0, BQ, BV, True, not EVEN)
    vv = _ld(v_ptr + bos * (HK * DV) + i_hk * DV, L, DV, HK * DV, k0, 0, BK, BV, True, not EVEN).to(DOT_DT)
    den = tl.load(den_ptr + tokq * H + i_h, mask=tq_ok, other=1.0)
    if FUSE_CD and not KV_SIDE:
        # the delta kernel folded in: cd = -(do . o) / den, stored for the reverse walk / key side
        oo = _ld(o_ptr + bos * (H * DV) + i_h * DV, L, DV, H * DV, q0, 0, BQ, BV, True, not EVEN).to(tl.float32)
        cd = -tl.sum(do.to(tl.float32) * oo, 1) / den
        tl.store(cd_ptr + tokq * H + i_h, cd, mask=tq_ok)
    else:
        cd = tl.load(cd_ptr + tokq * H + i_h, mask=tq_ok, other=0.0)
    if HAS_MASK:
        mk = tl.load(mask_ptr + tokk, mask=tk_ok, other=0.0)
    wq, bq = _load_wb(wq_ptr, bq_ptr, i_h, D, F, BD, BF, FUSED, HAS_BQ, EVEN)
    wk, bk = _load_wb(wk_ptr, bk_ptr, i_hk, D, F, BD, BF, FUSED, HAS_BK, EVEN)
    sp, zp = _chunk_state(si_ptr + sb * DV, zi_ptr + sb, h_ptr + hb * DV, hz_ptr + hb, 0, F, DV, 0, BF, BV, CAUSAL,
                          SEG, EVEN)  # fmt: skip
    if NEG:
        sn, zn = _chunk_state(si_ptr + sb * DV, zi_ptr + sb, h_ptr + hb * DV, hz_ptr + hb, F, F, DV, 0, BF, BV,
                              CAUSAL, SEG, EVEN)  # fmt: skip

    # features as DOT_DT right away (bf16 for bf16 inputs, like torch's bf16 map): fewer live
    # fp32 tiles; the map's backward uses the same rounded features
    zq = _preact(xq, wq, bq, FUSED, W_NATIVE, MAP_PREC)
    qp = _feat(zq, 1.0, tq_ok, F, BF, FUSED, ACT, EVEN).to(DOT_DT)
    zk = _preact(xk, wk, bk, FUSED, W_NATIVE, MAP_PREC)
    kp_raw = _feat(zk, 1.0, tk_ok, F, BF, FUSED, ACT, EVEN).to(DOT_DT)
    if HAS_MASK:
        kp = (kp_raw * mk[:, None]).to(DOT_DT)
    else:
        kp = kp_raw
    if NEG:
        qn = _feat(zq, -1.0, tq_ok, F, BF, FUSED, ACT, EVEN).to(DOT_DT)
        kn_raw = _feat(zk, -1.0, tk_ok, F, BF, FUSED, ACT, EVEN).to(DOT_DT)
        if HAS_MASK:
            kn = (kn_raw * mk[:, None]).to(DOT_DT)
        else:
            kn = kn_raw
    else:
        qn = qp
        kn_raw = kp_raw
        kn = kp
    g = (do.to(tl.float32) * (1.0 / den)[:, None]).to(DOT_DT)
    tril = offs_q[:, None] >= offs_k[None, :]  # [BQ, BK]: key at or before the query
    if not KV_SIDE:
        dqp = tl.dot(g, tl.trans(sp.to(DOT_DT)), input_precision=PREC) + cd[:, None] * zp[None, :]
        if NEG:
            dqn = tl.dot(g, tl.trans(sn.to(DOT_DT)), input_precision=PREC) + cd[:, None] * zn[None, :]
        else:
            dqn = dqp
        if CAUSAL:
            da = tl.dot(g, tl.trans(vv), input_precision=PREC) + cd[:, None]
            da = tl.where(tril, da, 0.0).to(DOT_DT)
            dqp += tl.dot(da, kp, input_precision=PREC)
            if NEG:
                dqn += tl.dot(da, kn, input_precision=PREC)
        _map_bwd(zq, qp.to(tl.float32), qn.to(tl.float32), dqp, dqn, tq_ok, wq, xq, dx_ptr, dz_ptr, dw_ptr, db_ptr, bos,
                 L, q0, i_h, i_h, H, D, F, BQ, BD, BF, FUSED, ACT, NEG, MAP_PREC, EVEN, DW_ATOMIC, HAS_BQ)  # fmt: skip
    else:
        if CAUSAL:
            # rows: keys s, columns: queries t (t >= s)
            dat = tl.dot(vv, tl.trans(g), input_precision=PREC) + cd[None, :]
            dat = tl.where(tl.trans(tril), dat, 0.0).to(DOT_DT)
            at = tl.dot(kp, tl.trans(qp), input_precision=PREC)
            dkp = tl.dot(dat, qp, input_precision=PREC)
            if NEG:
                at += tl.dot(kn, tl.trans(qn), input_precision=PREC)
                dkn = tl.dot(dat, qn, input_precision=PREC)
            else:
                dkn = dkp
            at = tl.where(tl.trans(tril), at, 0.0).to(DOT_DT)
            dvv = tl.dot(at, g, input_precision=PREC)
        else:
            dkp = tl.zeros([BK, BF], dtype=tl.float32)
            dkn = dkp
            dvv = tl.zeros([BK, BV], dtype=tl.float32)
        if first:
            r = sp.to(DOT_DT)
            dkp += tl.dot(vv, tl.trans(r), input_precision=PREC) + zp[None, :]
            dvv += tl.dot(kp, r, input_precision=PREC)
            if NEG:
                r = sn.to(DOT_DT)
                dkn += tl.dot(vv, tl.trans(r), input_precision=PREC) + zn[None, :]
                dvv += tl.dot(kn, r, input_precision=PREC)
        if HAS_MASK:
            dkp = dkp * mk[:, None]
            dkn = dkn * mk[:, None]
        _st(dv_ptr + bos * (H * DV) + i_h * DV, dvv, L, DV, H * DV, k0, 0, BK, BV, True, not EVEN)
        _map_bwd(zk, kp_raw.to(tl.float32), kn_raw.to(tl.float32), dkp, dkn, tk_ok, wk, xk, dx_ptr, dz_ptr, dw_ptr,
                 db_ptr, bos, L, k0, i_h, i_hk, H, D, F, BK, BD, BF, FUSED, ACT, NEG, MAP_PREC, EVEN, DW_ATOMIC,
                 HAS_BK)  # fmt: skip


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    wq_ptr,
    bq_ptr,
    wk_ptr,
    bk_ptr,
    s_ptr,
    z_ptr,
    o_ptr,
    eps,
    H,
    HK,
    G,
    D,
    F,
    DV,
    BD: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    HAS_BQ: tl.constexpr,
    HAS_BK: tl.constexpr,
    ACT: tl.constexpr,
    NEG: tl.constexpr,
):
    """One token for one (sequence, KV head): ``S += phi_k v^T``, ``z += phi_k`` in place, then
    ``o = phi_q S / (phi_q . z + eps)`` for the ``G`` query heads of the group. The 1 x D x F
    products are broadcast-reduces (a ``tl.dot`` needs 16 rows)."""
    i_nh = tl.program_id(0)
    i_b = i_nh // HK
    i_hk = i_nh % HK
    FT = 2 * F if NEG else F
    offs_d = tl.arange(0, BD)
    offs_f = tl.arange(0, BF)
    offs_v = tl.arange(0, BV)
    d_ok = offs_d < D
    f_ok = offs_f < F
    v_ok = offs_v < DV
    xk = tl.load(k_ptr + (i_b * HK + i_hk) * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    wk, bk = _load_wb(wk_ptr, bk_ptr, i_hk, D, F, BD, BF, True, HAS_BK, False)
    zk = (tl.sum(xk[:, None] * wk.to(tl.float32), 0) + bk)[None, :]
    vv = tl.load(v_ptr + (i_b * HK + i_hk) * DV + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    sbase = s_ptr + (i_b * HK + i_hk) * FT * DV
    zbase = z_ptr + (i_b * HK + i_hk) * FT
    m2 = f_ok[:, None] & v_ok[None, :]
    # updated halves stay in registers for the reads below (a store is not visible to other
    # threads of the program without a barrier)
    kp = _act(zk, 1.0, f_ok, ACT, False)
    s_p, z_p = _load_half(sbase, zbase, 0, F, DV, 0, BF, BV, False)
    s_p += tl.trans(kp) * vv[None, :]
    z_p += tl.sum(kp, 0)
    tl.store(sbase + offs_f[:, None] * DV + offs_v[None, :], s_p, mask=m2)
    tl.store(zbase + offs_f, z_p, mask=f_ok)
    if NEG:
        kn = _act(zk, -1.0, f_ok, ACT, False)
        s_n, z_n = _load_half(sbase, zbase, F, F, DV, 0, BF, BV, False)
        s_n += tl.trans(kn) * vv[None, :]
        z_n += tl.sum(kn, 0)
        tl.store(sbase + (F + offs_f)[:, None] * DV + offs_v[None, :], s_n, mask=m2)
        tl.store(zbase + F + offs_f, z_n, mask=f_ok)
    for g in range(G):
        i_h = i_hk * G + g
        xq = tl.load(q_ptr + (i_b * H + i_h) * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        wq, bq = _load_wb(wq_ptr, bq_ptr, i_h, D, F, BD, BF, True, HAS_BQ, False)
        zq = (tl.sum(xq[:, None] * wq.to(tl.float32), 0) + bq)[None, :]
        qf = _act(zq, 1.0, f_ok, ACT, False)
        num = tl.sum(tl.trans(qf) * s_p, 0)
        den = tl.sum(qf * z_p[None, :], 1)
        if NEG:
            qf = _act(zq, -1.0, f_ok, ACT, False)
            num += tl.sum(tl.trans(qf) * s_n, 0)
            den += tl.sum(qf * z_n[None, :], 1)
        o = num / (den + eps)
        tl.store(o_ptr + (i_b * H + i_h) * DV + offs_v, o.to(o_ptr.dtype.element_ty), mask=v_ok)
