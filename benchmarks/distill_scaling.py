"""Distillation throughput of the SmolLM2-135M architecture (seeded random weights), 1 vs N GPUs.

Reproduces BENCHMARKS.md "Distillation throughput and 2-GPU scaling" (issue #7) from the repo:

* ``build DST [--layers L] [--tokenizer DIR]``: an HF folder with SmolLM2-135M's architecture
  (``benchmarks/distill_smollm2_135m_config.json``, the real model's config.json) and seeded random
  weights saved in bf16. Throughput depends on shapes only, and the real weights (270 MB in bf16)
  do not travel in one 64 MiB device call. The tokenizer files are copied from ``--tokenizer``
  (default: the cached converted model, ``~/.cache/hedgehog_attention/smollm2-135m-instruct-fp32``).
* ``scaling --model DIR --text FILE --out DIR``: runs ``torchrun --nproc_per_node=N -m
  hedgehog_attention.cli linearize`` (online capture, bf16, hedgehog map, chunked backend) for
  each ``--nprocs`` x ``--global-batches`` (strong scaling: the same global batch on N GPUs) and,
  with ``--weak``, also ``--per-gpu-batch`` x N (weak scaling). Tokens/s are the steady state from
  the Trainer's history rows (steps ``--skip`` .. ``steps - skip``: no model load, no eval, no
  warm-up). Writes ``distill_scaling.json`` and ``distill_scaling.md`` (a table) into ``--out``.
* ``profile --model DIR``: torch.profiler over one distill step (the online loss of every layer,
  backward, AdamW step) after warm-up steps, on one device: top ops by self time, op/kernel counts
  per step, host syncs (``aten::_local_scalar_dense`` / ``aten::item`` / ``aten::equal``), and on
  CUDA the GPU busy time against the step's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "distill_smollm2_135m_config.json"
DEFAULT_TOKENIZER = Path("~/.cache/hedgehog_attention/smollm2-135m-instruct-fp32").expanduser()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def build(dst: Path, layers: int | None, tokenizer: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig.from_dict(json.loads(CONFIG.read_text()))
    if layers is not None:
        cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(dst)  # the runs load bf16: half the bytes
    missing = [f for f in TOKENIZER_FILES[:2] if not (tokenizer / f).exists()]
    if missing:
        raise FileNotFoundError(f"tokenizer files {missing} not found in {tokenizer} (pass --tokenizer DIR)")
    for f in TOKENIZER_FILES:
        if (tokenizer / f).exists():
            shutil.copy(tokenizer / f, dst / f)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {dst}: layers {cfg.num_hidden_layers}, params {n:,}", flush=True)


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def run_one(args, nproc: int, global_batch: int, tag: str) -> dict:
    # the CLI's report folder (json, md, png) stays in /tmp; only its report.json is copied to --out
    # (a device call brings back a limited number of files)
    outdir = Path(tempfile.gettempdir()) / "distill_scaling" / f"run_{tag}"
    cmd = _torchrun() + [
        f"--nproc_per_node={nproc}", f"--master_port={29500 + (os.getpid() + hash(tag)) % 400}",
        "-m", "hedgehog_attention.cli", "linearize",
        "--model", args.model, "--text", args.text, "--methods", "hedgehog", "--device", args.device,
        "--dtype", args.dtype, "--seq-len", str(args.seq_len), "--batch-size", str(global_batch),
        "--train-blocks", str(max(64, 2 * global_batch)), "--eval-blocks", "4", "--test-blocks", "2",
        "--test-items", "2", "--steps", str(args.steps), "--eval-every", str(args.steps), "--patience", "0",
        "--capture", "online", "--backend", args.backend, "--no-save", "--quiet", "--seed", "0",
        "--output-dir", str(outdir),
    ]  # fmt: skip
    log = Path(args.out) / f"distill_{tag}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    row = {"tag": tag, "nproc": nproc, "global_batch": global_batch, "per_gpu_batch": global_batch // nproc,
           "seq_len": args.seq_len, "rc": rc, "wall_s": round(wall, 1)}  # fmt: skip
    try:
        d = json.loads((outdir / "report.json").read_text())["methods"]["hedgehog"]["distill"]
    except (OSError, KeyError, ValueError) as e:
        row["error"] = f"no report: {e!r}; see {log.name}"
        print(row, flush=True)
        return row
    shutil.copy(outdir / "report.json", Path(args.out) / f"distill_{tag}.json")
    hist = {r["step"]: r for r in d["history"]}
    a, b = hist.get(args.skip), hist.get(args.steps - args.skip)
    if a is None or b is None:
        row["error"] = f"history has no rows at steps {args.skip} and {args.steps - args.skip} (log_every?)"
        return row
    n = b["step"] - a["step"]
    row.update(
        tok_s=(b["tokens"] - a["tokens"]) / (b["time"] - a["time"]),
        ms_per_step=(b["time"] - a["time"]) / n * 1e3,
        steady_steps=f"{a['step']}..{b['step']}",
        distill_seconds=d["seconds"],
        train_loss=d["train_loss"],
    )
    print(f"{tag}: {row['tok_s']:.0f} tok/s, {row['ms_per_step']:.1f} ms/step (rc {rc}, wall {wall:.0f} s)", flush=True)
    return row


def scaling(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = [(n, gb) for gb in args.global_batches for n in args.nprocs]
    if args.weak:  # per_gpu_batch x N on N GPUs; runs already in the plan are not repeated
        plan += [(n, args.per_gpu_batch * n) for n in args.nprocs if (n, args.per_gpu_batch * n) not in plan]
    runs = []
    for n, gb in plan:
        runs.append(run_one(args, n, gb, f"gb{gb}_n{n}"))
        _write_tables(args, runs)  # after every run: a killed call still leaves the finished rows


def _write_tables(args, runs: list[dict]) -> None:
    out = Path(args.out)
    by = {(r["global_batch"], r["nproc"]): r for r in runs}
    lines = [
        "| global batch | GPUs | per GPU | tok/s | ms/step | efficiency vs 1 GPU (same global batch) "
        "| loss max rel diff vs 1 GPU |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        one = by.get((r["global_batch"], 1))
        eff = diff = ""
        if "tok_s" in r and one and "tok_s" in one and r["nproc"] > 1:
            eff = f"{r['tok_s'] / (r['nproc'] * one['tok_s']):.2f}"
            rel = [abs(x - y) / abs(y) for x, y in zip(r["train_loss"], one["train_loss"])]
            r["efficiency"] = r["tok_s"] / (r["nproc"] * one["tok_s"])
            r["loss_max_rel_diff"] = max(rel) if rel else None
            diff = f"{r['loss_max_rel_diff']:.2g}"
        if "tok_s" in r:
            lines.append(f"| {r['global_batch']}x{r['seq_len']} | {r['nproc']} | {r['per_gpu_batch']} | "
                         f"{r['tok_s']:,.0f} | {r['ms_per_step']:.1f} | {eff} | {diff} |")  # fmt: skip
        else:
            lines.append(f"| {r['global_batch']}x{r['seq_len']} | {r['nproc']} | {r['per_gpu_batch']} | failed: "
                         f"{r.get('error', r['rc'])} | | | |")  # fmt: skip
    if args.weak:
        base = by.get((args.per_gpu_batch, 1))
        for n in args.nprocs:
            r = by.get((args.per_gpu_batch * n, n))
            if n > 1 and base and r and "tok_s" in base and "tok_s" in r:
                lines.append(f"\nweak scaling ({args.per_gpu_batch}x{args.seq_len} per GPU), {n} GPUs: "
                             f"{r['tok_s'] / (n * base['tok_s']):.2f} efficiency")  # fmt: skip
    table = "\n".join(lines)
    print(table, flush=True)
    (out / "distill_scaling.md").write_text(table + "\n")
    (out / "distill_scaling.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))


def profile(args) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    from transformers import AutoModelForCausalLM

    from hedgehog_attention.convert import linearize
    from hedgehog_attention.convert.config import DistillConfig, LinearizeConfig
    from hedgehog_attention.convert.distill import _online_loss_fn

    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager", dtype=dtype)
    if args.layers is not None:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    model.to(dev).eval()
    linearize(model, LinearizeConfig(feature_map="hedgehog", backend=args.backend))
    for p in model.parameters():
        p.requires_grad_(False)
    from hedgehog_attention.convert.base import feature_map_parameters

    params = [p for p in feature_map_parameters(model) if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss_fn = _online_loss_fn(DistillConfig())
    # named ranges in the profile: each layer's maps + Eq. 3 (forward part), and the teacher forward
    import hedgehog_attention.convert.distill as cd

    inner_ll = cd.layer_losses

    def layer_losses(*a, **k):
        with torch.profiler.record_function("hh::layer_losses(features+eq3, fwd)"):
            return inner_ll(*a, **k)

    cd.layer_losses = layer_losses
    inner_fwd = cd._forward

    def forward(*a, **k):
        with torch.profiler.record_function("hh::model_forward(teacher+losses, fwd)"):
            return inner_fwd(*a, **k)

    cd._forward = forward
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def step():
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.timed):
        loss = step()
    sync()
    wall = (time.perf_counter() - t0) / args.timed
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with tprofile(activities=acts, with_stack=bool(os.environ.get("PROFILE_STACKS"))) as prof:
        t0 = time.perf_counter()
        step()
        sync()
        wall_prof = time.perf_counter() - t0
    ev = prof.key_averages()
    names = {e.key: e for e in ev}
    syncs = {k: names[k].count for k in ("aten::_local_scalar_dense", "aten::item", "aten::equal",
                                          "aten::is_nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize",
                                          "cudaMemcpyAsync")
             if k in names}  # fmt: skip
    n_ops = sum(e.count for e in ev if e.key.startswith("aten::"))
    res = {"device": str(dev), "layers": model.config.num_hidden_layers, "batch": args.batch,
           "seq_len": args.seq_len, "loss": float(loss.detach()), "wall_ms_per_step_unprofiled": wall * 1e3,
           "wall_ms_profiled_step": wall_prof * 1e3, "aten_ops_per_step": n_ops,
           "host_syncs": syncs}  # fmt: skip
    res["ranges"] = {
        e.key: {"count": e.count, "cpu_total_ms": e.cpu_time_total / 1e3, "device_total_ms": e.device_time_total / 1e3}
        for e in ev
        if e.key.startswith("hh::")
    }
    if dev.type == "cuda":
        # GPU-side events, without the GPU copies of the named ranges (user annotations: they span
        # many kernels and would count them twice; run 2026-11-28 17:20 still counted them)
        kern = [
            e
            for e in prof.events()
            if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)
            and not e.name.startswith(("hh::", "Optimizer."))
        ]
        res["cuda_kernels_per_step"] = len(kern)
        res["cuda_kernel_time_ms"] = sum(e.time_range.elapsed_us() for e in kern) / 1e3  # kernel intervals, summed
        launches = [e for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")]
        res["cuda_launches_per_step"] = sum(e.count for e in launches)
        # busy fraction of the GPU during the step (kernels do not overlap on one stream)
        res["gpu_busy_fraction_of_profiled_wall"] = res["cuda_kernel_time_ms"] / (wall_prof * 1e3)
        res["gpu_busy_fraction_of_unprofiled_wall"] = res["cuda_kernel_time_ms"] / (wall * 1e3)
        res["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        sort = "self_device_time_total"
    else:
        sort = "self_cpu_time_total"
    print(json.dumps(res, indent=1), flush=True)
    try:
        table = ev.table(sort_by=sort, row_limit=args.top)
    except (KeyError, AttributeError, ValueError):  # older torch: the CUDA column has its old name
        table = ev.table(sort_by="self_cuda_time_total", row_limit=args.top)
    print(table, flush=True)
    if os.environ.get("PROFILE_STACKS"):  # where the host syncs come from
        for e in prof.key_averages(group_by_stack_n=8):
            if e.key in syncs:
                print(e.key, e.count, "\n   " + "\n   ".join(e.stack[:8]), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"distill_profile_{dev.type}.json").write_text(json.dumps(res, indent=1))
        (Path(args.out) / f"distill_profile_{dev.type}.txt").write_text(table)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("dst", type=Path)
    b.add_argument("--layers", type=int)
    b.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    for name in ("scaling", "profile"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--device", default="cuda")
        p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
        p.add_argument("--seq-len", type=int, default=512)
        p.add_argument("--backend", default="chunked")
        p.add_argument("--out", default=None)
    s = sub.choices["scaling"]
    s.add_argument("--text", required=True)
    s.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    s.add_argument("--global-batches", type=int, nargs="+", default=[8, 32])
    s.add_argument("--weak", action="store_true", help="also per-gpu-batch x N sequences on N GPUs")
    s.add_argument("--per-gpu-batch", type=int, default=8)
    s.add_argument("--steps", type=int, default=60)
    s.add_argument("--skip", type=int, default=10, help="history rows at steps skip and steps-skip bound the window")
    s.add_argument("--timeout", type=float, default=120, help="seconds per torchrun")
    pr = sub.choices["profile"]
    pr.add_argument("--layers", type=int, help="keep only the first L layers (CPU profiling)")
    pr.add_argument("--batch", type=int, default=8)
    pr.add_argument("--warmup", type=int, default=2)
    pr.add_argument("--timed", type=int, default=3)
    pr.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    if args.cmd == "build":
        build(args.dst, args.layers, args.tokenizer)
    elif args.cmd == "scaling":
        if args.out is None:
            ap.error("scaling needs --out")
        if args.steps - 2 * args.skip < 10 or args.skip % 10 or args.steps % 10:
            ap.error("--steps and --skip must be multiples of 10 (the history's log_every) with steps >= 2 * skip + 10")
        scaling(args)
    else:
        profile(args)


if __name__ == "__main__":
    main()
