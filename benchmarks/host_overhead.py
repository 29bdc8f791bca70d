"""Host (CPU) time to issue the fused Triton kernel's forward and forward+backward, against its GPU time.

The kernels run asynchronously: while the host issues a call faster than the GPU runs it, the
wall time is the GPU's. Where the host is slower (small batches, or launch paths that grew), the
wall time is the host's and no kernel speed-up shows. Run on a CUDA machine::

    PYTHONPATH=src python benchmarks/host_overhead.py --out results/ [--cprofile 1x1024,32x4096]

For each (B, T) prints the host time per call (``n`` calls issued back to back while a spin
kernel holds the GPU), the GPU time per call (CUDA events around the same calls, run after the
spin: no host gaps) and their ratio (above 1: host-bound); with
``--cprofile``, the Python functions that took the most host time in one fwd+bwd at those T.
Writes ``host_overhead.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pathlib
import pstats
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from attention_speed import HEADS, make_triton  # noqa: E402

SHAPES = ((1, 1024), (4, 1024), (32, 4096), (8, 16384), (1, 131072))


def _issue_and_gpu_ms(fn, grads=(), n=10, hold_ms=200.0):
    """(host ms, GPU ms) per call. The GPU is held by a ``hold_ms`` spin kernel while the host
    issues ``n`` calls back to back, so the GPU time (CUDA events around the calls, which start
    after the spin) has no host gaps in it; the host time is the issuing alone."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(hold_ms * 1_980_000))  # cycles at the H200's 1.98 GHz (longer if slower)
    start.record()
    t0 = time.perf_counter()
    for _ in range(n):
        for x in grads:
            x.grad = None
        fn()
    host_total = (time.perf_counter() - t0) * 1e3
    end.record()
    torch.cuda.synchronize()
    if host_total > hold_ms:  # the GPU caught up with the host: its time has gaps in it
        print(f"warning: issuing took {host_total:.0f} ms > the {hold_ms:.0f} ms hold", file=sys.stderr)
    return round(host_total / n, 4), round(start.elapsed_time(end) / n, 4)


def _graph_ms(fwd, leaves, do, n=10) -> tuple[float, float]:
    """(host ms, GPU ms) per replay of one fwd+bwd captured in a CUDA graph (warmed up on a side
    stream first, as PyTorch's whole-network capture recipe does)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for x in leaves:
                x.grad = None
            fwd().backward(do)
    torch.cuda.current_stream().wait_stream(side)
    for x in leaves:
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fwd().backward(do)
    return _issue_and_gpu_ms(graph.replay, n=n)


def _compiled_ms(B, T, dev, n=10) -> tuple[float, float, float]:
    """(host ms, GPU ms, largest relative difference to eager) per fwd+bwd of the attention under
    ``torch.compile(mode="reduce-overhead", fullgraph=True)``: inductor records the forward and
    backward graphs (the custom ops inside) in PyTorch's CUDA-graph trees and replays them."""
    from hedgehog_attention.ops.triton import fused_hedgehog_attention

    torch._dynamo.reset()  # every shape compiled on its own (static shapes, as a fixed-shape training loop)
    _, leaves = make_triton(B, T, dev, True)

    def f(q, k, v, wq, bq, wk, bk):
        return fused_hedgehog_attention(q, k, v, wq, bq, wk, bk, causal=True)[0]

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    do = torch.randn(B, T, HEADS, leaves[2].shape[3], device=dev, dtype=leaves[2].dtype)

    def step():
        compiled(*leaves).backward(do)

    diffs = []
    for fn in (step, lambda: f(*leaves).backward(do)):
        for x in leaves:
            x.grad = None
        fn()
        diffs.append([x.grad.float().clone() for x in leaves])
    worst = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(*diffs))
    for _ in range(3):  # record, then replays
        for x in leaves:
            x.grad = None
        step()
    host, gpu = _issue_and_gpu_ms(step, leaves, n=n)
    return host, gpu, worst


def _breakdown(fn, n=10) -> dict:
    """Host ms per call spent inside the launcher's entry points and kernel launches (wrapped
    with timers; nested: ``fwd`` includes its launches) and in the custom ops around them."""
    from hedgehog_attention.ops.triton import _launch as L

    spent: dict = {}

    def timed(name, f):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    names = ("fwd", "bwd_q", "bwd_kv", "_run", "_dw")
    saved = {k: getattr(L, k) for k in names}
    for k in names:
        setattr(L, k, timed(k, saved[k]))
    try:
        with torch.autograd.set_multithreading_enabled(False):  # the backward on this thread
            for _ in range(2):
                fn()
            torch.cuda.synchronize()
            spent.clear()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            total = time.perf_counter() - t0
            torch.cuda.synchronize()
    finally:
        for k, f in saved.items():
            setattr(L, k, f)
    out = {"total": total}
    out.update(spent)
    return {k: round(v * 1e3 / n, 4) for k, v in out.items()}


def _top_functions(fn, top: int, calls: int = 20) -> list[str]:
    """The ``top`` functions by own host time per call of ``fn`` over ``calls`` calls (cProfile, GPU
    running; the backward runs on this thread, which cProfile sees, instead of autograd's device
    thread), as rows of microseconds (pstats' own table rounds them to milliseconds, where a
    fwd+bwd's ~300 calls show as 0.000)."""
    prof = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (prim calls, calls, own s, cumulative s, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    lines = [f"per call of the step, over {calls} calls: calls | own us | cumulative us | function"]
    for (file, line, name), (_, nc, tt, ct, _) in rows:
        where = f"{pathlib.Path(file).name}:{line}({name})" if line else name
        lines.append(f"{nc / calls:8.1f} | {tt * 1e6 / calls:8.1f} | {ct * 1e6 / calls:9.1f} | {where}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--shapes", default=",".join(f"{b}x{t}" for b, t in SHAPES), help="BxT,BxT,...")
    ap.add_argument("--cprofile", default="", help="BxT shapes to profile with cProfile")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--graph", action="store_true", help="also replay the fwd+bwd from a CUDA graph")
    ap.add_argument("--compiled", action="store_true", help='also torch.compile(mode="reduce-overhead")')
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for shape in args.shapes.split(","):
        B, T = (int(x) for x in shape.split("x"))
        row = {"B": B, "T": T, "H": HEADS}
        fwd, leaves = make_triton(B, T, dev, False)
        with torch.no_grad():
            row["fwd_host_ms"], row["fwd_gpu_ms"] = _issue_and_gpu_ms(fwd)
        fwd, leaves = make_triton(B, T, dev, True)
        do = torch.randn_like(fwd())

        def step(fwd=fwd, do=do):
            fwd().backward(do)

        row["fwdbwd_host_ms"], row["fwdbwd_gpu_ms"] = _issue_and_gpu_ms(step, leaves)
        row["fwdbwd_host_breakdown_ms"] = _breakdown(step)
        if args.graph:
            row["graph_host_ms"], row["graph_gpu_ms"] = _graph_ms(fwd, leaves, do)
        if args.compiled:
            row["compiled_host_ms"], row["compiled_gpu_ms"], row["compiled_vs_eager"] = _compiled_ms(B, T, dev)
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
        del fwd, leaves, do
        torch.cuda.empty_cache()
    profiles = {}
    for shape in (x for x in args.cprofile.split(",") if x):
        B, T = (int(x) for x in shape.split("x"))
        fwd, leaves = make_triton(B, T, dev, True)
        do = torch.randn_like(fwd())
        for _ in range(2):
            fwd().backward(do)
        torch.cuda.synchronize()
        profiles[shape] = _top_functions(lambda fwd=fwd, do=do: fwd().backward(do), args.top)
        del fwd, leaves, do
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows, "cprofile": profiles}, indent=1))
    print(
        "| B | T | fwd host / GPU ms | fwd+bwd host / GPU ms | host/GPU fwd+bwd | CUDA graph replay host / GPU ms "
        '| torch.compile "reduce-overhead" host / GPU ms (rel. diff of the gradients to eager) |'
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["fwdbwd_host_ms"] / r["fwdbwd_gpu_ms"]
        graph = f"{r['graph_host_ms']:.3f} / {r['graph_gpu_ms']:.3f}" if "graph_gpu_ms" in r else "-"
        comp = "-"
        if "compiled_gpu_ms" in r:
            comp = f"{r['compiled_host_ms']:.3f} / {r['compiled_gpu_ms']:.3f} ({r['compiled_vs_eager']:.1e})"
        print(
            f"| {r['B']} | {r['T']} | {r['fwd_host_ms']:.3f} / {r['fwd_gpu_ms']:.3f} | "
            f"{r['fwdbwd_host_ms']:.3f} / {r['fwdbwd_gpu_ms']:.3f} | {ratio:.2f} | {graph} | {comp} |"
        )
    for r in rows:
        print(f"B={r['B']} T={r['T']} host ms per fwd+bwd inside:", r["fwdbwd_host_breakdown_ms"])
    for shape, lines in profiles.items():
        print(f"\ncProfile, one fwd+bwd at B x T = {shape}:")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
