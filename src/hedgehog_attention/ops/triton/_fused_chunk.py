"""Fused-chunk Triton kernels for causal linear attention (the ``"fused_chunk"`` design).

One program walks the chunks of one *segment* of one sequence in order and carries the running
state in registers (fp32): for every chunk it computes the outputs from the state entering the
chunk and the intra-chunk ``tril(phi_q phi_k^T) v``, then adds the chunk to the state. No
per-chunk state ever reaches global memory (fla's ``fused_chunk`` layout; the ``"chunk"`` design
in ``_kernels.py`` stores them and reads them back in a second kernel). The backward is two such
walks: forward in time for dq (the state recomputed on the fly), backward in time for dk, dv
(the reverse state ``sum_{later} phi_q^T (do / den)`` carried instead).

Segments give long sequences with few heads enough programs. Either (``fc_segments`` "sums") a
``_state_kernel`` walk (no per-chunk stores) first sums every segment, a cumulative sum in PyTorch
gives each segment its entering state ``si [N, HK, NS, FT, DV]`` (``SEG``), and the walks below
start from it; or ("fix", the forward's default) the forward walks start every segment from zero and
``_fc_fix_kernel`` then adds the entering states (from the walks' own end states) to the outputs.

Every program stores its state at the end of its segment (``se``: after the last chunk of the
segment going forward; after the first going backward), which gives the final state / the
initial-state gradient without another pass. The map helpers are ``_kernels``'s.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._kernels import (
    _coldot,
    _colsum,
    _feat,
    _ld,
    _ld_x,
    _load_half,
    _load_wb,
    _map_bwd,
    _preact,
    _rowdot,
    _rowsum,
    _seq,
    _st,
)


@triton.jit
def _features(x, w, b, t_ok, F, BF: tl.constexpr, FUSED: tl.constexpr, ACT: tl.constexpr, NEG: tl.constexpr,
              W_NATIVE: tl.constexpr, MAP_PREC: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    """Pre-activation and both feature halves of a ``[BT, BD]`` tile (``n = p`` without ``NEG``)."""
    z = _preact(x, w, b, FUSED, W_NATIVE, MAP_PREC)
    p = _feat(z, 1.0, t_ok, F, BF, FUSED, ACT, EVEN)
    if NEG:
        n = _feat(z, -1.0, t_ok, F, BF, FUSED, ACT, EVEN)
    else:
        n = p
    return z, p, n


@triton.jit
def _state0(si_ptr, zi_ptr, sb, F, DV, BF: tl.constexpr, BV: tl.constexpr, SEG: tl.constexpr, NEG: tl.constexpr,
            EVEN: tl.constexpr):  # fmt: skip
    """Entering state of a segment (both halves; zeros without ``SEG``)."""
    if SEG:
        sp, zp = _load_half(si_ptr + sb * DV, zi_ptr + sb, 0, F, DV, 0, BF, BV, EVEN)
        if NEG:
            sn, zn = _load_half(si_ptr + sb * DV, zi_ptr + sb, F, F, DV, 0, BF, BV, EVEN)
        else:
            sn, zn = sp, zp
    else:
        sp = tl.zeros([BF, BV], dtype=tl.float32)
        zp = tl.zeros([BF], dtype=tl.float32)
        sn, zn = sp, zp
    return sp, zp, sn, zn


@triton.jit
def _store_state(se_ptr, sez_ptr, sb, sp, zp, sn, zn, F, DV, BF: tl.constexpr, BV: tl.constexpr, NEG: tl.constexpr,
                 EVEN: tl.constexpr):  # fmt: skip
    offs_f = tl.arange(0, BF)
    _st(se_ptr + sb * DV, sp, F, DV, DV, 0, 0, BF, BV, not EVEN, not EVEN)
    tl.store(sez_ptr + sb + offs_f, zp, mask=offs_f < F)
    if NEG:
        _st(se_ptr + (sb + F) * DV, sn, F, DV, DV, 0, 0, BF, BV, not EVEN, not EVEN)
        tl.store(sez_ptr + sb + F + offs_f, zn, mask=offs_f < F)


@triton.jit
def _store_state_tma(h_desc, hz_ptr, hb, sp, zp, sn, zn, F, BF: tl.constexpr, NEG: tl.constexpr):
    """:func:`_store_state` of the chunk states through a TMA descriptor over ``[rows, DV]`` (blocks
    ``[BF, BV]`` covering a feature half: ``EVEN``); the normaliser by pointer (``BF`` floats)."""
    offs_f = tl.arange(0, BF)
    h_desc.store([hb.to(tl.int32), 0], sp.to(h_desc.dtype))
    tl.store(hz_ptr + hb + offs_f, zp)
    if NEG:
        h_desc.store([(hb + F).to(tl.int32), 0], sn.to(h_desc.dtype))
        tl.store(hz_ptr + hb + F + offs_f, zn)


@triton.jit
def _walk(cu_ptr, T, H, HK, G, FT, CPS, NS, BT: tl.constexpr, VARLEN: tl.constexpr):
    """This program's (sequence, query head, segment) of a grid ``(N * H * NS,)``: the query head,
    its KV head, the sequence's first token and length, the segment's chunk range ``[c0, c1)`` and
    the row offset ``sb`` of its ``[N, HK, NS, FT, ...]`` segment state."""
    i_p = tl.program_id(0)
    i_s = i_p % NS
    i_nh = i_p // NS
    i_h = i_nh % H
    i_n = i_nh // H
    i_hk = i_h // G
    bos, L = _seq(cu_ptr, i_n, T, VARLEN)
    c0 = i_s * CPS
    c1 = tl.minimum(c0 + CPS, tl.cdiv(L, BT))
    sb = ((i_n * HK + i_hk) * NS + i_s).to(tl.int64) * FT
    return i_h, i_hk, bos, L, c0, c1, sb


@triton.jit
def _chunk_qkv(q_ptr, k_ptr, v_ptr, bos, L, ic, i_h, i_hk, H, HK, D, F, DV, BT: tl.constexpr, BD: tl.constexpr,
               BF: tl.constexpr, BV: tl.constexpr, FUSED: tl.constexpr, EVEN: tl.constexpr,
               DOT_DT: tl.constexpr):  # fmt: skip
    """Chunk ``ic`` of a walk: its first token, token offsets, row mask, flat token indices, and the
    raw ``q`` (query head ``i_h``), ``k`` and ``v`` (KV head ``i_hk``) tiles (0 past the end)."""
    t0 = ic * BT
    offs_t = t0 + tl.arange(0, BT)
    t_ok = offs_t < L
    tok = bos + offs_t
    xq = _ld_x(q_ptr, bos, L, t0, i_h, H, D, F, BT, BD, BF, FUSED, EVEN)
    xk = _ld_x(k_ptr, bos, L, t0, i_hk, HK, D, F, BT, BD, BF, FUSED, EVEN)
    vv = _ld(v_ptr + bos * (HK * DV) + i_hk * DV, L, DV, HK * DV, t0, 0, BT, BV, True, not EVEN).to(DOT_DT)
    return t0, offs_t, t_ok, tok, xq, xk, vv


@triton.jit
def _tma_ld(desc, bos, t0, col, T, BT: tl.constexpr, BX: tl.constexpr, VARLEN: tl.constexpr):
    """The ``[BT, BX]`` tile at token ``t0`` of the sequence starting at token ``bos``, column ``col``,
    through a TMA descriptor (the launcher's ``_descriptor``): over ``[B, T, heads * C]`` for equal
    lengths (rows past ``T`` come back 0), over ``[tokens, heads * C]`` with ``cu_seqlens`` (rows past
    the sequence are the next sequence's tokens)."""
    if VARLEN:
        return desc.load([(bos + t0).to(tl.int32), col])
    else:
        return desc.load([(bos // T).to(tl.int32), t0.to(tl.int32), col]).reshape(BT, BX)


@triton.jit
def _chunk_qkv_tma(q_desc, k_desc, v_desc, bos, L, ic, i_h, i_hk, T, D, F, DV, BT: tl.constexpr, BX: tl.constexpr,
                   BV: tl.constexpr, FUSED: tl.constexpr, VARLEN: tl.constexpr, DOT_DT: tl.constexpr):  # fmt: skip
    """:func:`_chunk_qkv` through TMA descriptors: the copy engine writes the tiles to shared memory,
    so the software pipeline of ``tl.range`` stages the next chunk without registers for addresses
    or in-flight data. With ``cu_seqlens`` the rows past the sequence are the next sequence's:
    ``k`` and ``v`` are zeroed there (their features must be finite before the row mask multiplies
    them); ``q``'s rows only reach outputs that are not stored."""
    t0 = ic * BT
    offs_t = t0 + tl.arange(0, BT)
    t_ok = offs_t < L
    tok = bos + offs_t
    xq = _tma_ld(q_desc, bos, t0, i_h * (D if FUSED else F), T, BT, BX, VARLEN)
    xk = _tma_ld(k_desc, bos, t0, i_hk * (D if FUSED else F), T, BT, BX, VARLEN)
    vv = _tma_ld(v_desc, bos, t0, i_hk * DV, T, BT, BV, VARLEN)
    if VARLEN:
        xk = tl.where(t_ok[:, None], xk, 0.0).to(k_desc.dtype)
        vv = tl.where(t_ok[:, None], vv, 0.0).to(v_desc.dtype)
    return t0, offs_t, t_ok, tok, xq, xk, vv.to(DOT_DT)


@triton.jit
def _store_rows(o_desc, o_ptr, o, bos, L, t0, i_h, T, H, DV, BT: tl.constexpr, BV: tl.constexpr, TMA: tl.constexpr,
                VARLEN: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    """Store a chunk's ``[BT, BV]`` output rows of head ``i_h``. By TMA: over ``[B, T, ...]`` the rows
    past ``T`` are dropped; with ``cu_seqlens`` only whole chunks (a partial chunk's block would
    overwrite the next sequence's first rows) and masked stores otherwise."""
    if TMA:
        if VARLEN:
            if t0 + BT <= L:
                o_desc.store([(bos + t0).to(tl.int32), i_h * DV], o.to(o_desc.dtype))
            else:
                _st(o_ptr + bos * (H * DV) + i_h * DV, o, L, DV, H * DV, t0, 0, BT, BV, True, not EVEN)
        else:
            o_desc.store([(bos // T).to(tl.int32), t0.to(tl.int32), i_h * DV], o.to(o_desc.dtype).reshape(1, BT, BV))
    else:
        _st(o_ptr + bos * (H * DV) + i_h * DV, o, L, DV, H * DV, t0, 0, BT, BV, True, not EVEN)


@triton.jit(do_not_specialize=["T", "CPS", "NS"])
def _fc_fwd_kernel(
    q_ptr, k_ptr, v_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, mask_ptr, cu_ptr, si_ptr, zi_ptr, se_ptr, sez_ptr,
    o_ptr, den_ptr, h_ptr, hz_ptr, hoff_ptr, q_desc, k_desc, v_desc, o_desc, h_desc, eps, T, H, HK, G, D, F, FT, DV,
    CPS, NS,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, FUSED: tl.constexpr,
    HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_MASK: tl.constexpr, SEG: tl.constexpr, VARLEN: tl.constexpr,
    ACT: tl.constexpr, NEG: tl.constexpr, W_NATIVE: tl.constexpr, MAP_PREC: tl.constexpr, PREC: tl.constexpr,
    DOT_DT: tl.constexpr, EVEN: tl.constexpr, STAGES: tl.constexpr, SUMS: tl.constexpr, STORE_H: tl.constexpr,
    HBT: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Outputs of one segment of one sequence for one query head (grid ``(N * H * NS,)``).

    Per chunk: ``o = (phi_q S + tril(phi_q phi_k^T) v) / (phi_q z + rowsum(tril(...)) + eps)``,
    then ``S += phi_k^T v``, ``z += sum phi_k`` (keys masked by ``attention_mask``). ``S`` is
    the KV head's state (recomputed by each query head of a GQA group); the group's first head
    stores the segment's end state ``se [N, HK, NS, FT, DV]``. Stores ``o`` and ``den`` (fp32).

    ``STORE_H`` (a training forward: the chunk layout's backward follows): the group's first head
    also stores the state entering every ``HBT``-token chunk of the backward's layout (a multiple
    of ``BT``), ``h [NC, HK, FT, DV]`` (its dtype) / ``hz [NC, HK, FT]`` (fp32), complete (from
    the segment's entering state): what the chunk layout's state walk stores, without the walk.
    ``hoff [N + 1]``: each sequence's first ``HBT``-chunk (``cu_seqlens``; otherwise arithmetic).

    ``TMA``: ``q``, ``k``, ``v`` loaded and ``o`` stored through the descriptors ``*_desc``
    (:func:`_chunk_qkv_tma`, :func:`_store_rows`; H200 run 60, two stages: 0.864 -> 0.783 ms at
    T = 4096, bitwise the same outputs), and with ``STORE_H`` the states through ``h_desc``
    (``[NC * HK * FT, DV]``, blocks ``[BF, BV]``: the copy engine drains them while the walk goes
    on); the ``*_ptr`` versions otherwise (the descriptors unused).
    """
    i_h, i_hk, bos, L, c0, c1, sb = _walk(cu_ptr, T, H, HK, G, FT, CPS, NS, BT, VARLEN)
    sp, zp, sn, zn = _state0(si_ptr, zi_ptr, sb, F, DV, BF, BV, SEG, NEG, EVEN)
    wq, bq = _load_wb(wq_ptr, bq_ptr, i_h, D, F, BD, BF, FUSED, HAS_BQ, EVEN)
    wk, bk = _load_wb(wk_ptr, bk_ptr, i_hk, D, F, BD, BF, FUSED, HAS_BK, EVEN)
    if STORE_H:
        R: tl.constexpr = HBT // BT
        i_n = tl.program_id(0) // (NS * H)
        if VARLEN:
            hc0 = tl.load(hoff_ptr + i_n).to(tl.int64)
        else:
            hc0 = i_n.to(tl.int64) * tl.cdiv(T, HBT)
        store_h = (i_h % G) == 0
    for ic in tl.range(c0, c1, num_stages=STAGES):
        if TMA:
            t0, offs_t, t_ok, tok, xq, xk, vv = _chunk_qkv_tma(q_desc, k_desc, v_desc, bos, L, ic, i_h, i_hk, T, D, F,
                                                               DV, BT, BD if FUSED else BF, BV, FUSED, VARLEN,
                                                               DOT_DT)  # fmt: skip
        else:
            t0, offs_t, t_ok, tok, xq, xk, vv = _chunk_qkv(q_ptr, k_ptr, v_ptr, bos, L, ic, i_h, i_hk, H, HK, D, F, DV,
                                                           BT, BD, BF, BV, FUSED, EVEN, DOT_DT)  # fmt: skip
        if STORE_H:  # noqa: SIM102 (a constexpr test, then a runtime one: two ifs in Triton)
            if store_h & ((ic % R) == 0):  # the state entering this HBT-chunk, before the chunk joins it
                hb = ((hc0 + ic // R) * HK + i_hk) * FT
                if TMA:
                    _store_state_tma(h_desc, hz_ptr, hb, sp, zp, sn, zn, F, BF, NEG)
                else:
                    _store_state(h_ptr, hz_ptr, hb, sp, zp, sn, zn, F, DV, BF, BV, NEG, EVEN)
        if HAS_MASK:
            mk = tl.load(mask_ptr + tok, mask=t_ok, other=0.0)
        zq = _preact(xq, wq, bq, FUSED, W_NATIVE, MAP_PREC)
        zk = _preact(xk, wk, bk, FUSED, W_NATIVE, MAP_PREC)
        # one feature half at a time (its tiles die before the other's are made: registers);
        # the state is read before the chunk joins it
        # features in the products' dtype right away (bf16 for bf16 inputs: half the registers of
        # fp32 tiles; the normaliser then sums the same rounded features as the numerator)
        qp_d = _feat(zq, 1.0, t_ok, F, BF, FUSED, ACT, EVEN).to(DOT_DT)
        kp_d = _feat(zk, 1.0, t_ok, F, BF, FUSED, ACT, EVEN).to(DOT_DT)
        if HAS_MASK:
            kp_d = (kp_d * mk[:, None]).to(DOT_DT)
        num = tl.dot(qp_d, sp.to(DOT_DT), input_precision=PREC)
        den = _rowdot(qp_d, zp, SUMS, DOT_DT, PREC)
        a = tl.dot(qp_d, tl.trans(kp_d), input_precision=PREC)
        sp += tl.dot(tl.trans(kp_d), vv, input_precision=PREC)
        zp += _colsum(kp_d, SUMS, DOT_DT, PREC)
        if NEG:
            qn_d = _feat(zq, -1.0, t_ok, F, BF, FUSED, ACT, EVEN).to(DOT_DT)
            kn_d = _feat(zk, -1.0, t_ok, F, BF, FUSED, ACT, EVEN).to(DOT_DT)
            if HAS_MASK:
                kn_d = (kn_d * mk[:, None]).to(DOT_DT)
            num += tl.dot(qn_d, sn.to(DOT_DT), input_precision=PREC)
            den += _rowdot(qn_d, zn, SUMS, DOT_DT, PREC)
            a += tl.dot(qn_d, tl.trans(kn_d), input_precision=PREC)
            sn += tl.dot(tl.trans(kn_d), vv, input_precision=PREC)
            zn += _colsum(kn_d, SUMS, DOT_DT, PREC)
        # (from the loop's token offsets: a mask hoisted out of the loop would hold registers)
        a = tl.where(offs_t[:, None] >= offs_t[None, :], a, 0.0)
        a_d = a.to(DOT_DT)
        num += tl.dot(a_d, vv, input_precision=PREC)
        den += _rowsum(a_d, SUMS, DOT_DT, PREC) + eps
        o = num * (1.0 / den)[:, None]  # one reciprocal per row, not a division per element
        if HAS_MASK:
            o = tl.where(mk[:, None] != 0, o, 0.0)
        _store_rows(o_desc, o_ptr, o, bos, L, t0, i_h, T, H, DV, BT, BV, TMA, VARLEN, EVEN)
        tl.store(den_ptr + tok * H + i_h, den, mask=t_ok)
    if (i_h % G) == 0:
        _store_state(se_ptr, sez_ptr, sb, sp, zp, sn, zn, F, DV, BF, BV, NEG, EVEN)


@triton.jit(do_not_specialize=["T", "CPS", "NS"])
def _fc_bwd_q_kernel(
    q_ptr, k_ptr, v_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, mask_ptr, cu_ptr, si_ptr, zi_ptr,
    do_ptr, o_ptr, den_ptr, cd_ptr, dq_ptr, dzq_ptr, T, H, HK, G, D, F, FT, DV, CPS, NS,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, FUSED: tl.constexpr,
    HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_MASK: tl.constexpr, SEG: tl.constexpr, VARLEN: tl.constexpr,
    ACT: tl.constexpr, NEG: tl.constexpr, W_NATIVE: tl.constexpr, MAP_PREC: tl.constexpr, PREC: tl.constexpr,
    DOT_DT: tl.constexpr, EVEN: tl.constexpr, STAGES: tl.constexpr, SUMS: tl.constexpr,
):  # fmt: skip
    """Query side of the backward for one segment and one query head (grid ``(N * H * NS,)``).

    With ``g = do / den`` and ``cd = -(do . o) / den`` (stored for the key side), per chunk
    ``dphi_q = g S^T + cd z^T + tril(g v^T + cd) phi_k``, then the map's backward (``dq``,
    ``dz_q``), then the chunk joins the state ``S``, ``z`` exactly as in the forward walk.
    ``do`` has padded queries zeroed by the launcher.
    """
    i_h, i_hk, bos, L, c0, c1, sb = _walk(cu_ptr, T, H, HK, G, FT, CPS, NS, BT, VARLEN)
    sp, zp, sn, zn = _state0(si_ptr, zi_ptr, sb, F, DV, BF, BV, SEG, NEG, EVEN)
    wq, bq = _load_wb(wq_ptr, bq_ptr, i_h, D, F, BD, BF, FUSED, HAS_BQ, EVEN)
    wk, bk = _load_wb(wk_ptr, bk_ptr, i_hk, D, F, BD, BF, FUSED, HAS_BK, EVEN)
    offs_i = tl.arange(0, BT)
    tril = offs_i[:, None] >= offs_i[None, :]
    for ic in tl.range(c0, c1, num_stages=STAGES):
        t0, offs_t, t_ok, tok, xq, xk, vv = _chunk_qkv(q_ptr, k_ptr, v_ptr, bos, L, ic, i_h, i_hk, H, HK, D, F, DV, BT,
                                                       BD, BF, BV, FUSED, EVEN, DOT_DT)  # fmt: skip
        do = _ld(do_ptr + bos * (H * DV) + i_h * DV, L, DV, H * DV, t0, 0, BT, BV, True, not EVEN).to(tl.float32)
        oo = _ld(o_ptr + bos * (H * DV) + i_h * DV, L, DV, H * DV, t0, 0, BT, BV, True, not EVEN).to(tl.float32)
        den = tl.load(den_ptr + tok * H + i_h, mask=t_ok, other=1.0)
        cd = -tl.sum(do * oo, 1) / den
        tl.store(cd_ptr + tok * H + i_h, cd, mask=t_ok)
        g = (do * (1.0 / den)[:, None]).to(DOT_DT)
        zq, qp, qn = _features(xq, wq, bq, t_ok, F, BF, FUSED, ACT, NEG, W_NATIVE, MAP_PREC, EVEN)
        _, kp, kn = _features(xk, wk, bk, t_ok, F, BF, FUSED, ACT, NEG, W_NATIVE, MAP_PREC, EVEN)
        if HAS_MASK:
            mk = tl.load(mask_ptr + tok, mask=t_ok, other=0.0)
            kp = kp * mk[:, None]
            kn = kn * mk[:, None]
        kp_d = kp.to(DOT_DT)
        kn_d = kn.to(DOT_DT)
        da = tl.dot(g, tl.trans(vv), input_precision=PREC) + cd[:, None]
        da = tl.where(tril, da, 0.0).to(DOT_DT)
        dqp = tl.dot(g, tl.trans(sp.to(DOT_DT)), input_precision=PREC) + cd[:, None] * zp[None, :]
        dqp += tl.dot(da, kp_d, input_precision=PREC)
        if NEG:
            dqn = tl.dot(g, tl.trans(sn.to(DOT_DT)), input_precision=PREC) + cd[:, None] * zn[None, :]
            dqn += tl.dot(da, kn_d, input_precision=PREC)
        else:
            dqn = dqp
        # the map's backward with the features rounded like the products' operands
        _map_bwd(zq, qp.to(DOT_DT).to(tl.float32), qn.to(DOT_DT).to(tl.float32), dqp, dqn, t_ok, wq, xq, dq_ptr,
                 dzq_ptr, dzq_ptr, dzq_ptr, bos, L, t0, i_h, i_h, H, D, F, BT, BD, BF, FUSED, ACT, NEG, MAP_PREC, EVEN,
                 False, HAS_BQ)  # fmt: skip
        sp += tl.dot(tl.trans(kp_d), vv, input_precision=PREC)
        zp += _colsum(kp, SUMS, DOT_DT, PREC)
        if NEG:
            sn += tl.dot(tl.trans(kn_d), vv, input_precision=PREC)
            zn += _colsum(kn, SUMS, DOT_DT, PREC)


@triton.jit(do_not_specialize=["T", "CPS", "NS"])
def _fc_bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, mask_ptr, cu_ptr, ri_ptr, rzi_ptr, re_ptr, rez_ptr,
    do_ptr, den_ptr, cd_ptr, dk_ptr, dzk_ptr, dv_ptr, T, H, HK, D, F, FT, DV, CPS, NS,
    G: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, FUSED: tl.constexpr,
    HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_MASK: tl.constexpr, SEG: tl.constexpr, VARLEN: tl.constexpr,
    ACT: tl.constexpr, NEG: tl.constexpr, W_NATIVE: tl.constexpr, MAP_PREC: tl.constexpr, PREC: tl.constexpr,
    DOT_DT: tl.constexpr, EVEN: tl.constexpr, STAGES: tl.constexpr, SUMS: tl.constexpr,
):  # fmt: skip
    """Key side of the backward for one segment and one KV head (grid ``(N * HK * NS,)``),
    walked from the segment's last chunk to its first.

    ``R = sum_{later queries} phi_q^T (do / den)`` and ``r = sum phi_q cd`` over the ``G`` query
    heads of the group (plus the final-state gradient), entering from ``ri`` (``SEG``). Per chunk:
    ``dphi_k = v R^T + r + sum_g tril(g v^T + cd)^T phi_q``, ``dv = phi_k R + sum_g tril(A)^T g``,
    then the map's backward (``dk``, ``dz_k`` per KV head), then the chunk's queries join ``R``.
    Stores ``R`` after the segment's first chunk in ``re`` (segment 0: the initial-state gradient).
    """
    i_p = tl.program_id(0)
    i_s = i_p % NS
    i_nh = i_p // NS
    i_hk = i_nh % HK
    i_n = i_nh // HK
    bos, L = _seq(cu_ptr, i_n, T, VARLEN)
    c0 = i_s * CPS
    c1 = tl.minimum(c0 + CPS, tl.cdiv(L, BT))
    sb = ((i_n * HK + i_hk) * NS + i_s).to(tl.int64) * FT
    rp, rzp, rn, rzn = _state0(ri_ptr, rzi_ptr, sb, F, DV, BF, BV, SEG, NEG, EVEN)
    wk, bk = _load_wb(wk_ptr, bk_ptr, i_hk, D, F, BD, BF, FUSED, HAS_BK, EVEN)
    offs_i = tl.arange(0, BT)
    tril_t = offs_i[:, None] <= offs_i[None, :]  # [keys, queries]: query at or after the key
    for jj in tl.range(c0, c1, num_stages=STAGES):
        ic = c1 - 1 - (jj - c0)
        t0 = ic * BT
        offs_t = t0 + offs_i
        t_ok = offs_t < L
        tok = bos + offs_t
        xk = _ld_x(k_ptr, bos, L, t0, i_hk, HK, D, F, BT, BD, BF, FUSED, EVEN)
        vv = _ld(v_ptr + bos * (HK * DV) + i_hk * DV, L, DV, HK * DV, t0, 0, BT, BV, True, not EVEN).to(DOT_DT)
        zk, kp_raw, kn_raw = _features(xk, wk, bk, t_ok, F, BF, FUSED, ACT, NEG, W_NATIVE, MAP_PREC, EVEN)
        kp_raw = kp_raw.to(DOT_DT)
        kn_raw = kn_raw.to(DOT_DT)
        if HAS_MASK:
            mk = tl.load(mask_ptr + tok, mask=t_ok, other=0.0)
            kp = (kp_raw * mk[:, None]).to(DOT_DT)
            kn = (kn_raw * mk[:, None]).to(DOT_DT)
        else:
            kp = kp_raw
            kn = kn_raw
        # later chunks (and the final-state gradient), through R entering this chunk
        dkp = tl.dot(vv, tl.trans(rp.to(DOT_DT)), input_precision=PREC) + rzp[None, :]
        dvv = tl.dot(kp, rp.to(DOT_DT), input_precision=PREC)
        if NEG:
            dkn = tl.dot(vv, tl.trans(rn.to(DOT_DT)), input_precision=PREC) + rzn[None, :]
            dvv += tl.dot(kn, rn.to(DOT_DT), input_precision=PREC)
        else:
            dkn = dkp
        for gi in tl.static_range(G):
            i_h = i_hk * G + gi
            xq = _ld_x(q_ptr, bos, L, t0, i_h, H, D, F, BT, BD, BF, FUSED, EVEN)
            do = _ld(do_ptr + bos * (H * DV) + i_h * DV, L, DV, H * DV, t0, 0, BT, BV, True, not EVEN)
            den = tl.load(den_ptr + tok * H + i_h, mask=t_ok, other=1.0)
            cd = tl.load(cd_ptr + tok * H + i_h, mask=t_ok, other=0.0)
            wq, bq = _load_wb(wq_ptr, bq_ptr, i_h, D, F, BD, BF, FUSED, HAS_BQ, EVEN)
            _, qp, qn = _features(xq, wq, bq, t_ok, F, BF, FUSED, ACT, NEG, W_NATIVE, MAP_PREC, EVEN)
            qp_d = qp.to(DOT_DT)
            g = (do.to(tl.float32) * (1.0 / den)[:, None]).to(DOT_DT)
            dat = tl.dot(vv, tl.trans(g), input_precision=PREC) + cd[None, :]
            dat = tl.where(tril_t, dat, 0.0).to(DOT_DT)
            at = tl.dot(kp, tl.trans(qp_d), input_precision=PREC)
            dkp += tl.dot(dat, qp_d, input_precision=PREC)
            if NEG:
                qn_d = qn.to(DOT_DT)
                at += tl.dot(kn, tl.trans(qn_d), input_precision=PREC)
                dkn += tl.dot(dat, qn_d, input_precision=PREC)
            at = tl.where(tril_t, at, 0.0).to(DOT_DT)
            dvv += tl.dot(at, g, input_precision=PREC)
            # this chunk's queries join R for the chunks before it (R's terms above came first)
            rp += tl.dot(tl.trans(qp_d), g, input_precision=PREC)
            rzp += _coldot(qp, cd, SUMS, DOT_DT, PREC)
            if NEG:
                rn += tl.dot(tl.trans(qn_d), g, input_precision=PREC)
                rzn += _coldot(qn, cd, SUMS, DOT_DT, PREC)
        if HAS_MASK:
            dkp = dkp * mk[:, None]
            dkn = dkn * mk[:, None]
        _st(dv_ptr + bos * (HK * DV) + i_hk * DV, dvv, L, DV, HK * DV, t0, 0, BT, BV, True, not EVEN)
        _map_bwd(zk, kp_raw.to(tl.float32), kn_raw.to(tl.float32), dkp, dkn, t_ok, wk, xk, dk_ptr, dzk_ptr, dzk_ptr,
                 dzk_ptr, bos, L, t0, i_hk, i_hk, HK, D, F, BT, BD, BF, FUSED, ACT, NEG, MAP_PREC, EVEN, False,
                 HAS_BK)  # fmt: skip
    _store_state(re_ptr, rez_ptr, sb, rp, rzp, rn, rzn, F, DV, BF, BV, NEG, EVEN)


@triton.jit(do_not_specialize=["T", "CPS", "NS", "NP", "S_OFF"])
def _fc_fix_kernel(
    q_ptr, wq_ptr, bq_ptr, mask_ptr, cu_ptr, si_ptr, zi_ptr, o_ptr, den_ptr, q_desc, o_desc, T, H, HK, G, D, F, FT,
    DV, CPS, NS, NP, S_OFF,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, FUSED: tl.constexpr,
    HAS_BQ: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, ACT: tl.constexpr, NEG: tl.constexpr,
    W_NATIVE: tl.constexpr, MAP_PREC: tl.constexpr, PREC: tl.constexpr, DOT_DT: tl.constexpr, EVEN: tl.constexpr,
    SUMS: tl.constexpr, STAGES: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Add each segment's entering state to the outputs of walks that started every segment from
    zero (``CONFIG["fc_segments"] = "fix"``): grid ``(N * H * (NS - S_OFF) * NP,)``, part ``i_part``
    of ``NP`` of segment ``S_OFF + i``'s chunks (``S_OFF`` 1: segment 0 entered from zero, nothing to
    add). With the walk's ``o_l = num_l / den_l`` (``den_l`` includes ``eps``) and the entering
    state ``(S, z)``: ``den = den_l + phi_q z``, ``o = (o_l den_l + phi_q S) / den``; both stored
    back in place. Segment sums need no walk before the fused-chunk walk then, at the price of
    reading ``q``, ``o`` and writing ``o`` again for the segments after the first, in programs that
    run fully in parallel. ``TMA``: ``q`` and ``o`` through the descriptors (as the walk; rows past
    a sequence only reach rows that are not stored), which frees registers for more stages and
    programs per SM (H200 run 60, 3 stages at 168 registers: 1.191 -> 1.126 ms forward at 32K).
    """
    i_p = tl.program_id(0)
    i_part = i_p % NP
    i_r = i_p // NP
    NSF = NS - S_OFF
    i_s = S_OFF + i_r % NSF
    i_nh = i_r // NSF
    i_h = i_nh % H
    i_n = i_nh // H
    i_hk = i_h // G
    bos, L = _seq(cu_ptr, i_n, T, VARLEN)
    per = tl.cdiv(CPS, NP)
    c0 = i_s * CPS + i_part * per
    c1 = tl.minimum(tl.minimum(c0 + per, (i_s + 1) * CPS), tl.cdiv(L, BT))
    sb = ((i_n * HK + i_hk) * NS + i_s).to(tl.int64) * FT
    sp, zp, sn, zn = _state0(si_ptr, zi_ptr, sb, F, DV, BF, BV, True, NEG, EVEN)
    sp_d = sp.to(DOT_DT)
    sn_d = sn.to(DOT_DT)
    wq, bq = _load_wb(wq_ptr, bq_ptr, i_h, D, F, BD, BF, FUSED, HAS_BQ, EVEN)
    for ic in tl.range(c0, c1, num_stages=STAGES):
        t0 = ic * BT
        offs_t = t0 + tl.arange(0, BT)
        t_ok = offs_t < L
        tok = bos + offs_t
        if TMA:
            xq = _tma_ld(q_desc, bos, t0, i_h * (D if FUSED else F), T, BT, BD if FUSED else BF, VARLEN)
        else:
            xq = _ld_x(q_ptr, bos, L, t0, i_h, H, D, F, BT, BD, BF, FUSED, EVEN)
        zq = _preact(xq, wq, bq, FUSED, W_NATIVE, MAP_PREC)
        qp = _feat(zq, 1.0, t_ok, F, BF, FUSED, ACT, EVEN).to(DOT_DT)
        num = tl.dot(qp, sp_d, input_precision=PREC)
        den = _rowdot(qp, zp, SUMS, DOT_DT, PREC)
        if NEG:
            qn = _feat(zq, -1.0, t_ok, F, BF, FUSED, ACT, EVEN).to(DOT_DT)
            num += tl.dot(qn, sn_d, input_precision=PREC)
            den += _rowdot(qn, zn, SUMS, DOT_DT, PREC)
        if TMA:
            ol = _tma_ld(o_desc, bos, t0, i_h * DV, T, BT, BV, VARLEN).to(tl.float32)
        else:
            ol = _ld(o_ptr + bos * (H * DV) + i_h * DV, L, DV, H * DV, t0, 0, BT, BV, True, not EVEN).to(tl.float32)
        dl = tl.load(den_ptr + tok * H + i_h, mask=t_ok, other=1.0)
        den += dl
        o = (ol * dl[:, None] + num) * (1.0 / den)[:, None]
        if HAS_MASK:
            mk = tl.load(mask_ptr + tok, mask=t_ok, other=0.0)
            o = tl.where(mk[:, None] != 0, o, 0.0)
        _store_rows(o_desc, o_ptr, o, bos, L, t0, i_h, T, H, DV, BT, BV, TMA, VARLEN, EVEN)
        tl.store(den_ptr + tok * H + i_h, den, mask=t_ok)
