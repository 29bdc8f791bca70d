"""GPU speed of Hedgehog attention: fused Triton kernel vs SDPA (flash), fla 0.6.0 and PyTorch.

Run on a CUDA machine (see BENCHMARKS.md for the exact command and the recorded runs)::

    PYTHONPATH=src python benchmarks/attention_speed.py --out results/

Sweeps T = 1K..128K at constant B*T = 131072 tokens, H = 16, D = 64, bf16, causal; times the
forward and forward+backward (median of ``triton.testing.do_bench``) of each backend in the
registry below, the peak memory of forward+backward, and one decode step (B = 16, H = 16)
against the context length. Writes ``attention_speed.json`` and prints one table.
Plots: ``python benchmarks/_plot_attention_speed.py results/attention_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F_

TOKENS = 131072
HEADS = 16
HEAD_DIM = 64
DECODE_B = 16
DECODE_CONTEXTS = (4096, 32768, 131072)


def _hh_map(h: int, d: int, device) -> torch.nn.Module:
    from hedgehog_attention.feature_maps import HedgehogFeatureMap

    m = HedgehogFeatureMap(h, d, activation="softmax", negation=True, init="random").to(device)
    with torch.no_grad():
        m.bias.normal_(0, 0.1)
    return m.to(torch.bfloat16)  # a bf16 model: weights in bf16 like q, k


# ---------------------------------------------------------------- backends: (B, T) -> closure
def make_sdpa(B, T, dev, grad):
    q, k, v = (
        torch.randn(B, HEADS, T, HEAD_DIM, device=dev, dtype=torch.bfloat16, requires_grad=grad) for _ in range(3)
    )
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F_.scaled_dot_product_attention(q, k, v, is_causal=True)

    return fwd, [q, k, v]


def _qkv(B, T, dev, grad):
    return [torch.randn(B, T, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, requires_grad=grad) for _ in range(3)]


def make_fla(B, T, dev, grad):
    from fla.ops.linear_attn import chunk_linear_attn

    q, k, v = _qkv(B, T, dev, grad)
    mq, mk = _hh_map(HEADS, HEAD_DIM, dev), _hh_map(HEADS, HEAD_DIM, dev)
    mq.requires_grad_(grad)
    mk.requires_grad_(grad)

    def fwd():
        return chunk_linear_attn(mq(q), mk(k), v, scale=1.0, normalize=True)[0]

    return fwd, [q, k, v, *mq.parameters(), *mk.parameters()]


def make_chunked(B, T, dev, grad):
    from hedgehog_attention.ops import linear_attention

    q, k, v = _qkv(B, T, dev, grad)
    mq, mk = _hh_map(HEADS, HEAD_DIM, dev), _hh_map(HEADS, HEAD_DIM, dev)
    mq.requires_grad_(grad)
    mk.requires_grad_(grad)

    def fwd():
        return linear_attention(mq(q), mk(k), v, causal=True, backend="chunked")[0]

    return fwd, [q, k, v, *mq.parameters(), *mk.parameters()]


def make_triton(B, T, dev, grad):
    from hedgehog_attention.ops.triton import fused_hedgehog_attention

    q, k, v = _qkv(B, T, dev, grad)
    mq, mk = _hh_map(HEADS, HEAD_DIM, dev), _hh_map(HEADS, HEAD_DIM, dev)
    mq.requires_grad_(grad)
    mk.requires_grad_(grad)

    def fwd():
        return fused_hedgehog_attention(q, k, v, mq.weight, mq.bias, mk.weight, mk.bias, causal=True)[0]

    return fwd, [q, k, v, *mq.parameters(), *mk.parameters()]


TAYLOR_TOKENS = 16384  # 4161 features per token-head: 131072 tokens do not fit in 141 GB


def make_taylor(B, T, dev, grad):
    """The paper's Fig. 7 comparison: 2nd-order Taylor map (1 + d + d^2 = 4161 features), chunked op.

    Runs on ``TAYLOR_TOKENS`` tokens; ``time_backend`` scales the time to ``B * T`` (time is
    linear in the batch at fixed T)."""
    from hedgehog_attention.feature_maps import Taylor2FeatureMap
    from hedgehog_attention.ops import linear_attention

    q, k, v = _qkv(max(1, TAYLOR_TOKENS // T), T, dev, grad)
    m = Taylor2FeatureMap(HEADS, HEAD_DIM)

    def fwd():
        return linear_attention(m(q), m(k), v, causal=True, backend="chunked")[0]

    return fwd, [q, k, v]


BACKENDS: dict[str, Callable] = {
    "sdpa": make_sdpa,
    "fla+torch map": make_fla,
    "chunked (torch)": make_chunked,
    "triton fused": make_triton,
    "triton fused w8": make_triton,
    "triton fused w8 bv32": make_triton,
    "taylor2 (torch)": make_taylor,
}
FWD_ONLY = {"taylor2 (torch)"}
SCALED = {"taylor2 (torch)"}
# launcher settings per backend: the same kernels at 8 warps and split V (less spilling, per ptxas)
BACKEND_CONFIG = {"triton fused w8": {"num_warps": 8}, "triton fused w8 bv32": {"num_warps": 8, "fwd_bv": 32}}
# backends timed at a few T only (device time is scarce; Taylor's 4161 features are slow)
BACKEND_T = {
    "taylor2 (torch)": {1024, 4096, 16384},
    "triton fused w8": {1024, 32768},
    "triton fused w8 bv32": {1024, 32768},
}


def _bench(fn, grad_to_none=None):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=60, grad_to_none=grad_to_none, return_mode="median")


def time_backend(name, B, T, dev, with_bwd):
    from hedgehog_attention.ops.triton import _launch

    res = {}
    saved = dict(_launch.CONFIG)
    _launch.CONFIG.update(BACKEND_CONFIG.get(name, {}))
    try:
        torch.cuda.empty_cache()
        fwd, _ = BACKENDS[name](B, T, dev, False)
        with torch.no_grad():
            res["fwd_ms"] = _bench(fwd)
        if name in SCALED:
            res["measured_tokens"] = max(1, TAYLOR_TOKENS // T) * T
            res["fwd_ms"] *= B * T / res["measured_tokens"]
        del fwd
        if with_bwd and name not in FWD_ONLY:
            torch.cuda.empty_cache()
            fwd, leaves = BACKENDS[name](B, T, dev, True)
            out = fwd()
            do = torch.randn_like(out)
            del out

            def step():
                fwd().backward(do)

            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            res["peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
            res["fwdbwd_ms"] = _bench(step, grad_to_none=leaves)
            del fwd, leaves, do
    except torch.cuda.OutOfMemoryError:
        res["error"] = "OOM"
    except Exception as e:  # a backend that fails is reported in the table, the sweep goes on
        res["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        _launch.CONFIG.clear()
        _launch.CONFIG.update(saved)
    torch.cuda.empty_cache()
    return res


def decode_times(dev):
    from hedgehog_attention.ops.triton import fused_hedgehog_decode_step

    out = []
    B, H, D = DECODE_B, HEADS, HEAD_DIM
    mq, mk = _hh_map(H, D, dev), _hh_map(H, D, dev)
    for L in DECODE_CONTEXTS:
        row = {"context": L}
        q = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16)
        kc = torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16)
        vc = torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16)
        row["sdpa_ms"] = _bench(lambda q=q, kc=kc, vc=vc: F_.scaled_dot_product_attention(q, kc, vc))
        del kc, vc
        qs, ks, vs = (torch.randn(B, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        S = torch.rand(B, H, 2 * D, D, device=dev) * L / 64
        z = torch.rand(B, H, 2 * D, device=dev) * L / 64
        args = (qs, ks, vs, mq.weight, mq.bias, mk.weight, mk.bias, (S, z))

        def step(args=args):
            fused_hedgehog_decode_step(*args, activation="softmax", negation=True, eps=1e-6)

        row["triton_ms"] = _bench(step)
        # the launch (Python + driver) dominates one tiny step: also time a CUDA-graph replay
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        row["triton_graph_ms"] = _bench(g.replay)
        out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for attention_speed.json")
    ap.add_argument("--seq-lens", default="1024,2048,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--no-decode", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    import triton

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "tokens": TOKENS,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "dtype": "bf16",
        "causal": True,
    }
    try:
        import fla

        meta["fla"] = fla.__version__
    except ImportError:
        meta["fla"] = None
    rows = []
    names = args.backends.split(",")
    result = {"meta": meta, "rows": rows, "decode": []}
    p = pathlib.Path(args.out)
    p.mkdir(parents=True, exist_ok=True)
    if not args.no_decode:  # first: cheap, and the run may be cut short later
        result["decode"] = decode_times(dev)
        print(result["decode"], file=sys.stderr, flush=True)
    for T in (int(x) for x in args.seq_lens.split(",")):
        B = TOKENS // T
        row = {"T": T, "B": B}
        for name in names:
            if name in BACKEND_T and T not in BACKEND_T[name]:
                row[name] = {}
                continue
            row[name] = time_backend(name, B, T, dev, with_bwd=True)
            print(T, name, row[name], file=sys.stderr, flush=True)
        rows.append(row)
        # written after every T so that a run stopped at its time limit still leaves its rows
        (p / "attention_speed.json").write_text(json.dumps(result, indent=1))
    (p / "attention_speed.json").write_text(json.dumps(result, indent=1))
    print(format_table(result))


def _f(x, key):
    if not x:
        return "-"
    if "error" in x:
        return x["error"][:12]
    v = x.get(key)
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _ratio(a, b, key):
    return f"{a[key] / b[key]:.2f}" if key in a and key in b else "-"


def format_table(result) -> str:
    rows, names = result["rows"], [k for k in result["rows"][0] if k not in ("T", "B")]
    m = result["meta"]
    lines = [
        f"{m['gpu']}, torch {m['torch']}, triton {m['triton']}, fla {m['fla']}, {m['date']}; "
        f"B*T={m['tokens']}, H={m['heads']}, D={m['head_dim']}, bf16, causal; ms = median do_bench",
        "",
        "| T | B | "
        + " | ".join(f"{n} fwd | {n} f+b | {n} GB" for n in names)
        + " | SDPA/triton fwd | SDPA/triton f+b |",
        "|" + "---|" * (2 + 3 * len(names) + 2),
    ]
    for r in rows:
        cells = [str(r["T"]), str(r["B"])]
        for n in names:
            cells += [_f(r[n], "fwd_ms"), _f(r[n], "fwdbwd_ms"), _f(r[n], "peak_gb")]
        s, t = r.get("sdpa", {}), r.get("triton fused", {})
        cells += [_ratio(s, t, "fwd_ms"), _ratio(s, t, "fwdbwd_ms")]
        lines.append("| " + " | ".join(cells) + " |")
    if result["decode"]:
        lines += [
            "",
            "| decode context | SDPA KV cache ms | triton step ms | triton step (CUDA graph) ms |",
            "|---|---|---|---|",
        ]
        for d in result["decode"]:
            lines.append(f"| {d['context']} | {d['sdpa_ms']:.4f} | {d['triton_ms']:.4f} | {d['triton_graph_ms']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
