"""Compile the Triton kernels for sm_90 (H100/H200) without a GPU, and report registers/spills.

Catches compile errors and register spills before device time is spent (docs/kernels.md)::

    python benchmarks/_compile_sm90.py            # resource usage of the D=64 bf16 causal kernels
    python benchmarks/_compile_sm90.py --all      # compile every variant tests and benchmark use

Uses the ``ptxas``/``cuobjdump`` bundled with the triton wheel; the local triton may be newer than
the GPU machine's, so a clean compile here is a lead, not proof.
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
from hedgehog_attention.ops.triton import _kernels as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FP32_PTRS = {
    "cu_ptr": "*i32",
    **{
        p: "*fp32"
        for p in (
            [
                "si_ptr",
                "zi_ptr",
                "den_ptr",
                "se_ptr",
                "ze_ptr",
                "sl_ptr",
                "zl_ptr",
                "ri_ptr",
                "rzi_ptr",
                "dw_ptr",
                "db_ptr",
                "mask_ptr",
                "s_ptr",
                "z_ptr",
            ]
        )
    },
}
WALKS = (K._state_kernel, K._fwd_kernel, K._rstate_kernel, K._bwd_dq_kernel, K._bwd_dkv_kernel)


def compile_kernel(fn, cons: dict, dtype: str, num_warps: int):
    params = list(inspect.signature(fn.fn).parameters)
    sig = {
        p: "constexpr"
        if p in cons
        else FP32_PTRS.get(p, f"*{dtype}" if p.endswith("_ptr") else ("fp32" if p == "eps" else "i32"))
        for p in params
    }
    consts = {(params.index(k),): v for k, v in cons.items() if k in params}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": 1})


def resources(compiled) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return " ".join(line.strip() for line in out.splitlines() if "REG" in line)


def constexprs(dtype: str, D: int, act: str, fused: bool, causal: bool, mask: bool, bv: int | None = None) -> dict:
    half = dtype != "fp32"
    dot = (
        tl.float32
        if (not half or (dtype == "fp16" and act == "exp" and fused))
        else (tl.bfloat16 if dtype == "bf16" else tl.float16)
    )
    prec = "tf32" if half else "ieee"
    return dict(
        BT=64, BD=D, BF=D, BV=bv or D, FUSED=fused, HAS_MASK=mask, ACT=act, NEG=fused, W_NATIVE=half and fused,
        MAP_PREC=prec, PREC=prec, DOT_DT=dot, EVEN=True, HAS_B=True, HAS_BQ=True, HAS_BK=True,
        CAUSAL=causal, STORE_END=causal,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true")
    args = ap.parse_args()
    if not args.all:
        for nw, bv in ((4, None), (8, None), (8, 32)):
            for fn in WALKS:
                c = compile_kernel(fn, constexprs("bf16", 64, "softmax", True, True, False, bv), "bf16", nw)
                print(f"{fn.fn.__name__:16s} warps={nw} BV={bv or 64}: {resources(c)}", flush=True)
        return
    n = 0
    for dtype, D, act, fused, causal, mask in itertools.product(
        ["bf16", "fp16", "fp32"], [64, 128], ["softmax", "exp"], [True, False], [True, False], [False, True]
    ):
        if not fused and act == "exp":
            continue
        for fn in WALKS:
            compile_kernel(fn, constexprs(dtype, D, act, fused, causal, mask), dtype, 8 if D == 128 else 4)
            n += 1
    for D in (64, 128):
        for act in ("softmax", "exp"):
            cons = dict(BD=D, BF=D, BV=D, HAS_BQ=True, HAS_BK=True, ACT=act, NEG=True)
            compile_kernel(K._decode_kernel, cons, "bf16", 4)
            n += 1
    print("compiled", n, "kernels for sm_90")


if __name__ == "__main__":
    main()
