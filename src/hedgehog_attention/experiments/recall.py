"""``hedgehog recall``: associative recall across attentions (App. B.1, Table 4, Fig. 5).

Trains the same 4-layer, 4-head rotary Transformer (App. B.2) with each attention variant and
several seeds on freshly drawn multi-query AR sequences (:mod:`..tasks.associative_recall`), then
reports query accuracy on a fixed test set and the mean attention entropy over layers and heads
on test sequences, as a markdown table and a Fig. 5-style scatter (entropy vs accuracy).

Hyperparameters are fixed in the config; nothing is selected on the test set (the validation
curve printed during training uses its own sequences and is only logged).

Each finished (variant, seed) run is saved to ``<out>/runs/<variant>_s<seed>.json`` (and its
weights to ``<out>/ckpt/``); a rerun skips finished runs, so an interrupted sweep continues where
it stopped. ``--report-only`` rebuilds the table and plot from those files.

Usage::

    hedgehog recall --config configs/recall.yaml --device cuda --workers 12
    hedgehog recall --config configs/recall_smoke.yaml          # CPU, seconds
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..metrics import attention_entropy
from ..models import RotaryTransformer, TransformerConfig
from ..tasks.associative_recall import AssociativeRecallConfig, make_batch, recall_accuracy
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

log = logging.getLogger("hedgehog_attention.experiments.recall")

# Seeds of the data streams; model/training seeds come from the config. The test stream is
# shared by every run so all variants are scored on the same sequences.
TEST_DATA_SEED = 1_000_003
VALID_DATA_SEED = 2_000_003


@dataclass
class RecallTask:
    """vocab_size: keys | values split in half (paper: 40). seq_len: tokens per sequence (paper: 128)."""

    vocab_size: int = 40
    seq_len: int = 128

    def build(self) -> AssociativeRecallConfig:
        return AssociativeRecallConfig(self.vocab_size, self.seq_len)

    def __post_init__(self) -> None:
        self.build()


@dataclass
class RecallModel:
    """The App. B.2 model; only the attention changes between variants."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    backend: str = "chunked"  # linear-attention op backend; "chunked" is pure PyTorch everywhere


@dataclass
class RecallVariant:
    """One attention of the comparison.

    name: label in tables and file names. attention: ``softmax`` or a feature-map name.
    feature_map_kwargs: registry arguments. distill_weight: weight of the auxiliary Eq. 3 term
    against the softmax of the model's own q, k (0 = end to end). tie_qk: one map for q and k.
    """

    name: str
    attention: str
    feature_map_kwargs: dict[str, Any] = field(default_factory=dict)
    distill_weight: float = 0.0
    tie_qk: bool = False


@dataclass
class RecallTrain:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``; fresh data every step."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 150
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 500
    valid_sequences: int = 256
    test_sequences: int = 1024
    entropy_sequences: int = 64
    max_seconds: float | None = None  # per run; a run stopped early records the steps it made


@dataclass
class RecallConfig:
    """The whole experiment: task, model, training, variants and seeds."""

    task: RecallTask = field(default_factory=RecallTask)
    model: RecallModel = field(default_factory=RecallModel)
    train: RecallTrain = field(default_factory=RecallTrain)
    variants: list[RecallVariant] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    out_dir: str = "runs/recall"
    workers: int = 1

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("variants is empty: list at least one attention to compare")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if not self.seeds:
            raise ValueError("seeds is empty")
        for v in self.variants:  # fail at load time, not in a worker minutes later
            self.model_config(v)

    def model_config(self, v: RecallVariant) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=self.task.vocab_size,
            d_model=self.model.d_model,
            n_layers=self.model.n_layers,
            n_heads=self.model.n_heads,
            max_seq_len=self.task.seq_len,
            attention=v.attention,
            feature_map_kwargs=dict(v.feature_map_kwargs),
            tie_qk=v.tie_qk,
            distill_weight=v.distill_weight,
            mlp_ratio=self.model.mlp_ratio,
            backend=self.model.backend,
        )


def lr_at(step: int, tc: RecallTrain) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr_ratio * lr`` (step counts from 0)."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    frac = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def evaluate(model: RotaryTransformer, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = total = 0
    for i in range(0, x.shape[0], batch):
        c, n = recall_accuracy(model(x[i : i + batch]).logits, y[i : i + batch])
        correct, total = correct + c, total + n
    return correct / max(total, 1)


@torch.no_grad()
def mean_entropy(model: RotaryTransformer, x: torch.Tensor) -> tuple[float, list[float]]:
    """Mean attention entropy (nats) over layers, heads and query rows; and per layer."""
    model.eval()
    per_layer = [float(attention_entropy(w).mean()) for w in model.attention_weights(x)]
    return sum(per_layer) / len(per_layer), per_layer


def _optimizer(model: torch.nn.Module, tc: RecallTrain) -> torch.optim.Optimizer:
    # No weight decay on norms, biases and the feature maps' bias (GPT-2 / nanoGPT convention).
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.98))


def run_one(cfg: RecallConfig, variant: RecallVariant, seed: int, device: torch.device) -> dict:
    """Train and evaluate one (variant, seed); returns the result record."""
    tc, task = cfg.train, cfg.task.build()
    torch.manual_seed(seed)
    model = RotaryTransformer(cfg.model_config(variant)).to(device)
    opt = _optimizer(model, tc)
    amp = cfg.dtype == "bfloat16" and device.type == "cuda"
    gen = torch.Generator().manual_seed(10_000 + seed)
    vx, vy = make_batch(task, tc.valid_sequences, torch.Generator().manual_seed(VALID_DATA_SEED), device)
    curve = []
    t0 = time.perf_counter()
    steps_done = 0
    for step in range(tc.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        x, y = make_batch(task, tc.batch_size, gen, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x, y)
        loss = out.total_loss
        if not torch.isfinite(loss):
            log.warning("%s seed %d: loss %s at step %d; stopping this run", variant.name, seed, loss.item(), step)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        steps_done = step + 1
        if steps_done % tc.log_every == 0 or steps_done == tc.steps:
            acc = evaluate(model, vx, vy)
            curve.append(
                {
                    "step": steps_done,
                    "loss": out.loss.item(),
                    "aux": None if out.aux_loss is None else out.aux_loss.item(),
                    "valid_acc": acc,
                }
            )
            log.info(
                "%-14s seed %d step %5d loss %.4f valid acc %.3f", variant.name, seed, steps_done, loss.item(), acc
            )
        if tc.max_seconds is not None and time.perf_counter() - t0 > tc.max_seconds:
            log.warning("%s seed %d: stopped at step %d by max_seconds", variant.name, seed, steps_done)
            break
    train_seconds = time.perf_counter() - t0
    tx, ty = make_batch(task, tc.test_sequences, torch.Generator().manual_seed(TEST_DATA_SEED), device)
    test_acc = evaluate(model, tx, ty)
    ent, ent_layers = mean_entropy(model, tx[: tc.entropy_sequences])
    return {
        "variant": variant.name,
        "attention": variant.attention,
        "distill_weight": variant.distill_weight,
        "seed": seed,
        "steps": steps_done,
        "train_seconds": train_seconds,
        "test_accuracy": test_acc,
        "entropy": ent,
        "entropy_per_layer": ent_layers,
        "uniform_entropy": float(torch.log(torch.arange(1, task.seq_len + 1, dtype=torch.float64)).mean()),
        "curve": curve,
        "parameters": model.num_parameters(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def _job(args: tuple[dict, int, int, str, str]) -> str:
    """Worker entry (picklable): run one job and write its files; returns the result path."""
    cfg_dict, vi, seed, device_name, out_dir = args
    torch.set_num_threads(1)
    setup_logging()
    cfg = config_from_dict(RecallConfig, cfg_dict)
    variant = cfg.variants[vi]
    device = torch.device(device_name)
    res = run_one(cfg, variant, seed, device)
    state = res.pop("state_dict")
    out = Path(out_dir)
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    torch.save(
        {"config": cfg_dict, "variant": vi, "seed": seed, "model": state}, out / "ckpt" / f"{variant.name}_s{seed}.pt"
    )
    path = out / "runs" / f"{variant.name}_s{seed}.json"
    save_json(res, path)
    return str(path)


# Rough relative cost per training step (measured on an H200 with 16 concurrent runs, 2026-11-28).
_COST = {"taylor2": 4, "cosformer": 3, "hedgehog": 2, "hedgehog_exp": 2, "t2r": 2, "softmax": 0.5}


def run_sweep(cfg: RecallConfig, out_dir: Path, device: torch.device) -> list[dict]:
    cfg_dict = config_to_dict(cfg)
    jobs = []
    for vi, v in enumerate(cfg.variants):
        for s in cfg.seeds:
            if (out_dir / "runs" / f"{v.name}_s{s}.json").exists():
                log.info("skip %s seed %d (already done)", v.name, s)
                continue
            jobs.append((cfg_dict, vi, s, str(device), str(out_dir)))
    # Slowest attentions first, so a parallel sweep does not end waiting on one long run.
    jobs.sort(key=lambda j: -_COST.get(cfg.variants[j[1]].attention, 1) - cfg.variants[j[1]].distill_weight)
    t0 = time.perf_counter()
    if cfg.workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        # spawn: CUDA cannot be re-initialized in forked children.
        with mp.get_context("spawn").Pool(min(cfg.workers, len(jobs))) as pool:
            for p in pool.imap_unordered(_job, jobs):
                log.info("done %s (%.0f s)", p, time.perf_counter() - t0)
    else:
        for j in jobs:
            log.info("done %s (%.0f s)", _job(j), time.perf_counter() - t0)
    return collect(cfg, out_dir)


def collect(cfg: RecallConfig, out_dir: Path) -> list[dict]:
    import json

    results = []
    for v in cfg.variants:
        for s in cfg.seeds:
            p = out_dir / "runs" / f"{v.name}_s{s}.json"
            if p.exists():
                results.append(json.loads(p.read_text()))
    return results


def summarize(cfg: RecallConfig, results: list[dict]) -> list[dict]:
    rows = []
    for v in cfg.variants:
        rs = [r for r in results if r["variant"] == v.name]
        if not rs:
            continue
        accs = torch.tensor([r["test_accuracy"] for r in rs], dtype=torch.float64)
        ents = torch.tensor([r["entropy"] for r in rs], dtype=torch.float64)
        rows.append(
            {
                "variant": v.name,
                "attention": v.attention,
                "seeds": len(rs),
                "acc_mean": float(accs.mean()),
                "acc_std": float(accs.std()) if len(rs) > 1 else 0.0,
                "acc_per_seed": [r["test_accuracy"] for r in rs],
                "entropy_mean": float(ents.mean()),
                "entropy_std": float(ents.std()) if len(rs) > 1 else 0.0,
                "steps": sorted({r["steps"] for r in rs}),
                "train_seconds": float(sum(r["train_seconds"] for r in rs) / len(rs)),
                "parameters": rs[0]["parameters"],
            }
        )
    return rows


def render_report(cfg: RecallConfig, results: list[dict], out_dir: Path, env: dict, command: str) -> str:
    rows = summarize(cfg, results)
    task = cfg.task.build()
    table = markdown_table(
        ["attention", "test accuracy (mean ± std)", "per seed", "entropy (nats)", "steps", "s/run"],
        [
            [
                r["variant"],
                f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f}",
                " / ".join(f"{100 * a:.1f}" for a in r["acc_per_seed"]),
                f"{r['entropy_mean']:.3f} ± {r['entropy_std']:.3f}",
                ",".join(map(str, r["steps"])),
                f"{r['train_seconds']:.0f}",
            ]
            for r in rows
        ],
    )
    uniform = results[0]["uniform_entropy"] if results else float("nan")
    n_seeds = sorted({r["seeds"] for r in rows})
    plot_scatter(cfg, results, rows, out_dir / "recall_scatter.png")
    md = [
        "# Associative recall (App. B.1, Table 4, Fig. 5 analog)",
        "",
        f"Command: `{command}`",
        "",
        f"Environment: {', '.join(f'{k} {v}' for k, v in env.items())}",
        "",
        f"Task: vocabulary {task.vocab_size} ({task.num_keys} keys | {task.num_values} values), sequence length "
        f"{task.seq_len} ({task.num_pairs} pairs), per-sequence random key->value map; every repeated key is a "
        f"query (expected recurrence {task.expected_recurrence:.2f}); chance = {100 * task.chance_accuracy:.0f}%.",
        f"Model: {cfg.model.n_layers} layers, {cfg.model.n_heads} heads, d_model {cfg.model.d_model}, rotary, "
        f"{rows[0]['parameters'] if rows else '?'} parameters (softmax variant); only the attention differs.",
        f"Training: {cfg.train.steps} steps x {cfg.train.batch_size} fresh sequences, AdamW lr {cfg.train.lr}, "
        f"wd {cfg.train.weight_decay}, warmup {cfg.train.warmup_steps} + cosine; {cfg.dtype}; seeds "
        f"{cfg.seeds} ({'/'.join(map(str, n_seeds))} per attention). Accuracy over all query positions of "
        f"{cfg.train.test_sequences} test sequences (a fixed stream no run trains on); entropy = mean over layers, "
        f"heads and query rows of {cfg.train.entropy_sequences} test sequences (uniform causal weights: "
        f"{uniform:.3f} nats).",
        "",
        table,
        "",
        "![entropy vs accuracy](recall_scatter.png)",
        "",
    ]
    return "\n".join(md)


def plot_scatter(cfg: RecallConfig, results: list[dict], rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(rows):
        pts = [x for x in results if x["variant"] == r["variant"]]
        ax.scatter(
            [p["entropy"] for p in pts], [100 * p["test_accuracy"] for p in pts], color=cmap(i), alpha=0.35, s=18
        )
        ax.scatter(r["entropy_mean"], 100 * r["acc_mean"], color=cmap(i), s=60, edgecolor="k", label=r["variant"])
    ax.axhline(100 * cfg.task.build().chance_accuracy, color="gray", ls=":", lw=1, label="chance")
    ax.set_xlabel("mean attention entropy (nats)")
    ax.set_ylabel("AR test accuracy (%)")
    ax.set_title("Associative recall: entropy vs accuracy (small dots: seeds)")
    ax.legend(fontsize=7, ncol=2, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hedgehog recall", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML/JSON file of RecallConfig (configs/recall.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override KEY=VALUE (dotted)")
    p.add_argument("--device", help="cpu | cuda | auto (overrides the config)")
    p.add_argument("--workers", type=int, help="parallel runs (processes) (overrides the config)")
    p.add_argument("--out", help="output folder (overrides the config's out_dir)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = load_config_from_cli(RecallConfig, args, {"device": "device", "workers": "workers", "out": "out_dir"})
    except ConfigError as err:
        log.error("%s", err)
        return 2
    out_dir = Path(cfg.out_dir)
    device = pick_device(cfg.device)
    env = environment_info(device)
    save_json({"config": config_to_dict(cfg), "environment": env}, out_dir / "config.json")
    results = collect(cfg, out_dir) if args.report_only else run_sweep(cfg, out_dir, device)
    if not results:
        log.error("no finished runs under %s", out_dir)
        return 1
    command = "hedgehog recall " + " ".join(argv if argv is not None else [])
    md = render_report(cfg, results, out_dir, env, command.strip())
    (out_dir / "recall.md").write_text(md)
    save_json({"summary": summarize(cfg, results), "environment": env}, out_dir / "results.json")
    print(md)
    return 0
