"""Compile the Triton kernels for sm_90 (H100/H200) without a GPU, and report registers/spills.

Catches compile errors and register spills before device time is spent (docs/kernels.md)::

    python benchmarks/_compile_sm90.py            # resource usage of the D=64 bf16 causal kernels
    python benchmarks/_compile_sm90.py --all      # compile every variant tests and benchmark use
                                                  # (both causal layouts; > 50 min on 2 cores since the
                                                  # tensor-core sums: one line per kernel as it goes)

Uses the ``ptxas``/``cuobjdump`` bundled with the triton wheel. Registers depend on the triton
version: install the GPU machine's (3.6) beside the project's, ``pip install --no-deps --target
/tmp/t36 triton==3.6.0``, and run with ``PYTHONPATH=/tmp/t36``. With that and the launcher's
16-byte divisibility attributes (below) the state walk compiles to the H200's 175 registers
(run 5); without them every kernel shows 255 and spills. A lead, not proof.

    python benchmarks/_compile_sm90.py --variants  # persistent / split / both-halves variants
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from hedgehog_attention.ops.triton import _fused_chunk as FC  # noqa: E402
from hedgehog_attention.ops.triton import _kernels as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
INT_PTRS = ("cu_ptr", "coff_ptr", "cidx_ptr", "hoff_ptr")
FP32_PTRS = (
    "hz_ptr", "dhz_ptr", "si_ptr", "zi_ptr", "ri_ptr", "rzi_ptr", "st_ptr", "stz_ptr", "den_ptr", "cd_ptr",
    "mask_ptr", "s_ptr", "z_ptr", "s0_ptr", "z0_ptr", "se_ptr", "sez_ptr", "re_ptr", "rez_ptr",
)  # fmt: skip
STATE_PTRS = ("h_ptr", "dz_ptr", "dzq_ptr", "dzk_ptr")  # bf16 for bf16 inputs, fp32 otherwise (_launch.state_dtype)
KERNELS = (K._state_kernel, K._out_kernel, K._bwd_kernel)
# int arguments that are multiples of 16 in the benchmark's shapes (H = Hk = 16, D = F = Dv = 64)
DIV16_INTS = ("NH", "H", "HK", "D", "F", "FT", "DV")


def _ptr_type(p: str, dtype: str) -> str:
    if p in INT_PTRS:
        return "*i32"
    if p in FP32_PTRS:
        return "*fp32"
    if p in STATE_PTRS:
        return "*bf16" if dtype == "bf16" else "*fp32"
    return f"*{dtype}"


def compile_kernel(fn, cons: dict, dtype: str, num_warps: int, num_stages: int = 1, maxnreg: int | None = None):
    params = list(inspect.signature(fn.fn).parameters)
    if "G" in params:
        # a constexpr in the state walk and the fused-chunk key-side walk (GQA group walked per
        # step); a runtime int elsewhere, which Triton specialises when it is 1 (no GQA, as in the
        # benchmark): the H200's register and spill counts are those of G = 1 (session 8: the
        # backward's key side 120 B of spills with it, 424 B without)
        cons = dict(cons, G=cons.get("G", 1))
    sig = {
        p: "constexpr"
        if p in cons
        else (_ptr_type(p, dtype) if p.endswith("_ptr") else ("fp32" if p == "eps" else "i32"))
        for p in params
    }
    for p in params:  # TMA descriptors (the fused-chunk forward / correction pass with TMA=True; unused otherwise)
        if p.endswith("_desc"):
            cols = cons["BV"] if p[0] in "vo" else (cons["BD"] if cons.get("FUSED") else cons["BF"])
            blk = f"{cons['BT']}, {cols}" if cons.get("VARLEN") else f"1, {cons['BT']}, {cols}"
            blk = f"{cons['BF']}, {cons['BV']}" if p == "h_desc" else blk
            sig[p] = f"tensordesc<{dtype}[{blk}]>" if cons.get("TMA") else "i32"
    consts = {(params.index(k),): v for k, v in cons.items() if k in params}
    # the GPU launcher specialises 16-byte-aligned pointers and ints divisible by 16 ("D"):
    # aligned vector loads; without these the register counts are far from the H200's
    aligned = {p for p in params if p not in cons and (p.endswith("_ptr") or p in DIV16_INTS) and p in sig}
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=TARGET, options=options)


def resources(compiled) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return " ".join(line.strip() for line in out.splitlines() if "REG" in line)


def constexprs(
    dtype: str, D: int, act: str, fused: bool, causal: bool, mask: bool, bv: int | None = None, bt: int = 64
) -> dict:
    dot = tl.bfloat16 if dtype == "bf16" else tl.float32
    return dict(
        BT=bt, BD=D, BF=D, BV=bv or D, FUSED=fused, HAS_MASK=mask, ACT=act, NEG=fused,
        W_NATIVE=dtype != "fp32" and fused, MAP_PREC="ieee" if dtype == "fp32" else "tf32",
        PREC="ieee" if dtype == "fp32" else "tf32", DOT_DT=dot, EVEN=True, HAS_B=True, HAS_BQ=True, HAS_BK=True,
        CAUSAL=causal, REVERSE=False, STORE_H=causal, KV_SIDE=False, INIT=False, SEG=not causal, VARLEN=False,
        PERSIST=False, P_STAGES=1, FUSE_CD=False, SPLIT=1, BOTH=False, DW_ATOMIC=False, STAGES=1,
        SUMS=7 if dtype == "bf16" else 0, HBT=2 * bt, TMA=False,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--variants", action="store_true", help="the persistent / split variants only")
    args = ap.parse_args()
    if args.variants:
        for bt, nw, extra in ((128, 8, dict(PERSIST=True, P_STAGES=2)), (128, 8, dict(SPLIT=2)),
                              (128, 8, dict(SPLIT=2, PERSIST=True, P_STAGES=2))):  # fmt: skip
            cons = dict(constexprs("bf16", 64, "softmax", True, True, False, 64, bt), **extra)
            c = compile_kernel(K._out_kernel, cons, "bf16", nw, 1)
            print(f"BT={bt} _out_kernel warps={nw} {extra}: {resources(c)}", flush=True)
        for rev in (False, True):
            for both in (False, True):
                cons = dict(constexprs("bf16", 64, "softmax", True, True, False, 64, 128), REVERSE=rev, BOTH=both)
                c = compile_kernel(K._state_kernel, cons, "bf16", 8, 3)
                print(f"BT=128 _state_kernel reverse={rev} both halves={both} warps=8: {resources(c)}", flush=True)
        for split in (1, 2):
            for kv in (False, True):
                for nw in (4, 8):
                    cons = dict(constexprs("bf16", 64, "softmax", True, True, False, 64, 128), KV_SIDE=kv, SPLIT=split)
                    c = compile_kernel(K._bwd_kernel, cons, "bf16", nw, 1)
                    print(f"BT=128 _bwd_kernel kv={kv} split={split} warps={nw}: {resources(c)}", flush=True)
        return
    if not args.all:
        for bt in (64, 128):
            for fn, nw, ns, bv in (
                (K._state_kernel, 4, 2, 64), (K._state_kernel, 4, 2, 32), (K._state_kernel, 8, 2, 64),
                (K._out_kernel, 4, 1, 64), (K._out_kernel, 8, 1, 64), (K._bwd_kernel, 4, 1, 64),
                (K._bwd_kernel, 8, 1, 64), (K._bwd_kernel, 8, 2, 64),
            ):  # fmt: skip
                for rev in (False, True) if fn in (K._state_kernel, K._bwd_kernel) else (False,):
                    cons = dict(constexprs("bf16", 64, "softmax", True, True, False, bv, bt), REVERSE=rev, KV_SIDE=rev)
                    c = compile_kernel(fn, cons, "bf16", nw, ns)
                    name = fn.fn.__name__ + ((" rev" if fn is K._state_kernel else " kv") if rev else "")
                    print(f"BT={bt} {name:18s} warps={nw} stages={ns} BV={bv}: {resources(c)}", flush=True)
        # the fused-chunk forward and its correction pass as the launcher runs them (fc_stages /
        # fc_tma_stages, fix_stages / fix_tma_stages + fix_tma_maxnreg; session 12 with triton 3.6:
        # the walk 255 registers, 288 B of stack with pointers at 1 stage, 368 B with TMA at 2;
        # the pass 218 registers at 3 stages with pointers, 168 without spills with TMA)
        fc = dict(constexprs("bf16", 64, "softmax", True, True, False), SEG=False, STORE_H=False)
        runs = ((FC._fc_fwd_kernel, 1, False, None), (FC._fc_fwd_kernel, 2, True, None),
                (FC._fc_fix_kernel, 3, False, None), (FC._fc_fix_kernel, 3, True, 168))  # fmt: skip
        for fn, stages, tma, cap in runs:
            c = compile_kernel(fn, dict(fc, STAGES=stages, TMA=tma), "bf16", 4, 1, maxnreg=cap)
            print(f"BT=64 {fn.fn.__name__:18s} warps=4 stages={stages} TMA={tma}: {resources(c)}", flush=True)
        return
    n = 0
    for dtype, D, act, fused, causal, mask in itertools.product(
        ["bf16", "fp16", "fp32"], [64, 128], ["softmax", "exp"], [True, False], [True, False], [False, True]
    ):
        if not fused and act == "exp":
            continue
        for fn in KERNELS:
            for rev in (False, True) if fn in (K._state_kernel, K._bwd_kernel) else (False,):
                cons = dict(constexprs(dtype, D, act, fused, causal, mask), REVERSE=rev, KV_SIDE=rev)
                compile_kernel(fn, cons, dtype, 8 if fn is K._bwd_kernel else 4)
                n += 1
                print(n, fn.fn.__name__, dtype, D, act, "fused" if fused else "generic", causal, mask, flush=True)
    for dtype, act, fused, mask in itertools.product(["bf16", "fp16", "fp32"], ["softmax", "exp"], [True, False],
                                                     [False, True]):  # fmt: skip
        if fused or act == "softmax":  # the fused-chunk walks (at most 64 features per half)
            for fn in (FC._fc_fwd_kernel, FC._fc_bwd_q_kernel, FC._fc_bwd_kv_kernel):
                compile_kernel(fn, dict(constexprs(dtype, 64, act, fused, True, mask), SEG=True), dtype, 4)
                n += 1
                print(n, fn.fn.__name__, dtype, act, "fused" if fused else "generic", mask, flush=True)
    for D in (64, 128):
        for act in ("softmax", "exp"):
            cons = dict(BD=D, BF=D, BV=D, HAS_BQ=True, HAS_BK=True, ACT=act, NEG=True)
            compile_kernel(K._decode_kernel, cons, "bf16", 4)
            n += 1
    print("compiled", n, "kernels for sm_90")


if __name__ == "__main__":
    main()
