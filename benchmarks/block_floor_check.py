"""How often the Triton backward faults with narrow head-dim blocks (``CONFIG["min_block"]``).

On the H200 with triton 3.6 (session 14, BENCHMARKS.md runs 65-75) ``_bwd_kernel`` read shared
memory out of bounds (compute-sanitizer: "Invalid __shared__ read", at a ``tl.dot``) and the
process died with an illegal memory access in some runs only, when the head dims were 16 wide
(D = 16, F = 8). Each trial is therefore a fresh process (a fault poisons the CUDA context): a
causal forward + backward of the fused Hedgehog op, counted as ok / illegal access / other error,
for every ``--floors`` value of ``CONFIG["min_block"]`` and every case.

    PYTHONPATH=src python benchmarks/block_floor_check.py --reps 10 --floors 16,auto --out /tmp/floor

Writes ``block_floor_check.json`` under ``--out`` and prints one table. GPU only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# (T, D, F, DV, dtype): the cases that faulted with 16-wide blocks, and a real head size
CASES = {
    "d16f8-fp16": (8, 16, 8, 16, "float16"),
    "d16f8-bf16": (40, 16, 8, 16, "bfloat16"),
    "d32f16-fp16": (40, 32, 16, 32, "float16"),
    "d64f64-fp16": (300, 64, 64, 64, "float16"),
}

TRIAL = r"""
import json, sys, torch
from hedgehog_attention.ops.triton import _launch, fused_hedgehog_attention
c = json.loads(sys.argv[1])
_launch.CONFIG["min_block"] = c["floor"] if c["floor"] == "auto" else int(c["floor"])
T, D, F, DV, dt = c["case"]
dtype = getattr(torch, dt)
g = torch.Generator().manual_seed(c["rep"])
r = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).cuda()
q, k, v = r(2, T, 2, D).to(dtype), r(2, T, 2, D).to(dtype), r(2, T, 2, DV).to(dtype)
w = [r(2, D, F, sc=0.3), r(2, F, sc=0.5), r(2, D, F, sc=0.3), r(2, F, sc=0.5)]
leaves = [x.clone().requires_grad_() for x in (q, k, v, *w)]
o, _ = fused_hedgehog_attention(*leaves, causal=True)
o.backward(r(*o.shape).to(o.dtype))
torch.cuda.synchronize()
print("TRIAL OK")
"""


def trial(job: tuple[str, str, int]) -> tuple[str, str, str]:
    name, floor, rep = job
    arg = json.dumps({"case": CASES[name], "floor": floor, "rep": rep})
    try:
        p = subprocess.run([sys.executable, "-c", TRIAL, arg], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return name, floor, "timeout"
    if "TRIAL OK" in p.stdout:
        return name, floor, "ok"
    out = p.stdout + p.stderr
    return name, floor, "illegal access" if "illegal memory access" in out else "other error"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10, help="fresh processes per (case, floor)")
    ap.add_argument("--floors", default="16,auto", help='CONFIG["min_block"] values, comma-separated')
    ap.add_argument("--cases", default=",".join(CASES), help="names from: " + ", ".join(CASES))
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("block_floor_check.py needs a CUDA device (the fault is in compiled GPU code)")
    names = [n for n in args.cases.split(",") if n]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose from {sorted(CASES)}")
    floors = [f for f in args.floors.split(",") if f]
    jobs = [(n, f, rep) for rep in range(args.reps) for n in names for f in floors]
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    t0 = time.time()
    with ThreadPoolExecutor(args.workers) as ex:
        for name, floor, status in ex.map(trial, jobs):
            counts[(name, floor)][status] += 1
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{args.reps} fresh processes each, {time.time() - t0:.0f} s")  # fmt: skip
    print("| case | min_block | ok | illegal access | other error | timeout |\n|---|---|---|---|---|---|")
    for (name, floor), c in sorted(counts.items()):
        print(f"| {name} | {floor} | {c['ok']} | {c['illegal access']} | {c['other error']} | {c['timeout']} |")
    os.makedirs(args.out, exist_ok=True)
    rows = [dict(case=n, min_block=f, **c) for (n, f), c in sorted(counts.items())]
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), reps=args.reps)  # fmt: skip
    with open(os.path.join(args.out, "block_floor_check.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
