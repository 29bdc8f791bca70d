"""Finetuning after the swap: full or LoRA (peft), next-token or classification loss.

LoRA adapters go on the attention projections that the converted layers reuse (they live inside
``LinearizedAttention.original``, so the converted layers train through them). After training the
adapters are merged back (``merge_and_unload``), leaving a plain converted model that
:func:`~hedgehog_attention.convert.save_linearized` can write.

Training runs on :class:`hedgehog_attention.train.Trainer`: one process, or DDP/FSDP under
``torchrun`` (the rows of the batches sharded over the processes, the same global batch), with
atomic checkpoints and exact resume when the config names a ``checkpoint_dir``.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import available_adapters, feature_map_parameters, find_targets, linearized_modules
from .config import FinetuneConfig

__all__ = ["FinetuneResult", "evaluate_loss", "finetune"]

Batch = dict[str, torch.Tensor]


@dataclass
class FinetuneResult:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_loss_before: float = math.nan
    eval_loss_after: float = math.nan
    eval_accuracy_before: float = math.nan
    eval_accuracy_after: float = math.nan
    trainable_parameters: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    dev = _device(model)
    batch = {k: v.to(dev) for k, v in batch.items()}
    if "labels" not in batch:
        raise ValueError("finetuning batches need 'labels' (token ids for lm, class ids for classification)")
    out = model(**batch, use_cache=False) if hasattr(model, "generate") else model(**batch)
    return out.loss, out.logits


def _loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The Trainer's ``loss_fn``: the (possibly DDP-wrapped) model's own task loss."""
    from ..train import unwrap_model

    if "labels" not in batch:
        raise ValueError("finetuning batches need 'labels' (token ids for lm, class ids for classification)")
    out = model(**batch, use_cache=False) if hasattr(unwrap_model(model), "generate") else model(**batch)
    return out.loss


def _loss_terms(batch: Batch, task: str) -> int:
    """How many terms the model's mean loss averages over: sequences (classification) or predicted
    tokens (lm: labels after the one-token shift, ``-100`` ignored, as HF's causal-LM loss)."""
    labels = batch["labels"]
    if task == "classification":
        return len(labels)
    return int((labels[..., 1:] != -100).sum())


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Sequence[Batch], task: str) -> tuple[float, float]:
    """Mean loss over every sequence (classification) or predicted token (lm) of ``batches``, each
    batch's mean weighted by its count (a short last batch is not over-weighted), and
    (classification) accuracy."""
    was = model.training
    model.eval()
    total, n, correct, count = 0.0, 0, 0, 0
    for b in batches:
        loss, logits = _loss(model, b)
        terms = _loss_terms(b, task)
        if terms:
            total += loss.item() * terms
            n += terms
        if task == "classification":
            correct += int((logits.argmax(-1).cpu() == b["labels"]).sum())
            count += len(b["labels"])
    model.train(was)
    return (total / n if n else math.nan), (correct / count if count else math.nan)


def finetune(
    model: nn.Module,
    train_batches: Sequence[Batch],
    eval_batches: Sequence[Batch] | None = None,
    config: FinetuneConfig | None = None,
    *,
    progress: bool = True,
    evaluate_before: bool = True,
) -> tuple[nn.Module, FinetuneResult]:
    """Finetune a (linearized or original) model on a task loss; returns ``(model, result)``.

    ``model(**batch)`` must return ``.loss`` (a ``*ForCausalLM`` with ``labels`` = token ids, or
    a ``*ForSequenceClassification`` with class ``labels``). With ``method="lora"`` the returned
    model has the adapters merged in.
    """
    cfg = config or FinetuneConfig()
    res = FinetuneResult()
    t0 = time.perf_counter()
    eval_batches = list(eval_batches or [])
    if eval_batches and evaluate_before:
        res.eval_loss_before, res.eval_accuracy_before = evaluate_loss(model, eval_batches, cfg.task)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_targets
        if targets is None:
            converted = linearized_modules(model)
            if converted:
                adapter = available_adapters()[converted[0][1].architecture]
            else:
                adapter, _ = find_targets(model)
            targets = list(adapter.lora_targets)
        heads = [n for n in ("classifier", "score") if hasattr(model, n)] if cfg.task == "classification" else []
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            modules_to_save=heads or None,
        )
        # the adapters' initialisation (LoRA A is random) follows cfg.seed, as the config promises,
        # not whatever the global RNG happens to hold (this block leaves that RNG as it found it)
        dev = _device(model)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.random.default_generator.manual_seed(cfg.seed)
            if dev.type == "cuda":
                with torch.cuda.device(dev):
                    torch.cuda.manual_seed(cfg.seed)
            peft_model = get_peft_model(model, lora)
        if cfg.train_feature_maps:
            for p in feature_map_parameters(peft_model):
                p.requires_grad_(True)
        trained = peft_model
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        if not cfg.train_feature_maps:
            for p in feature_map_parameters(model):
                p.requires_grad_(False)
        trained = model
    params = [p for p in trained.parameters() if p.requires_grad]
    res.trainable_parameters = sum(p.numel() for p in params)
    trained.train()
    if cfg.steps > 0:
        from ..train import TrainConfig, Trainer, gather_fsdp_model, world_info
        from .data import BatchRows, pad_collate
        from .distill import global_batch

        rows = BatchRows(list(train_batches))
        if not len(rows):
            raise ValueError("no training batches")
        _, micro = global_batch(cfg.batch_size, len(rows), world_info().world_size)
        tcfg = TrainConfig(
            max_steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, micro_batch_size=micro,
            max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, progress=progress, progress_desc="finetune",
            strategy=cfg.strategy,
            checkpoint_dir=cfg.checkpoint_dir, checkpoint_every=cfg.checkpoint_every, resume=cfg.resume,
            device=str(_device(trained)), log_every=cfg.log_every,
            # full finetuning may leave parameters without a gradient (a pooler, an unused head)
            find_unused_parameters=cfg.method == "full",
        )  # fmt: skip
        trainer = Trainer(trained, _loss_fn, rows, None, tcfg, params=params, collate_fn=pad_collate)
        tres = trainer.fit()
        if trainer.strategy == "fsdp":
            gather_fsdp_model(trained)  # full tensors again for evaluation, merging and saving
        del trainer
        gc.collect()  # drop the DDP reducer (and its gradient hooks) before the model trains again
        res.steps, res.train_loss = list(range(1, len(tres.losses) + 1)), list(tres.losses)
        res.history, res.resumed_from = list(tres.history), tres.resumed_from
    trained.eval()
    if cfg.method == "lora":
        model = trained.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    if eval_batches:
        res.eval_loss_after, res.eval_accuracy_after = evaluate_loss(model, eval_batches, cfg.task)
    res.seconds = time.perf_counter() - t0
    return model, res
