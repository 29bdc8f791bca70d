"""Triton kernels for chunked linear attention with an optional fused Hedgehog feature map.

All kernels walk the chunks (``BT`` tokens each) of one *segment* of one sequence for one
KV head (or query head, for ``_bwd_dq_kernel``). A segment is ``CPS`` consecutive chunks; the
state entering a segment is computed by the launcher from per-segment sums (see
``_launch.py`` and ``docs/kernels.md``). Two feature layouts are handled:

* ``FUSED``: the kernel reads raw ``x [N*T, NH, D]`` plus ``W [NH, D, F]`` and ``b [NH, F]`` and
  computes ``z = x @ W + b`` in fp32, then ``p = act(z)`` and, with ``NEG``, ``n = act(-z)``
  (features ``[p, n]``, ``2F`` of them). ``act`` is ``softmax`` over ``F`` or ``exp`` of the
  pre-activation clamped to ``[-30, 30]``.
* generic: the kernel reads precomputed features ``[N*T, NH, F]`` (``NEG`` is then False).

The state is kept as two fp32 blocks, ``S_p [F, DV]`` for the positive half and ``S_n`` for the
negated half (``z_p``, ``z_n`` for the normalizer), so no concatenation is needed in registers.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rc(r_ok, c_ok, EVEN: tl.constexpr):
    """``[R, C]`` mask from row and column masks; rows only when every column is real (``EVEN``):
    a full-tile i1 mask costs a register per element and the compiler hoists it out of loops."""
    if EVEN:
        return r_ok[:, None]
    else:
        return r_ok[:, None] & c_ok[None, :]


@triton.jit
def _hh_act(z, f_ok, ACT: tl.constexpr, NEG: tl.constexpr, EVEN: tl.constexpr = False):
    """Hedgehog activation of a ``[M, BF]`` fp32 pre-activation; padded columns give 0."""
    if ACT == "softmax":
        if EVEN:
            zp = z
        else:
            zp = tl.where(f_ok[None, :], z, float("-inf"))
        p = tl.exp(zp - tl.max(zp, 1)[:, None])
        p = p / tl.sum(p, 1)[:, None]
        if NEG:
            if EVEN:
                zn = -z
            else:
                zn = tl.where(f_ok[None, :], -z, float("-inf"))
            n = tl.exp(zn - tl.max(zn, 1)[:, None])
            n = n / tl.sum(n, 1)[:, None]
        else:
            n = p
    else:
        zc = tl.minimum(tl.maximum(z, -30.0), 30.0)
        p = tl.exp(zc) if EVEN else tl.where(f_ok[None, :], tl.exp(zc), 0.0)
        if NEG:
            n = tl.exp(-zc) if EVEN else tl.where(f_ok[None, :], tl.exp(-zc), 0.0)
        else:
            n = p
    return p, n


@triton.jit
def _hh_act_bwd(z, p, n, dp, dn, ACT: tl.constexpr, NEG: tl.constexpr):
    """Gradient of the pre-activation ``z`` given the feature gradients ``dp``, ``dn``."""
    if ACT == "softmax":
        dz = p * (dp - tl.sum(dp * p, 1)[:, None])
        if NEG:
            dz -= n * (dn - tl.sum(dn * n, 1)[:, None])
    else:
        # torch.clamp passes the gradient where min <= z <= max (inclusive).
        inside = (z >= -30.0) & (z <= 30.0)
        dz = tl.where(inside, dp * p, 0.0)
        if NEG:
            dz -= tl.where(inside, dn * n, 0.0)
    return dz


@triton.jit
def _feat_tile(
    x_ptr,
    w_ptr,
    b_ptr,
    tok,
    t_ok,
    i_h,
    NH,
    D,
    F,
    BD: tl.constexpr,
    BF: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    NEG: tl.constexpr,
    W_NATIVE: tl.constexpr,
    MAP_PREC: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Load one chunk of one head and return ``(x, z, p, n)``; rows with ``t_ok == 0`` are 0.

    ``x`` is the raw input (for dW), ``z`` the fp32 pre-activation, ``p``/``n`` the fp32 features.
    In the generic path ``x``, ``z`` and ``n`` alias ``p`` (the loaded features).
    """
    offs_f = tl.arange(0, BF)
    f_ok = offs_f < F
    if FUSED:
        offs_d = tl.arange(0, BD)
        d_ok = offs_d < D
        x = tl.load(
            x_ptr + tok[:, None] * (NH * D) + i_h * D + offs_d[None, :],
            mask=_rc(t_ok, d_ok, EVEN),
            other=0.0,
        )
        w = tl.load(
            w_ptr + i_h * D * F + offs_d[:, None] * F + offs_f[None, :],
            mask=_rc(d_ok, f_ok, EVEN),
            other=0.0,
        )
        if W_NATIVE:
            # bf16/fp16 x bf16/fp16 products are exact in the fp32 accumulator.
            z = tl.dot(x, w)
        else:
            z = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=MAP_PREC)
        if HAS_B:
            b = tl.load(b_ptr + i_h * F + offs_f, mask=f_ok, other=0.0).to(tl.float32)
            z = z + b[None, :]
        p, n = _hh_act(z, f_ok, ACT, NEG, EVEN)
        p = tl.where(t_ok[:, None], p, 0.0)
        n = tl.where(t_ok[:, None], n, 0.0)
    else:
        x = tl.load(
            x_ptr + tok[:, None] * (NH * F) + i_h * F + offs_f[None, :],
            mask=_rc(t_ok, f_ok, EVEN),
            other=0.0,
        )
        p = x.to(tl.float32)
        z = p
        n = p
    return x, z, p, n


@triton.jit
def _feat_tile_bwd(
    x,
    z,
    p,
    n,
    dp,
    dn,
    t_ok,
    dx_ptr,
    w_ptr,
    tok,
    i_h,
    NH,
    D,
    F,
    dw_acc,
    db_acc,
    BD: tl.constexpr,
    BF: tl.constexpr,
    FUSED: tl.constexpr,
    ACT: tl.constexpr,
    NEG: tl.constexpr,
    MAP_PREC: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Store the input gradient of one chunk; return the updated dW / db accumulators."""
    offs_f = tl.arange(0, BF)
    f_ok = offs_f < F
    if FUSED:
        offs_d = tl.arange(0, BD)
        d_ok = offs_d < D
        dz = _hh_act_bwd(z, p, n, dp, dn, ACT, NEG)
        dz = tl.where(_rc(t_ok, f_ok, EVEN), dz, 0.0)
        w = tl.load(
            w_ptr + i_h * D * F + offs_d[:, None] * F + offs_f[None, :],
            mask=_rc(d_ok, f_ok, EVEN),
            other=0.0,
        ).to(tl.float32)
        dx = tl.dot(dz, tl.trans(w), input_precision=MAP_PREC)
        tl.store(
            dx_ptr + tok[:, None] * (NH * D) + i_h * D + offs_d[None, :],
            dx.to(dx_ptr.dtype.element_ty),
            mask=_rc(t_ok, d_ok, EVEN),
        )
        dw_acc += tl.dot(tl.trans(x.to(tl.float32)), dz, input_precision=MAP_PREC)
        db_acc += tl.sum(dz, 0)
    else:
        tl.store(
            dx_ptr + tok[:, None] * (NH * F) + i_h * F + offs_f[None, :],
            dp.to(dx_ptr.dtype.element_ty),
            mask=_rc(t_ok, f_ok, EVEN),
        )
    return dw_acc, db_acc


@triton.jit
def _load_dout(
    do_ptr,
    o_ptr,
    den_ptr,
    mask_ptr,
    tok,
    t_ok,
    i_h,
    H,
    DV,
    BV: tl.constexpr,
    HAS_MASK: tl.constexpr,
    EVEN: tl.constexpr,
):
    """``g = do / den`` ``[BT, BV]`` and ``c = -(do . o) / den`` ``[BT]``; zero at padded queries."""
    offs_v = tl.arange(0, BV)
    v_ok = offs_v < DV
    m2 = _rc(t_ok, v_ok, EVEN)
    off = tok[:, None] * (H * DV) + i_h * DV + offs_v[None, :]
    do = tl.load(do_ptr + off, mask=m2, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + off, mask=m2, other=0.0).to(tl.float32)
    den = tl.load(den_ptr + tok * H + i_h, mask=t_ok, other=1.0)
    if HAS_MASK:
        mq = tl.load(mask_ptr + tok, mask=t_ok, other=0.0)
        do = tl.where(mq[:, None] != 0, do, 0.0)
    g = do / den[:, None]
    c = -tl.sum(do * o, 1) / den
    return g, c


@triton.jit
def _load_state(ptr, zptr, F, DV, v0, BF: tl.constexpr, BV: tl.constexpr, NEG: tl.constexpr, EVEN: tl.constexpr):
    """State halves ``S[:F, v0:v0+BV]``, ``S[F:2F, v0:v0+BV]`` of a ``[FT, DV]`` fp32 state, and ``z``."""
    offs_f = tl.arange(0, BF)
    offs_v = v0 + tl.arange(0, BV)
    f_ok = offs_f < F
    m2 = _rc(f_ok, offs_v < DV, EVEN)
    s_p = tl.load(ptr + offs_f[:, None] * DV + offs_v[None, :], mask=m2, other=0.0)
    z_p = tl.load(zptr + offs_f, mask=f_ok, other=0.0)
    if NEG:
        s_n = tl.load(ptr + (F + offs_f)[:, None] * DV + offs_v[None, :], mask=m2, other=0.0)
        z_n = tl.load(zptr + F + offs_f, mask=f_ok, other=0.0)
    else:
        s_n = s_p
        z_n = z_p
    return s_p, s_n, z_p, z_n


@triton.jit
def _store_state(
    ptr, zptr, s_p, s_n, z_p, z_n, F, DV, v0, BF: tl.constexpr, BV: tl.constexpr, NEG: tl.constexpr, EVEN: tl.constexpr
):
    offs_f = tl.arange(0, BF)
    offs_v = v0 + tl.arange(0, BV)
    f_ok = offs_f < F
    m2 = _rc(f_ok, offs_v < DV, EVEN)
    tl.store(ptr + offs_f[:, None] * DV + offs_v[None, :], s_p, mask=m2)
    tl.store(zptr + offs_f, z_p, mask=f_ok)
    if NEG:
        tl.store(ptr + (F + offs_f)[:, None] * DV + offs_v[None, :], s_n, mask=m2)
        tl.store(zptr + F + offs_f, z_n, mask=f_ok)


@triton.jit
def _segment(cu_ptr, i_n, i_s, CPS, BT: tl.constexpr):
    """Token offset of sequence ``i_n``, its length, and the chunk range of segment ``i_s``."""
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    L = eos - bos
    c0 = i_s * CPS
    c1 = tl.minimum(c0 + CPS, tl.cdiv(L, BT))
    return bos, L, c0, c1


@triton.jit
def _state_kernel(
    k_ptr,
    v_ptr,
    wk_ptr,
    bk_ptr,
    mask_ptr,
    cu_ptr,
    sl_ptr,
    zl_ptr,
    HK,
    D,
    F,
    DV,
    CPS,
    NS,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACT: tl.constexpr,
    NEG: tl.constexpr,
    W_NATIVE: tl.constexpr,
    MAP_PREC: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Per-segment key sums ``sum phi_k^T v`` and ``sum phi_k`` -> ``sl [N, HK, NS, FT, DV]``."""
    i_s = tl.program_id(0)
    i_nh = tl.program_id(1)
    v0 = tl.program_id(2) * BV  # value columns of this program (fwd kernels split V; bwd: one block)
    i_n = i_nh // HK
    i_hk = i_nh % HK
    bos, L, c0, c1 = _segment(cu_ptr, i_n, i_s, CPS, BT)
    FT = 2 * F if NEG else F
    offs_v = v0 + tl.arange(0, BV)
    v_ok = offs_v < DV
    s_p = tl.zeros([BF, BV], dtype=tl.float32)
    s_n = tl.zeros([BF, BV], dtype=tl.float32)
    z_p = tl.zeros([BF], dtype=tl.float32)
    z_n = tl.zeros([BF], dtype=tl.float32)
    for ic in range(c0, c1):
        offs_t = ic * BT + tl.arange(0, BT)
        t_ok = offs_t < L
        tok = bos + offs_t
        _x, _z, kp, kn = _feat_tile(
            k_ptr, wk_ptr, bk_ptr, tok, t_ok, i_hk, HK, D, F, BD, BF, FUSED, HAS_B, ACT, NEG, W_NATIVE, MAP_PREC, EVEN
        )
        if HAS_MASK:
            mk = tl.load(mask_ptr + tok, mask=t_ok, other=0.0)
            kp = kp * mk[:, None]
            kn = kn * mk[:, None]
        vv = tl.load(
            v_ptr + tok[:, None] * (HK * DV) + i_hk * DV + offs_v[None, :],
            mask=_rc(t_ok, v_ok, EVEN),
            other=0.0,
        ).to(DOT_DT)
        s_p += tl.dot(tl.trans(kp.to(DOT_DT)), vv, input_precision=PREC)
        z_p += tl.sum(kp, 0)
        if NEG:
            s_n += tl.dot(tl.trans(kn.to(DOT_DT)), vv, input_precision=PREC)
            z_n += tl.sum(kn, 0)
    base = (i_n * HK + i_hk) * NS + i_s
    _store_state(sl_ptr + base * FT * DV, zl_ptr + base * FT, s_p, s_n, z_p, z_n, F, DV, v0, BF, BV, NEG, EVEN)


@triton.jit
def _fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    wq_ptr,
    bq_ptr,
    wk_ptr,
    bk_ptr,
    mask_ptr,
    cu_ptr,
    si_ptr,
    zi_ptr,
    o_ptr,
    den_ptr,
    se_ptr,
    ze_ptr,
    eps,
    H,
    HK,
    G,
    D,
    F,
    DV,
    CPS,
    NS,
    si_sn,
    si_sh,
    si_ss,
    zi_sn,
    zi_sh,
    zi_ss,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_BQ: tl.constexpr,
    HAS_BK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    STORE_END: tl.constexpr,
    ACT: tl.constexpr,
    NEG: tl.constexpr,
    W_NATIVE: tl.constexpr,
    MAP_PREC: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Outputs of one segment of one KV head (all ``G`` query heads of the group).

    Starts from the state ``si[n, hk, s]`` (causal: everything before the segment plus the
    initial state; bidirectional: the whole sequence plus the initial state) and, when causal,
    walks the chunks adding each one's keys after its queries are done.
    """
    i_s = tl.program_id(0)
    i_nh = tl.program_id(1)
    v0 = tl.program_id(2) * BV  # value columns of this program (fwd kernels split V; bwd: one block)
    i_n = i_nh // HK
    i_hk = i_nh % HK
    bos, L, c0, c1 = _segment(cu_ptr, i_n, i_s, CPS, BT)
    FT = 2 * F if NEG else F
    offs_v = v0 + tl.arange(0, BV)
    v_ok = offs_v < DV
    offs_i = tl.arange(0, BT)
    causal_mask = offs_i[:, None] >= offs_i[None, :]
    s_p, s_n, z_p, z_n = _load_state(
        si_ptr + i_n * si_sn + i_hk * si_sh + i_s * si_ss,
        zi_ptr + i_n * zi_sn + i_hk * zi_sh + i_s * zi_ss,
        F,
        DV,
        v0,
        BF,
        BV,
        NEG,
        EVEN,
    )
    for ic in range(c0, c1):
        offs_t = ic * BT + offs_i
        t_ok = offs_t < L
        tok = bos + offs_t
        if CAUSAL:
            _xk, _zk, kp, kn = _feat_tile(
                k_ptr,
                wk_ptr,
                bk_ptr,
                tok,
                t_ok,
                i_hk,
                HK,
                D,
                F,
                BD,
                BF,
                FUSED,
                HAS_BK,
                ACT,
                NEG,
                W_NATIVE,
                MAP_PREC,
                EVEN,
            )
            if HAS_MASK:
                mk = tl.load(mask_ptr + tok, mask=t_ok, other=0.0)
                kp = kp * mk[:, None]
                kn = kn * mk[:, None]
            vv = tl.load(
                v_ptr + tok[:, None] * (HK * DV) + i_hk * DV + offs_v[None, :],
                mask=_rc(t_ok, v_ok, EVEN),
                other=0.0,
            ).to(DOT_DT)
            kp_d = kp.to(DOT_DT)
            kn_d = kn.to(DOT_DT)
        for g in range(G):
            i_h = i_hk * G + g
            _xq, _zq, qp, qn = _feat_tile(
                q_ptr,
                wq_ptr,
                bq_ptr,
                tok,
                t_ok,
                i_h,
                H,
                D,
                F,
                BD,
                BF,
                FUSED,
                HAS_BQ,
                ACT,
                NEG,
                W_NATIVE,
                MAP_PREC,
                EVEN,
            )
            qp_d = qp.to(DOT_DT)
            num = tl.dot(qp_d, s_p.to(qp_d.dtype), input_precision=PREC)
            den = tl.sum(qp * z_p[None, :], 1)
            if NEG:
                qn_d = qn.to(qp_d.dtype)
                num += tl.dot(qn_d, s_n.to(qp_d.dtype), input_precision=PREC)
                den += tl.sum(qn * z_n[None, :], 1)
            if CAUSAL:
                a = tl.dot(qp_d, tl.trans(kp_d), input_precision=PREC)
                if NEG:
                    a += tl.dot(qn_d, tl.trans(kn_d), input_precision=PREC)
                a = tl.where(causal_mask, a, 0.0)
                num += tl.dot(a.to(DOT_DT), vv, input_precision=PREC)
                den += tl.sum(a, 1)
            den = den + eps
            o = num / den[:, None]
            if HAS_MASK:
                mq = tl.load(mask_ptr + tok, mask=t_ok, other=0.0)
                o = tl.where(mq[:, None] != 0, o, 0.0)
            tl.store(
                o_ptr + tok[:, None] * (H * DV) + i_h * DV + offs_v[None, :],
                o.to(o_ptr.dtype.element_ty),
                mask=_rc(t_ok, v_ok, EVEN),
            )
            tl.store(den_ptr + tok * H + i_h, den, mask=t_ok)
        if CAUSAL:
            s_p += tl.dot(tl.trans(kp_d), vv, input_precision=PREC)
            z_p += tl.sum(kp, 0)
            if NEG:
                s_n += tl.dot(tl.trans(kn_d), vv, input_precision=PREC)
                z_n += tl.sum(kn, 0)
    if STORE_END:
        base = (i_n * HK + i_hk) * NS + i_s
        _store_state(se_ptr + base * FT * DV, ze_ptr + base * FT, s_p, s_n, z_p, z_n, F, DV, v0, BF, BV, NEG, EVEN)


@triton.jit
def _rstate_kernel(
    q_ptr,
    wq_ptr,
    bq_ptr,
    do_ptr,
    o_ptr,
    den_ptr,
    mask_ptr,
    cu_ptr,
    sl_ptr,
    zl_ptr,
    H,
    HK,
    G,
    D,
    F,
    DV,
    CPS,
    NS,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_BQ: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACT: tl.constexpr,
    NEG: tl.constexpr,
    W_NATIVE: tl.constexpr,
    MAP_PREC: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Per-segment query sums of the backward state: ``sum phi_q^T g`` and ``sum phi_q c``."""
    i_s = tl.program_id(0)
    i_nh = tl.program_id(1)
    v0 = tl.program_id(2) * BV  # value columns of this program (fwd kernels split V; bwd: one block)
    i_n = i_nh // HK
    i_hk = i_nh % HK
    bos, L, c0, c1 = _segment(cu_ptr, i_n, i_s, CPS, BT)
    FT = 2 * F if NEG else F
    d_p = tl.zeros([BF, BV], dtype=tl.float32)
    d_n = tl.zeros([BF, BV], dtype=tl.float32)
    e_p = tl.zeros([BF], dtype=tl.float32)
    e_n = tl.zeros([BF], dtype=tl.float32)
    for ic in range(c0, c1):
        offs_t = ic * BT + tl.arange(0, BT)
        t_ok = offs_t < L
        tok = bos + offs_t
        for g in range(G):
            i_h = i_hk * G + g
            _xq, _zq, qp, qn = _feat_tile(
                q_ptr,
                wq_ptr,
                bq_ptr,
                tok,
                t_ok,
                i_h,
                H,
                D,
                F,
                BD,
                BF,
                FUSED,
                HAS_BQ,
                ACT,
                NEG,
                W_NATIVE,
                MAP_PREC,
                EVEN,
            )
            gg, c = _load_dout(do_ptr, o_ptr, den_ptr, mask_ptr, tok, t_ok, i_h, H, DV, BV, HAS_MASK, EVEN)
            gg_d = gg.to(DOT_DT)
            d_p += tl.dot(tl.trans(qp.to(gg_d.dtype)), gg_d, input_precision=PREC)
            e_p += tl.sum(qp * c[:, None], 0)
            if NEG:
                d_n += tl.dot(tl.trans(qn.to(gg_d.dtype)), gg_d, input_precision=PREC)
                e_n += tl.sum(qn * c[:, None], 0)
    base = (i_n * HK + i_hk) * NS + i_s
    _store_state(sl_ptr + base * FT * DV, zl_ptr + base * FT, d_p, d_n, e_p, e_n, F, DV, v0, BF, BV, NEG, EVEN)


@triton.jit
def _bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    wq_ptr,
    bq_ptr,
    wk_ptr,
    bk_ptr,
    mask_ptr,
    cu_ptr,
    si_ptr,
    zi_ptr,
    do_ptr,
    o_ptr,
    den_ptr,
    dq_ptr,
    dw_ptr,
    db_ptr,
    H,
    HK,
    G,
    D,
    F,
    DV,
    CPS,
    NS,
    si_sn,
    si_sh,
    si_ss,
    zi_sn,
    zi_sh,
    zi_ss,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_BQ: tl.constexpr,
    HAS_BK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACT: tl.constexpr,
    NEG: tl.constexpr,
    W_NATIVE: tl.constexpr,
    MAP_PREC: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
    EVEN: tl.constexpr,
):
    """dq (and the partial dW_q, db_q of this segment) for one query head, walking forward."""
    i_s = tl.program_id(0)
    i_nh = tl.program_id(1)
    v0 = tl.program_id(2) * BV  # value columns of this program (fwd kernels split V; bwd: one block)
    i_n = i_nh // H
    i_h = i_nh % H
    i_hk = i_h // G
    bos, L, c0, c1 = _segment(cu_ptr, i_n, i_s, CPS, BT)
    offs_v = v0 + tl.arange(0, BV)
    v_ok = offs_v < DV
    offs_i = tl.arange(0, BT)
    causal_mask = offs_i[:, None] >= offs_i[None, :]
    s_p, s_n, z_p, z_n = _load_state(
        si_ptr + i_n * si_sn + i_hk * si_sh + i_s * si_ss,
        zi_ptr + i_n * zi_sn + i_hk * zi_sh + i_s * zi_ss,
        F,
        DV,
        v0,
        BF,
        BV,
        NEG,
        EVEN,
    )
    dw_acc = tl.zeros([BD, BF], dtype=tl.float32)
    db_acc = tl.zeros([BF], dtype=tl.float32)
    for ic in range(c0, c1):
        offs_t = ic * BT + offs_i
        t_ok = offs_t < L
        tok = bos + offs_t
        xq, zq, qp, qn = _feat_tile(
            q_ptr, wq_ptr, bq_ptr, tok, t_ok, i_h, H, D, F, BD, BF, FUSED, HAS_BQ, ACT, NEG, W_NATIVE, MAP_PREC, EVEN
        )
        gg, c = _load_dout(do_ptr, o_ptr, den_ptr, mask_ptr, tok, t_ok, i_h, H, DV, BV, HAS_MASK, EVEN)
        gg_d = gg.to(DOT_DT)
        dqp = tl.dot(gg_d, tl.trans(s_p.to(gg_d.dtype)), input_precision=PREC) + c[:, None] * z_p[None, :]
        if NEG:
            dqn = tl.dot(gg_d, tl.trans(s_n.to(gg_d.dtype)), input_precision=PREC) + c[:, None] * z_n[None, :]
        else:
            dqn = dqp
        if CAUSAL:
            _xk, _zk, kp, kn = _feat_tile(
                k_ptr,
                wk_ptr,
                bk_ptr,
                tok,
                t_ok,
                i_hk,
                HK,
                D,
                F,
                BD,
                BF,
                FUSED,
                HAS_BK,
                ACT,
                NEG,
                W_NATIVE,
                MAP_PREC,
                EVEN,
            )
            if HAS_MASK:
                mk = tl.load(mask_ptr + tok, mask=t_ok, other=0.0)
                kp = kp * mk[:, None]
                kn = kn * mk[:, None]
            vv = tl.load(
                v_ptr + tok[:, None] * (HK * DV) + i_hk * DV + offs_v[None, :],
                mask=_rc(t_ok, v_ok, EVEN),
                other=0.0,
            ).to(DOT_DT)
            kp_d = kp.to(DOT_DT)
            da = tl.dot(gg_d, tl.trans(vv), input_precision=PREC) + c[:, None]
            da = tl.where(causal_mask, da, 0.0).to(DOT_DT)
            dqp += tl.dot(da, kp_d, input_precision=PREC)
            s_p += tl.dot(tl.trans(kp_d), vv, input_precision=PREC)
            z_p += tl.sum(kp, 0)
            if NEG:
                kn_d = kn.to(DOT_DT)
                dqn += tl.dot(da, kn_d, input_precision=PREC)
                s_n += tl.dot(tl.trans(kn_d), vv, input_precision=PREC)
                z_n += tl.sum(kn, 0)
        dw_acc, db_acc = _feat_tile_bwd(
            xq, zq, qp, qn, dqp, dqn, t_ok, dq_ptr, wq_ptr, tok, i_h, H, D, F, dw_acc, db_acc,
            BD, BF, FUSED, ACT, NEG, MAP_PREC, EVEN,
        )  # fmt: skip
    if FUSED:
        offs_d = tl.arange(0, BD)
        offs_f = tl.arange(0, BF)
        f_ok = offs_f < F
        base = (i_n * NS + i_s) * H + i_h
        tl.store(
            dw_ptr + base * D * F + offs_d[:, None] * F + offs_f[None, :],
            dw_acc,
            mask=(offs_d < D)[:, None] & f_ok[None, :],
        )
        tl.store(db_ptr + base * F + offs_f, db_acc, mask=f_ok)


@triton.jit
def _bwd_dkv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    wq_ptr,
    bq_ptr,
    wk_ptr,
    bk_ptr,
    mask_ptr,
    cu_ptr,
    ri_ptr,
    rzi_ptr,
    do_ptr,
    o_ptr,
    den_ptr,
    dk_ptr,
    dv_ptr,
    dw_ptr,
    db_ptr,
    H,
    HK,
    G,
    D,
    F,
    DV,
    CPS,
    NS,
    ri_sn,
    ri_sh,
    ri_ss,
    rzi_sn,
    rzi_sh,
    rzi_ss,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_BQ: tl.constexpr,
    HAS_BK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACT: tl.constexpr,
    NEG: tl.constexpr,
    W_NATIVE: tl.constexpr,
    MAP_PREC: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
    EVEN: tl.constexpr,
):
    """dk, dv (and partial dW_k, db_k) for one KV head, walking the segment backwards.

    ``ri[n, hk, s]`` holds ``dH = sum phi_q^T g`` (and ``dh = sum phi_q c``) over the queries
    after the segment (causal) or over all queries (bidirectional), plus the final-state grad.
    """
    i_s = tl.program_id(0)
    i_nh = tl.program_id(1)
    v0 = tl.program_id(2) * BV  # value columns of this program (fwd kernels split V; bwd: one block)
    i_n = i_nh // HK
    i_hk = i_nh % HK
    bos, L, c0, c1 = _segment(cu_ptr, i_n, i_s, CPS, BT)
    offs_v = v0 + tl.arange(0, BV)
    v_ok = offs_v < DV
    offs_i = tl.arange(0, BT)
    # rows are keys s, columns queries t: key s is seen by query t when t >= s
    causal_mask_t = offs_i[:, None] <= offs_i[None, :]
    dh_p, dh_n, e_p, e_n = _load_state(
        ri_ptr + i_n * ri_sn + i_hk * ri_sh + i_s * ri_ss,
        rzi_ptr + i_n * rzi_sn + i_hk * rzi_sh + i_s * rzi_ss,
        F,
        DV,
        v0,
        BF,
        BV,
        NEG,
        EVEN,
    )
    dw_acc = tl.zeros([BD, BF], dtype=tl.float32)
    db_acc = tl.zeros([BF], dtype=tl.float32)
    for j in range(c0, c1):
        ic = c1 - 1 - (j - c0)
        offs_t = ic * BT + offs_i
        t_ok = offs_t < L
        tok = bos + offs_t
        xk, zk, kp_raw, kn_raw = _feat_tile(
            k_ptr, wk_ptr, bk_ptr, tok, t_ok, i_hk, HK, D, F, BD, BF, FUSED, HAS_BK, ACT, NEG, W_NATIVE, MAP_PREC, EVEN
        )
        if HAS_MASK:
            mk = tl.load(mask_ptr + tok, mask=t_ok, other=0.0)
            kp = kp_raw * mk[:, None]
            kn = kn_raw * mk[:, None]
        else:
            kp = kp_raw
            kn = kn_raw
        vv = tl.load(
            v_ptr + tok[:, None] * (HK * DV) + i_hk * DV + offs_v[None, :],
            mask=_rc(t_ok, v_ok, EVEN),
            other=0.0,
        ).to(DOT_DT)
        kp_d = kp.to(DOT_DT)
        dkp = tl.dot(vv, tl.trans(dh_p.to(DOT_DT)), input_precision=PREC) + e_p[None, :]
        dv = tl.dot(kp_d, dh_p.to(DOT_DT), input_precision=PREC)
        if NEG:
            kn_d = kn.to(DOT_DT)
            dkn = tl.dot(vv, tl.trans(dh_n.to(DOT_DT)), input_precision=PREC) + e_n[None, :]
            dv += tl.dot(kn_d, dh_n.to(DOT_DT), input_precision=PREC)
        else:
            dkn = dkp
        if CAUSAL:
            for g in range(G):
                i_h = i_hk * G + g
                _xq, _zq, qp, qn = _feat_tile(
                    q_ptr,
                    wq_ptr,
                    bq_ptr,
                    tok,
                    t_ok,
                    i_h,
                    H,
                    D,
                    F,
                    BD,
                    BF,
                    FUSED,
                    HAS_BQ,
                    ACT,
                    NEG,
                    W_NATIVE,
                    MAP_PREC,
                    EVEN,
                )
                gg, c = _load_dout(do_ptr, o_ptr, den_ptr, mask_ptr, tok, t_ok, i_h, H, DV, BV, HAS_MASK, EVEN)
                gg_d = gg.to(DOT_DT)
                qp_d = qp.to(DOT_DT)
                at = tl.dot(kp_d, tl.trans(qp_d), input_precision=PREC)
                if NEG:
                    qn_d = qn.to(DOT_DT)
                    at += tl.dot(kn_d, tl.trans(qn_d), input_precision=PREC)
                at = tl.where(causal_mask_t, at, 0.0)
                dat = tl.dot(vv, tl.trans(gg_d), input_precision=PREC) + c[None, :]
                dat = tl.where(causal_mask_t, dat, 0.0).to(DOT_DT)
                dkp += tl.dot(dat, qp_d, input_precision=PREC)
                dv += tl.dot(at.to(DOT_DT), gg_d, input_precision=PREC)
                dh_p += tl.dot(tl.trans(qp_d), gg_d, input_precision=PREC)
                e_p += tl.sum(qp * c[:, None], 0)
                if NEG:
                    dkn += tl.dot(dat, qn_d, input_precision=PREC)
                    dh_n += tl.dot(tl.trans(qn_d), gg_d, input_precision=PREC)
                    e_n += tl.sum(qn * c[:, None], 0)
        if HAS_MASK:
            dkp = dkp * mk[:, None]
            dkn = dkn * mk[:, None]
        tl.store(
            dv_ptr + tok[:, None] * (HK * DV) + i_hk * DV + offs_v[None, :],
            dv.to(dv_ptr.dtype.element_ty),
            mask=_rc(t_ok, v_ok, EVEN),
        )
        dw_acc, db_acc = _feat_tile_bwd(
            xk, zk, kp_raw, kn_raw, dkp, dkn, t_ok, dk_ptr, wk_ptr, tok, i_hk, HK, D, F, dw_acc, db_acc,
            BD, BF, FUSED, ACT, NEG, MAP_PREC, EVEN,
        )  # fmt: skip
    if FUSED:
        offs_d = tl.arange(0, BD)
        offs_f = tl.arange(0, BF)
        f_ok = offs_f < F
        base = (i_n * NS + i_s) * HK + i_hk
        tl.store(
            dw_ptr + base * D * F + offs_d[:, None] * F + offs_f[None, :],
            dw_acc,
            mask=(offs_d < D)[:, None] & f_ok[None, :],
        )
        tl.store(db_ptr + base * F + offs_f, db_acc, mask=f_ok)


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
    ``o = phi_q S / (phi_q . z + eps)`` for the ``G`` query heads of the group."""
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
    wmask = d_ok[:, None] & f_ok[None, :]
    # keys: 1 x D times D x F as a broadcast-reduce (tl.dot needs 16 rows)
    xk = tl.load(k_ptr + (i_b * HK + i_hk) * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    wk = tl.load(wk_ptr + i_hk * D * F + offs_d[:, None] * F + offs_f[None, :], mask=wmask, other=0.0)
    zk = tl.sum(xk[:, None] * wk.to(tl.float32), 0)
    if HAS_BK:
        zk += tl.load(bk_ptr + i_hk * F + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    kp, kn = _hh_act(zk[None, :], f_ok, ACT, NEG)
    vv = tl.load(v_ptr + (i_b * HK + i_hk) * DV + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    sbase = s_ptr + (i_b * HK + i_hk) * FT * DV
    zbase = z_ptr + (i_b * HK + i_hk) * FT
    s_p, s_n, z_p, z_n = _load_state(sbase, zbase, F, DV, 0, BF, BV, NEG, False)
    s_p += tl.trans(kp) * vv[None, :]
    z_p += tl.sum(kp, 0)
    if NEG:
        s_n += tl.trans(kn) * vv[None, :]
        z_n += tl.sum(kn, 0)
    _store_state(sbase, zbase, s_p, s_n, z_p, z_n, F, DV, 0, BF, BV, NEG, False)
    for g in range(G):
        i_h = i_hk * G + g
        xq = tl.load(q_ptr + (i_b * H + i_h) * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        wq = tl.load(wq_ptr + i_h * D * F + offs_d[:, None] * F + offs_f[None, :], mask=wmask, other=0.0)
        zq = tl.sum(xq[:, None] * wq.to(tl.float32), 0)
        if HAS_BQ:
            zq += tl.load(bq_ptr + i_h * F + offs_f, mask=f_ok, other=0.0).to(tl.float32)
        qp, qn = _hh_act(zq[None, :], f_ok, ACT, NEG)
        num = tl.sum(tl.trans(qp) * s_p, 0)
        den = tl.sum(qp * z_p[None, :], 1)
        if NEG:
            num += tl.sum(tl.trans(qn) * s_n, 0)
            den += tl.sum(qn * z_n[None, :], 1)
        o = num / (den + eps)
        tl.store(o_ptr + (i_b * H + i_h) * DV + offs_v, o.to(o_ptr.dtype.element_ty), mask=v_ok)
