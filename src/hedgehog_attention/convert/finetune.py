"""Finetuning after the swap: full or LoRA (peft), next-token or classification loss.

LoRA adapters go on the attention projections that the converted layers reuse (they live inside
``LinearizedAttention.original``, so the converted layers train through them). After training the
adapters are merged back (``merge_and_unload``), leaving a plain converted model that
:func:`~hedgehog_attention.convert.save_linearized` can write.

The loop is :func:`train_steps`, a small function meant to be swapped for the project's
``hedgehog_attention.train.Trainer`` when runs need DDP/FSDP, checkpoints and resume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import available_adapters, feature_map_parameters, find_targets, linearized_modules
from .config import FinetuneConfig

__all__ = ["FinetuneResult", "evaluate_loss", "finetune", "train_steps"]

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


def train_steps(
    params: Sequence[nn.Parameter],
    batches: Sequence[Batch],
    loss_fn: Callable[[Batch], torch.Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "finetune",
) -> tuple[list[int], list[float]]:
    """AdamW over ``params`` for ``steps`` steps, cycling through ``batches`` in a seeded order."""
    from tqdm.auto import tqdm

    if not batches:
        raise ValueError("no training batches")
    opt = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    hist_s, hist_l = [], []
    for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        if not order:
            order = torch.randperm(len(batches), generator=gen).tolist()
        loss = loss_fn(batches[order.pop()])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"finetuning loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist_s.append(step)
        hist_l.append(loss.item())
    return hist_s, hist_l


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Sequence[Batch], task: str) -> tuple[float, float]:
    """Mean loss and (classification) accuracy over ``batches``."""
    was = model.training
    model.eval()
    total, n, correct, count = 0.0, 0, 0, 0
    for b in batches:
        loss, logits = _loss(model, b)
        total += loss.item()
        n += 1
        if task == "classification":
            correct += int((logits.argmax(-1).cpu() == b["labels"]).sum())
            count += len(b["labels"])
    model.train(was)
    return total / max(n, 1), (correct / count if count else math.nan)


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
    res.steps, res.train_loss = train_steps(
        params,
        list(train_batches),
        lambda b: _loss(trained, b)[0],
        steps=cfg.steps,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        progress=progress,
    )
    trained.eval()
    if cfg.method == "lora":
        model = trained.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    if eval_batches:
        res.eval_loss_after, res.eval_accuracy_after = evaluate_loss(model, eval_batches, cfg.task)
    res.seconds = time.perf_counter() - t0
    return model, res
