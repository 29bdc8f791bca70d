"""Training engine: one loop for one process and for ``torchrun`` (DDP or FSDP2), with exact resume.

The same :class:`Trainer` runs the distill and finetune stages of ``hedgehog linearize``
(``convert.distill`` / ``convert.finetune``). Launch it as a plain script (one process) or under ``torchrun``::

    torchrun --nproc_per_node=2 -m hedgehog_attention.cli linearize ...

Under ``torchrun`` the environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` select the
process group (nccl on CUDA, gloo on CPU); the model is wrapped in DDP (``strategy="ddp"`` or
``"auto"`` with several processes) or sharded with FSDP2 ``fully_shard`` (``strategy="fsdp"``).

Semantics (what the tests check):

* Global batch = ``micro_batch_size * grad_accum_steps * world_size`` samples per optimizer step.
  Each step takes the next global batch from one seeded, epoch-aware permutation of the dataset and
  splits it into equal micro-batches, so the samples of a step do not depend on how they are spread
  over processes and accumulation: 1 process x accumulation 2 and 2 processes x accumulation 1 see
  the same samples and (for a loss that is a mean over the micro-batch) the same gradient. The last
  incomplete global batch of an epoch is dropped.
* ``loss_fn(model, batch)`` returns the micro-batch mean loss (or ``(loss, metrics)``); the trainer
  divides it by ``grad_accum_steps``, DDP/FSDP average over processes.
* Checkpoints hold the trainable state (or the full state dict), optimizer, LR schedule, RNG states
  of every rank, step, data position (epoch, step in epoch), early-stopping state, history and the
  config; ``resume=True`` continues from the newest valid one and reaches the same result as an
  uninterrupted run with the same seed.
* A non-finite loss raises :class:`FloatingPointError` naming the step, on every rank, before the
  optimizer step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import checkpoint as ckpt

logger = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainerCallback",
    "LossModule",
    "WorldInfo",
    "barrier",
    "call_model",
    "cleanup_distributed",
    "gather_fsdp_model",
    "init_distributed",
    "is_main_process",
    "rank0_print",
    "unwrap_model",
    "world_info",
]


# --------------------------------------------------------------------------------------------------
# torch.distributed helpers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_INITIALIZED_BY_US = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def world_info() -> WorldInfo:
    """Rank, world size and local rank: from the process group when initialized, else torchrun's env."""
    if dist.is_available() and dist.is_initialized():
        return WorldInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return WorldInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def init_distributed(backend: str | None = None, *, device: str | torch.device | None = None) -> WorldInfo:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Does nothing without those variables (a plain single-process run) or when the group already
    exists. Args: ``backend`` defaults to ``nccl`` when CUDA is available (and ``device`` is not
    CPU), else ``gloo``. On CUDA the current device is set to ``cuda:LOCAL_RANK``.
    """
    global _INITIALIZED_BY_US
    info = world_info()
    if dist.is_initialized() or "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return info
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", info.local_rank)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size, **kwargs)
    _INITIALIZED_BY_US = True
    return world_info()


def cleanup_distributed() -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    global _INITIALIZED_BY_US
    if _INITIALIZED_BY_US and dist.is_initialized():
        # DDP wrappers caught in reference cycles (reducer hooks) keep the process group alive past
        # destroy_process_group; freed later, at interpreter exit, their gloo work can abort the
        # process ("terminate called without an active exception", seen in CI on a rank that
        # returned early). Collect them now, while the group and the interpreter are whole.
        gc.collect()
        # Then wait for every rank: a gloo rank that tears down while a peer is still working (e.g.
        # rank 0 writing a report) can abort the same way.
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()
    _INITIALIZED_BY_US = False


def is_main_process() -> bool:
    return world_info().rank == 0


def rank0_print(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (for CLI output; library code logs through ``logging``)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    """``dist.barrier()`` when a process group exists, else nothing."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_fsdp_model(model: nn.Module) -> nn.Module:
    """After FSDP2 training: all-gather every sharded module of ``model`` and keep it gathered, so
    that plain code (evaluation, a feature map called outside a forward, ``save_pretrained``) sees
    full ordinary tensors on every rank. Costs the whole model's parameters on each rank (no
    gradients or optimizer state). Collective: every rank calls it. A no-op for unsharded models."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_reshard_after_forward(False)
            m.unshard()
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, so there is nothing to unwrap)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


class LossModule(nn.Module):
    """Make ``fn(module, batch) -> loss`` the forward of a module, so DDP/FSDP wrap the loss itself.

    For training that runs no model forward per step, e.g. feature maps distilled on cached
    teacher ``q, k``: ``Trainer(LossModule(maps, cached_eq3_loss), call_model, ...)`` with
    ``call_model = lambda m, batch: m(batch)``. ``module`` holds every parameter the loss touches
    (an ``nn.ModuleDict`` of the maps, say); its state-dict keys get the prefix ``module.``.
    """

    def __init__(self, module: nn.Module, fn: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, batch: Any) -> Any:
        return self.fn(self.module, batch)


def call_model(model: nn.Module, batch: Any) -> Any:
    """The ``loss_fn`` for a model whose forward returns the loss (e.g. a :class:`LossModule`)."""
    return model(batch)


# --------------------------------------------------------------------------------------------------
# Config and result
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyperparameters and engine settings of :class:`Trainer` (defaults: App. C.2 distillation)."""

    max_steps: int
    """optimizer steps to run (steps, not epochs; the data loops over epochs as needed)"""
    lr: float = 1e-2
    weight_decay: float = 0.0
    decay_matrices_only: bool = False
    """apply weight_decay only to parameters with >= 2 dims (biases and norm gains get none: the
    GPT-2/nanoGPT convention the from-scratch experiments use)"""
    betas: tuple[float, float] = (0.9, 0.999)
    micro_batch_size: int = 8
    """samples per forward, per process"""
    grad_accum_steps: int = 1
    """global batch = micro_batch_size * grad_accum_steps * world_size"""
    max_grad_norm: float | None = 1.0
    """clip the global gradient norm; None disables clipping"""
    scheduler: Literal["constant", "cosine", "plateau"] = "constant"
    """cosine decays to min_lr_ratio*lr at max_steps; plateau multiplies lr by plateau_factor after
    more than plateau_patience evals without improvement (eval loss; train loss without eval data)"""
    warmup_steps: int = 0
    """linear warmup from lr/warmup_steps, for every scheduler"""
    eval_every: int = 50
    early_stopping_patience: int | None = None
    """stop after this many evals without eval-loss improvement (None: never; with restore_best the
    eval before the first step is the first best)"""
    checkpoint_every: int | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    """continue from the newest valid checkpoint in checkpoint_dir (starts fresh if there is none)"""
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    """tqdm progress bar on rank 0"""
    progress_desc: str = "train"
    """label of the progress bar"""
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """auto: ddp with several processes, none with one; fsdp: FSDP2 fully_shard"""
    num_workers: int = 0
    # ---- additions beyond the API (all optional) ----
    min_lr_ratio: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    shuffle: bool = True
    keep_last: int | None = 2
    """checkpoints kept on disk (None: all)"""
    full_state_dict: bool = False
    """checkpoint every parameter and buffer, not just the trainable parameters (+ buffers)"""
    eval_batch_size: int | None = None
    """per-process eval batch size (default: micro_batch_size)"""
    device: str | None = None
    """default (and for plain "cuda"): cuda:LOCAL_RANK when CUDA is available, else cpu"""
    autocast: Literal["none", "bf16"] = "none"
    """run loss_fn under torch.autocast(bfloat16) (parameters and optimizer state stay in their dtype)"""
    find_unused_parameters: bool = False
    """DDP: set when some trainable parameters get no gradient in a step"""
    pin_memory: bool | None = None
    """DataLoader pin_memory; None: on CUDA devices (set False for data that already lives on the GPU)"""
    restore_best: bool = False
    """at the end, load the trainable state of the best eval (needs eval_data; the copy is kept on CPU
    on every rank and goes into checkpoints, so resume restores the same one). A fresh run also
    evaluates the state before the first step (history row of step 0, best_step 0 if nothing beats
    it), so training that only makes the eval loss worse ends where it started"""
    early_stopping_min_delta: float = 0.0
    """an eval improves (new best, patience reset) only when it beats the best by more than this"""
    train_mode: bool = True
    """put the module in train mode for the steps (dropout on); False keeps it in eval mode, e.g. to
    distill against a deterministic frozen teacher"""

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)  # from JSON
        checks = [
            (self.max_steps >= 1, "max_steps must be >= 1", self.max_steps),
            (self.lr > 0, "lr must be > 0", self.lr),
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1", self.micro_batch_size),
            (self.grad_accum_steps >= 1, "grad_accum_steps must be >= 1", self.grad_accum_steps),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0", self.warmup_steps),
            (self.eval_every >= 1, "eval_every must be >= 1", self.eval_every),
            (self.log_every >= 1, "log_every must be >= 1", self.log_every),
            (self.num_workers >= 0, "num_workers must be >= 0", self.num_workers),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or None",
             self.max_grad_norm),
            (self.checkpoint_every is None or self.checkpoint_every >= 1, "checkpoint_every must be >= 1 or None",
             self.checkpoint_every),
            (self.keep_last is None or self.keep_last >= 1, "keep_last must be >= 1 or None", self.keep_last),
            (self.early_stopping_patience is None or self.early_stopping_patience >= 1,
             "early_stopping_patience must be >= 1 or None", self.early_stopping_patience),
            (0 < self.plateau_factor < 1, "plateau_factor must be in (0, 1)", self.plateau_factor),
            (self.plateau_patience >= 0, "plateau_patience must be >= 0", self.plateau_patience),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]", self.min_lr_ratio),
            (self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size must be >= 1 or None",
             self.eval_batch_size),
            (self.early_stopping_min_delta >= 0, "early_stopping_min_delta must be >= 0",
             self.early_stopping_min_delta),
        ]  # fmt: skip
        for ok, msg, got in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg} (got {got!r})")
        for name, valid in (
            ("scheduler", ("constant", "cosine", "plateau")),
            ("strategy", ("auto", "none", "ddp", "fsdp")),
            ("autocast", ("none", "bf16")),
        ):
            if getattr(self, name) not in valid:
                raise ValueError(f"TrainConfig: {name} must be one of {valid} (got {getattr(self, name)!r})")
        if (self.checkpoint_every is not None or self.resume) and not self.checkpoint_dir:
            raise ValueError(
                "TrainConfig: checkpoint_every/resume need checkpoint_dir "
                f"(got checkpoint_every={self.checkpoint_every}, resume={self.resume}, checkpoint_dir=None)"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Strict: unknown keys raise (a typo must not be ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    """rows at log/eval steps: step, train_loss (mean since the previous row), eval_loss (or None),
    lr, tokens (cumulative, all processes), time (s since start, resumed runs included), tokens_per_s;
    with restore_best a fresh run starts with the eval before training: step 0, train_loss and lr None"""
    best_eval_loss: float | None = None
    steps_done: int = 0
    stopped_early: bool = False
    losses: list[float] = field(default_factory=list)
    """the global training loss of every step (mean over the global batch)"""
    resumed_from: int | None = None
    """step of the checkpoint this run resumed from (None for a fresh run)"""
    best_step: int | None = None
    """step of best_eval_loss (with restore_best, the state the model ends in)"""


class TrainerCallback:
    """Hooks, all optional; every rank calls them. Set ``trainer.should_stop = True`` to stop."""

    def on_train_begin(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None: ...
    def on_eval(self, trainer: Trainer, step: int, eval_loss: float) -> None: ...
    def on_checkpoint(self, trainer: Trainer, step: int, path: str | None) -> None: ...
    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None: ...


# --------------------------------------------------------------------------------------------------
# LR schedule (one object for warmup x {constant, cosine, plateau}, with a plain state dict)
# --------------------------------------------------------------------------------------------------


class LRSchedule:
    """lr(step) = base * warmup(step) * {1 | cosine(step) | plateau_scale}.

    Written out rather than chaining ``torch.optim.lr_scheduler`` classes because warmup must
    compose with ReduceLROnPlateau (which the chained schedulers do not allow) and the whole
    schedule must round-trip through one small state dict for exact resume.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.plateau_scale = 1.0
        self.plateau_best = math.inf
        self.plateau_bad = 0

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        c = self.cfg
        factor = (step + 1) / c.warmup_steps if step < c.warmup_steps else 1.0
        if c.scheduler == "cosine" and step >= c.warmup_steps:
            progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
            factor *= c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        elif c.scheduler == "plateau":
            factor *= self.plateau_scale
        return c.lr * factor

    def observe(self, value: float) -> None:
        """Plateau: feed one monitored value (eval loss); other schedules ignore it."""
        if self.cfg.scheduler != "plateau":
            return
        if value < self.plateau_best * (1 - 1e-4):  # relative threshold, as ReduceLROnPlateau's default
            self.plateau_best, self.plateau_bad = value, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > self.cfg.plateau_patience:
                self.plateau_scale *= self.cfg.plateau_factor
                self.plateau_bad = 0

    def state_dict(self) -> dict[str, float]:
        return {"plateau_scale": self.plateau_scale, "plateau_best": self.plateau_best, "plateau_bad": self.plateau_bad}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.plateau_scale = float(state["plateau_scale"])
        self.plateau_best = float(state["plateau_best"])
        self.plateau_bad = int(state["plateau_bad"])


# --------------------------------------------------------------------------------------------------
# Data: deterministic, rank-sharded, resumable
# --------------------------------------------------------------------------------------------------


class GlobalBatchSampler:
    """Yields this rank's micro-batches (lists of indices) for one epoch, from a given step on.

    Epoch ``e`` uses the permutation ``randperm(n, generator=seed + e)`` (identity without shuffle).
    Global step ``s`` of the epoch takes ``perm[s*G:(s+1)*G]`` (``G`` = global batch), split into
    ``grad_accum_steps * world_size`` micro-batches; micro-step ``a`` of rank ``r`` takes chunk
    ``a * world_size + r``. The split depends on nothing but the step, so resuming at
    ``(epoch, start_step)`` yields exactly the samples an uninterrupted run would.
    """

    def __init__(self, n: int, *, micro: int, accum: int, world: int, rank: int, seed: int, epoch: int,
                 start_step: int = 0, shuffle: bool = True) -> None:  # fmt: skip
        self.n, self.micro, self.accum, self.world, self.rank = n, micro, accum, world, rank
        self.seed, self.epoch, self.start_step, self.shuffle = seed, epoch, start_step, shuffle

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        G = self.global_batch
        for s in range(self.start_step, self.steps_per_epoch):
            batch = perm[s * G : (s + 1) * G]
            for a in range(self.accum):
                j = a * self.world + self.rank
                yield batch[j * self.micro : (j + 1) * self.micro]


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested dict/list/tuple/namedtuple) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _count_tokens(batch: Any) -> int:
    """Tokens in a micro-batch: attention_mask sum, else input_ids numel, else B*T of a 2-D+ tensor, else B."""
    if isinstance(batch, Mapping):
        if isinstance(batch.get("attention_mask"), torch.Tensor):
            return int(batch["attention_mask"].sum())
        if isinstance(batch.get("input_ids"), torch.Tensor):
            return batch["input_ids"].numel()
        batch = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] * batch.shape[1] if batch.ndim >= 2 else batch.shape[0]
    return 0


# --------------------------------------------------------------------------------------------------
# RNG state (plain containers so checkpoints load with weights_only=True)
# --------------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    """RNG states as bytes/ints only: loadable with weights_only=True and safe for all_gather_object
    (which fails on tensors inside objects in torch 2.13: "UntypedStorage has no attribute dtype")."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].astype(np.uint32).tobytes(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state().numpy().tobytes(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return state


def _bytes_to_u8(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.frombuffer(n[1], dtype=np.uint32).copy(), n[2], n[3], n[4]))
    torch.set_rng_state(_bytes_to_u8(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_to_u8(state["cuda"]))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# Fields that may differ between a run and its resumption without changing the result.
_RESUME_NEUTRAL = {"resume", "progress", "log_every", "num_workers", "checkpoint_dir", "checkpoint_every", "keep_last",
                   "max_steps", "device", "strategy", "micro_batch_size", "grad_accum_steps", "pin_memory",
                   "progress_desc"}  # fmt: skip


def _config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (checkpoint's value, current value)} for fields that change the trajectory.
    (max_steps matters only to the cosine schedule; the batch split is checked as the global batch.)"""
    neutral = set(_RESUME_NEUTRAL)
    if new.get("scheduler") == "cosine":
        neutral.discard("max_steps")
    return {k: (old.get(k), v) for k, v in new.items() if k not in neutral and old.get(k) != v}


def _fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """Children of the outermost ``nn.ModuleList``s that hold parameters (FSDP2 units).

    A ModuleList nested inside a chosen block is left to that block's unit: FSDP2 must shard
    children before parents, and one level of units (the layers) is what saves memory.
    """
    blocks: list[nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name == t or name.startswith(t + ".") for t in taken):
            continue
        if isinstance(module, nn.ModuleList):
            for i, block in enumerate(module):
                if any(True for _ in block.parameters()):
                    blocks.append(block)
                    taken.append(f"{name}.{i}" if name else str(i))
    return blocks


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


LossFn = Callable[[nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, dict]"]


class Trainer:
    """Train ``params`` of ``model`` on ``loss_fn`` over ``train_data``; one process or torchrun.

    Args:
        model: the module; frozen parts (a teacher, a base model) keep ``requires_grad=False``.
        loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, metrics)``; ``loss`` is the scalar mean
            over the micro-batch. ``model`` is the *wrapped* module (DDP): call it, ``model(...)``, so
            DDP syncs gradients; :func:`unwrap_model` gives the original for attribute access.
            ``batch`` is the collated micro-batch already moved to the trainer's device.
        train_data: map-style dataset (``len`` and ``__getitem__``).
        eval_data: optional map-style dataset; eval loss is the sample-weighted mean of ``loss_fn``
            over all of it, computed on every rank (each takes a strided shard) and all-reduced.
        config: :class:`TrainConfig`.
        params: parameters to train (default: every parameter with ``requires_grad``). Must belong to
            ``model``; others are never in the optimizer. When given, every other parameter of
            ``model`` is set to ``requires_grad=False`` (so DDP/FSDP never reduce its gradients).
        collate_fn: passed to the ``DataLoader`` (default: torch's default collate).
        callbacks: :class:`TrainerCallback` instances.

    Call :func:`init_distributed` first under torchrun (the constructor does it if needed).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_data: Dataset,
        eval_data: Dataset | None,
        config: TrainConfig,
        *,
        params: Iterable[nn.Parameter] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> None:
        self.config = config
        self.loss_fn = loss_fn
        self.train_data = train_data
        self.eval_data = eval_data
        self.collate_fn = collate_fn
        self.callbacks = list(callbacks)
        self.should_stop = False

        self.world = init_distributed(device=config.device)
        if config.device is not None:
            self.device = torch.device(config.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda")
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda":
            if self.device.index is None:  # plain "cuda": this process's GPU, not everyone on cuda:0
                self.device = torch.device("cuda", self.world.local_rank)
            torch.cuda.set_device(self.device)
        strategy = config.strategy
        if strategy == "auto":
            strategy = "ddp" if self.world.distributed else "none"
        if strategy == "none" and self.world.distributed:
            raise ValueError(
                f"TrainConfig.strategy='none' with world_size={self.world.world_size}: every process would train "
                "its own copy; use strategy='auto', 'ddp' or 'fsdp' under torchrun"
            )
        if strategy in ("ddp", "fsdp") and not dist.is_initialized():
            raise RuntimeError(
                f"strategy={strategy!r} needs a process group: launch with torchrun (which sets RANK/WORLD_SIZE) "
                "or call torch.distributed.init_process_group first"
            )
        self.strategy = strategy

        n = len(train_data)  # type: ignore[arg-type]
        gb = config.micro_batch_size * config.grad_accum_steps * self.world.world_size
        if n < gb:
            raise ValueError(
                f"train_data has {n} samples, fewer than one global batch of {gb} "
                f"(micro_batch_size={config.micro_batch_size} x grad_accum_steps={config.grad_accum_steps} x "
                f"world_size={self.world.world_size}); lower micro_batch_size or grad_accum_steps"
            )
        self.global_batch_size = gb
        if eval_data is not None and len(eval_data) == 0:  # type: ignore[arg-type]
            raise ValueError("eval_data is empty; pass None to train without evaluation")
        if config.restore_best and eval_data is None:
            raise ValueError("TrainConfig.restore_best needs eval_data (the best state is chosen on eval loss)")
        self._best_state: dict[str, torch.Tensor] | None = None
        self.steps_per_epoch = n // gb

        # Which parameters train: by name, so they survive wrapping (FSDP2 swaps Parameter objects).
        name_of = {id(p): name for name, p in model.named_parameters()}
        chosen = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        chosen = list({id(p): p for p in chosen}.values())  # a parameter listed twice is still stepped once
        missing = [p for p in chosen if id(p) not in name_of]
        if missing:
            raise ValueError(f"{len(missing)} of the given params are not parameters of the model")
        if not chosen:
            raise ValueError("nothing to train: no parameter has requires_grad=True (or params is empty)")
        self.trainable_names = [name_of[id(p)] for p in chosen]
        if params is not None:  # params given: everything else is frozen (so DDP/FSDP skip its grads)
            keep = set(self.trainable_names)
            for name, p in model.named_parameters():
                if name not in keep:
                    p.requires_grad_(False)
                elif not p.requires_grad:
                    p.requires_grad_(True)

        self.model = model
        self.wrapped = self._wrap(model)
        named = dict(self.model.named_parameters())
        self.params = [named[name] for name in self.trainable_names]
        groups: list[dict[str, Any]] | list[nn.Parameter] = self.params
        if config.decay_matrices_only:
            groups = [
                {"params": [p for p in self.params if p.dim() >= 2], "weight_decay": config.weight_decay},
                {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0},
            ]
        self.optimizer = torch.optim.AdamW(
            groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
            foreach=None if self.strategy != "fsdp" else False,  # plain loop over DTensor shards: the safe path
        )  # fmt: skip
        self.schedule = LRSchedule(config)
        self._forward_calls = 0
        if self.strategy == "ddp":
            self.wrapped.register_forward_pre_hook(self._count_forward)

    # ---- setup --------------------------------------------------------------------------------

    def _count_forward(self, *_: Any) -> None:
        # DDP prepares its gradient all-reduce only in a forward run with grad enabled; a forward
        # under torch.no_grad() whose loss is built inside hooks with enable_grad would not sync.
        if torch.is_grad_enabled():
            self._forward_calls += 1

    def _check_replicas_agree(self, step: int) -> None:
        """DDP: every rank must hold the same parameters after a step (bitwise: all-reduced grads,
        same optimizer). Catches gradients that were silently not synchronized."""
        with torch.no_grad():
            mine = torch.stack([p.detach().double().sum() for p in self.params]).to(self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world.world_size)]
        dist.all_gather(everyone, mine)
        if any(not torch.equal(other, everyone[0]) for other in everyone[1:]):
            raise RuntimeError(
                f"DDP replicas diverged after step {step}: the gradients were not synchronized. loss_fn must call "
                "the model it is given (the DDP wrapper), with gradients enabled"
            )

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.strategy == "none":
            return model.to(self.device)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model.to(self.device)
            return DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.config.find_unused_parameters,
                gradient_as_bucket_view=True,  # grads live in the all-reduce buckets: one copy less
            )
        # FSDP2: shard every block of the outermost ModuleLists (the transformer layers), then the
        # root. Per-parameter sharding allows frozen and trainable parameters in one group.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world.world_size,))
        if self.device.type == "cuda":
            model.to(self.device)
        # Unlike DDP, fully_shard does not sync the replicas: each rank keeps its slice of its OWN
        # tensors, so a model initialized from per-rank RNG streams (a randomly initialized feature
        # map created after an earlier fit reseeded each rank) would be a mix. Start from rank 0's.
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)
        for block in _fsdp_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    # ---- state --------------------------------------------------------------------------------

    # Model and optimizer state go through torch.distributed.checkpoint.state_dict for every
    # strategy: full (unsharded) tensors keyed by parameter name (FQN), so a checkpoint written by
    # 2 FSDP ranks resumes on 1 process or under DDP and vice versa (optimizer.state_dict() would
    # key by position, and FSDP's by shard).

    def _sd_options(self, **kw: Any):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # cpu_offload gathers to rank 0 only; it needs a process group, so only under FSDP.
        return StateDictOptions(full_state_dict=True, cpu_offload=self.strategy == "fsdp", **kw)

    def _model_state(self, *, every_rank: bool = False) -> dict[str, torch.Tensor]:
        """Full trainable state (+ buffers) on CPU: on rank 0 only under FSDP unless ``every_rank``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if every_rank:
            opts = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
        else:
            opts = self._sd_options(ignore_frozen_params=not self.config.full_state_dict)
        sd = get_model_state_dict(self.model, options=opts)
        return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}

    def _load_model_state(self, sd: Mapping[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        missing = sorted(set(self.trainable_names) - set(sd))
        if missing:
            raise KeyError(
                f"checkpoint lacks trainable parameters {missing[:5]}{'...' if len(missing) > 5 else ''}: "
                "was it written for another model or another params selection?"
            )
        names = set(self.model.state_dict())
        unexpected = sorted(set(sd) - names)
        if unexpected:
            raise KeyError(f"checkpoint has keys the model lacks: {unexpected[:5]}")
        # Only FSDP needs full_state_dict=True (full tensors -> shards). For a plain or DDP model it is a
        # plain load_state_dict either way, except that torch then probes the device of the model's
        # non-scalar tensors and, with none (every parameter and buffer 0-dim), asks for a process group.
        opts = self._sd_options(strict=False) if self.strategy == "fsdp" else StateDictOptions(strict=False)
        set_model_state_dict(self.model, dict(sd), options=opts)

    def _optim_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=self._sd_options())

    def _load_optim_state(self, sd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # as in _load_model_state: full_state_dict=True only for FSDP (its device probe fails on 0-dim state)
        opts = self._sd_options() if self.strategy == "fsdp" else StateDictOptions()
        set_optimizer_state_dict(self.model, self.optimizer, sd, options=opts)

    def _all_rng_states(self) -> list[dict[str, Any]]:
        mine = _rng_state()
        if not self.world.distributed:
            return [mine]
        gathered: list[Any] = [None] * self.world.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    def save_checkpoint(self, step: int, data_pos: tuple[int, int], extra: dict[str, Any]) -> str | None:
        """Collective: every rank calls it; rank 0 writes. Returns the path on rank 0."""
        cfg = self.config
        model_sd = self._model_state()
        optim_sd = self._optim_state()
        rngs = self._all_rng_states()
        path = None
        if self.world.is_main:
            meta = {
                "step": step,
                "epoch": data_pos[0],
                "step_in_epoch": data_pos[1],
                "world_size": self.world.world_size,
                "global_batch_size": self.global_batch_size,
                "strategy": self.strategy,
                "config": cfg.to_dict(),
                "torch": str(torch.__version__),
            }
            state = {
                "meta": meta,
                "model": model_sd,
                "optimizer": optim_sd,
                "schedule": self.schedule.state_dict(),
                "rng": rngs,
                "trainer": extra,
                "best_model": self._best_state,
            }
            path = str(ckpt.save_checkpoint(cfg.checkpoint_dir, step, state, keep_last=cfg.keep_last))
            logger.info("saved checkpoint %s", path)
        barrier()
        return path

    def _refuse_stale_checkpoints(self) -> None:
        """A fresh run must not write into a folder holding another run's checkpoints: a later
        ``resume`` would continue whichever run has the highest step (an older ``ckpt-100`` outranks
        a new ``ckpt-2``). Rank 0 looks; every rank raises alike."""
        found: list[Any] = [None]
        if self.world.is_main:
            old = ckpt.list_checkpoints(self.config.checkpoint_dir)
            found[0] = [p.name for p in old] or None
        if self.world.distributed:
            dist.broadcast_object_list(found, src=0)
        if found[0]:
            raise FileExistsError(
                f"checkpoint_dir {self.config.checkpoint_dir} already holds checkpoints {found[0]} of an earlier "
                "run: pass resume=True to continue it, or remove them / choose an empty folder for a fresh run"
            )

    def _load_latest(self) -> dict[str, Any] | None:
        """All ranks read the file rank 0 chose (so a corrupted file is judged once)."""
        choice: list[Any] = [None]
        if self.world.is_main:
            found = ckpt.find_latest_valid(self.config.checkpoint_dir)
            choice[0] = None if found is None else str(found[0])
        if self.world.distributed:
            dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return None
        return ckpt.load_checkpoint(choice[0]) | {"path": choice[0]}

    # ---- loop ---------------------------------------------------------------------------------

    def _loader(self, epoch: int, start_step: int) -> DataLoader:
        c = self.config
        sampler = GlobalBatchSampler(
            len(self.train_data), micro=c.micro_batch_size, accum=c.grad_accum_steps,  # type: ignore[arg-type]
            world=self.world.world_size, rank=self.world.rank, seed=c.seed, epoch=epoch,
            start_step=start_step, shuffle=c.shuffle,
        )  # fmt: skip
        # A private generator: DataLoader draws its worker base seed from it, so creating a loader on
        # resume does not consume the global torch RNG (which would break exact resume).
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + epoch * 1009 + self.world.rank)
        return DataLoader(
            self.train_data, batch_sampler=sampler, collate_fn=self.collate_fn, num_workers=c.num_workers,
            pin_memory=self.device.type == "cuda" if c.pin_memory is None else c.pin_memory, generator=gen,
        )  # fmt: skip

    def _micro_batches(self, epoch: int, start_step: int) -> Iterator[tuple[int, int, Any]]:
        """(epoch, step_in_epoch, micro_batch) forever, epoch after epoch."""
        accum = self.config.grad_accum_steps
        while True:
            for i, batch in enumerate(self._loader(epoch, start_step)):
                yield epoch, start_step + i // accum, batch
            epoch, start_step = epoch + 1, 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.autocast == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _call_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.loss_fn(self.wrapped, batch)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TypeError(
                f"loss_fn must return a scalar tensor or (scalar tensor, dict); got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            )
        return loss, metrics

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Sample-weighted mean of ``loss_fn`` over ``eval_data`` (collective under torchrun)."""
        if self.eval_data is None:
            return None
        n = len(self.eval_data)  # type: ignore[arg-type]
        bs = self.config.eval_batch_size or self.config.micro_batch_size
        idx = list(range(self.world.rank, n, self.world.world_size))
        batches = [idx[i : i + bs] for i in range(0, len(idx), bs)]
        # FSDP needs every rank in every forward: a rank with fewer samples repeats sample 0 with weight 0.
        steps = math.ceil(math.ceil(n / self.world.world_size) / bs)
        weights = [len(b) for b in batches] + [0] * (steps - len(batches))
        batches += [[0]] * (steps - len(batches))
        loader = DataLoader(self.eval_data, batch_sampler=batches, collate_fn=self.collate_fn,
                            num_workers=self.config.num_workers)  # fmt: skip
        was_training = self.wrapped.training
        self.wrapped.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # [weighted loss sum, samples]
        for w, batch in zip(weights, loader):
            with self._autocast():
                loss, _ = self._call_loss(_to_device(batch, self.device))
            if w:
                total[0] += loss.double() * w
                total[1] += w
        if self.world.distributed:
            dist.all_reduce(total)
        self.wrapped.train(was_training)
        return (total[0] / total[1]).item()

    def _baseline_eval(self, result: TrainResult, start: float) -> float:
        """restore_best, fresh run: evaluate the state before the first step and make it the best so far.

        Without it a run that only makes the eval loss worse would restore step ``eval_every``'s state,
        worse than not training. Recorded as a history row of step 0 (``train_loss`` and ``lr`` None);
        it is the baseline of early stopping too, but no callback sees it and the plateau schedule does
        not observe it. The RNG is put back, so the steps train exactly as without this eval.
        """
        rng = _rng_state()
        eval_loss = self.evaluate()
        _set_rng_state(rng)
        assert eval_loss is not None
        if not math.isfinite(eval_loss):
            raise FloatingPointError(
                f"eval loss is {eval_loss} at step 0, before training: the eval data makes the loss undefined"
            )
        result.best_eval_loss, result.best_step = eval_loss, 0
        self._best_state = self._model_state(every_rank=True)
        now = time.perf_counter()
        result.history.append({"step": 0, "train_loss": None, "eval_loss": eval_loss, "lr": None, "tokens": 0,
                               "time": now - start, "tokens_per_s": 0.0})  # fmt: skip
        if self.world.is_main:
            logger.info("step 0 (before training) eval_loss %.5g", eval_loss)
        return eval_loss

    def _agree_on_stop(self) -> None:
        """A callback may stop one rank: stop them all (or they would hang). Collective under torchrun."""
        if self.world.distributed:
            flag = torch.tensor([float(self.should_stop)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.should_stop = bool(flag.item())

    def fit(self) -> TrainResult:
        """Run until ``max_steps``, early stopping or ``should_stop``; resumes when ``config.resume``."""
        c = self.config
        result = TrainResult()
        step, epoch, step_in_epoch = 0, 0, 0
        best, bad_evals, time_offset, tokens_total = math.inf, 0, 0.0, 0
        _seed_all(c.seed + self.world.rank)  # rank offset: dropout masks differ across ranks

        if not c.resume and c.checkpoint_every is not None:
            self._refuse_stale_checkpoints()
        state = self._load_latest() if c.resume else None
        if state is not None:
            meta = state["meta"]
            if meta["global_batch_size"] != self.global_batch_size:
                warnings.warn(
                    f"resuming with global batch {self.global_batch_size} (the checkpoint used "
                    f"{meta['global_batch_size']}): the data order differs from the original run",
                    RuntimeWarning, stacklevel=2,
                )  # fmt: skip
            changed = _config_changes(meta["config"], c.to_dict())
            old_max, old_every = meta["config"]["max_steps"], meta["config"]["eval_every"]
            if (self.eval_data is not None and meta["step"] == old_max < c.max_steps and old_max % old_every
                    and not state["trainer"].get("stopped_early", False) and self.world.is_main):  # fmt: skip
                warnings.warn(
                    f"resuming {state['path']} past its final step {old_max}, which was evaluated off the "
                    f"eval_every={old_every} grid: that eval is in the resumed state (best, plateau, early stopping, "
                    "history), so the run will not match an uninterrupted one",
                    RuntimeWarning, stacklevel=2,
                )  # fmt: skip
            if changed and self.world.is_main:
                warnings.warn(
                    f"resuming {state['path']} with a different config: {changed}; the run will not match an "
                    "uninterrupted one", RuntimeWarning, stacklevel=2,
                )  # fmt: skip
            self._load_model_state(state["model"])
            # load_state_dict restores the saved param groups' hyperparameters; the current config's
            # weight_decay/betas must apply (a change is warned about above), as lr does via the schedule
            hyper = [{k: g[k] for k in ("weight_decay", "betas")} for g in self.optimizer.param_groups]
            self._load_optim_state(state["optimizer"])
            for g, h in zip(self.optimizer.param_groups, hyper):
                g.update(h)
            self.schedule.load_state_dict(state["schedule"])
            rngs = state["rng"]
            _set_rng_state(rngs[self.world.rank] if len(rngs) == self.world.world_size else rngs[0])
            t = state["trainer"]
            step, epoch, step_in_epoch = meta["step"], meta["epoch"], meta["step_in_epoch"]
            best, bad_evals = float(t["best"]), int(t["bad_evals"])
            # a run that had stopped early stays stopped (it must not train past its stopping point)
            result.stopped_early = bool(t.get("stopped_early", False))
            self.should_stop = self.should_stop or result.stopped_early
            time_offset, tokens_total = float(t["time"]), int(t["tokens"])
            result.history, result.losses = list(t["history"]), list(t["losses"])
            result.best_eval_loss = None if best == math.inf else best
            result.best_step = t.get("best_step")
            self._best_state = state.get("best_model")
            result.resumed_from = step
            if self.world.is_main:
                logger.info("resumed from %s at step %d", state["path"], step)
            del state
        elif c.resume and self.world.is_main:
            logger.info("resume: no checkpoint in %s, starting from step 0", c.checkpoint_dir)

        for cb in self.callbacks:
            cb.on_train_begin(self)
        bar = None
        if c.progress and self.world.is_main and step < c.max_steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.max_steps, initial=step, desc=c.progress_desc, dynamic_ncols=True)

        self.wrapped.train(c.train_mode)
        start = time.perf_counter()
        window_tokens, window_start = 0, start
        data = self._micro_batches(epoch, step_in_epoch)
        stop_now = step >= c.max_steps or self.should_stop
        if c.restore_best and result.resumed_from is None and not stop_now:
            best = self._baseline_eval(result, start)
        while not stop_now:
            lr = self.schedule.lr(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros(2, dtype=torch.float64, device=self.device)  # [sum of micro losses, tokens]
            for a in range(c.grad_accum_steps):
                epoch, step_in_epoch, batch = next(data)
                # counted on the loader's (host) batch: the sum of a device mask is a host sync that
                # waits for the previous micro-step's backward and stalls the CPU every step
                host_tokens = _count_tokens(batch)
                batch = _to_device(batch, self.device)
                last = a == c.grad_accum_steps - 1
                if last:
                    self._forward_calls = 0  # the syncing micro-step must run the wrapper with grad
                if self.strategy == "fsdp":  # reduce-scatter only on the last micro-step
                    self.model.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext() if last or self.strategy != "ddp" else self.wrapped.no_sync()
                with sync, self._autocast():
                    loss, metrics = self._call_loss(batch)
                    (loss / c.grad_accum_steps).backward()
                loss_sum[0] += loss.detach().double()
                loss_sum[1] += float(metrics["tokens"]) if "tokens" in metrics else host_tokens
            if self.strategy == "ddp" and self._forward_calls == 0:
                raise RuntimeError(
                    "loss_fn never called the model it was given with gradients enabled: under DDP the gradient "
                    "sync is prepared only by the wrapper's forward under torch.is_grad_enabled(). Call model(...) "
                    "in loss_fn without torch.no_grad() around it (unwrap_model(model) is for attribute access)"
                )
            if self.world.distributed:
                dist.all_reduce(loss_sum)
            step_loss = loss_sum[0].item() / (c.grad_accum_steps * self.world.world_size)
            if not math.isfinite(step_loss):
                raise FloatingPointError(
                    f"training loss is {step_loss} at step {step + 1} (lr={lr:.3g}); the optimizer step was skipped. "
                    "Lower lr, keep max_grad_norm set, or check the data and the loss for inf/NaN"
                )
            if c.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor (collective, every rank)
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
            if not math.isfinite(grad_norm):  # a finite loss can still have inf/NaN gradients
                raise FloatingPointError(
                    f"gradient norm is {grad_norm} at step {step + 1} (lr={lr:.3g}, loss {step_loss:.4g}); the "
                    "optimizer step was skipped. Check the loss for non-differentiable points (sqrt/log at 0)"
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            if self.strategy == "ddp" and (step == 1 or result.resumed_from == step - 1):
                self._check_replicas_agree(step)
            step_in_epoch += 1
            if step_in_epoch >= self.steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
            tokens = int(loss_sum[1].item())
            tokens_total += tokens
            result.losses.append(step_loss)
            window_tokens += tokens
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4g}", lr=f"{lr:.2e}")
            for cb in self.callbacks:
                cb.on_step_end(self, step, step_loss)

            eval_loss = None
            is_eval = self.eval_data is not None and (step % c.eval_every == 0 or step == c.max_steps)
            if is_eval:
                eval_loss = self.evaluate()
                assert eval_loss is not None
                if not math.isfinite(eval_loss):  # would count as "no improvement" and pass unnoticed
                    raise FloatingPointError(
                        f"eval loss is {eval_loss} at step {step} (lr={lr:.3g}, train loss {step_loss:.4g}): the model "
                        "diverged or the eval data makes the loss undefined"
                    )
                for cb in self.callbacks:
                    cb.on_eval(self, step, eval_loss)
                if eval_loss < best - c.early_stopping_min_delta:
                    best, bad_evals = eval_loss, 0
                    result.best_step = step
                    if c.restore_best:
                        self._best_state = self._model_state(every_rank=True)
                else:
                    bad_evals += 1
                result.best_eval_loss = best
                self.schedule.observe(eval_loss)
                if c.early_stopping_patience is not None and bad_evals >= c.early_stopping_patience:
                    result.stopped_early = True
                    self.should_stop = True
            elif self.eval_data is None and c.scheduler == "plateau" and step % c.eval_every == 0:
                self.schedule.observe(sum(result.losses[-c.eval_every :]) / c.eval_every)

            self._agree_on_stop()
            stop_now = step >= c.max_steps or self.should_stop
            if step % c.log_every == 0 or is_eval or stop_now:
                now = time.perf_counter()
                # since the previous row, from the losses (restored on resume, unlike a running sum)
                window = result.losses[result.history[-1]["step"] if result.history else 0 :]
                row = {
                    "step": step,
                    "train_loss": sum(window) / max(1, len(window)),
                    "eval_loss": eval_loss,
                    "lr": lr,
                    "tokens": tokens_total,
                    "time": time_offset + now - start,
                    "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                }
                result.history.append(row)
                if self.world.is_main:
                    logger.info(
                        "step %d train_loss %.5g%s lr %.3g tok/s %.0f", step, row["train_loss"],
                        "" if eval_loss is None else f" eval_loss {eval_loss:.5g}", lr, row["tokens_per_s"],
                    )  # fmt: skip
                window_tokens, window_start = 0, now

            if c.checkpoint_every is not None and (step % c.checkpoint_every == 0 or stop_now):
                extra = {
                    "best": best, "best_step": result.best_step, "bad_evals": bad_evals,
                    "stopped_early": result.stopped_early,
                    "time": time_offset + time.perf_counter() - start,
                    "tokens": tokens_total, "history": result.history, "losses": result.losses,
                }  # fmt: skip
                path = self.save_checkpoint(step, (epoch, step_in_epoch), extra)
                for cb in self.callbacks:
                    cb.on_checkpoint(self, step, path)
                if not stop_now:  # "save and stop": a stop asked for in on_checkpoint ends the run at this step
                    self._agree_on_stop()
                    stop_now = self.should_stop

        if bar is not None:
            bar.close()
        if c.restore_best and self._best_state is not None:
            self._load_model_state(self._best_state)
        result.steps_done = step
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result
