"""CPU scaling of the PyTorch linear-attention paths: time and peak memory vs sequence length.

    .venv/bin/python benchmarks/cpu_scaling.py [--max-t 65536] [--out benchmarks/results/cpu_scaling.json]

B=1, H=4, D=64, fp32, causal, Hedgehog features (F=2D=128) precomputed. Each (backend, T) runs in a
fresh subprocess so its peak resident memory (ru_maxrss) minus the memory held before the call is
the op's own peak. ``reference`` is skipped where its [B, H, T, T] weights would not fit in
--mem-cap-gb. Prints a markdown table and writes JSON. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
from hedgehog_attention.ops import linear_attention
torch.set_num_threads(int(sys.argv[4]))
backend, t, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
B, H, D, F = 1, 4, 64, 128
g = torch.Generator().manual_seed(0)
fq = torch.rand(B, t, H, F, generator=g); fk = torch.rand(B, t, H, F, generator=g)
v = torch.randn(B, t, H, D, generator=g)
linear_attention(fq[:, :64], fk[:, :64], v[:, :64], causal=True, backend=backend)  # warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(reps):
    t0 = time.perf_counter()
    o, _ = linear_attention(fq, fk, v, causal=True, backend=backend)
    times.append(time.perf_counter() - t0)
    del o
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times.sort()
print(json.dumps({"ms": 1e3 * times[len(times) // 2], "peak_mb": (peak - before) / 1024}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-t", type=int, default=1024)
    p.add_argument("--max-t", type=int, default=65536)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mem-cap-gb", type=float, default=10.0, help="skip reference when T^2 weights exceed this")
    p.add_argument("--out", default="benchmarks/results/cpu_scaling.json")
    args = p.parse_args()

    rows = []
    t = args.min_t
    while t <= args.max_t:
        row = {"T": t}
        for backend in ("reference", "chunked"):
            need_gb = 2 * 4 * t * t * 4 / 1e9  # ~2 live [B, H, T, T] fp32 buffers (measured: 2.2 GB at T=8K)
            if backend == "reference" and need_gb > args.mem_cap_gb:
                row[backend] = None
                continue
            res = subprocess.run(
                [sys.executable, "-c", CHILD, backend, str(t), str(args.reps), str(args.threads)],
                capture_output=True,
                text=True,
                check=True,
            )
            row[backend] = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"T={t}: {row}", file=sys.stderr)
        t *= 2

    print("| T | reference ms | reference peak MB | chunked ms | chunked peak MB | chunked ms per 1K tokens |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ref, ch = r["reference"], r["chunked"]
        ref_s = f"{ref['ms']:.1f} | {ref['peak_mb']:.0f}" if ref else "skipped (T^2 > cap) | -"
        print(f"| {r['T']} | {ref_s} | {ch['ms']:.1f} | {ch['peak_mb']:.0f} | {ch['ms'] / (r['T'] / 1024):.2f} |")
    import torch

    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads={args.threads}",
        "torch": torch.__version__,
        "shape": "B=1 H=4 D=64 F=128 fp32 causal",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
