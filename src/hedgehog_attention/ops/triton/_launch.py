"""Launchers: ``fwd`` / ``bwd`` / ``decode`` turn validated tensors into kernel grids.

Chunk layout (``docs/kernels.md``), forward: (1) ``_state_kernel`` per (sequence, KV head, segment,
feature half, value block) stores the state entering every chunk relative to its segment
(``h [NC, HK, FT, DV]``, bf16 for bf16 inputs, fp32 otherwise; ``hz [NC, HK, FT]`` fp32) and
each segment's total; (2) ``_seg_scan_kernel`` (``_entering``): exclusive cumulative sum over the
few segments (+ the initial state) = each segment's entering state ``s_in [N, HK, NS, FT, DV]`` fp32,
which ``_fold_kernel`` adds to the chunk states (``seg_fold``); (3) ``_out_kernel`` over (chunk,
query head, value block). Segments only exist so that long sequences with few heads still give
enough programs to the sequential state walk. Bidirectional: (1) without per-chunk stores, every
chunk reads the sequence total. Backward mirrors it: ``_delta_kernel``, the reverse
``_state_kernel``, a reverse cumulative sum, ``_bwd_kernel``, ``_dw_kernel``.

Fused-chunk layout (causal forward, ``uses_fused_chunk``): ``_fc_fwd_kernel`` walks each
(sequence, query head, segment) chunk by chunk with the state in registers and writes ``o``
directly; with several segments the walks start from zero and ``_fc_fix_kernel`` adds each
segment's entering state's contribution afterwards (``fc_segments`` "fix"), or a training forward
that stores its chunk states for the chunk layout's backward walks from the segment sums. ``design``
"fused_chunk" also takes the backward to ``_fc_bwd_q_kernel`` / ``_fc_bwd_kv_kernel``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
import triton.runtime.errors

from . import _fused_chunk as FC
from . import _kernels as K
from . import _weight_grad as WG

# Tunables (measured choices in BENCHMARKS.md). ``chunk``: tokens per chunk (BT; see
# ``chunk_size``). ``state_bv``: value columns per state-walk program. ``out_bv``: value columns
# per output program. ``min_programs``: state-walk programs resident at once (one 8-warp program
# on each of the H200's 132 SMs), which sets the segments per sequence (``segments``). ``*_warps``, ``*_stages``:
# per kernel. ``poison``: fill every kernel-written buffer with NaN first (tests), so a skipped
# write shows. Tests shrink ``chunk`` to 32 (and the V blocks to 16) to exercise many chunks on tiny
# inputs. The defaults follow the H200 sweeps of 2026-11-28/29 (BENCHMARKS.md): since session 7 the
# "auto" tiles (``tile_knob``: 64 tokens and 4 warps up to 64K tokens, runs 24-27); before that
# BT=128, 8 warps (at 128 tokens 4 warps spilled, run 5), 3 stages in the walk (run 4); the output
# kernel persistent with 2 programs per SM (1.24 -> 1.00 ms) and cd in the backward kernel (run 5);
# both feature halves per walk program (run 7: walks 1.73 -> 1.38 ms, fwd 1.76 -> 1.57, fwd+bwd
# 7.13 -> 6.78 ms). Peak memory: the
# forward chunk states are dropped after the query side of the backward (``__init__._setup_context``;
# run 7: 1.99 GB at T=4096, SDPA 2.16). Slower there and off: programs over part of a chunk
# (backward 3.7 -> 6.6-11 ms), the output kernel at 4 warps over half chunks (1.01 -> 1.46 ms), dW by
# atomics (-0.27 GB but +0.32 ms), value blocks of 32; removed after run 5: a two-level
# scan for the walk, persistent backward launches, rounded features.
CONFIG = {
    # "auto" (chunk, min_programs, *_warps): the tile profile of ``tile_knob`` (session 7, H200 sweeps
    # s7d-s7f: 64-token chunks and 4-warp programs for bf16 up to 64 features per half while
    # max_len <= small_tiles_max_len, fwd+bwd 5.30 -> 4.79 ms at T = 4K, 5.72 -> 5.52 at 64K; 128
    # tokens and 8 warps above. Session 7 kept 128K on 128-token chunks (the twice as many chunk
    # states to fold and walk: 5.75 -> 5.9-6.6 ms); since session 8 trains in the fused-chunk layout
    # there, the small tiles take 5.71 -> 5.30 ms of kernels, and once the launcher's host time was
    # cut (session 9: a fwd+bwd at 128K was issued in 5.5 ms, more than its kernels) the wall time
    # follows: 5.77 -> 5.36 ms (H200 runs 35-39), peak 1.64 -> 1.95 GB (SDPA flash 2.16)
    "chunk": "auto",
    "small_tiles_max_len": 131072,
    "state_bv": 64,
    "out_bv": 64,
    "min_programs": "auto",
    "state_warps": "auto",
    "out_warps": "auto",
    "bwd_warps": "auto",
    "state_stages": 3,
    "out_stages": 1,
    "bwd_stages": 1,
    "poison": False,
    # smallest block for a head / feature / value dim in the kernels that run tl.dot ("auto": 64 on
    # CUDA devices, 16 under the CPU interpreter). Blocks past the dim are masked. H200, triton 3.6
    # (session 14): with 16-wide blocks (D = 16, F = 8) the backward's _bwd_kernel read shared memory
    # out of bounds (compute-sanitizer) and failed with an illegal memory access in 5 of 10 (bf16)
    # and 9 of 10 (fp16) fresh processes; with 64-wide blocks 0 of 40 (BENCHMARKS.md, run 73). Head
    # dims of 64 and more are unaffected.
    "min_block": "auto",
    "fallback": "auto",
    # causal, no initial state: do not keep the forward's chunk states ``h`` for the backward
    # at all (recomputed there by one more forward walk). Off: they are held (not saved) and
    # freed after the query side, before the key side allocates its states, which gives the
    # same peak memory without the extra walk (see _setup_context in __init__.py)
    "recompute_h": False,
    # output kernel persistent over (chunk, head) items: this many programs per SM (0: one
    # program per item), each looping with ``out_persist_stages`` software-pipeline stages
    "out_persist": 2,
    "out_persist_stages": 2,
    # compute cd = -(do . o) / den in the query-side backward launch (no _delta_kernel)
    "fuse_delta": True,
    # sub-blocks per chunk in the output / backward programs: each program owns BT // split rows
    # (queries; keys on the backward's key side) against the whole chunk (smaller tiles, more
    # programs, the chunk states and the walk of BT-token chunks)
    "out_split": 1,
    "bwd_split": 1,
    # feature halves per state-walk program (2: both halves of the negation map in one program,
    # the chunk's loads and pre-activation shared; 1: a program per half)
    "walk_halves": 2,
    # map weight gradients accumulated in the backward kernels (fp32 atomics of each chunk's
    # x^T dz) instead of storing dz and one batched matmul per side
    "dw_atomic": False,
    # causal layout: "fused_chunk" (_fused_chunk.py: one program walks a segment's chunks with the
    # state in registers, no per-chunk states in memory) or "chunk" (per-chunk states stored by a
    # walk and read by a parallel output kernel). fused_chunk needs <= 64 features per half and
    # value columns (the state lives in registers); larger heads use "chunk".
    "design": "auto",
    "fc_chunk": 64,
    "fc_warps": 4,
    "fc_stages": 1,
    # fused-chunk programs resident at once (sets the segments per sequence, as min_programs does
    # for the state walk)
    "fc_programs": 264,
    # where "auto" runs the fused-chunk forward (the backward of "auto" is the chunk layout's):
    # "inference" (no autograd graph, one segment per walk: session 4's rule), "one_segment"
    # (training too: the forward then also stores the chunk states the chunk layout's backward
    # reads, STORE_H, so that no state walk runs), "always" (segments too: their sums by a state
    # walk first), "segments_inference" ("one_segment", and inference over segments too), "all"
    # (every forward, training over segments too as "fix" does, and a training forward stores no
    # chunk states: the backward's query side recomputes them with one state walk, which costs
    # less than the walk's per-chunk stores and starts every segment from the entering state the
    # forward saved; under an initial state: "segments_inference"), "auto" (session 12: "always" where the
    # forward goes through TMA, fc_tma / tma_applies, whose state stores cost less than the backward's
    # recomputing walk: fwd+bwd 4.41 -> 4.30 ms at 4K, 5.11 -> 4.88 at 128K, H200 run 62; "all" otherwise)
    "fc_forward": "auto",
    # "all": training forwards in the fused-chunk layout only where the chunk layout's chunks are
    # the walks' ("tiles"; above small_tiles_max_len its 128-token output kernel costs less than the
    # walk + correction pass: H200 run 32 at 128K, 5.71 against 6.13 ms of kernels per fwd+bwd), or
    # up to this many tokens (an int)
    "fc_train_max_len": "tiles",
    # causal walks over several segments (long sequences): add each segment's entering state to its
    # chunk states in place (_fold_kernel: one read and write of them) so that the output kernel and
    # the backward read one state tile per chunk instead of the local state + the segment's
    "seg_fold": True,
    # ... except the reverse walk's (backward, key side) when it has more segments than this: the
    # key side then adds each chunk's segment state itself. H200 run 51 (sweep s10c): the fold
    # costs 0.18 / 0.26 / 0.35 ms at T = 16K / 32K / 128K (2 / 4 / 16 segments), the key side's
    # additions 0.18 at every T: fwd+bwd 4.98 -> 4.99, 5.20 -> 5.12, 5.35 -> 5.20 ms
    "rev_fold_max_segments": 2,
    # fused-chunk forward over several segments: "fix" = every walk starts its segment from zero and
    # _fc_fix_kernel then adds the entering states (sums of the walks' own end states) to the
    # outputs of later segments, in parallel programs (fix_programs per SM); "sums" = a state walk
    # sums the segments first and the walks start from their entering states (run 16: 1.51 ms at
    # T = 16K against the chunk layout's 1.24). Training forwards that store chunk states use "sums".
    "fc_segments": "fix",
    "fix_programs": 4,
    "fix_warps": 4,
    "fix_stages": 3,
    # TMA (Hopper's tensor-memory accelerator) for the fused-chunk forward's q, k, v loads and o
    # stores and the correction pass's q, o: "auto" = on CUDA devices of compute capability >= 9 for
    # bf16/fp16 inputs with power-of-two head dims, True = wherever those dims allow (the tests run
    # it under the CPU interpreter), False = pointer loads. The copy engine writes the tiles to
    # shared memory, so the loop's software pipeline holds no registers for them: H200 run 60,
    # inference forward at B*T = 131072 (bitwise the same outputs) with the walk at two stages
    # (fc_tma_stages; one stage: 0.864 -> 1.044 ms, three: 1.52, one program per SM by shared
    # memory) 0.864 -> 0.783 ms at 4K, 1.081 -> 1.002 at 16K, 1.191 -> 1.112 at 32K; the correction
    # pass at three stages, 168 registers and 6 programs per SM 1.191 -> 1.126 at 32K
    "fc_tma": "auto",
    "fc_tma_stages": 2,
    "fix_tma_stages": 3,
    "fix_tma_programs": 6,
    "fix_tma_maxnreg": 168,
    # dW / db of the map by _dw_kernel (one pass over dz, fp32 partials) rather than a cuBLAS
    # batched matmul + dz.sum; dw_programs: its programs per SM (split-K over tokens)
    "dw_kernel": True,
    "dw_programs": 4,
    # reductions over a chunk's tokens on the tensor cores (bits of the kernels' SUMS; "auto" =
    # AUTO_SUMS for bf16, "mma" = all, "fma" = none, or an int 0-7): 1 the walks' sum phi_k /
    # sum phi_q cd, 2 the fused-chunk forward's phi_q . z, 4 its score rows, each as a product
    # with a ones column in the products' operand dtype instead of fp32 adds (which, over the token
    # axis, cross the warps: shuffles, shared memory, barriers). H200, T = 4096 (BENCHMARKS.md runs
    # 11-13): fused-chunk forward 1.19 -> 0.86 ms, state walks 1.21 -> 1.05 ms per fwd+bwd, chunk
    # fwd+bwd 5.92 -> 5.76 ms; sm_90 SASS per program 3,408 -> 2,728 (fused-chunk forward), 1,984
    # -> 1,616 (walk). fp16/fp32 keep the adds (their products run in tf32 / fp32 emulation). The
    # output kernel keeps them too (its row sums as products compiled to more instructions), as
    # does the softmax map's normaliser.
    "sums": "auto",
    # registers per thread per kernel name (ptxas .maxnreg; none by default): more programs per SM
    # for latency-bound kernels at the price of spills. Offline sm_90 compile (session 8,
    # benchmarks/_compile_sm90.py): _fc_fix_kernel 220 registers at 4 warps / 3 stages (two
    # programs per SM by registers, 77 KB of shared memory each); capped at 168 with 2 stages: 32 B
    # of spills, 60 KB, three programs per SM fit ({"_fc_fix_kernel": 168}, fix_stages 2,
    # fix_programs 6: not yet timed). The walks spill 176-432 B at 168. "_bwd_kernel_q" /
    # "_bwd_kernel_kv": one side of the backward only (its query side waits on its loads for 47%
    # of its stall samples at two programs per SM: ncu, 2026-11-29)
    "maxnreg": {},
}


_UNSTAGED: set = set()  # specialisations whose pipelined variant did not fit in shared memory


def _run(kernel, grid, *args, **kw):
    """``kernel[grid](*args, **kw)``; if the software-pipelined variant (``num_stages`` /
    ``P_STAGES`` > 1) needs more shared memory than a block may have (``OutOfResources`` at
    launch, before anything runs: e.g. the reverse walk over a GQA group of 2 heads with 3 stages,
    H200 run of 2026-11-28 18:09), launch it with one stage; remembered per specialisation.
    ``CONFIG["maxnreg"]`` caps the kernel's registers per thread (:func:`_register_cap`)."""
    kw = _register_cap(kernel.fn.__name__, kw)

    def key():  # (formed only when needed: it is host time on every launch)
        return kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in kw.items()))

    if _UNSTAGED and key() in _UNSTAGED:
        kw = dict(kw, num_stages=1, **({"P_STAGES": 1} if "P_STAGES" in kw else {}))
    try:
        kernel[grid](*args, **kw)
    except triton.runtime.errors.OutOfResources:
        staged = kw.get("num_stages", 1) > 1 or kw.get("P_STAGES", 1) > 1
        if not staged:
            raise
        _UNSTAGED.add(key())
        kernel[grid](*args, **dict(kw, num_stages=1, **({"P_STAGES": 1} if "P_STAGES" in kw else {})))


def _register_cap(name: str, kw: dict) -> dict:
    """Launch options ``kw`` with ``maxnreg`` (ptxas ``.maxnreg``: registers per thread) where
    ``CONFIG["maxnreg"]`` names the kernel."""
    cap = CONFIG["maxnreg"].get(name)
    if cap is None:
        return kw
    if not 24 <= int(cap) <= 255:
        raise ValueError(f'CONFIG["maxnreg"][{name!r}] must be 24..255 registers; got {cap!r}')
    return dict(kw, maxnreg=int(cap))


def _split(key: str, bt: int) -> int:
    """``CONFIG[key]`` sub-blocks per chunk, at most down to 16-row tiles (``tl.dot``'s minimum)."""
    split = max(1, int(CONFIG[key]))
    if split & (split - 1):
        raise ValueError(f"CONFIG[{key!r}] must be a power of two, got {split}")
    while split > 1 and bt // split < 16:
        split //= 2
    return split


def _n_sm(dev: torch.device) -> int:
    """Streaming multiprocessors (4 under the CPU interpreter: a few programs, many items each)."""
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4


_COMMON = ("BT", "BD", "BF", "FUSED", "HAS_MASK", "ACT", "W_NATIVE", "MAP_PREC", "PREC", "DOT_DT", "EVEN")


@functools.cache
def _tma_device(dev: torch.device) -> bool:
    """A device with TMA (compute capability 9+) and a triton with host tensor descriptors."""
    try:
        import triton.tools.tensor_descriptor  # noqa: F401  (host descriptors: not in older triton releases)
    except ImportError:
        return False
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9


def tma_applies(device: torch.device, dtype: torch.dtype, D: int, F: int, DV: int, H: int, HK: int,
                packed: bool = False) -> bool:  # fmt: skip
    """Whether the fused-chunk forward and its correction pass read (and store) through TMA
    descriptors (``CONFIG["fc_tma"]``): blocks must cover the head dims exactly (powers of two) and
    every row of q, k, v, o be a multiple of 16 bytes; "auto" also asks for a device of compute
    capability 9 or more, bf16/fp16 inputs (the timed case: H200 runs 60-62) and equal lengths:
    with ``cu_seqlens`` (``packed``) a block reaches into the next sequence, whose rows the kernel
    zeroes, and three timings of 32 packed sequences of 1K-7K tokens showed no gain (pointers -> TMA:
    1.475 -> 1.569 ms in run 61, 1.487 -> 1.409 in run 62, 1.318-1.359 -> 1.365 in run 64), so packed
    inputs keep the pointers unless ``fc_tma`` is True."""
    mode = CONFIG["fc_tma"]
    if mode not in ("auto", True, False):
        raise ValueError(f'CONFIG["fc_tma"] must be "auto", True or False; got {mode!r}')
    if mode is False or any(_block(n, device) != n for n in (D, F, DV)):
        return False
    size = dtype.itemsize
    if any((n * size) % 16 for n in (H * D, HK * D, H * DV, HK * DV)):
        return False
    if mode is True:
        return True
    return not packed and dtype in (torch.bfloat16, torch.float16) and _tma_device(torch.device(device))


def _descriptor(x: torch.Tensor, rows: int, cols: int, packed: bool):
    """TMA descriptor over ``x [B, T, heads, C]`` (contiguous) as ``[B, T, heads * C]`` with blocks
    ``[1, rows, cols]`` (rows past ``T`` read as 0, stores there dropped), or for ``packed``
    sequences as ``[tokens, heads * C]`` with blocks ``[rows, cols]`` (sequence ends are the kernel's
    to mask)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if packed:
        return TensorDescriptor.from_tensor(x.view(-1, x.shape[-2] * x.shape[-1]), [rows, cols])
    return TensorDescriptor.from_tensor(x.view(x.shape[0], x.shape[1], -1), [1, rows, cols])


def _empty(*shape, device, dtype) -> torch.Tensor:
    t = torch.empty(*shape, device=device, dtype=dtype)
    return t.fill_(float("nan")) if CONFIG["poison"] and t.is_floating_point() else t


def _pow2(n: int) -> int:
    """Block size for ``n``: the next power of two, at least 16. Plain Python: the host side of a
    launch plan calls it and :func:`_cdiv` hundreds of times per step, and ``triton.cdiv`` /
    ``next_power_of_2`` are constexpr functions whose wrappers cost microseconds per host call
    (H200, session 9: ~300 calls per fwd+bwd)."""
    n = int(n)
    return max(16, 1 << (n - 1).bit_length() if n > 1 else 1)


def _block(n: int, device: torch.device, cap: int | None = None) -> int:
    """Block for a head / feature / value dim ``n`` of a kernel with ``tl.dot`` tiles: ``_pow2(n)``
    (at most ``_pow2(cap)`` when given: several blocks then cover ``n``), at least
    ``CONFIG["min_block"]``."""
    b = _pow2(n) if cap is None else min(_pow2(n), _pow2(cap))
    floor = CONFIG["min_block"]
    if floor == "auto":
        floor = 64 if torch.device(device).type == "cuda" else 16
    if int(floor) < 16 or int(floor) & (int(floor) - 1):
        raise ValueError(f'CONFIG["min_block"] must be "auto" or a power of two >= 16; got {floor!r}')
    return max(b, int(floor))


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``triton.cdiv`` without its constexpr wrapper)."""
    return -(-int(a) // int(b))


_TILES = {"chunk": (64, 128), "min_programs": (264, 132), "state_warps": (4, 8), "out_warps": (4, 8),
          "bwd_warps": (4, 8)}  # fmt: skip


def small_tiles(F: int, dtype: torch.dtype, max_len: int) -> bool:
    """The small tile profile of ``tile_knob``: bf16, at most 64 features per half, sequences of at
    most ``CONFIG["small_tiles_max_len"]`` tokens."""
    return dtype == torch.bfloat16 and _pow2(F) <= 64 and max_len <= int(CONFIG["small_tiles_max_len"])


def tile_knob(key: str, F: int, dtype: torch.dtype, max_len: int) -> int:
    """``CONFIG[key]`` for the chunk layout's tiles ("chunk", "min_programs", "*_warps"); "auto":
    64-token chunks, 4-warp programs, 264 walk programs at once (two per SM) in the small profile
    (``small_tiles``: a quarter of the backward's intra-chunk products per token, backward kernels
    3.27 -> 2.50 ms at T = 4K), otherwise 128 tokens, 8 warps, 132 programs. The warps and programs
    follow the chunk actually used (a fixed 128-token ``CONFIG["chunk"]`` gets 8 warps)."""
    val = CONFIG[key]
    if val != "auto":
        return int(val)
    small = small_tiles(F, dtype, max_len)
    if key != "chunk":
        small = small and chunk_size(F, dtype, max_len) <= _TILES["chunk"][0]
    return _TILES[key][0 if small else 1]


def chunk_size(F: int, dtype: torch.dtype, max_len: int) -> int:
    """Tokens per chunk: ``tile_knob("chunk")`` for bf16 with up to 64 features per half; fp16/fp32
    inputs run their products on fp32 operands, whose tiles are twice as large: at most 64 tokens,
    32 with 128+ features (shared memory and registers)."""
    bt = tile_knob("chunk", F, dtype, max_len)
    if dtype == torch.bfloat16 and _pow2(F) <= 64:
        return bt
    return min(bt, 64 if (dtype == torch.bfloat16 or _pow2(F) <= 64) else 32)


_FC_FORWARD = ("inference", "inference_all", "one_segment", "segments_inference", "always", "all", "auto")


def fc_forward_rule(init: bool, train: bool, F: int, dtype: torch.dtype, max_len: int, tma: bool = False) -> str:
    """``CONFIG["fc_forward"]``, checked. "auto": "always" where the forward goes through TMA
    (``tma``: :func:`tma_applies`; a training forward then stores the chunk states by TMA, which
    costs less than the backward's walk that would recompute them), "all" otherwise. "all" reads
    "segments_inference" under an initial state (the backward's state walk that recomputes the chunk
    states starts from zero) and for a training forward beyond ``CONFIG["fc_train_max_len"]``."""
    rule = CONFIG["fc_forward"]
    if rule not in _FC_FORWARD:
        raise ValueError(f'CONFIG["fc_forward"] must be one of {_FC_FORWARD}; got {rule!r}')
    if rule == "auto":
        rule = "always" if tma else "all"
    if rule != "all":
        return rule
    if init:
        return "segments_inference"
    if train:
        lim = CONFIG["fc_train_max_len"]
        if lim == "tiles":
            fits = chunk_size(F, dtype, max_len) == fc_chunk_size(F, dtype, max_len)
        else:
            fits = max_len <= int(lim)
        if not fits:
            return "segments_inference"
    return rule


def uses_fused_chunk(causal: bool, F: int, DV: int, dtype: torch.dtype, *, train: bool, n_seq: int, H: int,
                     max_len: int, forward: bool = True, init: bool = False, tma: bool = False) -> bool:  # fmt: skip
    """Whether a causal pass takes the fused-chunk layout (``CONFIG["design"]``): "fused_chunk"
    always, "chunk" never; "auto": the backward (``forward`` False) never (the fused-chunk
    backward walks spill: 7.8 against 5.8 ms fwd+bwd, H200, 2026-11-28), the forward as
    ``CONFIG["fc_forward"]`` says: "inference" when no autograd graph records it and every
    (sequence, query head) walk is one segment (enough programs: ``N * H`` at least
    ``CONFIG["fc_programs"]``: forward 0.86 ms against the chunk layout's 1.26 at T = 4096),
    "one_segment" for training too, "segments_inference": also inference over several segments
    (``CONFIG["fc_segments"]``), "inference_all": every inference forward, no training forward,
    "always" also training over segments, "all" every forward (``init``: an initial state is
    given, see :func:`fc_forward_rule`). Only when the state fits a program's registers: at most 64
    features per half and 64 value columns."""
    mode = CONFIG["design"]
    if not causal or mode == "chunk" or _pow2(F) > 64 or _pow2(DV) > 64:
        return False
    if mode == "fused_chunk":
        return True
    if mode != "auto":
        raise ValueError(f'CONFIG["design"] must be "auto", "chunk" or "fused_chunk"; got {mode!r}')
    rule = fc_forward_rule(init, train, F, dtype, max_len, tma)
    if not forward or (train and rule in ("inference", "inference_all")):
        return False
    if rule in ("always", "all") or (rule in ("segments_inference", "inference_all") and not train):
        return True
    bt = fc_chunk_size(F, dtype, max_len)
    return segments(n_seq, H, max_len, 1, bt, cap=int(CONFIG["fc_programs"]))[1] == 1


def fc_stores_h(causal: bool, F: int, DV: int, dtype: torch.dtype, *, train: bool, n_seq: int, H: int,
                max_len: int, init: bool = False, tma: bool = False) -> bool:  # fmt: skip
    """A training forward in the fused-chunk layout followed by the chunk layout's backward: the
    forward stores the chunk states that backward reads (``_fc_fwd_kernel``'s ``STORE_H``), unless
    ``fc_forward`` is (or "auto" without ``tma`` reads) "all" (the backward recomputes them)."""
    kw = dict(train=train, n_seq=n_seq, H=H, max_len=max_len, init=init, tma=tma)
    return (
        train
        and fc_forward_rule(init, train, F, dtype, max_len, tma) != "all"
        and uses_fused_chunk(causal, F, DV, dtype, **kw)
        and not uses_fused_chunk(causal, F, DV, dtype, **kw, forward=False)
    )


def fc_chunk_size(F: int, dtype: torch.dtype, max_len: int) -> int:
    """Tokens per chunk of the fused-chunk walks: ``CONFIG["fc_chunk"]``, at most the chunk design's."""
    return min(int(CONFIG["fc_chunk"]), chunk_size(F, dtype, max_len))


# "auto" for bf16 per causal layout (bits: 1 column sums, 2 phi_q . z, 4 score rows: K._rowsum)
AUTO_SUMS = {"chunk": 7, "fused_chunk": 7}
_SUMS_BITS = {"fma": 0, "mma": 7}


def sums_mode(dtype: torch.dtype, design: str = "chunk") -> int:
    """The kernels' ``SUMS`` bits for ``CONFIG["sums"]``: which reductions run on the tensor
    cores (an int 0-7 sets the bits directly: sweeps); ``design``: the causal layout taken."""
    mode = CONFIG["sums"]
    if mode == "auto":
        return AUTO_SUMS[design] if dtype == torch.bfloat16 else 0
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode <= 7:
        return mode
    if mode not in _SUMS_BITS:
        raise ValueError(f'CONFIG["sums"] must be "auto", "mma", "fma" or bits 0-7; got {mode!r}')
    return _SUMS_BITS[mode]


def needs_fallback(F: int, dtype: torch.dtype, device: torch.device) -> bool:
    """fp16/fp32 (fp32 operand tiles) with more than 64 features per half on a GPU: the fused
    kernels need 237-311 KB of shared memory there (ptxas for sm_90, and the H200's
    OutOfResources of 2026-11-28, run 4), over the 227 KB an H200 block may use.
    ``CONFIG["fallback"]``: "auto" (that rule), "always" (tests), "never"."""
    mode = CONFIG["fallback"]
    if mode != "auto":
        return mode == "always"
    return device.type == "cuda" and dtype != torch.bfloat16 and _pow2(F) > 64


def n_chunks(lens: list[int] | None, B: int, T: int, bt: int) -> int:
    """Number of ``bt``-token chunks over all sequences: ``B`` sequences of ``T`` tokens, or packed
    sequences of the given lengths (host ints: the caller read them with one transfer)."""
    if lens is None:
        return B * _cdiv(T, bt)
    return sum(_cdiv(n, bt) for n in lens)


def state_dtype(v_dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the per-chunk states: bf16 for bf16 inputs (the products take bf16
    operands anyway), fp32 otherwise (fp16 cannot hold a state that sums T tokens)."""
    return torch.bfloat16 if v_dtype == torch.bfloat16 else torch.float32


def segments(n_seq: int, hk: int, max_len: int, n_prog: int, bt: int, cap: int | None = None) -> tuple[int, int]:
    """``(CPS, NS)``: chunks per segment and segments per sequence for the state walk, whose
    other grid axes give ``p0 = n_seq * hk * n_prog`` programs. The walk is sequential, so its
    time goes as (waves of programs) x (chunks per program): pick the ``NS`` that minimises
    ``ceil(p0 * NS / cap) * ceil(chunks / NS)`` with ``cap = CONFIG["min_programs"]`` programs
    running at once (132 SMs x programs per SM; ``cap`` overrides it); the smallest such ``NS``
    (fewest segments)."""
    if cap is None:
        cap = CONFIG["min_programs"] if CONFIG["min_programs"] != "auto" else _TILES["min_programs"][1]
    # int(): under torch.compile with dynamic shapes the sizes reach the custom ops' fake
    # implementations as SymInts, which the cached search cannot hash (a TypeError in the trace);
    # int() specialises them (a guard: a new size recompiles), as the segment count they give
    # decides the shapes of the op's outputs anyway
    n_ch, p0 = int(max(1, _cdiv(max_len, bt))), int(max(1, n_seq * hk * n_prog))
    return _segment_search(n_ch, p0, max(1, int(cap)))


@functools.lru_cache(maxsize=1024)
def _segment_search(n_ch: int, p0: int, cap: int) -> tuple[int, int]:
    """:func:`segments` for ``n_ch`` chunks per sequence and ``p0`` programs per segment index
    (cached: a long sequence over few heads tries dozens of candidates, on every launch plan)."""
    best, ns = None, 1
    for cand in range(1, n_ch + 1):
        cost = _cdiv(p0 * cand, cap) * _cdiv(n_ch, cand)
        if best is None or cost < best:
            best, ns = cost, cand
        if p0 * cand >= 4 * cap:
            break
    cps = _cdiv(n_ch, ns)
    return cps, _cdiv(n_ch, cps)


class _Plan:
    """Shapes, block sizes, chunk tables and constexprs shared by the forward and backward."""

    def __init__(self, q, k, v, wq, bq, bk, mask, cu, *, activation, negation, fused, max_len, nc, varlen, causal,
                 train=True, forward=False, init=False):  # fmt: skip
        self.B, self.T, self.H, dq = q.shape
        self.HK, self.DV = k.shape[2], v.shape[3]
        self.N = cu.numel() - 1
        self.G = self.H // self.HK
        if fused:
            self.D, self.F = wq.shape[1], wq.shape[2]
        else:
            self.D = self.F = dq
        self.neg = bool(negation) and fused
        self.FT = 2 * self.F if self.neg else self.F
        self.nhalf = 2 if self.neg else 1
        self.dev = q.device
        # the fused-chunk forward through TMA descriptors (tma_applies; needs the fused-chunk layout)
        self.tma = tma_applies(q.device, v.dtype, self.D, self.F, self.DV, self.H, self.HK, bool(varlen))
        kw = dict(train=train, n_seq=self.N, H=self.H, max_len=max_len, init=init, tma=self.tma)
        self.fc = uses_fused_chunk(causal, self.F, self.DV, v.dtype, **kw, forward=forward)
        self.store_h = forward and fc_stores_h(causal, self.F, self.DV, v.dtype, **kw)
        self.bt = bt = fc_chunk_size(self.F, v.dtype, max_len) if self.fc else chunk_size(self.F, v.dtype, max_len)
        # the chunk layout's launch shapes (tile_knob)
        self.tiles = {key: tile_knob(key, self.F, v.dtype, max_len) for key in _TILES}
        self.nc = nc
        self.max_len = max_len
        self.cu = cu
        self.varlen = bool(varlen)
        if self.varlen and not self.fc:  # (the fused-chunk walks index sequences, not chunks)
            lens = (cu[1:] - cu[:-1]).long()
            nch = (lens + bt - 1) // bt
            self.coff = torch.cat([nch.new_zeros(1), torch.cumsum(nch, 0)]).to(torch.int32)
            # (sequence, chunk-in-sequence) of every global chunk; output_size avoids a host sync
            seq = torch.repeat_interleave(torch.arange(self.N, device=self.dev), nch, output_size=nc)
            self.cidx = torch.stack([seq, torch.arange(nc, device=self.dev) - self.coff[seq].long()], 1)
            self.cidx = self.cidx.to(torch.int32).contiguous()
        else:  # equal lengths: the kernels compute both from the chunk index (never read)
            self.coff = self.cidx = cu
        self.mask = mask
        half = v.dtype in (torch.float16, torch.bfloat16)
        self.hdt = state_dtype(v.dtype)
        self.c = dict(
            BT=bt,
            BD=_block(self.D, self.dev),
            BF=_block(self.F, self.dev),
            FUSED=fused,
            HAS_MASK=mask is not None,
            ACT=activation,
            W_NATIVE=bool(fused and half and wq.dtype == q.dtype),
            # fp32/fp64 inputs: exact fp32 products everywhere; half inputs: tf32 is exact for the
            # map's bf16/fp16 operands (fp32 weights round to tf32 there: below the inputs' own precision)
            MAP_PREC="tf32" if half else "ieee",
            # attention products: bf16 operands for bf16 (fp32 accumulation); fp16 runs them in
            # tf32 (fp16 cannot hold e^30 exp features, states or do/den), fp32 and fp64 in ieee fp32
            # (fp64 took tf32 here before 2026-11-29: 10-bit products for the most precise inputs)
            PREC="tf32" if half else "ieee",
            DOT_DT=tl.bfloat16 if v.dtype == torch.bfloat16 else tl.float32,
            # every block dimension exactly the tensor's: only row masks are needed
            EVEN=_block(self.D, self.dev) == self.D and _block(self.F, self.dev) == self.F,
            SUMS=sums_mode(v.dtype, "fused_chunk" if self.fc else "chunk"),
        )
        dummy = q
        self.has_bq, self.has_bk = bq is not None, bk is not None
        self.mask_ = mask if mask is not None else dummy

    def consts(self, bv: int) -> dict:
        c = dict(self.c, BV=bv)
        c["EVEN"] = c["EVEN"] and self.DV % bv == 0
        return c

    def walk_segments(self) -> tuple[int, int]:
        """``(CPS, NS)`` of the fused-chunk walks: programs per (sequence, query head, segment)."""
        return segments(self.N, self.H, self.max_len, 1, self.bt, cap=int(CONFIG["fc_programs"]))

    def fc_consts(self) -> dict:
        return dict(
            self.consts(_block(self.DV, self.dev)), HAS_MASK=self.mask is not None, VARLEN=self.varlen, NEG=self.neg,
            STAGES=int(CONFIG["fc_stages"]), num_warps=int(CONFIG["fc_warps"]),
        )  # fmt: skip

    def state_walk(self, x, w, b, u, den, cd, s0, z0, *, reverse: bool, store_h: bool, seg=None):
        """Run ``_state_kernel``; returns ``(h, hz, st, stz, cps, init)`` (``h``/``hz`` None unless
        ``store_h``). With one segment per sequence and a given ``(s0, z0)`` (initial state, or the
        final-state gradient when ``reverse``) the walk starts from it (``init``): the chunk states
        are then complete and ``st`` includes it; so too with several segments and ``s0 [N, HK, NS,
        FT, DV]``, every segment's entering state. ``seg = (CPS, NS)`` imposes the segments (the
        fused-chunk walks' segment sums, or the segments ``s0`` belongs to)."""
        bv = _block(self.DV, self.dev, CONFIG["state_bv"])
        nv = _cdiv(self.DV, bv)
        both = self.nhalf == 2 and int(CONFIG["walk_halves"]) == 2
        nj = 1 if both else self.nhalf  # programs per value block
        cps, ns = seg if seg is not None else segments(self.N, self.HK, self.max_len, nj * nv, self.bt,
                                                       cap=self.tiles["min_programs"])  # fmt: skip
        f32 = torch.float32
        if store_h:
            h = _empty(self.nc, self.HK, self.FT, self.DV, device=self.dev, dtype=self.hdt)
            hz = _empty(self.nc, self.HK, self.FT, device=self.dev, dtype=f32)
        else:
            h = hz = None
        st = _empty(self.N, self.HK, ns, self.FT, self.DV, device=self.dev, dtype=f32)
        stz = _empty(self.N, self.HK, ns, self.FT, device=self.dev, dtype=f32)
        c = self.consts(bv)
        dummy = x
        init = store_h and s0 is not None and (ns == 1 or (s0.dim() == 5 and s0.shape[2] == ns))
        _run(K._state_kernel, (self.N * self.HK * ns, nj * nv),
            x, w if w is not None else dummy, b if b is not None else dummy, u,
            den if den is not None else dummy, cd if cd is not None else dummy, self.mask_, self.cu, self.coff,
            h if h is not None else dummy, hz if hz is not None else dummy, st, stz,
            s0 if init else dummy, z0 if init else dummy, self.T,
            x.shape[2], self.HK, self.D, self.F, self.FT, self.DV, cps, ns, G=self.G if reverse else 1,
            HAS_B=b is not None, REVERSE=reverse, STORE_H=store_h, INIT=init, VARLEN=self.varlen, BOTH=both,
            SUMS=self.c["SUMS"],
            **{n: c[n] for n in _COMMON}, BV=bv, num_warps=self.tiles["state_warps"],
            num_stages=CONFIG["state_stages"],
        )  # fmt: skip
        return h, hz, st, stz, cps, init


def fwd(q, k, v, wq, bq, wk, bk, mask, cu, s0, z0, *, activation, negation, causal, eps, fused, max_len, nc, varlen,
        train=True):  # fmt: skip
    """Forward launcher.

    Shapes: ``q [B, T, H, D]`` (or features ``[B, T, H, F]``), ``k [B, T, HK, D]``,
    ``v [B, T, HK, DV]``, ``cu [N + 1]`` int32 token offsets into the flattened ``B * T`` axis,
    ``s0 [N, HK, FT, DV]`` / ``z0 [N, HK, FT]`` fp32 or None, ``nc`` = number of chunks,
    ``varlen``: packed sequences (``cu_seqlens``) rather than ``B`` sequences of ``T`` tokens;
    ``train``: a backward may follow (``uses_fused_chunk``: the layout can differ for inference).
    Returns ``(o, den, h, hz, s_in, z_in, s_fin, z_fin)``: ``den [B*T, H]`` fp32 normalizers,
    ``h [NC, HK, FT, DV]`` / ``hz`` the chunks' local states (empty when bidirectional),
    ``s_in [N, HK, NS, FT, DV]`` / ``z_in`` the segments' entering states (saved for the backward).
    """
    P = _Plan(q, k, v, wq, bq, bk, mask, cu, activation=activation, negation=negation, fused=fused,
              max_len=max_len, nc=nc, varlen=varlen, causal=causal, train=train, forward=True,
              init=s0 is not None)  # fmt: skip
    if P.fc:
        return _fc_fwd(P, q, k, v, wq, bq, wk, bk, s0, z0, eps)
    dev = P.dev
    h, hz, st, stz, cps, init = P.state_walk(
        k, wk if fused else None, bk if fused else None, v, None, None, s0, z0, reverse=False, store_h=causal
    )
    add0 = s0 is not None and not init  # init: the walk started from (s0, z0), st includes it
    s_fin, z_fin = st.sum(2), stz.sum(2)
    if add0:
        s_fin, z_fin = s_fin + s0, z_fin + z0
    if causal and st.shape[2] == 1:
        # one segment: the chunk states are complete and neither the output kernel nor the
        # backward reads s_in (SEG off): empty, so that the backward does not hold the segment
        # totals (``[N, HK, 1, FT, DV]`` fp32: 67 MB at T = 1K, over SDPA's peak memory in run 7)
        s_in, z_in = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    elif causal:
        s_in, z_in = _entering(st, stz, reverse=False)
        if add0:
            s_in, z_in = s_in + s0[:, :, None], z_in + z0[:, :, None]
        if CONFIG["seg_fold"]:  # complete chunk states: s_in neither read nor saved
            _fold(P, h, hz, s_in, z_in, cps, skip=-1 if add0 else 0)
            s_in, z_in = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    else:
        s_in, z_in = s_fin[:, :, None].clone(), z_fin[:, :, None].clone()  # outputs may not alias
        h = q.new_empty(0, dtype=P.hdt)
        hz = q.new_empty(0, dtype=torch.float32)
    # one segment per sequence: the chunk states are complete (s_in is zero) and not read
    nsi = s_in.shape[2] if s_in.dim() == 5 else 1
    seg = (not causal) or nsi > 1
    bv = _block(P.DV, dev, CONFIG["out_bv"])
    nv = _cdiv(P.DV, bv)
    o = _empty(P.B, P.T, P.H, P.DV, device=dev, dtype=v.dtype)
    den = _empty(P.B * P.T, P.H, device=dev, dtype=torch.float32)
    c = P.consts(bv)
    split = _split("out_split", P.bt)
    n_items = P.nc * split * nv * P.H
    persist = int(CONFIG["out_persist"]) > 0
    grid = (min(n_items, int(CONFIG["out_persist"]) * _n_sm(dev)),) if persist else (P.nc * split, nv * P.H)
    _run(K._out_kernel, grid,
        q, k, v, wq if fused else q, bq if bq is not None else q, wk if fused else q, bk if bk is not None else q,
        P.mask_, cu, P.cidx, h if causal else q, hz if causal else q, s_in if seg else q, z_in if seg else q, o, den,
        float(eps), P.T, P.H, P.HK, P.G, P.D, P.F, P.FT, P.DV, cps, nsi,
        HAS_BQ=bq is not None, HAS_BK=bk is not None, CAUSAL=bool(causal), SEG=seg, VARLEN=P.varlen, NEG=P.neg,
        NITEMS=n_items, PERSIST=persist, SPLIT=split,
        P_STAGES=int(CONFIG["out_persist_stages"]),
        **{n: c[n] for n in _COMMON}, BV=bv, num_warps=P.tiles["out_warps"],
        num_stages=CONFIG["out_stages"],
    )  # fmt: skip
    return o, den, h, hz, s_in, z_in, s_fin, z_fin


def _bwd_plan(do, q, k, v, wq, bq, wk, bk, mask, cu, s_in, *, activation, negation, causal, fused, max_len, nc, varlen):
    """Plan of a backward launch, ``do`` with padded queries zeroed (their output is a constant
    0: no gradient flows through them), and the launcher of ``_bwd_kernel`` for one side."""
    P = _Plan(q, k, v, wq, bq, bk, mask, cu, activation=activation, negation=negation, fused=fused,
              max_len=max_len, nc=nc, varlen=varlen, causal=causal)  # fmt: skip
    do = do.contiguous()
    if mask is not None:
        do = do * mask.view(P.B, P.T, 1, 1).to(do.dtype)
    c = P.consts(_block(P.DV, P.dev))
    cps = _fwd_cps(P)
    split = _split("bwd_split", P.bt)

    wq_, bq_ = (wq if fused else q), (bq if bq is not None else q)
    wk_, bk_ = (wk if fused else q), (bk if bk is not None else q)

    def launch(kv_side, hh, hhz, si, zi, den, cd, o, dx, dz, dv, fuse_cd, dw=None, db=None):
        """``si``/``zi``: segment states (read when there are several; the forward's segments on the
        query side, the reverse walk's on the key side)."""
        seg = (not causal) or (si.dim() == 5 and si.shape[2] > 1)
        _run(K._bwd_kernel, (P.nc * split, P.H),
            q, k, v, wq_, bq_, wk_, bk_, P.mask_, cu, P.cidx,
            hh if causal else q, hhz if causal else q, si if seg else q, zi if seg else q, do, den, cd, o, dx, dz, dv,
            dw if dw is not None else q, db if db is not None else q, P.T,
            P.H, P.HK, P.G, P.D, P.F, P.FT, P.DV, cps, si.shape[2] if seg else 1,
            KV_SIDE=kv_side, HAS_BQ=bq is not None, HAS_BK=bk is not None, CAUSAL=bool(causal), SEG=seg,
            VARLEN=P.varlen, NEG=P.neg, **{n: c[n] for n in _COMMON}, BV=c["BV"], FUSE_CD=fuse_cd, SPLIT=split,
            DW_ATOMIC=dw is not None,
            num_warps=P.tiles["bwd_warps"], num_stages=CONFIG["bwd_stages"],
            **_register_cap("_bwd_kernel_kv" if kv_side else "_bwd_kernel_q", {}),
        )  # fmt: skip

    return P, do, cps, launch


def bwd_q(
    do, q, k, v, wq, bq, wk, bk, mask, cu, o, den, h, hz, s_in, z_in,
    *, activation, negation, causal, fused, max_len, nc, varlen,
):  # fmt: skip
    """Query side of the backward: returns ``(dq, dwq, dbq, cd)`` (``dwq``/``dbq`` None unless
    fused) with ``cd = -(do . o) / den [B*T, H]`` fp32 for the key side. ``h`` empty (causal):
    the forward's chunk states were not kept; one more forward walk recomputes them. The caller
    drops its last reference to ``h`` after this returns, so that the chunk states are freed
    before the key side allocates its own (peak memory)."""
    P, do, cps, launch = _bwd_plan(do, q, k, v, wq, bq, wk, bk, mask, cu, s_in, activation=activation,
                                   negation=negation, causal=causal, fused=fused, max_len=max_len, nc=nc,
                                   varlen=varlen)  # fmt: skip
    if P.fc:
        return _fc_bwd_q(P, do, q, k, v, wq, bq, wk, bk, o, den, s_in, z_in)
    dev, f32 = P.dev, torch.float32
    cd = _empty(P.B * P.T, P.H, device=dev, dtype=f32)
    fuse_cd = bool(CONFIG["fuse_delta"])
    if not fuse_cd:
        K._delta_kernel[(_cdiv(P.B * P.T, 64), P.H)](
            do, o, den, cd, P.B * P.T, P.H, P.DV, BT=64, BV=_pow2(P.DV), num_warps=4
        )  # fmt: skip
    if causal and h.numel() == 0:
        # the chunk states again (CONFIG["recompute_h"], a second backward, fc_forward "all"; no
        # initial state: _setup_context). Where the forward saved its segments' entering states
        # and the walk can take those segments, every segment starts from its entering state:
        # complete chunk states, nothing to fold
        seg = _entering_segments(P, s_in, v.dtype)
        h, hz, st, stz = P.state_walk(
            k, wk if fused else None, bk if fused else None, v, None, None, *((s_in, z_in) if seg else (None, None)),
            reverse=False, store_h=True, seg=seg,
        )[:4]  # fmt: skip
        if seg is None and st.shape[2] > 1:  # the walk's states are local to its segments
            s_in, z_in = _entering(st, stz, reverse=False)
            if CONFIG["seg_fold"]:
                _fold(P, h, hz, s_in, z_in, cps, skip=0)
                s_in, z_in = s_in.new_empty(0), z_in.new_empty(0)
        else:  # complete chunk states: no segment states read
            s_in, z_in = s_in.new_empty(0), z_in.new_empty(0)
        del st, stz
    zdt = torch.bfloat16 if v.dtype == torch.bfloat16 else f32
    dq = _empty(q.shape, device=dev, dtype=q.dtype)
    atomic = fused and bool(CONFIG["dw_atomic"])
    dwq_ = dbq_ = None
    if atomic:  # fp32 accumulators the kernel adds every chunk's x^T dz / sum dz to
        dw32, db32 = _dw_accumulators(P.H, P.D, P.F, bq is not None, dev)
        launch(False, h, hz, s_in, z_in, den, cd, o, dq, q, q, fuse_cd, dw32, db32)
        dwq_, dbq_ = dw32.to(wq.dtype), (db32.to(bq.dtype) if bq is not None else None)
        return dq, dwq_, dbq_, cd
    # dz = the map's pre-activation gradients for dW = x^T dz (freed before the key side)
    dzq = _empty(P.B, P.T, P.H, P.F, device=dev, dtype=zdt) if fused else q
    launch(False, h, hz, s_in, z_in, den, cd, o, dq, dzq, q, fuse_cd)
    del h, hz
    if fused:
        dwq_, dbq_ = _dw(q, dzq, wq, bq)
    return dq, dwq_, dbq_, cd


def bwd_kv(
    do, ds_fin, dz_fin, q, k, v, wq, bq, wk, bk, mask, cu, den, cd, s_in,
    *, activation, negation, causal, fused, max_len, nc, varlen, need_ds0,
):  # fmt: skip
    """Key side of the backward: the reverse state walk, then ``(dk, dv, dwk, dbk, ds0, dz0)``
    (None where n/a; ``ds0``/``dz0`` the initial-state gradient when ``need_ds0``)."""
    P, do, cps, launch = _bwd_plan(do, q, k, v, wq, bq, wk, bk, mask, cu, s_in, activation=activation,
                                   negation=negation, causal=causal, fused=fused, max_len=max_len, nc=nc,
                                   varlen=varlen)  # fmt: skip
    dev, f32 = P.dev, torch.float32
    zdt = torch.bfloat16 if v.dtype == torch.bfloat16 else f32
    if (ds_fin is None) != (dz_fin is None):  # one of the two final-state gradients: the other is 0
        if ds_fin is None:
            ds_fin = torch.zeros(P.N, P.HK, P.FT, P.DV, device=dev, dtype=f32)
        else:
            dz_fin = torch.zeros(P.N, P.HK, P.FT, device=dev, dtype=f32)
    if ds_fin is not None:
        ds_fin, dz_fin = ds_fin.contiguous(), dz_fin.contiguous()
    if P.fc:
        return _fc_bwd_kv(P, do, ds_fin, dz_fin, q, k, v, wq, bq, wk, bk, den, cd, need_ds0)
    dh, dhz, rt, rtz, cps_r, init = P.state_walk(
        q, wq if fused else None, bq if fused else None, do, den, cd, ds_fin, dz_fin, reverse=True, store_h=causal
    )
    tot = ztot = None
    if need_ds0 or not causal:  # the totals (not formed when nothing reads them)
        tot, ztot = rt.sum(2), rtz.sum(2)
        if ds_fin is not None and not init:
            tot, ztot = tot + ds_fin, ztot + dz_fin
    if causal and rt.shape[2] == 1:  # complete chunk states, r_in not read (as s_in in fwd)
        r_in, rz_in = rt, rtz
    elif causal:
        # queries after each segment (+ the final-state gradient): reverse exclusive cumsum
        r_in, rz_in = _entering(rt, rtz, reverse=True, last=ds_fin, last_z=dz_fin)
    else:
        r_in, rz_in = tot[:, :, None].contiguous(), ztot[:, :, None].contiguous()
    if causal and cps_r != cps:
        raise RuntimeError("forward and backward state walks must use the same segments")
    fold = CONFIG["seg_fold"] and rt.shape[2] <= int(CONFIG["rev_fold_max_segments"])
    if causal and rt.shape[2] > 1 and fold:  # complete reverse states: r_in not read
        _fold(P, dh, dhz, r_in, rz_in, cps, skip=-1 if ds_fin is not None else rt.shape[2] - 1)
        r_in, rz_in = r_in.new_empty(0), rz_in.new_empty(0)

    # per query head dk / dv / dz_k, summed over a GQA group below (the KV tensors themselves
    # when G == 1)
    dk = _empty(P.B, P.T, P.H, k.shape[3], device=dev, dtype=k.dtype if P.G == 1 else f32)
    dv = _empty(P.B, P.T, P.H, P.DV, device=dev, dtype=v.dtype if P.G == 1 else f32)
    atomic = fused and bool(CONFIG["dw_atomic"])
    dwk_ = dbk_ = None
    if atomic:  # the query heads of a GQA group add to their KV head's accumulators
        dw32, db32 = _dw_accumulators(P.HK, P.D, P.F, bk is not None, dev)
        launch(True, dh, dhz, r_in, rz_in, den, cd, do, dk, q, dv, False, dw32, db32)
        dwk_, dbk_ = dw32.to(wk.dtype), (db32.to(bk.dtype) if bk is not None else None)
    else:
        dzk = _empty(P.B, P.T, P.H, P.F, device=dev, dtype=zdt if P.G == 1 else f32) if fused else q
        launch(True, dh, dhz, r_in, rz_in, den, cd, do, dk, dzk, dv, False)
    del dh, dhz
    if P.G > 1:
        dk = dk.view(P.B, P.T, P.HK, P.G, -1).sum(3).to(k.dtype)
        dv = dv.view(P.B, P.T, P.HK, P.G, -1).sum(3).to(v.dtype)
        if fused and not atomic:
            dzk = dzk.view(P.B, P.T, P.HK, P.G, P.F).sum(3).to(zdt)
    if fused and not atomic:
        dwk_, dbk_ = _dw(k, dzk, wk, bk)
    ds0 = dz0 = None
    if need_ds0:
        ds0, dz0 = tot, ztot
    return dk, dv, dwk_, dbk_, ds0, dz0


def _dw_accumulators(nw: int, d: int, f: int, has_b: bool, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 ``dW [nw, d, f]`` and ``db [nw, f]`` (a 1-element dummy without bias)."""
    dw = torch.zeros(nw, d, f, device=dev, dtype=torch.float32)
    db = torch.zeros(nw, f, device=dev, dtype=torch.float32) if has_b else dw.new_zeros(1)
    return dw, db


def _dw(x: torch.Tensor, dz: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """``dW[h] = sum_t x[t, h]^T dz[t, h]`` and ``db[h] = sum_t dz[t, h]`` (``x [B, T, NH, D]``,
    ``dz [B, T, NH, F]``) in w's / b's dtypes: ``_dw_kernel``'s split-K partials (fp32) summed
    here (``CONFIG["dw_kernel"]``; otherwise :func:`_dw_reference`)."""
    if not CONFIG["dw_kernel"]:
        return _dw_reference(x, dz, w, b)
    NH, D, F = w.shape
    ntok = x.numel() // (NH * D)
    x2, dz2 = x.reshape(ntok, NH, D), dz.reshape(ntok, NH, F)
    bd, bf = _block(D, x.device), _block(F, x.device)
    bt = 128 if bd * bf <= 64 * 64 else 64
    n_par = max(1, min(_cdiv(ntok, bt), _cdiv(int(CONFIG["dw_programs"]) * _n_sm(x.device), NH)))
    tpp = _cdiv(_cdiv(ntok, n_par), bt) * bt  # tokens per program, whole tiles
    n_par = _cdiv(ntok, tpp)
    dw = _empty(n_par, NH, D, F, device=x.device, dtype=torch.float32)
    db = _empty(n_par, NH, F, device=x.device, dtype=torch.float32) if b is not None else dw
    _run(WG._dw_kernel, (n_par, NH),
        x2, dz2, dw, db, ntok, NH, D, F, tpp,
        BT=bt, BD=bd, BF=bf, HAS_B=b is not None,
        PREC="ieee" if dz.dtype == torch.float32 else "tf32", STAGES=3, num_warps=4,
    )  # fmt: skip
    return dw.sum(0).to(w.dtype), (db.sum(0).to(b.dtype) if b is not None else None)


def _dw_reference(x: torch.Tensor, dz: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """:func:`_dw` as one batched matmul over heads and a sum (cuBLAS; reads ``dz`` twice, and
    the bf16 matmul rounds ``dW`` to bf16): the oracle of ``_dw_kernel``'s test."""
    NH, D, F = w.shape
    xt = x.reshape(-1, NH, D).to(dz.dtype).permute(1, 2, 0)  # [NH, D, tokens] (strided view)
    dzt = dz.reshape(-1, NH, F).permute(1, 0, 2)  # [NH, tokens, F]
    dw = torch.bmm(xt, dzt).to(w.dtype)
    db = dz.reshape(-1, NH, F).sum(0, dtype=torch.float32).to(b.dtype) if b is not None else None
    return dw, db


def _entering(x: torch.Tensor, xz: torch.Tensor, *, reverse: bool, last: torch.Tensor | None = None,
              last_z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """What enters each segment of a state ``x [N, HK, NS, FT, DV]`` and its normaliser ``xz
    [N, HK, NS, FT]`` (both fp32): :func:`_before` (forward) or, ``reverse``, :func:`_after` with the
    final-state gradient ``(last, last_z)`` (or None), both in one ``_seg_scan_kernel`` launch."""
    x, xz = x.contiguous(), xz.contiguous()
    N, HK, NS = x.shape[:3]
    m1, m2 = x[0, 0, 0].numel(), xz[0, 0, 0].numel()
    out, out_z = torch.empty_like(x), torch.empty_like(xz)
    has_last = last is not None
    nsp = max(2, 1 << (NS - 1).bit_length())  # (no padding to 16 rows: run 59, 2 segments 0.010 -> 0.039 ms)
    bm = min(1024, 4096 // nsp)  # a [NSP, BM] tile of at most 4096 values per program
    K._seg_scan_kernel[(N * HK, _cdiv(m1, bm) + _cdiv(m2, bm))](
        x, last.contiguous() if has_last else x, out, xz, last_z.contiguous() if has_last else xz, out_z, NS, m1, m2,
        NSP=nsp, BM=bm, REVERSE=bool(reverse), HAS_LAST=has_last, num_warps=4,
    )  # fmt: skip
    return out, out_z


def _before(x: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums over the segment axis 2 of ``x [N, HK, NS, ...]``: what enters each
    segment going forward. A shifted cumulative sum, not ``cumsum(x) - x`` (which rounds the
    large running sum and subtracts: its error scales with the total, not with the result).
    (PyTorch reference of :func:`_entering`, which the launchers call.)"""
    out = torch.zeros_like(x)
    out[:, :, 1:] = torch.cumsum(x[:, :, :-1], 2)
    return out


def _after(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """Exclusive suffix sums over axis 2 (+ ``last [N, HK, ...]``, the final-state gradient): what
    enters each segment going backward. Summed from the end, not ``total - cumsum(x)``: that
    difference lost up to ~25x the fp32 rounding in the key-side gradients with several segments
    (CPU, 2026-11-29: bk 1.7e-5 against 6.9e-7 for the chunked PyTorch op). (PyTorch reference of
    :func:`_entering`.)"""
    out = torch.zeros_like(x)
    out[:, :, :-1] = torch.flip(torch.cumsum(torch.flip(x[:, :, 1:], [2]), 2), [2])
    if last is not None:
        out += last[:, :, None]
    return out


def _fold(P: _Plan, h: torch.Tensor, hz: torch.Tensor, si: torch.Tensor, zi: torch.Tensor, cps: int, *,
          skip: int) -> None:  # fmt: skip
    """Add every segment's entering state ``si [N, HK, NS, FT, DV]`` / ``zi`` to the chunk states
    ``h [NC, HK, FT, DV]`` / ``hz`` of its chunks, in place (``CONFIG["seg_fold"]``), except
    segment ``skip``'s (zero there; -1: none)."""
    bft, bv = _pow2(P.FT), _pow2(P.DV)
    _run(K._fold_kernel, (P.nc, P.HK),
        h, hz, si.contiguous(), zi.contiguous(), P.cu, P.cidx, P.T, P.HK, P.FT, P.DV, cps, si.shape[2], skip,
        BT=P.bt, BFT=bft, BV=bv, VARLEN=P.varlen, num_warps=4 if bft * bv <= 8192 else 8,
    )  # fmt: skip


def _entering_segments(P: _Plan, s_in: torch.Tensor, dtype: torch.dtype) -> tuple[int, int] | None:
    """``(CPS, NS)`` in the chunk layout's chunks of the segments whose entering states a causal
    training forward saved (``s_in [N, HK, NS, FT, DV]``, several segments): the fused-chunk walks'
    (``fc_chunk_size``-token chunks; None when a segment is not a whole number of the state walk's
    chunks) or the forward state walk's own. None without such states."""
    if s_in.dim() != 5 or s_in.shape[2] <= 1:
        return None
    ns = s_in.shape[2]
    if uses_fused_chunk(True, P.F, P.DV, dtype, train=True, n_seq=P.N, H=P.H, max_len=P.max_len, tma=P.tma):
        fbt = fc_chunk_size(P.F, dtype, P.max_len)
        cps_f, ns_f = segments(P.N, P.H, P.max_len, 1, fbt, cap=int(CONFIG["fc_programs"]))
        if ns_f != ns or (cps_f * fbt) % P.bt:
            return None
        return cps_f * fbt // P.bt, ns
    cps = _fwd_cps(P)
    return (cps, ns) if _cdiv(_cdiv(P.max_len, P.bt), cps) == ns else None


def _fwd_cps(P: _Plan) -> int:
    """Chunks per segment of the forward state walk (the backward reads its segment states)."""
    bv = _block(P.DV, P.dev, CONFIG["state_bv"])
    nj = 1 if (P.nhalf == 2 and int(CONFIG["walk_halves"]) == 2) else P.nhalf
    return segments(P.N, P.HK, P.max_len, nj * _cdiv(P.DV, bv), P.bt, cap=P.tiles["min_programs"])[0]


def decode(q, k, v, wq, bq, wk, bk, s, z, *, activation, negation, eps):
    """One decode step for ``q [B, H, D]``, ``k [B, HK, D]``, ``v [B, HK, DV]``; updates ``s``, ``z``."""
    B, H, D = q.shape
    HK, DV = k.shape[1], v.shape[2]
    F = wq.shape[2]
    o = _empty(B, H, DV, device=q.device, dtype=v.dtype)
    BF, BV = _pow2(F), _pow2(DV)
    K._decode_kernel[(B * HK,)](
        q, k, v, wq, bq if bq is not None else q, wk, bk if bk is not None else q, s, z, o,
        float(eps), H, HK, H // HK, D, F, DV,
        BD=_pow2(D), BF=BF, BV=BV, HAS_BQ=bq is not None, HAS_BK=bk is not None, ACT=activation,
        NEG=bool(negation), num_warps=4 if BF * BV <= 64 * 64 else 8,
    )  # fmt: skip
    return o


# ------------------------------------------------------------------ fused-chunk design (causal)
def _fc_run(kernel, grid, P, *args, **kw):
    _run(kernel, grid, *args, **P.fc_consts(), **kw)


def _fc_weights(P, q, wq, bq, wk, bk):
    """Map weights/biases as kernel arguments (``q`` stands in for the absent ones)."""
    fused = P.c["FUSED"]
    return (wq if fused else q), (bq if bq is not None else q), (wk if fused else q), (bk if bk is not None else q)


def _fc_fwd(P, q, k, v, wq, bq, wk, bk, s0, z0, eps):
    """Fused-chunk forward. Several segments: either (``fc_segments`` "sums", and whenever the
    chunk states are stored) the segments' sums by a ``_state_kernel`` walk without per-chunk
    stores, their exclusive cumulative sum + the initial state, then ``_fc_fwd_kernel`` from those
    entering states; or ("fix") ``_fc_fwd_kernel`` from zero in every segment, then the same
    cumulative sum over its end states and ``_fc_fix_kernel`` over the outputs. Same returns as
    :func:`fwd`, with ``h``/``hz`` empty and ``s_in``/``z_in`` empty when the walks start from
    zero (one segment, no initial state). ``P.store_h`` (training, chunk-layout backward):
    ``h``/``hz`` are the complete states entering every chunk of the chunk layout (``P.nc`` chunks
    of ``chunk_size`` tokens) and ``s_in``/``z_in`` empty (not read)."""
    dev, f32 = P.dev, torch.float32
    cps, ns = P.walk_segments()
    # several segments: walks from zero + a correction pass ("fix"), or the segment sums first
    fix = ns > 1 and not P.store_h and CONFIG["fc_segments"] == "fix"
    if CONFIG["fc_segments"] not in ("fix", "sums"):
        raise ValueError(f'CONFIG["fc_segments"] must be "fix" or "sums"; got {CONFIG["fc_segments"]!r}')
    if fix:
        s_in, z_in = q.new_empty(0, dtype=f32), q.new_empty(0, dtype=f32)
    elif ns > 1:
        _, _, st, stz, _, _ = P.state_walk(
            k, wk if P.c["FUSED"] else None, bk if P.c["FUSED"] else None, v, None, None, None, None,
            reverse=False, store_h=False, seg=(cps, ns),
        )  # fmt: skip
        s_in, z_in = _entering(st, stz, reverse=False)
        del st, stz
        if s0 is not None:
            s_in, z_in = s_in + s0[:, :, None], z_in + z0[:, :, None]
    elif s0 is not None:
        s_in, z_in = s0[:, :, None].clone(), z0[:, :, None].clone()  # outputs may not alias inputs
    else:
        s_in, z_in = q.new_empty(0, dtype=f32), q.new_empty(0, dtype=f32)
    se = _empty(P.N, P.HK, ns, P.FT, P.DV, device=dev, dtype=f32)
    sez = _empty(P.N, P.HK, ns, P.FT, device=dev, dtype=f32)
    o = _empty(P.B, P.T, P.H, P.DV, device=dev, dtype=v.dtype)
    den = _empty(P.B * P.T, P.H, device=dev, dtype=f32)
    wq_, bq_, wk_, bk_ = _fc_weights(P, q, wq, bq, wk, bk)
    seg = s_in.numel() > 0
    hbt = chunk_size(P.F, v.dtype, P.max_len)  # the chunk layout's chunks (the backward's)
    if P.store_h:
        h = _empty(P.nc, P.HK, P.FT, P.DV, device=dev, dtype=P.hdt)
        hz = _empty(P.nc, P.HK, P.FT, device=dev, dtype=f32)
        if P.varlen:  # first chunk of every sequence
            nch = ((P.cu[1:] - P.cu[:-1]).long() + hbt - 1) // hbt
            hoff = torch.cat([nch.new_zeros(1), torch.cumsum(nch, 0)]).to(torch.int32)
        else:
            hoff = P.cu
    else:
        h, hz, hoff = q.new_empty(0, dtype=P.hdt), q.new_empty(0, dtype=f32), P.cu
    fc = P.fc_consts()
    # TMA also needs 16-byte aligned bases: a contiguous view at an odd offset takes the pointers
    # (same results; a training forward then stores its chunk states by pointer)
    tma = P.tma and all(t.data_ptr() % 16 == 0 for t in (q, k, v))
    if tma:  # descriptors in place of the pointers (the kernel's TMA branch)
        bx = fc["BD"] if fc["FUSED"] else fc["BF"]
        bt, pk = fc["BT"], P.varlen
        qd, kd, vd = _descriptor(q, bt, bx, pk), _descriptor(k, bt, bx, pk), _descriptor(v, bt, fc["BV"], pk)
        od = _descriptor(o, bt, fc["BV"], pk)
        fc["STAGES"] = int(CONFIG["fc_tma_stages"])
        if P.store_h:  # the chunk states as [NC * HK * FT, DV] rows, a feature half per block
            from triton.tools.tensor_descriptor import TensorDescriptor

            hd = TensorDescriptor.from_tensor(h.view(-1, P.DV), [fc["BF"], fc["BV"]])
        else:
            hd = q
    else:
        qd = kd = vd = od = hd = q
    _run(FC._fc_fwd_kernel, (P.N * P.H * ns,),
        q, k, v, wq_, bq_, wk_, bk_, P.mask_, P.cu, s_in if seg else q, z_in if seg else q, se, sez, o, den,
        h if P.store_h else q, hz if P.store_h else q, hoff, qd, kd, vd, od, hd,
        float(eps), P.T, P.H, P.HK, P.G, P.D, P.F, P.FT, P.DV, cps, ns,
        HAS_BQ=bq is not None, HAS_BK=bk is not None, SEG=seg, STORE_H=P.store_h, HBT=hbt, TMA=tma, **fc,
    )  # fmt: skip
    if P.store_h:  # the chunk states are complete: the backward reads no segment states
        s_in, z_in = q.new_empty(0, dtype=f32), q.new_empty(0, dtype=f32)
    if fix:  # se: each segment's own sum; entering states = the sums of the segments before it
        s_in, z_in = _entering(se, sez, reverse=False)
        if s0 is not None:
            s_in, z_in = s_in + s0[:, :, None], z_in + z0[:, :, None]
        s_off = 0 if s0 is not None else 1  # segment 0 entered from zero: nothing to add
        rows = P.N * P.H * (ns - s_off)
        per_sm = int(CONFIG["fix_tma_programs" if tma else "fix_programs"])
        n_part = max(1, min(cps, _cdiv(per_sm * _n_sm(dev), rows)))
        c = dict(P.fc_consts(), num_warps=int(CONFIG["fix_warps"]))
        c.pop("STAGES")
        if tma:
            c["maxnreg"] = int(CONFIG["fix_tma_maxnreg"])
        _run(FC._fc_fix_kernel, (rows * n_part,),
            q, wq_, bq_, P.mask_, P.cu, s_in, z_in, o, den, qd, od, P.T, P.H, P.HK, P.G, P.D, P.F, P.FT, P.DV, cps,
            ns, n_part, s_off, HAS_BQ=bq is not None, STAGES=int(CONFIG["fix_tma_stages" if tma else "fix_stages"]),
            TMA=tma, **c,
        )  # fmt: skip
        s_fin, z_fin = s_in[:, :, ns - 1] + se[:, :, ns - 1], z_in[:, :, ns - 1] + sez[:, :, ns - 1]
    else:
        s_fin, z_fin = se[:, :, ns - 1].contiguous(), sez[:, :, ns - 1].contiguous()
    return o, den, h, hz, s_in, z_in, s_fin, z_fin


def _fc_bwd_q(P, do, q, k, v, wq, bq, wk, bk, o, den, s_in, z_in):
    """Fused-chunk query side: ``(dq, dwq, dbq, cd)`` as :func:`bwd_q`."""
    dev, f32 = P.dev, torch.float32
    cps, ns = P.walk_segments()
    fused = P.c["FUSED"]
    cd = _empty(P.B * P.T, P.H, device=dev, dtype=f32)
    dq = _empty(q.shape, device=dev, dtype=q.dtype)
    zdt = torch.bfloat16 if v.dtype == torch.bfloat16 else f32
    dzq = _empty(P.B, P.T, P.H, P.F, device=dev, dtype=zdt) if fused else q
    wq_, bq_, wk_, bk_ = _fc_weights(P, q, wq, bq, wk, bk)
    seg = s_in.numel() > 0
    _fc_run(FC._fc_bwd_q_kernel, (P.N * P.H * ns,), P,
        q, k, v, wq_, bq_, wk_, bk_, P.mask_, P.cu, s_in if seg else q, z_in if seg else q, do, o, den, cd, dq, dzq,
        P.T, P.H, P.HK, P.G, P.D, P.F, P.FT, P.DV, cps, ns,
        HAS_BQ=bq is not None, HAS_BK=bk is not None, SEG=seg,
    )  # fmt: skip
    dwq = dbq = None
    if fused:
        dwq, dbq = _dw(q, dzq, wq, bq)
    return dq, dwq, dbq, cd


def _fc_bwd_kv(P, do, ds_fin, dz_fin, q, k, v, wq, bq, wk, bk, den, cd, need_ds0):
    """Fused-chunk key side: the reverse segments' sums (several segments), their reverse
    exclusive cumulative sum + the final-state gradient, then ``_fc_bwd_kv_kernel`` per KV head
    (``dk``, ``dv``, ``dz_k`` per KV head: no GQA sum). Returns as :func:`bwd_kv`."""
    dev, f32 = P.dev, torch.float32
    cps, ns = P.walk_segments()
    fused = P.c["FUSED"]
    if ns > 1:
        _, _, rt, rtz, _, _ = P.state_walk(
            q, wq if fused else None, bq if fused else None, do, den, cd, None, None, reverse=True, store_h=False,
            seg=(cps, ns),
        )  # fmt: skip
        r_in, rz_in = _entering(rt, rtz, reverse=True, last=ds_fin, last_z=dz_fin)
        del rt, rtz
    elif ds_fin is not None:
        r_in, rz_in = ds_fin[:, :, None], dz_fin[:, :, None]
    else:
        r_in = rz_in = None
    seg = r_in is not None
    re = _empty(P.N, P.HK, ns, P.FT, P.DV, device=dev, dtype=f32)
    rez = _empty(P.N, P.HK, ns, P.FT, device=dev, dtype=f32)
    dk = _empty(k.shape, device=dev, dtype=k.dtype)
    dv = _empty(v.shape, device=dev, dtype=v.dtype)
    zdt = torch.bfloat16 if v.dtype == torch.bfloat16 else f32
    dzk = _empty(P.B, P.T, P.HK, P.F, device=dev, dtype=zdt) if fused else q
    wq_, bq_, wk_, bk_ = _fc_weights(P, q, wq, bq, wk, bk)
    _fc_run(FC._fc_bwd_kv_kernel, (P.N * P.HK * ns,), P,
        q, k, v, wq_, bq_, wk_, bk_, P.mask_, P.cu, r_in if seg else q, rz_in if seg else q, re, rez, do, den, cd,
        dk, dzk, dv, P.T, P.H, P.HK, P.D, P.F, P.FT, P.DV, cps, ns,
        G=P.G, HAS_BQ=bq is not None, HAS_BK=bk is not None, SEG=seg,
    )  # fmt: skip
    dwk = dbk = None
    if fused:
        dwk, dbk = _dw(k, dzk, wk, bk)
    ds0 = dz0 = None
    if need_ds0:
        ds0, dz0 = re[:, :, 0].contiguous(), rez[:, :, 0].contiguous()
    return dk, dv, dwk, dbk, ds0, dz0
