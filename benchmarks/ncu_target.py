"""A short fwd+bwd workload of the fused Triton kernels for Nsight Compute (``ncu``) to profile.

Runs ``--iters`` forward+backward passes of ``fused_hedgehog_attention`` (bf16, causal, H=16,
D=64, B*T=131072 as in ``attention_speed.py``) under a launcher config, so that ncu can skip the
first (compiling) iteration and profile the next. Usage on the GPU machine (``benchmarks/gpu_ncu.sh``
wraps it)::

    ncu --clock-control none -k regex:_fc_ --launch-skip 3 --launch-count 3 --set full -o prof \\
        python3 benchmarks/ncu_target.py --T 4096 --config '{"design": "fused_chunk"}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from hedgehog_attention.ops.triton import _launch, fused_hedgehog_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--config", default="{}", help="JSON overrides of _launch.CONFIG")
    args = ap.parse_args()
    _launch.CONFIG.update(json.loads(args.config))
    B, T, H, D = args.tokens // args.T, args.T, 16, 64
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16).requires_grad_()

    q, k, v = r(B, T, H, D), r(B, T, H, D), r(B, T, H, D)
    wq, wk, bq, bk = r(H, D, D, scale=0.1), r(H, D, D, scale=0.1), r(H, D, scale=0.1), r(H, D, scale=0.1)
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    for _ in range(args.iters):
        o, _ = fused_hedgehog_attention(q, k, v, wq, bq, wk, bk, causal=True)
        o.backward(do)
    torch.cuda.synchronize()
    print("ok", B, T, float(o.float().norm()))


if __name__ == "__main__":
    main()
