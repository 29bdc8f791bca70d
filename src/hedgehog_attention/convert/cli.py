"""``hedgehog linearize``: convert a real pretrained model to linear attention and report fidelity.

Default (no arguments): all-MiniLM-L6-v2 on the offline public-domain corpus. For each method
(Hedgehog distilled with Eq. 3, Hedgehog untrained = identity init, 1+ELU, T2R distilled with
Eq. 3 = "T2R-HH") it swaps every attention layer, distills when the map has parameters, then
measures per layer the softmax-vs-linear CE/KL, entropy, monotonicity, and the end-to-end
agreement with the original on held-out text; writes report.{json,md,png} and the converted
Hedgehog model into ``--output-dir`` (default ``runs/linearize-<model>``).

    hedgehog linearize                                   # MiniLM, ~2 min on 2 CPU cores
    hedgehog linearize --model smollm2 --steps 30        # SmolLM2-135M (GGUF, dequantized)
    hedgehog linearize --model smollm2 --device cuda --dtype bf16 --steps 1000 --train-blocks 4096
    hedgehog linearize --model path/to/hf-folder --text my_texts/ --finetune

Several processes/GPUs (the distill and finetune stages run on hedgehog_attention.train.Trainer:
rows sharded by rank, same global batch as one process; fidelity, report and saving on rank 0):

    torchrun --nproc_per_node=2 -m hedgehog_attention.cli linearize --model smollm2 --device cuda ...
    hedgehog linearize ... --checkpoint-dir runs/ckpt --checkpoint-every 50     # killed? add --resume
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..metrics import perplexity
from ..train import barrier, cleanup_distributed, init_distributed, is_main_process, rank0_print
from .base import linearize, linearized_modules, unlinearize
from .config import DistillConfig, FinetuneConfig, LinearizeConfig
from .data import make_batches, passages, text_blocks, tokenize_passages
from .distill import TeacherCapture, capture_qkv, distill, evaluate_fidelity
from .report import summarize_layers, write_report
from .serialization import save_linearized

log = logging.getLogger("hedgehog.linearize")

# Fine-food test reviews scored after --finetune on encoders (of 1000; ~1 s per 16 on a CPU core).
FINETUNE_TEST_EXAMPLES = 256

# Above this the teacher q, k of the training blocks are not cached but recomputed each step.
CACHED_CAPTURE_LIMIT = 4 * 2**30

DEFAULT_METHODS = ("hedgehog", "hedgehog-untrained", "elu", "t2r-hh")

# Per-model defaults, measured to fit the budgets in the docstring (see docs/linearize.md).
PRESETS: dict[str, dict[str, int]] = {
    "encoder": dict(
        seq_len=128,
        train_blocks=256,
        eval_blocks=8,
        test_blocks=8,
        test_items=128,
        steps=600,
        batch_size=4,
        eval_every=25,
    ),
    "decoder": dict(
        seq_len=128, train_blocks=32, eval_blocks=4, test_blocks=8, test_items=8, steps=30, batch_size=2, eval_every=10
    ),
}


def _method(name: str) -> tuple[str, bool]:
    """Method name -> (feature map, distilled?). ``X`` distills X when it has parameters;
    ``X-untrained`` keeps its initialization; ``t2r-hh`` is T2R trained with Eq. 3."""
    from ..feature_maps import available_feature_maps

    base, untrained = (name[: -len("-untrained")], True) if name.endswith("-untrained") else (name, False)
    base = {"t2r-hh": "t2r"}.get(base, base)
    if base not in available_feature_maps():
        raise SystemExit(
            f"unknown method {name!r}: expected a feature map ({', '.join(available_feature_maps())}), "
            "optionally with '-untrained', or 't2r-hh'"
        )
    return base, not untrained


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hedgehog linearize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="minilm", help="minilm (default), smollm2, or a local HF model folder")
    p.add_argument("--output-dir", default=None, help="default runs/linearize-<model>")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated: hedgehog, hedgehog-untrained, elu, t2r-hh, or any feature map name",
    )
    p.add_argument(
        "--text", nargs="*", default=None, help="text files/folders to use instead of the offline public-domain corpus"
    )
    p.add_argument("--hf-dataset", default=None, help="HF datasets name (needs a network), e.g. wikitext")
    p.add_argument("--hf-config", default=None, help="HF datasets config, e.g. wikitext-103-raw-v1")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per distillation block")
    p.add_argument("--train-blocks", type=int, default=None, help="distillation blocks (train documents)")
    p.add_argument("--eval-blocks", type=int, default=None, help="early-stopping blocks (validation documents)")
    p.add_argument("--test-blocks", type=int, default=None, help="attention-metric blocks (test documents)")
    p.add_argument(
        "--test-items",
        type=int,
        default=None,
        help="end-to-end items from test documents: passages (encoder) or blocks (decoder)",
    )
    p.add_argument("--steps", "--max-steps", dest="steps", type=int, default=None, help="max distillation steps")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW lr (App. C.2: 1e-2)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--patience", type=int, default=3, help="early stopping: evaluations without improvement")
    p.add_argument("--output-mse", type=float, default=0.0, help="weight of the attention-output MSE term")
    p.add_argument("--capture", choices=("cached", "online"), default="cached")
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "chunked", "recurrent", "reference", "triton"),
        help="linear-attention op of the converted layers (evaluation, generation): auto = Triton on CUDA, "
        "else chunked (distillation trains on the teacher path and Eq. 3, not through this op)",
    )
    p.add_argument("--keep-softmax", default="", help="comma-separated layer indices left as softmax")
    p.add_argument("--finetune", action="store_true", help="add a finetuning stage to the Hedgehog model")
    p.add_argument("--finetune-method", choices=("lora", "full"), default="lora")
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--finetune-lr", type=float, default=None, help="default 1e-4 (lora) / 2e-5 (full)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--strategy",
        choices=("auto", "ddp", "fsdp"),
        default="auto",
        help="under torchrun: auto = ddp (teacher replicated); fsdp shards the model (one method, see docs)",
    )
    p.add_argument(
        "--checkpoint-dir", default=None, help="write stage checkpoints under this folder (one subfolder per stage)"
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="steps between checkpoints (needs --checkpoint-dir; default there: --eval-every)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue each stage from its newest checkpoint in --checkpoint-dir"
    )
    p.add_argument("--no-save", action="store_true", help="do not save the converted model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ------------------------------------------------------------------------------------- loading
def _load(model: str, device: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    from .. import models_zoo

    if model == "minilm":
        m, tok = models_zoo.load_minilm(dtype=dtype, device=device)
        return m, tok, "all-MiniLM-L6-v2"
    if model == "smollm2":
        m, tok = models_zoo.load_smollm2(dtype=dtype, device=device)
        return m, tok, "SmolLM2-135M-Instruct"
    path = Path(model)
    if not path.is_dir():
        raise SystemExit(f"--model {model!r}: expected minilm, smollm2 or a local HF model folder")
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {model!r}: {path} has no config.json (not a saved HF model folder)")
    from transformers import AutoModel, AutoModelForCausalLM

    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    cls = (
        AutoModelForCausalLM
        if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
        else AutoModel
    )
    try:
        m, tok = models_zoo.load_local_hf_model(path, model_class=cls, dtype=dtype, device=device)
    except OSError as exc:  # e.g. a config.json without weights
        raise SystemExit(f"--model {model!r}: cannot load the model from {path}: {exc}") from exc
    if tok is None:
        raise SystemExit(f"{path} has no tokenizer files; the job needs one to read text")
    return m.eval(), tok, _model_key(model)


def _model_key(model: str) -> str:
    """The model's name for the report and the default output folder (a folder's own name, also for ``.``)."""
    path = Path(model)
    return path.resolve().name if path.is_dir() else model


def _documents(args) -> tuple[dict[str, list], str]:
    from ..tasks import corpora

    if args.text:
        docs, source = corpora.load_text_files(args.text), f"text files {args.text}"
    elif args.hf_dataset:
        docs = corpora.load_hf_dataset(args.hf_dataset, config=args.hf_config, split="train")
        source = f"HF dataset {args.hf_dataset}"
    else:
        docs, source = corpora.load_public_domain_corpus(), "offline public-domain corpus (Austen, KJV, Moby Dick)"
    split = corpora.split_documents(docs)
    if len(docs) < 3 or not all(split.values()):
        # Too few documents for a document-level split: cut each document into thirds by position.
        split = {"train": [], "validation": [], "test": []}
        for d in docs:
            n = len(d.text)
            split["train"].append(corpora.Document(d.name + "#train", d.text[: int(n * 0.8)]))
            split["validation"].append(corpora.Document(d.name + "#val", d.text[int(n * 0.8) : int(n * 0.9)]))
            split["test"].append(corpora.Document(d.name + "#test", d.text[int(n * 0.9) :]))
        source += " (split by position within documents: too few documents)"
    return split, source


# ------------------------------------------------------------------------------------- end to end
def _mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(h.dtype).unsqueeze(-1)
    e = (h * m).sum(1) / m.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(e.float(), dim=-1)


@torch.no_grad()
def end_to_end(model, batches, decoder: bool) -> dict[str, float]:
    """Agreement of the converted model with its original on held-out batches (same forward pass
    count for both: the original is the teacher inside each converted layer)."""
    dev = next(model.parameters()).device
    if not decoder:
        cos = []
        for b in batches:
            b = {k: v.to(dev) for k, v in b.items()}
            with TeacherCapture(model):
                ref = _mean_pool(model(**b).last_hidden_state, b["attention_mask"])
            got = _mean_pool(model(**b).last_hidden_state, b["attention_mask"])
            cos.append((ref * got).sum(-1).cpu())
        c = torch.cat(cos)
        return {
            "embedding_cosine_mean": float(c.mean()),
            "embedding_cosine_min": float(c.min()),
            "embedding_cosine_p10": float(c.quantile(0.1)),
        }
    agree = kl = nll_ref = nll_got = 0.0
    n = 0
    for b in batches:
        b = {k: v.to(dev) for k, v in b.items() if k != "labels"}
        with TeacherCapture(model):
            ref = model(**b, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        got = model(**b, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        tgt = b["input_ids"][:, 1:]
        mask = b.get("attention_mask")
        # predictions of a real token from a real token only (padding is neither input nor target)
        real = torch.ones_like(tgt, dtype=torch.bool) if mask is None else mask[:, 1:].bool() & mask[:, :-1].bool()
        ref, got, tgt = ref[real], got[real], tgt[real]
        agree += float((ref.argmax(-1) == got.argmax(-1)).float().sum())
        kl += float((ref.exp() * (ref - got)).sum(-1).sum())
        nll_ref += float(-ref.gather(-1, tgt[..., None]).sum())
        nll_got += float(-got.gather(-1, tgt[..., None]).sum())
        n += tgt.numel()
    return {
        "next_token_agreement": agree / n,
        "logits_kl": kl / n,
        "ppl_original": perplexity(nll_ref / n),
        "ppl_converted": perplexity(nll_got / n),
    }


# ------------------------------------------------------------------------------------- main
def _stage_engine(args, stage: str) -> dict[str, Any]:
    """Trainer settings of one stage: strategy, and its own checkpoint subfolder."""
    ckdir = str(Path(args.checkpoint_dir) / stage) if args.checkpoint_dir else None
    return dict(
        strategy=args.strategy,
        checkpoint_dir=ckdir,
        checkpoint_every=args.checkpoint_every if ckdir else None,
        resume=bool(args.resume and ckdir),
    )


def _finetune_config(args, lr: float, task: str, batch_size: int, stage: str) -> FinetuneConfig:
    """The finetuning stage's config from the CLI flags (``stage`` names its checkpoint subfolder)."""
    return FinetuneConfig(
        method=args.finetune_method, task=task, steps=args.finetune_steps, lr=lr, batch_size=batch_size,
        seed=args.seed, **_stage_engine(args, stage),
    )  # fmt: skip


def _check_args(args) -> None:
    """Refuse bad flag values before anything is loaded (not after the model, the text, the capture
    and, for the finetuning flags, a whole distillation), each with the flag's name."""
    if (args.checkpoint_every is not None or args.resume) and not args.checkpoint_dir:
        raise SystemExit("--checkpoint-every and --resume need --checkpoint-dir")
    at_least = (
        ("checkpoint_every", 1), ("seq_len", 1), ("train_blocks", 1), ("eval_blocks", 0), ("test_blocks", 1),
        ("test_items", 1), ("steps", 0), ("batch_size", 1), ("eval_every", 1), ("patience", 0),
        ("finetune_steps", 0), ("threads", 1),
    )  # fmt: skip
    for key, low in at_least:
        value = getattr(args, key, None)
        if value is not None and value < low:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= {low}, got {value}")
    for key in ("lr", "finetune_lr"):
        value = getattr(args, key, None)
        if value is not None and not value > 0:  # also NaN
            raise SystemExit(f"--{key.replace('_', '-')} must be > 0, got {value}")
    if not args.output_mse >= 0:
        raise SystemExit(f"--output-mse must be >= 0 (0 = Eq. 3 only), got {args.output_mse}")
    try:
        keep = [int(x) for x in args.keep_softmax.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--keep-softmax takes comma-separated layer indices, got {args.keep_softmax!r}") from None
    if any(i < 0 for i in keep):
        raise SystemExit(f"--keep-softmax layer indices must be >= 0, got {args.keep_softmax!r}")


def run(args) -> dict[str, Any]:
    t_start = time.perf_counter()
    _check_args(args)
    world = init_distributed(device=args.device)
    if args.strategy == "fsdp" and (args.capture == "online" or args.finetune):
        raise SystemExit(
            "--strategy fsdp: only --capture cached distillation (with online capture each layer's Eq. 3 is built "
            "inside the layer's forward, bypassing FSDP's backward hooks, so the maps would not train) and no "
            "--finetune (the finetuned model stays FSDP-managed); use --strategy ddp (the default) for those"
        )
    if args.device == "cuda" and torch.cuda.is_available():
        args.device = f"cuda:{world.local_rank}"  # each process its own GPU
    main_rank = is_main_process()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise SystemExit(f"--methods {args.methods!r}: no method given (e.g. {','.join(DEFAULT_METHODS)})")
    specs = {m: _method(m) for m in methods}
    # --finetune tunes one model: the Hedgehog one, else the first method's
    finetuned_method = "hedgehog" if "hedgehog" in methods else methods[0]
    model_key = _model_key(args.model)
    out_dir = Path(args.output_dir or f"runs/linearize-{model_key}")
    progress = not args.quiet

    rank0_print(f"[linearize] loading {args.model} ...")
    model, tok, display = _load(args.model, args.device, dtype)
    decoder = hasattr(model, "generate")  # *ForCausalLM / *LMHeadModel; encoders have no generate()
    preset = dict(PRESETS["decoder" if decoder else "encoder"])
    for k in preset:
        if getattr(args, k, None) is not None:
            preset[k] = getattr(args, k)
    if args.checkpoint_dir and args.checkpoint_every is None:
        # --checkpoint-dir alone wrote nothing (checkpoint_every=None), so a later --resume silently
        # started over: checkpoint on the evaluation grid (and, as always, when a stage ends)
        args.checkpoint_every = preset["eval_every"]
    if getattr(tok, "pad_token_id", None) is None:
        tok.pad_token = tok.eos_token

    rank0_print("[linearize] reading text ...")
    split, source = _documents(args)
    seq = preset["seq_len"]
    train = text_blocks(split["train"], tok, seq, preset["train_blocks"], seed=args.seed)
    val = text_blocks(split["validation"], tok, seq, preset["eval_blocks"], seed=args.seed + 1)
    test = text_blocks(split["test"], tok, seq, preset["test_blocks"], seed=args.seed + 2)
    bs = preset["batch_size"]
    train_b, val_b, test_b = make_batches(train, bs), make_batches(val, bs), make_batches(test, bs)
    if decoder:
        e2e_b = make_batches(text_blocks(split["test"], tok, seq, preset["test_items"], seed=args.seed + 3), bs)
        n_items = sum(len(b["input_ids"]) for b in e2e_b)
    else:
        texts = passages(split["test"], preset["test_items"], seed=args.seed)
        e2e_b = tokenize_passages(texts, tok, batch_size=16, max_length=seq)
        n_items = len(texts)

    keep = [int(x) for x in args.keep_softmax.split(",") if x.strip()]
    dcfg = DistillConfig(
        steps=preset["steps"],
        lr=args.lr,
        batch_size=bs,
        eval_every=preset["eval_every"],
        patience=args.patience,
        output_mse_weight=args.output_mse,
        capture=args.capture,
        seed=args.seed,
        strategy=args.strategy,
    )
    report: dict[str, Any] = {
        "schema": "hedgehog-linearize-report/1",
        "model": display,
        "model_arg": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "world_size": world.world_size,
        "strategy": args.strategy,
        "data": {
            "source": source,
            "seq_len": seq,
            "train_blocks": len(train),
            "eval_blocks": len(val),
            "test_blocks": len(test),
            "test_items": n_items,
            "documents": {k: len(v) for k, v in split.items()},
        },
        "distill_config": dict(dcfg.__dict__),
        "primary_end_to_end": "next_token_agreement" if decoder else "embedding_cosine_mean",
        "methods": {},
    }
    records: dict[str, Any] = {}
    for name in methods:
        fmap, distilled = specs[name]
        t0 = time.perf_counter()
        conv = linearize(model, LinearizeConfig(feature_map=fmap, keep_softmax_layers=keep, backend=args.backend))
        distilled = distilled and conv.trainable_parameters > 0
        label = " + Eq. 3 distillation" if distilled else ""
        rank0_print(f"[linearize] method {name}: feature map {fmap}{label}")
        if name == methods[0]:
            report.update(architecture=conv.architecture, num_layers=len(conv.converted) + len(conv.kept_softmax))
            first = linearized_modules(model)[0][1].attn
            report.update(
                num_heads=first.num_heads,
                num_kv_heads=first.num_kv_heads,
                head_dim=first.head_dim,
                converted=conv.converted,
                kept_softmax=conv.kept_softmax,
            )
            a = first
            elem = torch.finfo(dtype).bits // 8
            cache_bytes = len(train) * seq * len(conv.converted) * (a.num_heads + a.num_kv_heads) * a.head_dim * elem
            if args.capture == "cached" and cache_bytes > CACHED_CAPTURE_LIMIT:
                rank0_print(
                    f"[linearize] cached teacher q, k would take {cache_bytes / 2**30:.1f} GiB; "
                    "switching to --capture online",
                )
                args.capture = "online"
                dcfg.capture = report["distill_config"]["capture"] = "online"
            rank0_print("[linearize] capturing teacher q, k ...")
            rv = args.output_mse > 0
            if args.capture == "cached":
                records["train"] = capture_qkv(model, train_b, record_v=rv)
                records["eval"] = capture_qkv(model, val_b, record_v=rv)
            if main_rank:
                records["test"] = capture_qkv(model, test_b)
        res = None
        if distilled:
            res = distill(
                model,
                train_b,
                val_b,
                dataclasses.replace(dcfg, **_stage_engine(args, f"distill-{name}")),
                progress=progress,
                desc=f"distill {name}",
                train_records=records.get("train"),
                eval_records=records.get("eval"),
            )
        if main_rank:
            report["methods"][name] = _evaluate_method(
                model, conv, fmap, res, test_b, records["test"], e2e_b, decoder, t0
            )
        tuned = model
        if args.finetune and name == finetuned_method:
            tuned = _finetune(model, tok, args, report, decoder, split, train, test, seq, bs)
        if not args.no_save and name == "hedgehog":
            if main_rank:
                path = save_linearized(tuned, out_dir / "model", tokenizer=tok)
                report["saved_model"] = str(path)
            barrier()
        del tuned
        unlinearize(model)
    report["runtime_seconds"] = time.perf_counter() - t_start
    if main_rank:
        paths = write_report(report, out_dir)
        rank0_print(f"[linearize] report: {paths['md']}  {paths['json']}  {paths['png']}")
    barrier()
    return report


def _evaluate_method(model, conv, fmap, res, test_b, test_records, e2e_b, decoder, t0) -> dict[str, Any]:
    """Fidelity per layer (teacher vs linear attention on the test blocks) and end to end."""
    fid = evaluate_fidelity(model, test_b, records=test_records)
    # the layer's index in the model (kept softmax layers included), not its rank among the converted
    index = {n: m.layer_idx for n, m in linearized_modules(model)}
    layers = [{"layer": index[n], "name": n, **fid[n]} for n in conv.converted]
    e2e = end_to_end(model, e2e_b, decoder)
    entry = {
        "feature_map": fmap,
        "distilled": res is not None,
        "trainable_parameters": conv.trainable_parameters,
        "distill": None
        if res is None
        else {
            "steps_run": res.steps_run,
            "best_step": res.best_step,
            "best_eval_loss": res.best_eval_loss,
            "stopped_early": res.stopped_early,
            "seconds": res.seconds,
            "eval_steps": res.eval_steps,
            "eval_loss": res.eval_loss,
            "global_batch_size": res.global_batch_size,
            "resumed_from": res.resumed_from,
            "train_loss": res.train_loss,
            "history": res.history,
        },
        "layers": layers,
        "mean": summarize_layers(layers),
        "end_to_end": e2e,
        "seconds": time.perf_counter() - t0,
    }
    m = entry["mean"]
    rank0_print(
        f"[linearize]   CE {m['ce']:.4f}  KL {m['kl']:.4f}  entropy {m['entropy_linear']:.3f} "
        f"(softmax {m['entropy_softmax']:.3f})  monotonicity {m['monotonicity_linear']:.3f}  "
        + "  ".join(f"{k} {v:.4f}" for k, v in e2e.items())
        + f"  [{entry['seconds']:.0f} s]",
    )
    return entry


def _finetune(model, tok, args, report, decoder, split, train, test, seq, batch_size):
    """The finetuning stage; returns the model to save. The given model is left as it is (the
    methods converted after this one must still compare with the original)."""
    import copy

    lr = args.finetune_lr if args.finetune_lr is not None else (1e-4 if args.finetune_method == "lora" else 2e-5)
    rank0_print(f"[linearize] finetuning ({args.finetune_method}, {args.finetune_steps} steps) ...")
    from . import finetune as ft

    if decoder:
        cfg = _finetune_config(args, lr, "lm", batch_size, "finetune")
        # on a copy: LoRA merges into (full tunes) the original projections, the teacher of later methods
        model, res = ft.finetune(
            copy.deepcopy(model),
            make_batches(train, batch_size, labels=True),
            make_batches(test, batch_size, labels=True),
            cfg,
            progress=not args.quiet,
        )
        report["finetune"] = {"task": "next-token on train blocks; eval on test blocks", **res.to_dict()}
        report["finetune"]["eval_ppl_before"] = perplexity(res.eval_loss_before)
        report["finetune"]["eval_ppl_after"] = perplexity(res.eval_loss_after)
        return model
    report["finetune"] = finetune_classification(model, tok, args, lr, seq)
    return model


def finetune_classification(encoder, tok, args, lr, seq) -> dict[str, Any]:
    """Fine-food sentiment (offline): a classification head on the converted encoder, finetuned
    with the task loss, next to the softmax original finetuned with the same budget."""
    import copy

    from transformers import AutoModelForSequenceClassification

    from ..tasks import corpora
    from . import finetune as ft

    train_rows, test_rows = corpora.load_fine_food()

    def batches(rows, n):
        out = []
        for i in range(0, min(len(rows), n), 16):
            chunk = rows[i : i + 16]
            enc = tok([r[0] for r in chunk], padding=True, truncation=True, max_length=seq, return_tensors="pt")
            out.append(
                {
                    "input_ids": enc["input_ids"],
                    "attention_mask": enc["attention_mask"],
                    "token_type_ids": torch.zeros_like(enc["input_ids"]),
                    "labels": torch.tensor([int(r[1]) for r in chunk]),
                }
            )
        return out

    train_b = batches(train_rows, 16 * args.finetune_steps)
    test_b = batches(test_rows, FINETUNE_TEST_EXAMPLES)
    results = {
        "task": "fine-food sentiment (r-cran-modeldata), 2 classes",
        "test_examples": min(len(test_rows), FINETUNE_TEST_EXAMPLES),
    }
    for which in ("hedgehog", "softmax"):
        cfg_cls = copy.deepcopy(encoder.config)
        cfg_cls.num_labels = 2
        cls = AutoModelForSequenceClassification.from_config(cfg_cls)
        base = copy.deepcopy(encoder)
        if which == "softmax":
            unlinearize(base)
        setattr(cls, cls.base_model_prefix, base)  # cls.bert, cls.roberta, ...: the backbone the head reads
        cls.to(next(encoder.parameters()).device)
        cfg = _finetune_config(args, lr, "classification", 16, f"finetune-{which}")
        # no "before" score: the classification head is freshly initialized
        _, res = ft.finetune(cls, train_b, test_b, cfg, progress=not args.quiet, evaluate_before=False)
        results[which] = {
            "accuracy_after": res.eval_accuracy_after,
            "loss_after": res.eval_loss_after,
            "seconds": res.seconds,
            "trainable_parameters": res.trainable_parameters,
        }
        rank0_print(f"[linearize]   {which}: test accuracy {res.eval_accuracy_after:.4f}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"hedgehog linearize: error: {err}", file=sys.stderr)
        return 2
    cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
