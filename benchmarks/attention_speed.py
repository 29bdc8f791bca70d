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
import os
import pathlib
import platform
import sys
import time
import zlib
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
def make_sdpa(B, T, dev, grad, backend="flash"):
    """SDPA in its own ``[B, H, T, D]`` layout; ``backend`` "flash" forces FlashAttention (the
    issue's anchor), "auto" lets PyTorch pick (cuDNN's attention on Hopper when it is there, which
    which measured faster: the issue's anchor figures match it, not the flash backend)."""
    q, k, v = (
        torch.randn(B, HEADS, T, HEAD_DIM, device=dev, dtype=torch.bfloat16, requires_grad=grad) for _ in range(3)
    )
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fwd():
        if backend == "auto":
            return F_.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F_.scaled_dot_product_attention(q, k, v, is_causal=True)

    return fwd, [q, k, v]


def make_sdpa_auto(B, T, dev, grad):
    return make_sdpa(B, T, dev, grad, backend="auto")


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
    "sdpa (auto)": make_sdpa_auto,
    "fla+torch map": make_fla,
    "chunked (torch)": make_chunked,
    "triton fused": make_triton,
    "taylor2 (torch)": make_taylor,
}
FWD_ONLY = {"taylor2 (torch)"}
SCALED = {"taylor2 (torch)"}
# launcher settings per backend (``--config`` sets the "triton fused" one; the sweep adds more)
BACKEND_CONFIG: dict[str, dict] = {}
# backends timed at a few T only (device time is scarce): Taylor's 4161 features are slow, and
# the chunked PyTorch op's fwd+bwd grows to ~0.2 s and ~18 GB per call past 8K
BACKEND_T = {
    "taylor2 (torch)": {1024, 4096, 16384},
    "chunked (torch)": {1024, 2048, 4096, 8192, 16384},
}
REPS = {"warmup": 10, "rep": 60}
# named ``--sweep`` sets (launcher CONFIG overrides of "triton fused"; defaults in _launch.CONFIG).
# Run 5 (2026-11-28 18:10) swept 23 variants at T=4096 (the set "call1" of commit a7621aa; results
# in BENCHMARKS.md); the knobs that lost there (two-level scan, rounded features, persistent
# backward) were removed from the kernels afterwards.
# 64-token chunks with 4-warp backward and walk programs (session 7 sweeps)
_B64W4 = {"chunk": 64, "bwd_warps": 4, "state_warps": 4, "min_programs": 264}
SWEEPS = {
    # session 4: the fused-chunk design (state in registers, no per-chunk states; the default)
    # against the chunk design of runs 3-7, and its chunk size / warps / pipeline stages /
    # resident programs (segments per sequence)
    "fc": {
        "chunk": {"design": "chunk"},
        "fc64w4s2": {"design": "fused_chunk", "fc_chunk": 64, "fc_warps": 4, "fc_stages": 2},
        "fc64w4s1": {"design": "fused_chunk", "fc_chunk": 64, "fc_warps": 4, "fc_stages": 1},
        "fc64w8s2": {"design": "fused_chunk", "fc_chunk": 64, "fc_warps": 8, "fc_stages": 2},
        "fc32w4s2": {"design": "fused_chunk", "fc_chunk": 32, "fc_warps": 4, "fc_stages": 2},
        "fc128w8s1": {"design": "fused_chunk", "fc_chunk": 128, "fc_warps": 8, "fc_stages": 1},
        "fc64w4p132": {"design": "fused_chunk", "fc_chunk": 64, "fc_warps": 4, "fc_stages": 2, "fc_programs": 132},
        "fc64w4p528": {"design": "fused_chunk", "fc_chunk": 64, "fc_warps": 4, "fc_stages": 2, "fc_programs": 528},
        "fc32w2s2": {"design": "fused_chunk", "fc_chunk": 32, "fc_warps": 2, "fc_stages": 2},
    },
    # session 5: reductions over a chunk's tokens on the tensor cores (CONFIG["sums"]; "auto" = the
    # new default, all bits for bf16) against the fp32 adds, in the auto layout and in the fused-chunk
    # layout forced (training too: its walks spill less now), and the fused-chunk forward at 8 warps.
    # Run 11 ran it on the first, broken version (NaN in the fused-chunk kernels; BENCHMARKS.md); not
    # re-run since the fix. At 16K-32K its "fc" row is the fused-chunk forward over segments, the
    # open question for the forward target above 8K (docs/kernels.md)
    "sums": {
        "auto": {},
        "auto_fma": {"sums": "fma"},
        "fc": {"design": "fused_chunk"},
        "fc_fma": {"design": "fused_chunk", "sums": "fma"},
        "fc_w8": {"design": "fused_chunk", "fc_warps": 8},
        "chunk": {"design": "chunk"},
    },
    # session 6: the fused-chunk forward in training too (it stores the chunk states the chunk
    # layout's backward reads: no forward state walk), over segments at long T, and the bias
    # gradient from per-chunk partials written by the backward kernels; "base" = session 5's defaults
    # (run 15 had "db_partial": False in "base"; the knob went with the partials, so "base" and
    # "dbp" are the same configuration now)
    "train": {
        "base": {"fc_forward": "inference"},
        "dbp": {"fc_forward": "inference"},
        "fc1": {"fc_forward": "one_segment"},
        "fcall": {"fc_forward": "always"},
        "fcall_p132": {"fc_forward": "always", "fc_programs": 132},
    },
    # session 6, after "train": the defaults (fused-chunk training forward at one segment, segment
    # states folded into the chunk states at long T) against each change undone, and a fused-chunk
    # inference forward at 8 warps with one segment at 16K (128 programs)
    "fold": {
        "defaults": {},
        "unfold": {"seg_fold": False},
        "fc_inference": {"fc_forward": "inference"},
        "fc_w8_p132": {"fc_forward": "always", "fc_programs": 132, "fc_warps": 8},
    },
    # session 7: the fused-chunk forward over segments for inference (walks from zero + the
    # correction pass, or with the segment sums first) and dW / db by _dw_kernel, against session 6's
    # defaults
    "s7": {
        "defaults": {},
        "s6": {"fc_forward": "one_segment", "dw_kernel": False},
        "sums": {"fc_segments": "sums"},
        "fix8": {"fix_programs": 8},
        "fix1": {"fix_programs": 1},
    },
    # session 7, second sweep: the correction pass's launch shape, and 64-token chunks for the chunk
    # layout (its backward's intra-chunk work halves, its state reads and stores double)
    "s7b": {
        "defaults": {},
        "fix_w8": {"fix_warps": 8},
        "fix_s1": {"fix_stages": 1},
        "fix_p2s4": {"fix_programs": 2, "fix_stages": 4},
        "bt64": {"chunk": 64},
        "bt64w4": {"chunk": 64, "bwd_warps": 4, "min_programs": 264},
    },
    # session 7, third sweep: 64-token chunks with 4-warp programs (the backward kernel 3.27 -> 2.50
    # ms in s7b, but twice the chunk states to store and walk)
    "s7d": {
        "defaults": {},
        "bt64w4": {"chunk": 64, "bwd_warps": 4, "min_programs": 264},
        "bt64all4": {"chunk": 64, "bwd_warps": 4, "state_warps": 4, "out_warps": 4, "min_programs": 264},
        "bt64all4s2": {
            "chunk": 64,
            "bwd_warps": 4,
            "state_warps": 4,
            "out_warps": 4,
            "min_programs": 264,
            "state_stages": 2,
        },
    },
    # session 7, fourth sweep: 64-token chunks, 4 warps everywhere, and the training forward in the
    # chunk layout (its 4-warp state walk) rather than the fused-chunk kernel storing every state
    "s7e": {
        "defaults": {},
        "bt64all4": dict(_B64W4, out_warps=4),
        "bt64all4_inf": dict(_B64W4, out_warps=4, fc_forward="inference_all"),
        "bt64all4_inf_o8": dict(_B64W4, out_warps=8, fc_forward="inference_all"),
        "bt64all4_inf_p4": dict(_B64W4, out_warps=4, fc_forward="inference_all", out_persist=4),
    },
    # session 7: the "auto" tile profile (64-token chunks and 4 warps up to small_tiles_max_len)
    # against 128-token chunks and 8 warps everywhere (session 6's tiles)
    "s7f": {
        "defaults": {},
        "tiles128": {"chunk": 128, "bwd_warps": 8, "state_warps": 8, "out_warps": 8, "min_programs": 132},
        "small_to_64k": {"small_tiles_max_len": 65536},
    },
    # session 8, prepared for the next device run (not yet timed): the correction pass capped at 168
    # registers with two stages and three programs per SM (offline sm_90: 220 -> 168 registers, 32 B
    # of spills, 60 KB of shared memory), its uncapped two-stage control, and small tiles at 128K
    # (kernel time 5.28 against 5.71 ms in runs 32-33, wall 6.5-6.7 against 5.7: a host-side gap to
    # explain first). Run with --sweep-seq-lens 16384,131072,32768 --sweep-profile.
    # session 9: the backward kernel at 168 registers (three 4-warp programs per SM instead of two;
    # offline sm_90: 368 / 552 B of spills on the query / key side against 48 / 120), at 8 warps
    # (240 / 255 registers, 0 / 32 B: one program per SM), the correction pass capped (s8) and small
    # tiles at 128K (s8: over 1 ms of host time, now profiled). Run with --sweep-seq-lens
    # 4096,16384,131072 --sweep-profile
    "s9": {
        "defaults": {},
        "bwd168": {"maxnreg": {"_bwd_kernel": 168}},
        "bwd_w8": {"bwd_warps": 8},
        "fix168": {"maxnreg": {"_fc_fix_kernel": 168}, "fix_stages": 2, "fix_programs": 6},
        "small128": {"small_tiles_max_len": 131072},
    },
    # session 9, second call: the fused-chunk forward's walk with its next chunk's loads pipelined
    # (84 KB) and small tiles at 128K; run 36 also timed the backward kernel persistent over
    # (chunk, head) items (knobs bwd_persist / bwd_persist_stages of commit 3b1ba9d, removed after
    # it lost: 2.51 -> 3.20-5.47 ms). --sweep-seq-lens 4096,131072
    "s9b": {
        "defaults": {},
        "small128": {"small_tiles_max_len": 131072},
        "fc_s2": {"fc_stages": 2},
    },
    # session 9, third call: after the launcher's host-time cut, small tiles at 128K again (their
    # wall time was over the kernels' because the host issued a fwd+bwd in 5.5 ms)
    "s9c": {
        "defaults": {},
        "small128": {"small_tiles_max_len": 131072},
    },
    # session 10: the reverse walk's segment states added by the key side instead of folded into
    # its chunk states (run 16 chose the fold with 128-token chunks and older kernels)
    "s10c": {
        "defaults": {},
        "nofold": {"seg_fold": False},
    },
    # session 12 (runs 60-62): TMA descriptors in the fused-chunk forward and its correction pass,
    # and the training forward storing the chunk states by TMA ("auto" reads "always" with TMA)
    # against the backward recomputing them ("all"); "pointers" is session 11's default
    "s12": {
        "defaults": {},
        "pointers": {"fc_tma": False},
        "tma_all": {"fc_forward": "all"},
        "tma_s1": {"fc_tma_stages": 1},
        "fix_p4_255": {"fix_tma_programs": 4, "fix_tma_maxnreg": 255},
    },
    # the correction pass above 8K with TMA (the forward's last 0.02-0.07 ms over 1.0 ms at 32K-128K):
    # stages, programs per SM, warps; not yet run (session 12 ended without device time)
    "s12fix": {
        "defaults": {},
        "s2": {"fix_tma_stages": 2},
        "p4": {"fix_tma_programs": 4},
        "p8": {"fix_tma_programs": 8},
        "s2p9": {"fix_tma_stages": 2, "fix_tma_programs": 9},
        "w8": {"fix_warps": 8, "fix_tma_maxnreg": 128},
    },
    # session 10: one side of the backward at 168 registers (three programs per SM)
    "s10b": {
        "defaults": {},
        "q168": {"maxnreg": {"_bwd_kernel_q": 168}},
        "kv168": {"maxnreg": {"_bwd_kernel_kv": 168}},
    },
    "s8": {
        "defaults": {},
        "fix168": {"maxnreg": {"_fc_fix_kernel": 168}, "fix_stages": 2, "fix_programs": 6},
        "fix_s2": {"fix_stages": 2},
        "small128": {"small_tiles_max_len": 131072},
    },
    # the table's config picked among the likely winners (--pick; the first is the same-function
    # reference)
    "fcpick": {
        "chunk": {"design": "chunk"},
        "fc64w4s1": {"design": "fused_chunk", "fc_chunk": 64, "fc_warps": 4, "fc_stages": 1},
        "fc32w4s1": {"design": "fused_chunk", "fc_chunk": 32, "fc_warps": 4, "fc_stages": 1},
    },
    # session 4, call 3: the final defaults ("auto": fused-chunk forward for inference with one
    # segment per walk, chunk layout for training) against each layout forced
    "final": {
        "auto": {},
        "chunk": {"design": "chunk"},
        "fc64w4s1": {"design": "fused_chunk", "fc_chunk": 64, "fc_warps": 4, "fc_stages": 1},
    },
    # session 4, call 2: after the instruction diet, the two designs and a few launch knobs
    "diet": {
        "chunk": {"design": "chunk"},
        "fc64w4s1": {"design": "fused_chunk", "fc_chunk": 64, "fc_warps": 4, "fc_stages": 1},
        "fc32w4s1": {"design": "fused_chunk", "fc_chunk": 32, "fc_warps": 4, "fc_stages": 1},
        "fc32w4s2": {"design": "fused_chunk", "fc_chunk": 32, "fc_warps": 4, "fc_stages": 2},
        "chunk_st2": {"design": "chunk", "state_stages": 2},
        "chunk_op1": {"design": "chunk", "out_persist": 1, "out_persist_stages": 2},
        "chunk_p264": {"design": "chunk", "min_programs": 264},
    },
    # run 6: the defaults (persistent output kernel, cd in the backward, chunk states dropped
    # after the query side) against programs over part of a chunk, both feature halves per walk
    # program and dW accumulated in the kernels (never measured before; picked by the registers
    # and spills that triton 3.6 gives locally, benchmarks/_compile_sm90.py); dwat also drops the
    # stored dz (memory)
    "call2": {  # in order of priority (the time limit cuts the tail)
        "defaults": {},
        "bsplit2": {"bwd_split": 2},
        "dwat": {"dw_atomic": True},
        "osplit2w4": {"out_split": 2, "out_warps": 4, "out_persist": 0},
        "combo": {
            "walk_halves": 2,
            "bwd_split": 2,
            "dw_atomic": True,
            "out_split": 2,
            "out_warps": 4,
            "out_persist": 0,
        },
        "halves2": {"walk_halves": 2},  # after combo: its walk kernels are compiled by then
        "bsplit4": {"bwd_split": 4},
    },
}


def _bench(fn, grad_to_none=None):
    from triton.testing import do_bench

    return do_bench(fn, warmup=REPS["warmup"], rep=REPS["rep"], grad_to_none=grad_to_none, return_mode="median")


def _host_ms(fn, grad_to_none=None, n=5):
    """Host time to issue one call of ``fn`` (ms): ``n`` calls back to back without waiting for
    the GPU, which runs behind them. When it approaches the GPU time of a call, the wall time is
    the host's (launch overhead), not the kernels'."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        for x in grad_to_none or ():
            x.grad = None
        fn()
    host = (time.perf_counter() - t0) * 1e3 / n
    torch.cuda.synchronize()
    return round(host, 4)


def time_backend(name, B, T, dev, with_bwd):
    from hedgehog_attention.ops.triton import _launch

    res = {}
    saved = dict(_launch.CONFIG)
    _launch.CONFIG.update(BACKEND_CONFIG.get(name, {}))
    try:
        torch.cuda.empty_cache()
        fwd, _ = BACKENDS[name.split(" @")[0]](B, T, dev, False)
        with torch.no_grad():
            res["fwd_ms"] = _bench(fwd)
            res["fwd_host_ms"] = _host_ms(fwd)
        if name in SCALED:
            res["measured_tokens"] = max(1, TAYLOR_TOKENS // T) * T
            res["fwd_ms"] *= B * T / res["measured_tokens"]
        del fwd
        if with_bwd and name not in FWD_ONLY:
            torch.cuda.empty_cache()
            fwd, leaves = BACKENDS[name.split(" @")[0]](B, T, dev, True)
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
            res["fwdbwd_host_ms"] = _host_ms(step, leaves)
            if name.startswith("triton"):  # the forward of training (autograd records it): its layout can differ
                res["fwd_train_ms"] = _bench(fwd)
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


def profile_kernels(T, dev, n_iter=5):
    """Per-kernel CUDA time of the fused kernel's fwd+bwd at ``T`` (torch.profiler), ms per call."""
    from torch.profiler import ProfilerActivity, profile

    fwd, leaves = make_triton(TOKENS // T, T, dev, True)
    do = torch.randn_like(fwd())
    for _ in range(2):
        fwd().backward(do)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n_iter):
            for x in leaves:
                x.grad = None
            fwd().backward(do)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / n_iter
    out = _kernel_times(prof, n_iter, "")
    # host side (session 9: a variant whose wall time exceeded its kernels' by > 1 ms): the wall
    # time per step under the profiler and the host calls that took longest
    out["wall (profiled)"] = round(wall, 4)
    out.update(_host_times(prof, n_iter))
    # the forward alone (no_grad): separates the forward walk from the reverse one (same kernel)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.no_grad():
            for _ in range(n_iter):
                fwd()
        torch.cuda.synchronize()
    out.update(_kernel_times(prof, n_iter, "fwd only: "))
    return out


def _kernel_times(prof, n_iter, prefix):
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0):
            t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if t:
                out[prefix + e.key[:60]] = round(t / 1e3 / n_iter, 4)
    top = dict(sorted(out.items(), key=lambda kv: -kv[1])[:14])
    top[prefix + "sum"] = round(sum(out.values()), 4)
    return top


def _host_times(prof, n_iter, top=6):
    """The host-side calls (CUDA runtime and ATen) with the most self time, ms per step."""
    rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages() if e.device_type.name == "CPU"]
    rows.sort(key=lambda kv: -kv[1])
    return {f"host: {k[:50]}": round(t / 1e3 / n_iter, 4) for k, t in rows[:top] if t}


def _same_function(cfg, B, T, dev, ref):
    """Relative difference of o, dq, dk, dv and the maps' dW, db (fixed seed inputs) between this config and the first
    variant of the sweep (stored in ``ref`` on its first call): a GPU check, at full size, that a
    variant computes the same function (bf16: differences of a few 1e-3 are rounding). When the
    first variant failed, no later one becomes the reference (its zeros would read as "checked")."""
    if ref.get("failed"):
        return {"error": "no reference: the first variant failed"}
    first = not ref
    saved = dict(_launch_config())
    _launch_config().update(cfg)
    try:
        torch.manual_seed(0)
        fwd, leaves = make_triton(B, T, dev, True)
        o = fwd()
        o.backward(torch.randn_like(o))
        cur = {"o": o.detach().float(), "dq": leaves[0].grad.float(), "dk": leaves[1].grad.float(),
               "dv": leaves[2].grad.float(), "dWq": leaves[3].grad.float(), "dbq": leaves[4].grad.float(),
               "dWk": leaves[5].grad.float(), "dbk": leaves[6].grad.float()}  # fmt: skip
        del fwd, leaves, o
        if not ref:
            ref.update(cur)
            return {k: 0.0 for k in cur}
        return {k: float((cur[k] - ref[k]).norm() / ref[k].norm()) for k in ref}
    except Exception as e:  # report, keep sweeping
        if first:
            ref["failed"] = True
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    finally:
        _launch_config().clear()
        _launch_config().update(saved)


def _kernels() -> dict:
    """Every Triton kernel of the launcher by name (``_kernels``, ``_fused_chunk``, ``_weight_grad``:
    the correction pass ``_fc_fix_kernel``, the fold, the scan and ``_dw_kernel`` included)."""
    from hedgehog_attention.ops.triton import _fused_chunk as FC
    from hedgehog_attention.ops.triton import _kernels as K
    from hedgehog_attention.ops.triton import _weight_grad as WG

    return {
        n: f for mod in (K, FC, WG) for n, f in sorted(vars(mod).items()) if n.endswith("_kernel") and hasattr(f, "fn")
    }


def kernel_resources():
    """Registers and spills of every compiled variant of our kernels (triton's CompiledKernel)."""
    out = []
    for name, fn in _kernels().items():
        try:
            for cache in getattr(fn, "device_caches", {}).values():
                kc = cache[0] if isinstance(cache, tuple) else cache
                for key, ck in kc.items():
                    md = ck.metadata
                    # the specialization key (constexprs) as a short hash: tells variants apart;
                    # shared memory too (a second program per SM needs registers and shared memory)
                    out.append(
                        f"{name} w{getattr(md, 'num_warps', '?')} s{getattr(md, 'num_stages', '?')} "
                        f"#{zlib.crc32(str(key).encode()) % 10**6:06d}: regs {getattr(ck, 'n_regs', '?')} "
                        f"spills {getattr(ck, 'n_spills', '?')} smem {getattr(md, 'shared', '?')}"
                    )
        except Exception as e:  # report, never fail the run over introspection
            out.append(f"{name}: {type(e).__name__} {e}"[:120])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for attention_speed.json")
    ap.add_argument("--seq-lens", default="1024,2048,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--backends", default="sdpa,sdpa (auto),fla+torch map,triton fused")
    ap.add_argument(
        "--extra-backends",
        default="chunked (torch),taylor2 (torch)",
        help="timed after every T of --backends is done (slow ones: cut first by --time-limit)",
    )
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--config", default="{}", help="JSON overrides of _launch.CONFIG for 'triton fused'")
    ap.add_argument("--sweep", default="", help="JSON {name: CONFIG overrides} or a SWEEPS name")
    ap.add_argument("--sweep-seq-lens", default="1024,32768")
    ap.add_argument("--pick", action="store_true", help="the sweep's best checked config (first T) for the table")
    ap.add_argument("--profile-seq-lens", default="", help="per-kernel time of triton fwd+bwd at these T")
    ap.add_argument("--reps", default="10,60", help="do_bench warmup,rep in ms")
    ap.add_argument(
        "--time-limit",
        type=float,
        default=1e9,
        help="start no new T row after this many seconds (counted after --warm-fla's warm-up)",
    )
    ap.add_argument(
        "--sweep-time-limit",
        type=float,
        default=1e9,
        help="start no new sweep variant after this (counted after the warm-up)",
    )
    ap.add_argument("--sweep-profile", action="store_true", help="per-kernel times of every sweep variant")
    ap.add_argument("--warm-fla", action="store_true", help="run fla once at T=1024 before anything is timed")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke run of this script (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    t_start = time.time()
    REPS["warmup"], REPS["rep"] = (int(x) for x in args.reps.split(","))
    BACKEND_CONFIG["triton fused"] = check_config(json.loads(args.config), "--config")
    # the sweep and --pick checked before anything runs (--warm-fla alone takes 130-150 s on a fresh
    # machine): a misspelt sweep name or knob must not cost that first
    sweep = {}
    if args.sweep:
        try:
            sweep = SWEEPS[args.sweep] if args.sweep in SWEEPS else json.loads(args.sweep)
        except json.JSONDecodeError:
            raise ValueError(f"--sweep {args.sweep!r}: neither a SWEEPS name {sorted(SWEEPS)} nor JSON") from None
        if not isinstance(sweep, dict) or not sweep:
            raise ValueError(f"--sweep: a JSON object {{name: launch knobs}} with a variant, got {args.sweep!r}")
        for cname, cfg in sweep.items():
            check_config(cfg, f"--sweep variant {cname!r}")
    if args.pick and not (sweep and any(x for x in args.sweep_seq_lens.split(","))):
        raise ValueError("--pick needs a --sweep and its --sweep-seq-lens (it picks at the first of them)")
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is not None:  # cuda:N: the memory statistics, synchronisations and
        torch.cuda.set_device(dev)  # do_bench use the current device (plain "cuda" is the current one already)
    import triton

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "tokens": TOKENS,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "dtype": "bf16",
        "causal": True,
        "config": BACKEND_CONFIG["triton fused"],
        "reps_ms": [REPS["warmup"], REPS["rep"]],
    }
    try:
        import fla

        meta["fla"] = fla.__version__
    except ImportError:
        meta["fla"] = None
    rows = []
    names = [n for n in args.backends.split(",") if n]
    result = {"meta": meta, "rows": rows, "decode": [], "sweep": [], "profile": {}}
    p = pathlib.Path(args.out)
    p.mkdir(parents=True, exist_ok=True)

    def save():  # atomically: a job killed mid-write keeps the previous complete file
        result["meta"]["elapsed_s"] = round(time.time() - t_start, 1)
        tmp = p / "attention_speed.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, p / "attention_speed.json")

    if args.warm_fla:  # fla compiles and autotunes on its first calls: before anything is timed
        t0 = time.time()
        r = time_backend("fla+torch map", TOKENS // 1024, 1024, dev, with_bwd=True)
        meta["fla_warm_s"] = round(time.time() - t0, 1)
        print("fla warm-up", meta["fla_warm_s"], "s", r, file=sys.stderr, flush=True)
    # the time limits count from here: fla's first compile takes 130-150 s on a fresh machine and
    # once took a whole limit (H200 run 40); the caller's outer timeout still bounds the total
    t_limits = time.time()
    if sweep:  # configuration sweep of the fused kernel first: it picks the config
        result["sweep_profile"], result["sweep_kernels"] = {}, {}
        ref = {}  # the first variant's o and dq on fixed inputs: every variant must compute the same
        for i, T in enumerate(int(x) for x in args.sweep_seq_lens.split(",") if x):
            row = {"T": T, "B": TOKENS // T}
            for cname, cfg in sweep.items():
                name = f"triton fused @{cname}"
                if time.time() - t_limits > args.sweep_time_limit:
                    row[name] = {"error": "not run (time limit)"}
                    continue
                BACKEND_CONFIG[name] = cfg
                before = set(kernel_resources())
                row[name] = time_backend(name, TOKENS // T, T, dev, with_bwd=True)
                print(T, name, row[name], file=sys.stderr, flush=True)
                if i == 0:  # registers of the kernels this variant compiled; the same function
                    result["sweep_kernels"][cname] = sorted(set(kernel_resources()) - before)
                    row[name]["vs_first"] = _same_function(cfg, TOKENS // T, T, dev, ref)
                if args.sweep_profile and "error" not in row[name]:  # per-kernel times at every T
                    key = f"{cname} T={T}"
                    saved = dict(_launch_config())
                    _launch_config().update(cfg)
                    try:
                        result["sweep_profile"][key] = profile_kernels(T, dev, n_iter=3)
                    except Exception as e:  # report, keep sweeping
                        result["sweep_profile"][key] = {"error": f"{type(e).__name__}: {e}"[:200]}
                    finally:
                        _launch_config().clear()
                        _launch_config().update(saved)
                    print(" ", key, result["sweep_kernels"].get(cname), result["sweep_profile"][key],
                          file=sys.stderr, flush=True)  # fmt: skip
                save()
            result["sweep"].append(row)
            save()
        if args.pick:  # normalised to the targets: fwd 1.0 ms, fwd+bwd 4.0 ms

            def score(x):
                # a variant whose o/dq/dk/dv differ from the first variant's by more than bf16
                # rounding (or that was not checked) is never picked
                vf = x.get("vs_first", {})
                ok = all(k in vf and vf[k] < 2e-2 for k in ("o", "dq", "dk", "dv"))
                return (x.get("fwd_ms", 1e9) / 1.0 + x.get("fwdbwd_ms", 1e9) / 4.0) if ok else 1e9

            last = result["sweep"][0]  # the T at which the variants were checked
            best = min(sweep, key=lambda c: score(last.get(f"triton fused @{c}", {})))
            if score(last.get(f"triton fused @{best}", {})) >= 1e9:  # none timed and checked (time
                # limit, errors): the table keeps --config rather than an unmeasured variant
                meta["picked"] = None
                print("picked no config: no variant was timed and checked", file=sys.stderr, flush=True)
            else:
                BACKEND_CONFIG["triton fused"] = dict(sweep[best], **BACKEND_CONFIG["triton fused"])
                meta["picked"] = best
                meta["config"] = BACKEND_CONFIG["triton fused"]
                print("picked config", best, meta["config"], file=sys.stderr, flush=True)
    for T in (int(x) for x in args.profile_seq_lens.split(",") if x):
        saved = dict(_launch_config())
        _launch_config().update(BACKEND_CONFIG["triton fused"])
        try:
            result["profile"][str(T)] = profile_kernels(T, dev)
        except Exception as e:  # report, go on with the table
            result["profile"][str(T)] = {"error": f"{type(e).__name__}: {e}"[:200]}
        finally:
            _launch_config().clear()
            _launch_config().update(saved)
        print("profile", T, result["profile"][str(T)], file=sys.stderr, flush=True)
        save()
    if not args.no_decode and dev.type == "cuda":  # CUDA graphs and events: nothing to time on the CPU
        try:
            result["decode"] = decode_times(dev)
        except Exception as e:  # report, go on with the table (it is the run's main result)
            result["decode"] = {"error": f"{type(e).__name__}: {e}"[:200]}
        print(result["decode"], file=sys.stderr, flush=True)
        save()
    extras = [n for n in args.extra_backends.split(",") if n]
    for pass_names in (names, extras):
        for T in (int(x) for x in args.seq_lens.split(",") if x):
            row = next((r for r in rows if r["T"] == T), None)
            if row is None:
                row = {"T": T, "B": TOKENS // T}
                rows.append(row)
            for name in pass_names:
                if name in BACKEND_T and T not in BACKEND_T[name]:
                    row[name] = {}
                    continue
                if time.time() - t_limits > args.time_limit:
                    row[name] = {"error": "not run (time limit)"}
                    continue
                row[name] = time_backend(name, TOKENS // T, T, dev, with_bwd=True)
                print(T, name, row[name], file=sys.stderr, flush=True)
                # after every backend: a run killed by an outer time limit still leaves what it
                # measured (run 63 lost its 128K SDPA rows from the JSON when only T was the unit)
                save()
    result["kernels"] = kernel_resources()
    save()
    print(format_table(result))
    print("\n".join(result["kernels"]))


def _launch_config():
    from hedgehog_attention.ops.triton import _launch

    return _launch.CONFIG


def check_config(cfg: dict, where: str) -> dict:
    """``cfg`` if every key is a ``_launch.CONFIG`` knob with a value the launcher takes: a misspelt
    knob, ``maxnreg`` kernel name or mode (``"fallback": "alway"``, ``"seg_fold": "False"``) would
    otherwise time the defaults under the variant's name, or fail only on the GPU."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: a JSON object of launch knobs, got {cfg!r}"[:200])
    unknown = sorted(set(cfg) - set(_launch_config()))
    if unknown:
        raise ValueError(f"{where}: not launch knobs (_launch.CONFIG): {unknown}")
    bad = [f"{k}={v!r}" for k, v in cfg.items() if not _knob_ok(k, v)]
    if bad:
        raise ValueError(f"{where}: invalid launch knob values: {bad}")
    return cfg


def _knob_ok(key: str, val) -> bool:
    """Whether ``val`` is a value ``_launch`` accepts for knob ``key`` (its checks, made up front)."""
    from hedgehog_attention.ops.triton import _launch

    def is_int(x, lo=0, hi=1 << 30):
        return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi

    def pow2(x, lo=1, hi=1 << 20):
        return is_int(x, lo, hi) and not x & (x - 1)

    modes = {
        "design": ("auto", "chunk", "fused_chunk"),
        "fc_forward": _launch._FC_FORWARD,
        "fc_segments": ("fix", "sums"),
        "fc_tma": ("auto", True, False),
        "fallback": ("auto", "always", "never"),
    }
    if key in modes:
        return any(val is m if isinstance(m, bool) else val == m for m in modes[key])
    if key == "sums":
        return val in ("auto", "mma", "fma") or is_int(val, 0, 7)
    if key == "maxnreg":  # kernel names (both sides of the backward on their own too) -> registers
        names = set(_kernels()) | {"_bwd_kernel_q", "_bwd_kernel_kv"}
        return isinstance(val, dict) and all(n in names and is_int(r, 24, 255) for n, r in val.items())
    if key == "fix_tma_maxnreg":
        return is_int(val, 24, 255)
    if key == "min_block":
        return val == "auto" or pow2(val, 16)
    if key == "fc_train_max_len":
        return val == "tiles" or is_int(val, 1)
    if key.endswith("_warps"):
        return (val == "auto" and key in _launch._TILES) or pow2(val, 1, 32)
    if key in ("chunk", "fc_chunk"):
        return (val == "auto" and key in _launch._TILES) or pow2(val, 16, 256)
    if key in ("out_split", "bwd_split", "walk_halves"):
        return pow2(val, 1, 16)
    default = _launch.CONFIG[key]
    if isinstance(default, bool):
        return isinstance(val, bool)
    if isinstance(default, int) or key in _launch._TILES:  # counts: stages, programs, blocks, lengths
        return is_int(val) or (val == "auto" and key in _launch._TILES)
    return True


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
    m = result["meta"]
    lines = [
        f"{m['gpu']}, torch {m['torch']}, triton {m['triton']}, fla {m['fla']}, {m['date']}; "
        f"B*T={m['tokens']}, H={m['heads']}, D={m['head_dim']}, bf16, causal; ms = median do_bench",
    ]
    for r in result["sweep"]:  # one line per variant
        lines += [
            "",
            "| T | variant | fwd ms | f+b ms | GB | rel. diff o / dq / dk / dv vs first |",
            "|---|---|---|---|---|---|",
        ]
        for n, x in r.items():
            if n not in ("T", "B"):
                vf = x.get("vs_first", {}) if isinstance(x, dict) else {}
                dif = (
                    " / ".join(f"{vf[k]:.1e}" for k in ("o", "dq", "dk", "dv") if k in vf) or vf.get("error", "-")[:30]
                )
                lines.append(f"| {r['T']} | {n.split('@')[-1]} | {_f(x, 'fwd_ms')} | {_f(x, 'fwdbwd_ms')} | "
                             f"{_f(x, 'peak_gb')} | {dif} |")  # fmt: skip
    for key in ("rows",):
        rows = result[key]
        if not rows:
            continue
        names = [k for k in rows[0] if k not in ("T", "B")]
        lines += [
            "",
            "| T | B | "
            + " | ".join(f"{n} fwd | {n} f+b | {n} GB" for n in names)
            + (
                " | SDPA/triton fwd | SDPA/triton f+b | SDPA(auto)/triton fwd | SDPA(auto)/triton f+b | fla/triton fwd "
                "| fla/triton f+b |"
                if key == "rows"
                else " |"
            ),
            "|" + "---|" * (2 + 3 * len(names) + (6 if key == "rows" else 0)),
        ]
        for r in rows:
            cells = [str(r["T"]), str(r["B"])]
            for n in names:
                cells += [_f(r.get(n), "fwd_ms"), _f(r.get(n), "fwdbwd_ms"), _f(r.get(n), "peak_gb")]
            if key == "rows":
                s, t, f = r.get("sdpa", {}), r.get("triton fused", {}), r.get("fla+torch map", {})
                sa = r.get("sdpa (auto)", {})
                cells += [_ratio(s, t, "fwd_ms"), _ratio(s, t, "fwdbwd_ms"), _ratio(sa, t, "fwd_ms"),
                          _ratio(sa, t, "fwdbwd_ms"), _ratio(f, t, "fwd_ms"), _ratio(f, t, "fwdbwd_ms")]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    for key, prof in result.get("sweep_profile", {}).items():
        lines += ["", f"sweep {key} kernels (ms per fwd+bwd): " + ", ".join(f"{k}: {v}" for k, v in prof.items())]
        lines += ["  " + x for x in result.get("sweep_kernels", {}).get(key.split(" T=")[0], [])]
    for T, prof in result.get("profile", {}).items():
        lines += ["", f"profile T={T} (ms per fwd+bwd): " + ", ".join(f"{k}: {v}" for k, v in prof.items())]
    if isinstance(result["decode"], dict):  # {"error": ...}
        lines += ["", f"decode: {result['decode'].get('error')}"]
    elif result["decode"]:
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
