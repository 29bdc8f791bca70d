"""GPU check of the kernels' tensor-core reductions (``_launch.CONFIG["sums"]`` bits), one process each.

Each variant (``--bits``, ``--design``) runs in a child process (a miscompiled kernel that faults
takes only its own process down) and reports, on bf16 inputs, the relative error of the output and
of every gradient against the same call in fp32 with fp32-add reductions (bits 0), whether
anything is NaN, and the forward (inference) and forward+backward times at the benchmark's shape
(T = 4096, B = 32, H = 16, D = 64). Writes one JSON line per variant::

    python benchmarks/sums_check.py --bits 0,1,2,4,7 --design fused_chunk,chunk --out /tmp/sums.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def _inputs(B, T, H, D, dtype, seed=0, wdtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    wq, wk = (torch.randn(H, D, D, generator=g) * 0.3 for _ in range(2))
    bq, bk = (torch.randn(H, D, generator=g) * 0.5 for _ in range(2))
    xs = [q.to(dtype), k.to(dtype), v.to(dtype), wq.to(wdtype), bq.to(wdtype), wk.to(wdtype), bk.to(wdtype)]
    return [x.cuda().requires_grad_() for x in xs]


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _child(bits: int, design: str, phase: str) -> dict:
    import triton.testing

    from hedgehog_attention.ops.triton import _launch, fused_hedgehog_attention

    out: dict = {"bits": bits, "design": design}
    # (fp32 map weights as in the tests; bf16 weights, a bf16 model's, as in the benchmark)
    for B, T, mask_kind, wdt in ((2, 1000, None, torch.float32), (2, 3000, "mask", torch.float32),
                                 (2, 3000, "mask", torch.bfloat16)):  # fmt: skip
        res = {}
        for name, sums, dtype in (("ref", 0, torch.float32), ("bf16", bits, torch.bfloat16)):
            _launch.CONFIG.update(sums=sums, design=design)
            xs = _inputs(B, T, 4, 64, dtype, wdtype=wdt if name == "bf16" else torch.float32)
            mask = None
            if mask_kind:
                mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
                mask[0, : T // 3] = False
            o = fused_hedgehog_attention(*xs, causal=True, attention_mask=mask)[0]
            do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).cuda()
            gs = torch.autograd.grad((o.float() * do).sum(), xs)
            torch.cuda.synchronize()
            res[name] = [o.detach()] + [g.detach() for g in gs]
        names = ["o", "q", "k", "v", "Wq", "bq", "Wk", "bk"]
        key = f"T{T}{'-mask' if mask_kind else ''}{'-bf16w' if wdt == torch.bfloat16 else ''}"
        out[key] = {n: _rel(a, b) for n, a, b in zip(names, res["bf16"], res["ref"])}
        out[key + "-nan"] = any(bool(torch.isnan(x).any()) for x in res["bf16"])
    if phase == "check":  # (compiles every kernel: the timing phase then finds them cached)
        return out
    _launch.CONFIG.update(sums=bits, design=design)
    xs = _inputs(32, 4096, 16, 64, torch.bfloat16, wdtype=torch.bfloat16)  # the benchmark's shape and dtypes
    with torch.no_grad():
        out["fwd_ms"] = triton.testing.do_bench(lambda: fused_hedgehog_attention(*xs, causal=True)[0])
    do = torch.randn(32, 4096, 16, 64, device="cuda", dtype=torch.bfloat16)

    def fb():
        o = fused_hedgehog_attention(*xs, causal=True)[0]
        torch.autograd.grad(o, xs, do)

    out["fwdbwd_ms"] = triton.testing.do_bench(fb)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="0,1,2,4,7")
    ap.add_argument("--design", default="fused_chunk,chunk")
    ap.add_argument("--out", default="sums_check.jsonl")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--phases", default="check,time", help="check: all variants side by side; time: one by one")
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        bits, design, phase = args.child.split(":")
        print("RESULT " + json.dumps(_child(int(bits), design, phase)), flush=True)
        return
    variants = [(b, d) for d in args.design.split(",") for b in args.bits.split(",")]

    def start(bits, design, phase):
        cmd = [sys.executable, __file__, "--child", f"{bits}:{design}:{phase}"]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(p, bits, design):
        try:
            stdout, stderr = p.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            return {"bits": int(bits), "design": design, "error": "timeout"}
        lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        return json.loads(lines[-1][7:]) if lines else {"bits": int(bits), "design": design, "error": stderr[-600:]}

    # correctness (and compilation) of every variant side by side, then the timings one at a time
    phases = args.phases.split(",")
    if "check" in phases:
        procs = [(start(b, d, "check"), b, d) for b, d in variants]
        rows = [finish(p, b, d) for p, b, d in procs]
    else:
        rows = [{"bits": int(b), "design": d} for b, d in variants]
    for row in rows:
        if "time" in phases and "error" not in row and not any(v is True for v in row.values()):
            row.update(finish(start(row["bits"], row["design"], "time"), row["bits"], row["design"]))
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
