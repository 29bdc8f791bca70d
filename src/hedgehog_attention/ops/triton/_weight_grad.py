"""The map's weight gradients from the backward's stored pre-activation gradients.

``dW[h] = sum_t x[t, h]^T dz[t, h]`` and ``db[h] = sum_t dz[t, h]`` in one pass over ``dz``:
each program sums a contiguous range of tokens for one head into an fp32 ``[D, F]`` tile and
an ``[F]`` vector (split-K over the tokens), and the launcher adds the few partials. Before this
kernel the same sums were a batched cuBLAS matmul plus a separate ``dz.sum``, which read ``dz``
twice and rounded ``dW`` to bf16 (``_launch._dw_reference`` keeps that formulation as the
test's oracle).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["NTOK", "TPP"])
def _dw_kernel(
    x_ptr, dz_ptr, dw_ptr, db_ptr, NTOK, NH, D, F, TPP,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, HAS_B: tl.constexpr, PREC: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """Partial sums of one token range and one head (grid ``(NP, NH)``).

    ``x [NTOK, NH, D]`` (any float dtype; cast to ``dz``'s), ``dz [NTOK, NH, F]`` (bf16 or
    fp32); writes ``dw [NP, NH, D, F]`` and ``db [NP, NH, F]`` fp32, the sums over tokens
    ``[i_p * TPP, (i_p + 1) * TPP)``. ``PREC``: the products' precision for fp32 ``dz``
    ("ieee": the fp32 batched matmul it replaces; bf16 ``dz`` multiplies in bf16).
    """
    i_p = tl.program_id(0)
    i_h = tl.program_id(1)
    t_begin = i_p * TPP
    t_end = tl.minimum(t_begin + TPP, NTOK)
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_f = tl.arange(0, BF)
    d_ok = offs_d < D
    f_ok = offs_f < F
    acc = tl.zeros([BD, BF], dtype=tl.float32)
    acc_b = tl.zeros([BF], dtype=tl.float32)
    for t0 in tl.range(t_begin, t_end, BT, num_stages=STAGES):
        rows = (t0 + offs_t).to(tl.int64)
        r_ok = rows < t_end
        x = tl.load(x_ptr + rows[:, None] * (NH * D) + i_h * D + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                    other=0.0)  # fmt: skip
        dz = tl.load(dz_ptr + rows[:, None] * (NH * F) + i_h * F + offs_f[None, :],
                     mask=r_ok[:, None] & f_ok[None, :], other=0.0)  # fmt: skip
        acc += tl.dot(tl.trans(x.to(dz.dtype)), dz, input_precision=PREC)
        if HAS_B:
            acc_b += tl.sum(dz.to(tl.float32), 0)
    out = (i_p * NH + i_h).to(tl.int64)
    tl.store(dw_ptr + out * D * F + offs_d[:, None] * F + offs_f[None, :], acc, mask=d_ok[:, None] & f_ok[None, :])
    if HAS_B:
        tl.store(db_ptr + out * F + offs_f, acc_b, mask=f_ok)
