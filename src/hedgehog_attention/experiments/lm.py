"""``hedgehog lm``: from-scratch language modelling across attentions (Table 1 analog).

Trains the same rotary decoder (:mod:`..models`) with each attention on the offline public-domain
corpus (Austen + KJV + Moby Dick, GPT-2 tokenizer, document-level train/validation/test split) at
context 1024 with App. C.2's optimizer (AdamW, lr 6e-4, weight decay 0.01), and reports held-out
perplexity and the share of the 1+ELU-to-softmax gap that each attention closes (paper, on
WikiText-103 with 125M models: Hedgehog 68.6%).

Data sources (``data.source``):

* ``public_domain``: tokenizes the offline corpus (needs ``scripts/setup_assets.sh``).
* ``npz``: a token file written by ``--prepare-data`` (uint16 streams ``train``, ``validation``,
  ``test``): what travels to a GPU machine that has no assets.
* ``wikitext103``: WikiText-103 through HF ``datasets`` (needs a network or a filled cache).

Training draws random 1024-token windows of the training stream; evaluation scores every full
non-overlapping block of the test stream (perplexity = exp of the mean token NLL). Nothing is
selected on the test split; the validation split is only logged. A checkpoint (model, optimizer,
step, RNG) is written every ``checkpoint_every`` steps and at the end; a rerun resumes from it.

Usage::

    hedgehog lm --config configs/lm.yaml --prepare-data .carry/lm_tokens.npz   # once, on a CPU
    hedgehog lm --config configs/lm.yaml --set data.source=npz --device cuda
    hedgehog lm --config configs/lm_smoke.yaml                                 # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..models import RotaryTransformer, TransformerConfig
from .common import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    environment_info,
    load_config_from_cli,
    markdown_table,
    pick_device,
    save_json,
    setup_logging,
)

log = logging.getLogger("hedgehog_attention.experiments.lm")


@dataclass
class LMData:
    """source: public_domain | npz | wikitext103. npz_path: token file for ``npz``.
    block_size: context (paper: 1024). max_eval_blocks: cap on scored test/validation blocks
    (None = all). vocab_size: model vocabulary (GPT-2: 50257; every token id must be below it)."""

    source: Literal["public_domain", "npz", "wikitext103"] = "public_domain"
    npz_path: str = ".carry/lm_tokens.npz"
    block_size: int = 1024
    max_eval_blocks: int | None = None
    vocab_size: int = 50257


@dataclass
class LMModel:
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    mlp_ratio: int = 4
    dropout: float = 0.0
    backend: str = "chunked"


@dataclass
class LMVariant:
    """name: table label; attention: softmax or a feature-map name; feature_map_kwargs; distill_weight
    (auxiliary Eq. 3 term, 0 = end to end)."""

    name: str
    attention: str
    feature_map_kwargs: dict[str, Any] = field(default_factory=dict)
    distill_weight: float = 0.0


@dataclass
class LMTrain:
    """App. C.2: AdamW lr 6e-4, wd 0.01; warmup then cosine to 10%."""

    steps: int = 600
    batch_size: int = 8
    lr: float = 6e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 60
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 100
    eval_batch_size: int = 8
    checkpoint_every: int = 200
    max_seconds: float | None = None


@dataclass
class LMConfig:
    data: LMData = field(default_factory=LMData)
    model: LMModel = field(default_factory=LMModel)
    train: LMTrain = field(default_factory=LMTrain)
    variants: list[LMVariant] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    out_dir: str = "runs/lm"
    workers: int = 1
    # Table 1's gap: (ppl[gap_low] - ppl[x]) / (ppl[gap_low] - ppl[gap_high]).
    gap_low: str = "elu"
    gap_high: str = "softmax"

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("variants is empty")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        for v in self.variants:
            self.model_config(v, 2)

    def model_config(self, v: LMVariant, vocab_size: int) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=vocab_size,
            d_model=self.model.d_model,
            n_layers=self.model.n_layers,
            n_heads=self.model.n_heads,
            max_seq_len=self.data.block_size,
            attention=v.attention,
            feature_map_kwargs=dict(v.feature_map_kwargs),
            distill_weight=v.distill_weight,
            mlp_ratio=self.model.mlp_ratio,
            dropout=self.model.dropout,
            backend=self.model.backend,
        )


# --------------------------------------------------------------------------------------- data
def prepare_tokens(cfg: LMConfig) -> dict[str, np.ndarray]:
    """Token streams per split (uint16 when the vocabulary fits) for ``public_domain``/``wikitext103``."""
    if cfg.data.source == "public_domain":
        from ..tasks.lm_data import public_domain_lm_splits

        splits = public_domain_lm_splits(block_size=1)  # block 1: keep every token of each stream
        streams = {s: ds.blocks.flatten().numpy() for s, ds in splits.items()}
    elif cfg.data.source == "wikitext103":
        from ..tasks.lm_data import load_wikitext103

        streams = {
            s: load_wikitext103(s, block_size=1).blocks.flatten().numpy() for s in ("train", "validation", "test")
        }
    else:
        return load_npz(cfg.data.npz_path)
    return {s: a.astype(np.uint16) for s, a in streams.items()}


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        missing = {"train", "validation", "test"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: missing token streams {sorted(missing)} (found {z.files})")
        return {k: z[k] for k in ("train", "validation", "test")}


def eval_blocks(stream: np.ndarray, block: int, max_blocks: int | None) -> torch.Tensor:
    """Non-overlapping ``[N, block + 1]`` windows (inputs + the next token) of a stream."""
    n = (len(stream) - 1) // block
    if max_blocks is not None:
        n = min(n, max_blocks)
    idx = torch.arange(n)[:, None] * block + torch.arange(block + 1)[None]
    return torch.from_numpy(stream.astype(np.int64))[idx]


# ------------------------------------------------------------------------------------ training
def lr_at(step: int, tc: LMTrain) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    frac = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def perplexity(model: RotaryTransformer, blocks: torch.Tensor, cfg: LMConfig, device: torch.device) -> float:
    model.eval()
    nll, n = 0.0, 0
    amp = cfg.dtype == "bfloat16" and device.type == "cuda"
    for i in range(0, blocks.shape[0], cfg.train.eval_batch_size):
        b = blocks[i : i + cfg.train.eval_batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(b[:, :-1], b[:, 1:])
        nll += out.loss.item() * b[:, 1:].numel()
        n += b[:, 1:].numel()
    return math.exp(nll / max(n, 1))


def _optimizer(model: torch.nn.Module, tc: LMTrain) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=tuple(tc.betas),
    )


def run_variant(cfg: LMConfig, vi: int, streams: dict[str, np.ndarray], device: torch.device, out_dir: Path) -> dict:
    v, tc, block = cfg.variants[vi], cfg.train, cfg.data.block_size
    vocab = cfg.data.vocab_size
    top = max(int(a.max()) for a in streams.values())
    if top >= vocab:
        raise ValueError(f"token id {top} >= data.vocab_size={vocab}; raise data.vocab_size")
    torch.manual_seed(cfg.seed)
    model = RotaryTransformer(cfg.model_config(v, vocab)).to(device)
    opt = _optimizer(model, tc)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    ckpt_path = out_dir / "ckpt" / f"{v.name}.pt"
    step, history, elapsed = 0, [], 0.0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, history, elapsed = ck["step"], ck["history"], ck["elapsed"]
        gen.set_state(ck["generator"])
        log.info("%s: resumed at step %d", v.name, step)
    train = torch.from_numpy(streams["train"].astype(np.int64))
    valid = eval_blocks(streams["validation"], block, cfg.data.max_eval_blocks)
    amp = cfg.dtype == "bfloat16" and device.type == "cuda"

    def save(final: bool = False) -> None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "history": history,
            "elapsed": elapsed,
            "generator": gen.get_state(),
            "config": config_to_dict(cfg),
            "variant": vi,
        }
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(ckpt_path)

    t0 = time.perf_counter() - elapsed
    tokens_per_step = tc.batch_size * block
    stopped_early = False
    while step < tc.steps:
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        starts = torch.randint(0, len(train) - block - 1, (tc.batch_size,), generator=gen)
        batch = train[starts[:, None] + torch.arange(block + 1)[None]].to(device)  # (B, block + 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(batch[:, :-1], batch[:, 1:])
        loss = out.total_loss
        if not torch.isfinite(loss):
            log.warning("%s: non-finite loss at step %d; stopping", v.name, step)
            stopped_early = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        elapsed = time.perf_counter() - t0
        if step % tc.log_every == 0 or step == tc.steps:
            vppl = perplexity(model, valid, cfg, device)
            history.append({"step": step, "train_loss": out.loss.item(), "valid_ppl": vppl, "seconds": elapsed})
            log.info("%-10s step %5d loss %.3f valid ppl %.2f (%.0f s)", v.name, step, out.loss.item(), vppl, elapsed)
        if step % tc.checkpoint_every == 0:
            save()
        if tc.max_seconds is not None and elapsed > tc.max_seconds:
            log.warning("%s: stopped at step %d by max_seconds=%s", v.name, step, tc.max_seconds)
            stopped_early = True
            break
    save()
    test = eval_blocks(streams["test"], block, cfg.data.max_eval_blocks)
    result = {
        "variant": v.name,
        "attention": v.attention,
        "steps": step,
        "planned_steps": tc.steps,
        "stopped_early": stopped_early,
        "tokens_seen": step * tokens_per_step,
        "train_seconds": elapsed,
        "test_ppl": perplexity(model, test, cfg, device),
        "valid_ppl": perplexity(model, valid, cfg, device),
        "test_tokens": int(test[:, 1:].numel()),
        "parameters": model.num_parameters(),
        "non_embedding_parameters": model.num_parameters(non_embedding=True),
        "history": history,
    }
    save_json(result, out_dir / "runs" / f"{v.name}.json")
    return result


def _job(args: tuple[dict, int, str, str]) -> str:
    cfg_dict, vi, device_name, out_dir = args
    torch.set_num_threads(2)
    setup_logging()
    cfg = config_from_dict(LMConfig, cfg_dict)
    streams = prepare_tokens(cfg)
    run_variant(cfg, vi, streams, torch.device(device_name), Path(out_dir))
    return cfg.variants[vi].name


# ------------------------------------------------------------------------------------- report
def gap_closed(ppl: float, low: float, high: float) -> float:
    """Share of the ``low -> high`` perplexity gap closed by ``ppl`` (1.0 = matches ``high``)."""
    return (low - ppl) / (low - high) if low != high else float("nan")


def render_report(cfg: LMConfig, results: list[dict], env: dict, command: str, data_info: dict) -> str:
    by = {r["variant"]: r for r in results}
    low, high = by.get(cfg.gap_low), by.get(cfg.gap_high)
    rows = []
    for v in cfg.variants:
        r = by.get(v.name)
        if r is None:
            continue
        gap = gap_closed(r["test_ppl"], low["test_ppl"], high["test_ppl"]) if low and high else float("nan")
        rows.append(
            [
                v.name,
                f"{r['test_ppl']:.2f}",
                f"{r['valid_ppl']:.2f}",
                "-" if math.isnan(gap) else f"{100 * gap:.1f}%",
                f"{r['steps']}/{r['planned_steps']}",
                f"{r['tokens_seen'] / 1e6:.2f}M",
                f"{r['train_seconds']:.0f}",
            ]
        )
    table = markdown_table(
        ["attention", "test ppl", "valid ppl", f"gap {cfg.gap_low}->{cfg.gap_high} closed", "steps", "tokens", "s"],
        rows,
    )
    m = cfg.model
    params = results[0]["parameters"] if results else 0
    nonemb = results[0]["non_embedding_parameters"] if results else 0
    return "\n".join(
        [
            "# From-scratch language modelling (Table 1 analog)",
            "",
            f"Command: `{command}`",
            "",
            f"Environment: {', '.join(f'{k} {v}' for k, v in env.items())}",
            "",
            f"Data: {data_info}. Context {cfg.data.block_size}.",
            f"Model: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, rotary, tied embeddings; "
            f"{params / 1e6:.1f}M parameters ({nonemb / 1e6:.1f}M without the embedding) for the softmax model.",
            f"Training: AdamW lr {cfg.train.lr}, wd {cfg.train.weight_decay}, betas {cfg.train.betas}, "
            f"warmup {cfg.train.warmup_steps} + cosine, batch {cfg.train.batch_size} x {cfg.data.block_size} tokens, "
            f"{cfg.dtype}, seed {cfg.seed}; one run per attention.",
            "",
            table,
            "",
            "Gap closed = (ppl[1+ELU] - ppl[x]) / (ppl[1+ELU] - ppl[softmax]) on the test split (paper, 125M on "
            "WikiText-103: Hedgehog 68.6%).",
            "",
            "![validation perplexity](lm_curves.png)",
            "",
        ]
    )


def plot_curves(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in results:
        h = r["history"]
        if h:
            ax.plot([x["step"] for x in h], [x["valid_ppl"] for x in h], marker="o", ms=3, label=r["variant"])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity")
    ax.set_title("From-scratch LM: validation perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hedgehog lm", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML/JSON file of LMConfig (configs/lm.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override KEY=VALUE (dotted)")
    p.add_argument("--device", help="cpu | cuda | auto")
    p.add_argument("--workers", type=int, help="variants trained in parallel processes")
    p.add_argument("--out", help="output folder")
    p.add_argument("--prepare-data", metavar="NPZ", help="write the token streams to NPZ and exit")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = load_config_from_cli(LMConfig, args, {"device": "device", "workers": "workers", "out": "out_dir"})
    except ConfigError as err:
        log.error("%s", err)
        return 2
    if args.prepare_data:
        streams = prepare_tokens(cfg)
        Path(args.prepare_data).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.prepare_data, **streams)
        log.info("wrote %s: %s", args.prepare_data, {k: len(v) for k, v in streams.items()})
        return 0
    out_dir = Path(cfg.out_dir)
    device = pick_device(cfg.device)
    env = environment_info(device)
    save_json({"config": config_to_dict(cfg), "environment": env}, out_dir / "config.json")
    streams = prepare_tokens(cfg)
    data_info = (
        f"{cfg.data.source} token streams: "
        + ", ".join(f"{k} {len(v) / 1e6:.2f}M tokens" for k, v in streams.items())
        + " (GPT-2 tokenizer, document-level split)"
    )
    todo = [i for i, v in enumerate(cfg.variants) if not (out_dir / "runs" / f"{v.name}.json").exists()]
    if not args.report_only and todo:
        if cfg.workers > 1 and len(todo) > 1:
            import multiprocessing as mp

            jobs = [(config_to_dict(cfg), i, str(device), str(out_dir)) for i in todo]
            with mp.get_context("spawn").Pool(min(cfg.workers, len(jobs))) as pool:
                for name in pool.imap_unordered(_job, jobs):
                    log.info("done %s", name)
        else:
            for i in todo:
                run_variant(cfg, i, streams, device, out_dir)
    results = [
        json.loads((out_dir / "runs" / f"{v.name}.json").read_text())
        for v in cfg.variants
        if (out_dir / "runs" / f"{v.name}.json").exists()
    ]
    if not results:
        log.error("no finished runs under %s", out_dir)
        return 1
    plot_curves(results, out_dir / "lm_curves.png")
    command = ("hedgehog lm " + " ".join(argv if argv is not None else [])).strip()
    md = render_report(cfg, results, env, command, data_info)
    (out_dir / "lm.md").write_text(md)
    save_json({"results": results, "environment": env, "data": data_info}, out_dir / "results.json")
    print(md)
    return 0
