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

Training runs on :class:`hedgehog_attention.train.Trainer`: the training stream is cut into
windows of ``block_size + 1`` tokens (every ``train_stride`` tokens), visited in a seeded
per-epoch permutation, ``train.batch_size`` windows per optimizer step (the global batch, the same
for any process count). Under ``torchrun`` every variant is trained by all ranks together (DDP,
or FSDP2 with ``strategy: fsdp``), the data sharded by rank; only rank 0 writes files. Evaluation
scores every full non-overlapping block of the test stream (perplexity = exp of the mean token
NLL). Nothing is selected on the test split; the validation split is only logged. A checkpoint
(model, optimizer, schedule, RNG, data position) is written every ``checkpoint_every`` steps and
at the end under ``<out>/ckpt/<variant>/``; ``--resume`` continues from it (same result as an
uninterrupted run), a run without ``--resume`` starts from step 0. Finished variants
(``<out>/runs/<variant>.json``) are skipped; one recorded with other settings (data, model, training
recipe, seed, dtype: :func:`run_settings`) stops the command instead of entering the report.

Usage::

    hedgehog lm --config configs/lm.yaml --prepare-data .carry/lm_tokens.npz   # once, on a CPU
    hedgehog lm --config configs/lm.yaml --set data.source=npz --device cuda --workers 5
    torchrun --nproc_per_node=2 -m hedgehog_attention.cli lm --config configs/lm.yaml --device cuda
    hedgehog lm --config configs/lm.yaml --device cuda --resume                 # after a kill
    hedgehog lm --config configs/lm_smoke.yaml                                 # CPU, seconds

``--workers N`` trains N variants at once in separate single-process runs (one process each, for
small models that leave a GPU idle); it is for plain launches, not torchrun.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ..metrics import perplexity
from ..models import RotaryTransformer, TransformerConfig
from ..train import (
    TrainConfig,
    Trainer,
    TrainerCallback,
    barrier,
    cleanup_distributed,
    init_distributed,
    world_info,
)
from .common import (
    TRAINING_SHORTCUTS,
    ConfigError,
    add_training_arguments,
    config_from_dict,
    config_to_dict,
    environment_info,
    load_config_from_cli,
    markdown_table,
    micro_batch_size,
    pick_device,
    record_run,
    save_figure,
    save_json,
    settings_diff,
    setup_logging,
    trainer_placement,
)

log = logging.getLogger("hedgehog_attention.experiments.lm")


@dataclass
class LMData:
    """source: public_domain | npz | wikitext103. npz_path: token file for ``npz``.
    block_size: context (paper: 1024). max_eval_blocks: cap on scored test/validation blocks
    (None = all). vocab_size: model vocabulary (GPT-2: 50257; every token id must be below it).
    train_stride: tokens between the starts of consecutive training windows (None = block_size:
    non-overlapping windows; an epoch is one pass over the training stream)."""

    source: Literal["public_domain", "npz", "wikitext103"] = "public_domain"
    npz_path: str = ".carry/lm_tokens.npz"
    block_size: int = 1024
    max_eval_blocks: int | None = None
    train_stride: int | None = None
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
    """App. C.2: AdamW lr 6e-4, wd 0.01 (on weight matrices only: no decay on biases and norm gains); warmup
    then cosine to ``min_lr_ratio``. batch_size: the GLOBAL batch (windows per optimizer step), split
    over processes and ``grad_accum_steps``. log_every: validation every so many steps."""

    steps: int = 600
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 6e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 60
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 100
    eval_batch_size: int = 8
    checkpoint_every: int = 200
    keep_last: int | None = 1  # checkpoints kept per run (None: all)
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
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
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
    return {s: compact_token_ids(a) for s, a in streams.items()}


def compact_token_ids(ids: np.ndarray) -> np.ndarray:
    """``ids`` as uint16 when every id fits (GPT-2's 50,257), else int32: never wrapped."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= 2**31):
        raise ValueError(f"token ids must be in [0, 2**31); got {int(ids.min())}..{int(ids.max())}")
    return ids.astype(np.uint16 if not ids.size or int(ids.max()) <= np.iinfo(np.uint16).max else np.int32)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        missing = {"train", "validation", "test"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: missing token streams {sorted(missing)} (found {z.files})")
        return {k: z[k] for k in ("train", "validation", "test")}


# ------------------------------------------------------------------------------------ training
class TokenWindows(Dataset):
    """Windows ``[block + 1]`` (inputs + the next token) of a token stream, one every ``stride`` tokens.

    Map-style, so :class:`~hedgehog_attention.train.Trainer` shards it by rank and orders it with its
    seeded per-epoch permutation (the samples of a step do not depend on the process count).
    """

    def __init__(self, stream: np.ndarray, block: int, stride: int | None = None, max_windows: int | None = None):
        stride = block if stride is None else stride
        if block < 1 or stride < 1:
            raise ValueError(f"block and stride must be >= 1, got block={block}, stride={stride}")
        if len(stream) < block + 1:
            raise ValueError(f"token stream of {len(stream)} tokens is shorter than one window of {block + 1}")
        self.stream, self.block, self.stride = stream, block, stride
        n = (len(stream) - block - 1) // stride + 1
        self.n = n if max_windows is None else min(n, max_windows)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} out of range [0, {self.n})")
        s = i * self.stride
        return torch.from_numpy(self.stream[s : s + self.block + 1].astype(np.int64))


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Trainer loss: mean next-token CE over ``batch [B, block + 1]`` (+ the weighted Eq. 3 term while
    training; the model computes it only in train mode, so evaluation scores the plain CE)."""
    out = model(batch[:, :-1], batch[:, 1:])
    return out.total_loss, {"tokens": batch[:, 1:].numel()}


class _RunControl(TrainerCallback):
    """Wall-clock cap (``max_seconds``; the Trainer all-reduces the stop flag across ranks) and a
    per-step log line every ``log_every`` steps."""

    def __init__(self, name: str, max_seconds: float | None) -> None:
        self.name, self.max_seconds = name, max_seconds
        self.stopped_by_time = False
        self.t0 = time.perf_counter()
        self.last_step = 0

    def on_train_begin(self, trainer: Trainer) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        self.last_step = step
        if self.max_seconds is not None and time.perf_counter() - self.t0 > self.max_seconds:
            if not self.stopped_by_time:
                log.warning("%s: stopping at step %d (max_seconds=%s)", self.name, step, self.max_seconds)
            self.stopped_by_time = True
            trainer.should_stop = True


def train_config(cfg: LMConfig, vi: int, device: torch.device, ckpt_dir: Path, resume: bool) -> TrainConfig:
    """The :class:`TrainConfig` of one variant: App. C.2 AdamW, warmup + cosine, global batch
    ``train.batch_size`` split over ``world_size * grad_accum_steps`` micro-batches."""
    tc = cfg.train
    return TrainConfig(
        max_steps=tc.steps, lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.betas[0], tc.betas[1]),
        decay_matrices_only=True,  # no decay on biases / norm gains (GPT-2 convention)
        micro_batch_size=micro_batch_size(tc.batch_size, tc.grad_accum_steps), grad_accum_steps=tc.grad_accum_steps,
        max_grad_norm=tc.grad_clip,
        scheduler="cosine", warmup_steps=tc.warmup_steps, min_lr_ratio=tc.min_lr_ratio, eval_every=tc.log_every,
        log_every=tc.log_every, checkpoint_every=tc.checkpoint_every, checkpoint_dir=str(ckpt_dir), resume=resume,
        seed=cfg.seed, progress=False, progress_desc=cfg.variants[vi].name, strategy=cfg.strategy,
        eval_batch_size=tc.eval_batch_size, keep_last=tc.keep_last,
        **trainer_placement(device, cfg.dtype),
    )  # fmt: skip


def _fresh_checkpoint_dir(path: Path, resume: bool) -> None:
    """Without ``--resume`` a run starts from step 0: rank 0 removes an earlier run's checkpoints so
    a later ``--resume`` cannot pick up a stale step."""
    if not resume and world_info().is_main and path.exists():
        shutil.rmtree(path)
    barrier()


def run_variant(
    cfg: LMConfig, vi: int, streams: dict[str, np.ndarray], device: torch.device, out_dir: Path, resume: bool = False
) -> dict | None:
    """Train and score one variant on the :class:`Trainer` (one process, or every rank under
    torchrun); rank 0 writes ``runs/<name>.json`` and returns the record, other ranks return None."""
    v, tc, block = cfg.variants[vi], cfg.train, cfg.data.block_size
    vocab = cfg.data.vocab_size
    top = max(int(a.max()) for a in streams.values())
    if top >= vocab:
        raise ValueError(f"token id {top} >= data.vocab_size={vocab}; raise data.vocab_size")
    ckpt_dir = out_dir / "ckpt" / v.name
    _fresh_checkpoint_dir(ckpt_dir, resume)
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    model = RotaryTransformer(cfg.model_config(v, vocab))
    train = TokenWindows(streams["train"], block, cfg.data.train_stride)
    valid = TokenWindows(streams["validation"], block, max_windows=cfg.data.max_eval_blocks)
    test = TokenWindows(streams["test"], block, max_windows=cfg.data.max_eval_blocks)
    control = _RunControl(v.name, tc.max_seconds)
    trainer = Trainer(
        model, lm_loss, train, valid, train_config(cfg, vi, device, ckpt_dir, resume), callbacks=[control]
    )
    info = trainer.world
    if info.is_main:
        log.info("%s: %s, %d train windows, global batch %d on %d process(es)", v.name, trainer.strategy,
                 len(train), trainer.global_batch_size, info.world_size)  # fmt: skip
    error = None
    try:
        res = trainer.fit()
        history, steps, losses = res.history, res.steps_done, res.losses
    except FloatingPointError as err:  # a diverged run is recorded, not fatal to the other variants
        log.error("%s: %s", v.name, err)
        history, steps, losses, error = [], control.last_step, [], str(err)
    trainer.eval_data = test
    test_loss = trainer.evaluate()
    trainer.eval_data = valid
    valid_loss = trainer.evaluate()
    if not info.is_main:
        return None
    result = {
        "variant": v.name,
        "attention": v.attention,
        "steps": steps,
        "planned_steps": tc.steps,
        "stopped_early": control.stopped_by_time or error is not None,
        "error": error,
        "tokens_seen": steps * tc.batch_size * block,
        "train_seconds": history[-1]["time"] if history else float("nan"),
        "test_ppl": perplexity(test_loss) if error is None else float("nan"),
        "valid_ppl": perplexity(valid_loss) if error is None else float("nan"),
        "test_tokens": len(test) * block,
        "parameters": model.num_parameters(),
        "non_embedding_parameters": model.num_parameters(non_embedding=True),
        "world_size": info.world_size,
        "strategy": trainer.strategy,
        "history": [
            {
                "step": h["step"],
                "train_loss": h["train_loss"],
                "valid_ppl": perplexity(h["eval_loss"]),
                "seconds": h["time"],
                "tokens_per_s": h["tokens_per_s"],
            }
            for h in history
            if h["eval_loss"] is not None
        ],  # fmt: skip
        "losses": losses,
        "settings": run_settings(cfg, vi),
    }
    save_json(result, out_dir / "runs" / f"{v.name}.json")
    return result


# Config fields a run's numbers do not depend on (placement, bookkeeping, the report's gap baseline);
# every other field is recorded with the run and must match for a finished run to be reused.
_PLACEMENT_KEYS = ("out_dir", "workers", "device", "strategy", "gap_low", "gap_high", "variants")
_BOOKKEEPING_KEYS = {"data": ("npz_path",), "train": ("log_every", "checkpoint_every", "keep_last", "max_seconds",
                                                        "eval_batch_size")}  # fmt: skip


def run_settings(cfg: LMConfig, vi: int) -> dict:
    """The settings variant ``vi``'s result depends on (its own variant entry, data, model, training
    recipe, seed, dtype), as saved in ``runs/<name>.json`` and compared before a finished run is reused."""
    d = config_to_dict(cfg)
    out = {k: v for k, v in d.items() if k not in _PLACEMENT_KEYS}
    for section, keys in _BOOKKEEPING_KEYS.items():
        out[section] = {k: v for k, v in d[section].items() if k not in keys}
    out["variant"] = d["variants"][vi]
    return json.loads(json.dumps(out))  # as it reads back from the run's JSON


def stale_runs(cfg: LMConfig, out_dir: Path) -> list[str]:
    """Finished runs under ``out_dir`` recorded with other settings than ``cfg`` gives them (one line
    each, naming the differing keys). Runs saved without their settings (older files) are not checked."""
    problems = []
    for vi, v in enumerate(cfg.variants):
        path = out_dir / "runs" / f"{v.name}.json"
        if not path.exists():
            continue
        saved = json.loads(path.read_text()).get("settings")
        if saved is None:
            continue
        diff = settings_diff(saved, run_settings(cfg, vi))
        if diff:
            problems.append(f"{path} was trained with other settings ({'; '.join(diff)})")
    return problems


def _job(args: tuple[dict, int, str, str, bool]) -> str:
    """Worker entry of ``--workers N`` (one process, one variant, no process group)."""
    cfg_dict, vi, device_name, out_dir, resume = args
    torch.set_num_threads(2)
    setup_logging()
    cfg = config_from_dict(LMConfig, cfg_dict)
    streams = prepare_tokens(cfg)
    run_variant(cfg, vi, streams, torch.device(device_name), Path(out_dir), resume)
    return cfg.variants[vi].name


# ------------------------------------------------------------------------------------- report
def gap_closed(ppl: float, low: float, high: float) -> float:
    """Share of the ``low -> high`` perplexity gap closed by ``ppl`` (1.0 = matches ``high``)."""
    return (low - ppl) / (low - high) + 0.0 if low != high else float("nan")  # + 0.0: no "-0.0%"


def common_step_gap(cfg: LMConfig, results: list[dict]) -> tuple[int | None, dict[str, tuple[float, float]]]:
    """Validation perplexity of every variant at the last logged step they all reached, and the gap
    closed there: ``(step, {variant: (valid_ppl, gap)})``; ``(None, {})`` without a common step."""
    curves = {r["variant"]: {h["step"]: h["valid_ppl"] for h in r["history"]} for r in results}
    common = set.intersection(*(set(c) for c in curves.values())) if curves else set()
    if not common:
        return None, {}
    step = max(common)
    low, high = curves.get(cfg.gap_low, {}).get(step), curves.get(cfg.gap_high, {}).get(step)
    out = {}
    for name, c in curves.items():
        gap = gap_closed(c[step], low, high) if low is not None and high is not None else float("nan")
        out[name] = (c[step], gap)
    return step, out


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def render_report(cfg: LMConfig, results: list[dict], env: dict, command: str, data_info: str) -> str:
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
                f"{r['test_ppl']:.2f}" if r.get("error") is None else "diverged",
                f"{r['valid_ppl']:.2f}",
                _pct(gap),
                f"{r['steps']}/{r['planned_steps']}",
                f"{r['tokens_seen'] / 1e6:.2f}M",
                f"{r['train_seconds']:.0f}",
            ]
        )
    table = markdown_table(
        ["attention", "test ppl", "valid ppl", f"gap {cfg.gap_low}->{cfg.gap_high} closed", "steps", "tokens", "s"],
        rows,
    )
    step, at = common_step_gap(cfg, results)
    equal = []
    if step is not None:
        equal = [
            f"Validation perplexity at step {step}, the last logged step every variant reached:",
            "",
            markdown_table(
                ["attention", f"valid ppl @ {step}", "gap closed"],
                [[name, f"{ppl:.2f}", _pct(gap)] for name, (ppl, gap) in at.items()],
            ),
            "",
        ]
    errors = [f"- {r['variant']}: {r['error']}" for r in results if r.get("error")]
    m = cfg.model
    params = results[0]["parameters"] if results else 0
    nonemb = results[0]["non_embedding_parameters"] if results else 0
    procs = sorted({r.get("world_size", 1) for r in results})
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
            f"{params / 1e6:.1f}M parameters ({nonemb / 1e6:.1f}M without the embedding) for the first variant.",
            f"Training (hedgehog_attention.train.Trainer, {'/'.join(map(str, procs))} process(es)): AdamW lr "
            f"{cfg.train.lr}, wd {cfg.train.weight_decay}, betas {cfg.train.betas}, warmup {cfg.train.warmup_steps} + "
            f"cosine to {cfg.train.min_lr_ratio} x lr, global batch {cfg.train.batch_size} x {cfg.data.block_size} "
            f"tokens, {cfg.dtype}, seed {cfg.seed}; one run per attention.",
            "",
            table,
            "",
            "Gap closed = (ppl[1+ELU] - ppl[x]) / (ppl[1+ELU] - ppl[softmax]) on the test split (paper, 125M on "
            "WikiText-103: Hedgehog 68.6%).",
            "",
            *equal,
            *(["Runs that failed:", "", *errors, ""] if errors else []),
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
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hedgehog lm", description=__doc__.split("\n\n")[0])
    add_training_arguments(
        p, config_help="YAML/JSON file of LMConfig (configs/lm.yaml)", strategies="auto | none | ddp | fsdp"
    )
    p.add_argument("--prepare-data", metavar="NPZ", help="write the token streams to NPZ and exit")
    return p


def _train_all(cfg: LMConfig, todo: list[int], streams: dict, device: torch.device, out_dir: Path, resume: bool):
    if cfg.workers > 1 and len(todo) > 1:
        if world_info().distributed:
            raise ValueError("workers > 1 runs variants in separate processes; under torchrun set workers: 1")
        import multiprocessing as mp

        jobs = [(config_to_dict(cfg), i, str(device), str(out_dir), resume) for i in todo]
        with mp.get_context("spawn").Pool(min(cfg.workers, len(jobs))) as pool:
            for name in pool.imap_unordered(_job, jobs):
                log.info("done %s", name)
    else:
        for i in todo:
            run_variant(cfg, i, streams, device, out_dir, resume)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = load_config_from_cli(LMConfig, args, TRAINING_SHORTCUTS)
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
    info = init_distributed(device=device)  # no-op outside torchrun
    try:
        return _main(cfg, args, argv, out_dir, device, info.is_main)
    finally:
        cleanup_distributed()


def _main(cfg: LMConfig, args: argparse.Namespace, argv: list[str] | None, out_dir: Path, device: torch.device,
          is_main: bool) -> int:  # fmt: skip
    stale = stale_runs(cfg, out_dir)
    if stale:  # reusing them would report their numbers under this config's settings
        for line in stale:
            log.error("%s; use another --out, or delete the file to retrain it", line)
        return 2
    env = environment_info(device) | {"processes": world_info().world_size}
    command = ("hedgehog lm " + " ".join(argv if argv is not None else [])).strip()
    env, command = record_run(cfg, out_dir, env, command, report_only=args.report_only, is_main=is_main)
    streams = prepare_tokens(cfg)
    data_info = (
        f"{cfg.data.source} token streams: "
        + ", ".join(f"{k} {len(v) / 1e6:.2f}M tokens" for k, v in streams.items())
        + " (GPT-2 tokenizer, document-level split)"
    )
    todo = [i for i, v in enumerate(cfg.variants) if not (out_dir / "runs" / f"{v.name}.json").exists()]
    barrier()  # every rank has looked for finished runs before rank 0 writes new ones
    if not args.report_only and todo:
        _train_all(cfg, todo, streams, device, out_dir, args.resume)
    if not is_main:
        return 0
    results = [
        json.loads((out_dir / "runs" / f"{v.name}.json").read_text())
        for v in cfg.variants
        if (out_dir / "runs" / f"{v.name}.json").exists()
    ]
    if not results:
        log.error("no finished runs under %s", out_dir)
        return 1
    plot_curves(results, out_dir / "lm_curves.png")
    md = render_report(cfg, results, env, command, data_info)
    (out_dir / "lm.md").write_text(md)
    save_json({"results": results, "environment": env, "data": data_info}, out_dir / "results.json")
    print(md)
    return 0
