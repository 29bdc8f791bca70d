"""``hedgehog recall``: associative recall across attentions (App. B.1, Table 4, Fig. 5).

Trains the same 4-layer, 4-head rotary Transformer (App. B.2) with each attention variant and
several seeds on freshly drawn multi-query AR sequences (:mod:`..tasks.associative_recall`), then
reports query accuracy on a fixed test set and the mean attention entropy over layers and heads
on test sequences, as a markdown table and a Fig. 5-style scatter (entropy vs accuracy).

Hyperparameters are fixed in the config; nothing is selected on the test set (the validation
curve printed during training uses its own sequences and is only logged).

Each run trains on :class:`hedgehog_attention.train.Trainer` (one process, or every rank of a
``torchrun`` launch with the global batch sharded by rank; only rank 0 writes files). Each finished
(variant, seed) run is saved to ``<out>/runs/<variant>_s<seed>.json`` (its final weights to
``<out>/weights/``); a rerun skips finished runs, so an interrupted sweep continues where it
stopped, and with ``train.checkpoint_every`` set ``--resume`` continues an unfinished run from its
checkpoint under ``<out>/ckpt/<variant>_s<seed>/``. ``--report-only`` rebuilds the table and plot.

``train.engine: graph`` trains with :func:`fit_graphed` instead (one process: the same optimizer,
schedule and data order, the whole step replayed as one CUDA graph that is first checked against
eager steps; no checkpoints). Variants may override ``train`` / ``model`` fields (a recipe probe in
one config), ``--shard I/N`` runs every N-th job (one process per GPU), and the final validation
accuracy of each run is recorded for selecting a recipe (never the test accuracy).

Usage::

    hedgehog recall --config configs/recall.yaml --device cuda --workers 12   # runs side by side
    torchrun --nproc_per_node=2 -m hedgehog_attention.cli recall --config configs/recall.yaml
    hedgehog recall --config configs/recall_smoke.yaml                        # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from ..metrics import attention_entropy
from ..models import RotaryTransformer, TransformerConfig
from ..tasks.associative_recall import AssociativeRecallConfig, make_batch, recall_accuracy
from ..train import (
    TrainConfig,
    Trainer,
    TrainerCallback,
    barrier,
    cleanup_distributed,
    init_distributed,
    unwrap_model,
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
    train / model: per-variant overrides of ``RecallTrain`` / ``RecallModel`` fields (e.g.
    ``{lr: 3.0e-3}``), so one config can hold a recipe probe (same attention, several learning rates).
    """

    name: str
    attention: str
    feature_map_kwargs: dict[str, Any] = field(default_factory=dict)
    distill_weight: float = 0.0
    tie_qk: bool = False
    train: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecallTrain:
    """AdamW (weight decay on matrices only, none on biases / norm gains) with linear warmup then
    cosine decay to ``min_lr_ratio * lr``; fresh sequences every step. batch_size: the GLOBAL batch,
    split over processes and ``grad_accum_steps``. checkpoint_every: Trainer checkpoints under
    ``<out>/ckpt/<variant>_s<seed>/`` (None: none; ``--resume`` then restarts unfinished runs)."""

    steps: int = 3000
    batch_size: int = 64
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    checkpoint_every: int | None = None
    keep_last: int | None = 1  # checkpoints kept per run (None: all)
    warmup_steps: int = 150
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 500
    valid_sequences: int = 256
    test_sequences: int = 1024
    entropy_sequences: int = 64
    max_seconds: float | None = None  # per run; a run stopped early records the steps it made
    # "trainer": the shared Trainer (DDP, checkpoints, resume). "graph": fit_graphed, one process,
    # the whole step as one CUDA graph on a GPU (same schedule, grouping, clipping and data order;
    # no checkpoints; eager on CPU). A run asking for "graph" under torchrun uses the Trainer.
    engine: Literal["trainer", "graph"] = "trainer"


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
    # No FSDP: the models are tiny, and rank 0 scores the whole model alone during training.
    strategy: Literal["auto", "none", "ddp"] = "auto"

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("variants is empty: list at least one attention to compare")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if not self.seeds:
            raise ValueError("seeds is empty")
        for v in self.variants:  # fail at load time, not in a worker minutes later
            self.train_for(v)
            self.model_config(v)

    def train_for(self, v: RecallVariant) -> RecallTrain:
        """``train`` with the variant's overrides (checked like config keys)."""
        return config_from_dict(RecallTrain, {**config_to_dict(self.train), **v.train}, f"variants[{v.name}].train")

    def model_for(self, v: RecallVariant) -> RecallModel:
        """``model`` with the variant's overrides."""
        return config_from_dict(RecallModel, {**config_to_dict(self.model), **v.model}, f"variants[{v.name}].model")

    def model_config(self, v: RecallVariant) -> TransformerConfig:
        m = self.model_for(v)
        return TransformerConfig(
            vocab_size=self.task.vocab_size,
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            max_seq_len=self.task.seq_len,
            attention=v.attention,
            feature_map_kwargs=dict(v.feature_map_kwargs),
            tie_qk=v.tie_qk,
            distill_weight=v.distill_weight,
            mlp_ratio=m.mlp_ratio,
            backend=m.backend,
        )


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


class RecallStream(Dataset):
    """``n`` AR sequences ``(input_ids [T], labels [T])``, drawn in chunks of ``chunk`` from
    generators seeded by ``(seed, chunk index)``: sequence ``i`` is the same whatever process asks
    for it, so the Trainer's rank sharding keeps the global batch of a step (read in order, without
    shuffling: every step sees fresh sequences, as in an endless stream)."""

    def __init__(self, task: AssociativeRecallConfig, n: int, seed: int, chunk: int = 4096) -> None:
        if n < 1 or chunk < 1:
            raise ValueError(f"n and chunk must be >= 1, got n={n}, chunk={chunk}")
        self.task, self.n, self.seed, self.chunk = task, n, seed, chunk
        self._cached: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(f"sequence {i} out of range [0, {self.n})")
        c = i // self.chunk
        if self._cached is None or self._cached[0] != c:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
            self._cached = (c, *make_batch(self.task, self.chunk, gen))
        j = i % self.chunk
        return self._cached[1][j], self._cached[2][j]

    def batch(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences ``start .. start + n - 1`` as ``(input_ids [n, T], labels [n, T])``: the same
        rows as ``[self[i] for i in range(start, start + n)]``, sliced from whole chunks."""
        if n < 1 or start < 0 or start + n > self.n:
            raise IndexError(f"batch [{start}, {start + n}) out of range [0, {self.n})")
        xs, ys, i = [], [], start
        while i < start + n:
            self[i]  # loads chunk i // chunk
            assert self._cached is not None
            j = i % self.chunk
            take = min(self.chunk - j, start + n - i)
            xs.append(self._cached[1][j : j + take])
            ys.append(self._cached[2][j : j + take])
            i += take
        return torch.cat(xs), torch.cat(ys)


def recall_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Trainer loss: CE over the query positions of the micro-batch (+ the weighted Eq. 3 term of
    the distilled variant; the model adds it in train mode only). The number of queries varies per
    sequence, so with several micro-batches (ranks, accumulation) the step loss is the mean of the
    micro-batch means, not exactly the token mean of one big batch (unlike ``hedgehog lm``)."""
    x, y = batch
    out = model(x, y)
    return out.total_loss, {"tokens": x.numel()}


class _Curve(TrainerCallback):
    """Validation accuracy every ``log_every`` steps (rank 0, on the unwrapped model: no collective),
    the wall-clock cap ``max_seconds``, and a copy of the curve beside each checkpoint so a resumed
    run keeps its earlier points."""

    def __init__(self, name: str, tc: RecallTrain, vx: torch.Tensor, vy: torch.Tensor, ckpt_dir: Path | None):
        self.name, self.tc, self.vx, self.vy, self.ckpt_dir = name, tc, vx, vy, ckpt_dir
        self.curve: list[dict] = []
        self.stopped_by_time = False
        self.t0 = time.perf_counter()
        self.last_step = 0
        self._first = True

    def on_train_begin(self, trainer: Trainer) -> None:
        self.t0 = time.perf_counter()
        if trainer.config.resume and self.ckpt_dir is not None and (self.ckpt_dir / "curve.json").exists():
            self.curve = json.loads((self.ckpt_dir / "curve.json").read_text())

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        if self._first:  # drop points past the checkpoint a resumed run restarts from
            self.curve = [p for p in self.curve if p["step"] < step]
            self._first = False
        self.last_step = step
        if trainer.world.is_main and (step % self.tc.log_every == 0 or step == trainer.config.max_steps):
            model = unwrap_model(trainer.wrapped)
            acc = evaluate(model, self.vx.to(trainer.device), self.vy.to(trainer.device))
            model.train(trainer.config.train_mode)
            self.curve.append({"step": step, "loss": loss, "valid_acc": acc})
            log.info("%-16s step %5d loss %.4f valid acc %.3f", self.name, step, loss, acc)
        if self.tc.max_seconds is not None and time.perf_counter() - self.t0 > self.tc.max_seconds:
            if not self.stopped_by_time:
                log.warning("%s: stopping at step %d (max_seconds=%s)", self.name, step, self.tc.max_seconds)
            self.stopped_by_time = True
            trainer.should_stop = True

    def on_checkpoint(self, trainer: Trainer, step: int, path: str | None) -> None:
        if path is not None and self.ckpt_dir is not None:  # rank 0
            save_json(self.curve, self.ckpt_dir / "curve.json")


def train_config(
    cfg: RecallConfig, seed: int, device: torch.device, ckpt_dir: Path | None, resume: bool,
    tc: RecallTrain | None = None,
) -> TrainConfig:  # fmt: skip
    """The :class:`TrainConfig` of one run: AdamW, warmup + cosine, global batch ``train.batch_size``
    split over ``world_size * grad_accum_steps`` micro-batches, fresh sequences every step.
    ``tc``: the run's training settings (default ``cfg.train``; a variant's: ``cfg.train_for(v)``)."""
    tc = cfg.train if tc is None else tc
    return TrainConfig(
        max_steps=tc.steps, lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.betas[0], tc.betas[1]),
        decay_matrices_only=True,  # no decay on biases / norm gains (GPT-2 convention)
        micro_batch_size=micro_batch_size(tc.batch_size, tc.grad_accum_steps), grad_accum_steps=tc.grad_accum_steps,
        max_grad_norm=tc.grad_clip or None, scheduler="cosine", warmup_steps=tc.warmup_steps,
        min_lr_ratio=tc.min_lr_ratio, log_every=tc.log_every, eval_every=tc.log_every,
        checkpoint_every=tc.checkpoint_every, checkpoint_dir=None if ckpt_dir is None else str(ckpt_dir),
        resume=resume, seed=seed,
        progress=False, shuffle=False, strategy=cfg.strategy, keep_last=tc.keep_last, pin_memory=False,
        **trainer_placement(device, cfg.dtype),
    )  # fmt: skip


def fit_graphed(
    model: RotaryTransformer, tc: RecallTrain, tcfg: TrainConfig, data: RecallStream, device: torch.device,
    curve: _Curve, check_steps: int = 3,
) -> tuple[int, str | None, dict]:  # fmt: skip
    """Train ``model`` as the Trainer would for one process (AdamW with weight decay on matrices
    only, ``LRSchedule`` of ``tcfg``, clipping, zero_grad(set_to_none), sequences read in order), but
    with no host sync per step and, on CUDA, the whole step (forward, backward, clip, AdamW with a
    tensor lr) captured once as a CUDA graph and replayed: a 0.8M-parameter model is launch-bound.

    The graph is checked before it is used: from one saved state, ``check_steps`` eager steps and
    ``check_steps`` replays on the same batches must give the same losses (else the saved state is
    restored and the run continues eagerly; both recorded in the returned info). Validation points
    and the ``max_seconds`` cap as the Trainer path's ``_Curve``; a non-finite loss is noticed at
    the next validation point (not at once as in the Trainer). Returns ``(steps_done, error, info)``.
    """
    from ..train import LRSchedule

    is_cuda = device.type == "cuda"
    sched = LRSchedule(tcfg)
    model.to(device).train()
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    lr_t = torch.tensor(sched.lr(0), dtype=torch.float32, device=device) if is_cuda else None
    opt = torch.optim.AdamW(
        groups, lr=lr_t if lr_t is not None else sched.lr(0), betas=(tc.betas[0], tc.betas[1]),
        weight_decay=tc.weight_decay, foreach=True, capturable=is_cuda,
    )  # fmt: skip
    bsz = tc.batch_size
    sx, sy = (t.to(device) for t in data.batch(0, bsz))  # static inputs of the graph
    vx, vy = curve.vx.to(device), curve.vy.to(device)
    # The stream goes to the device a block of steps at a time: a copy from pageable host memory
    # waits for the GPU, so one per block instead of one per step; per step a device-side copy.
    block_steps = max(1, data.chunk // bsz)
    block: list = [-1, None, None]  # block index, input_ids, labels on the device

    def set_step(step: int) -> None:
        lr = sched.lr(step)
        if lr_t is not None:
            lr_t.fill_(lr)
        else:
            for g in opt.param_groups:
                g["lr"] = lr
        b = step // block_steps
        if block[0] != b:
            first = b * block_steps * bsz
            x, y = data.batch(first, min(block_steps * bsz, data.n - first))
            block[:] = [b, x.to(device), y.to(device)]
        off = (step - b * block_steps) * bsz
        sx.copy_(block[1][off : off + bsz])
        sy.copy_(block[2][off : off + bsz])

    accum, micro = tcfg.grad_accum_steps, tcfg.micro_batch_size

    def one_step() -> torch.Tensor:
        # the Trainer's micro-batches: the step loss is the mean of the micro-batch means
        loss = None
        for a in range(accum):
            part = model(sx[a * micro : (a + 1) * micro], sy[a * micro : (a + 1) * micro]).total_loss
            (part / accum).backward()
            loss = part.detach() if loss is None else loss + part.detach()
        assert loss is not None
        loss = loss / accum
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        return loss.detach()

    info: dict = {"engine": "graph" if is_cuda else "eager-loop", "graph_check": None}
    graph, static_loss = None, None
    step, error, last_loss = 0, None, None
    while step < tc.steps:
        if is_cuda and graph is None and step == 1 and info["graph_check"] is None and tc.steps > 1 + check_steps:
            graph, static_loss, info["graph_check"] = _capture_checked(
                model, opt, one_step, set_step, step, check_steps, device
            )
            if graph is not None:
                step += check_steps  # the checked replays were real steps
                last_loss = static_loss
            else:
                info["engine"] = "eager-loop (graph check failed)"
                log.warning("%s: CUDA graph check failed (%s); continuing eagerly", curve.name, info["graph_check"])
        else:
            set_step(step)
            if graph is not None:
                graph.replay()
                last_loss = static_loss
            else:
                last_loss = one_step()
                opt.zero_grad(set_to_none=True)
            step += 1
        if step % tc.log_every == 0 or step >= tc.steps:
            assert last_loss is not None
            loss_val = float(last_loss)  # the only host sync: at validation points
            if not torch.isfinite(torch.tensor(loss_val)):
                error = f"training loss is {loss_val} at step {step} (noticed at a validation point)"
                log.warning("%s: %s", curve.name, error)
                break
            acc = evaluate(model, vx, vy)
            model.train()
            curve.curve.append({"step": step, "loss": loss_val, "valid_acc": acc})
            log.info("%-16s step %5d loss %.4f valid acc %.3f", curve.name, step, loss_val, acc)
        curve.last_step = step
        if tc.max_seconds is not None and time.perf_counter() - curve.t0 > tc.max_seconds:
            log.warning("%s: stopping at step %d (max_seconds=%s)", curve.name, step, tc.max_seconds)
            curve.stopped_by_time = True
            break
    if is_cuda:
        torch.cuda.synchronize(device)
    return step, error, info


def _capture_checked(model, opt, one_step, set_step, step: int, k: int, device: torch.device):
    """Capture ``one_step`` as a CUDA graph and check it against ``k`` eager steps from the same
    state (steps ``step .. step + k - 1``). Returns ``(graph, static_loss, check)``; on a failed
    check or capture ``(None, None, check)`` with the state restored to before ``step``."""
    opt.zero_grad(set_to_none=True)
    saved = [t.detach().clone() for t in _state_tensors(model, opt)]

    def restore() -> None:
        with torch.no_grad():
            for t, v in zip(_state_tensors(model, opt), saved):
                t.copy_(v)

    eager = []
    for i in range(k):
        set_step(step + i)
        eager.append(float(one_step()))
        opt.zero_grad(set_to_none=True)
    restore()
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up (allocations, autotuning) off the capture
            for i in range(3):
                set_step(step + i % k)
                one_step()
                opt.zero_grad(set_to_none=True)
        torch.cuda.current_stream(device).wait_stream(side)
        restore()
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_loss = one_step()
        replayed = []
        for i in range(k):
            set_step(step + i)
            graph.replay()
            replayed.append(float(static_loss))
    except Exception as err:  # noqa: BLE001 (capture not supported by some op: fall back, recorded)
        restore()
        opt.zero_grad(set_to_none=True)
        return None, None, {"ok": False, "error": str(err)[:500]}
    diff = max(abs(a - b) for a, b in zip(eager, replayed))
    check = {"ok": diff <= 1e-4 * max(1.0, abs(eager[0])), "eager": eager, "graph": replayed, "max_diff": diff}
    if not check["ok"]:
        restore()
        opt.zero_grad(set_to_none=True)  # the replays' gradients must not add to the next eager step's
        return None, None, check
    return graph, static_loss, check


def run_one(
    cfg: RecallConfig, variant: RecallVariant, seed: int, device: torch.device, ckpt_dir: Path | None = None,
    resume: bool = False,
) -> dict | None:  # fmt: skip
    """Train and evaluate one (variant, seed) on the :class:`Trainer`; returns the result record on
    rank 0 (with the final ``state_dict``), None on other ranks. ``ckpt_dir``: where the Trainer
    checkpoints every ``train.checkpoint_every`` steps and at the end (needed for that and for
    ``resume``; None: no checkpoints)."""
    tc, task = cfg.train_for(variant), cfg.task.build()
    if ckpt_dir is not None and not resume and world_info().is_main and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # a fresh run must not later resume from an older run's checkpoint
    barrier()
    torch.manual_seed(seed)  # the model's init: same on every rank
    model = RotaryTransformer(cfg.model_config(variant))
    vx, vy = make_batch(task, tc.valid_sequences, torch.Generator().manual_seed(VALID_DATA_SEED))
    curve = _Curve(variant.name, tc, vx, vy, ckpt_dir)
    data = RecallStream(task, tc.steps * tc.batch_size, seed=10_000 + seed)
    tcfg = train_config(cfg, seed, device, ckpt_dir, resume, tc)
    use_graph = tc.engine == "graph" and not world_info().distributed
    is_main = world_info().is_main
    if not use_graph:
        trainer = Trainer(model, recall_loss, data, None, tcfg, callbacks=[curve])
    error, engine_info = None, {"engine": "trainer"}
    if use_graph:
        curve.t0 = time.perf_counter()
        steps_done, error, engine_info = fit_graphed(model, tc, tcfg, data, device, curve)
    else:
        try:
            steps_done = trainer.fit().steps_done
        except FloatingPointError as err:  # recorded (as the model stood before the bad step), not fatal
            log.warning("%s seed %d: %s", variant.name, seed, err)
            steps_done, error = curve.last_step, str(err)
    train_seconds = time.perf_counter() - curve.t0
    if not is_main:
        return None
    model = model if use_graph else unwrap_model(trainer.wrapped)
    eval_device = device if use_graph else trainer.device
    tx, ty = make_batch(task, tc.test_sequences, torch.Generator().manual_seed(TEST_DATA_SEED), eval_device)
    test_acc = evaluate(model, tx, ty)
    # Final validation accuracy: what recipe probes select on (never the test accuracy).
    valid_acc = evaluate(model, vx.to(eval_device), vy.to(eval_device))
    ent, ent_layers = mean_entropy(model, tx[: tc.entropy_sequences])
    return {
        "variant": variant.name,
        "attention": variant.attention,
        "distill_weight": variant.distill_weight,
        "seed": seed,
        "steps": steps_done,
        "planned_steps": tc.steps,
        "stopped_early": curve.stopped_by_time or error is not None,
        "error": error,
        "train_seconds": train_seconds,
        "test_accuracy": test_acc,
        "valid_accuracy": valid_acc,
        "lr": tc.lr,
        "batch_size": tc.batch_size,
        "d_model": cfg.model_for(variant).d_model,
        "entropy": ent,
        "entropy_per_layer": ent_layers,
        "uniform_entropy": float(torch.log(torch.arange(1, task.seq_len + 1, dtype=torch.float64)).mean()),
        "curve": curve.curve,
        "parameters": model.num_parameters(),
        "world_size": world_info().world_size,
        **engine_info,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def _step_parts(model: RotaryTransformer, lr: torch.Tensor | float, tc: RecallTrain, capturable: bool):
    """AdamW with the Trainer's grouping (weight decay on matrices only) for :func:`benchmark_step`."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    kw = {"capturable": True, "foreach": True} if capturable else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(tc.betas[0], tc.betas[1]), **kw)


def benchmark_step(
    cfg: RecallConfig, variant: RecallVariant, device: torch.device, steps: int = 100, check_steps: int = 6
) -> dict:
    """Time one training step of ``variant`` (constant lr, fresh batches) the eager way (a host sync
    per step, as the Trainer) and, on CUDA, as one captured CUDA graph (forward + backward + clip +
    AdamW, replayed with no host work but the batch copy). Also checks the graph computes the same
    step: from one saved state, ``check_steps`` eager steps and ``check_steps`` replays on the same
    batches must give the same losses (``max_loss_diff``). Returns steps/s of both and the check.
    Used to decide whether the graphed training loop (``train.engine: graph``) is worth it."""
    tc, task = cfg.train_for(variant), cfg.task.build()
    torch.manual_seed(0)
    model = RotaryTransformer(cfg.model_config(variant)).to(device)
    model.train()
    is_cuda = device.type == "cuda"
    lr = torch.tensor(tc.lr, device=device) if is_cuda else tc.lr
    opt = _step_parts(model, lr, tc, capturable=is_cuda)
    params = [p for p in model.parameters()]
    gen = torch.Generator().manual_seed(123)
    pool = [make_batch(task, tc.batch_size, gen) for _ in range(8)]  # host batches, reused in turn
    sx, sy = (t.to(device) for t in pool[0])  # static input buffers of the graph

    def step() -> torch.Tensor:
        loss = model(sx, sy).total_loss
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)  # foreach, no host sync
        opt.step()
        return loss.detach()

    def load(i: int) -> None:
        sx.copy_(pool[i % len(pool)][0], non_blocking=True)
        sy.copy_(pool[i % len(pool)][1], non_blocking=True)

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(device)

    load(0)
    step()  # creates the optimizer state
    opt.zero_grad(set_to_none=True)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        load(i)
        float(step())  # float(): the Trainer's per-step host sync
        opt.zero_grad(set_to_none=True)
    sync()
    out = {"variant": variant.name, "eager_steps_per_s": steps / (time.perf_counter() - t0), "steps": steps}
    if not is_cuda:
        return out
    # The same checked whole-step capture as fit_graphed: eager steps and replays from one saved state.
    graph, _, check = _capture_checked(model, opt, step, load, 0, check_steps, device)
    out["graph_check"] = check
    if graph is None:
        return out
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        load(i)
        graph.replay()
    sync()
    out["graph_steps_per_s"] = steps / (time.perf_counter() - t0)
    out["max_loss_diff"] = check["max_diff"]
    return out


def _state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters and AdamW state tensors (exp_avg, exp_avg_sq, step), in a fixed order."""
    out = [p.data for p in model.parameters()]
    for p in model.parameters():
        st = opt.state.get(p, {})
        out += [st[k] for k in sorted(st) if isinstance(st[k], torch.Tensor)]
    return out


# how a run is placed and logged, not what it computes: left out of the settings a finished run is reused by
_BOOKKEEPING = ("log_every", "checkpoint_every", "keep_last", "max_seconds", "engine")


def run_settings(cfg: RecallConfig, vi: int, seed: int) -> dict:
    """The settings job (variant ``vi``, ``seed``)'s result depends on (task, the variant and its
    model and training recipe, seed, dtype), saved with the result and compared before a finished
    run is reused."""
    v = cfg.variants[vi]
    train = {k: x for k, x in config_to_dict(cfg.train_for(v)).items() if k not in _BOOKKEEPING}
    out = {"task": config_to_dict(cfg.task), "model": config_to_dict(cfg.model_for(v)), "train": train,
           "variant": config_to_dict(v), "seed": seed, "dtype": cfg.dtype}  # fmt: skip
    return json.loads(json.dumps(out))  # as it reads back from the run's JSON


def stale_runs(cfg: RecallConfig, out_dir: Path) -> list[str]:
    """Finished runs under ``out_dir`` recorded with other settings than ``cfg`` gives them (one line
    each, naming the keys). Runs saved without their settings (older files) are not checked."""
    problems = []
    for vi, v in enumerate(cfg.variants):
        for s in cfg.seeds:
            path = out_dir / "runs" / f"{v.name}_s{s}.json"
            saved = json.loads(path.read_text()).get("settings") if path.exists() else None
            diff = [] if saved is None else settings_diff(saved, run_settings(cfg, vi, s))
            if diff:
                problems.append(f"{path} was trained with other settings ({'; '.join(diff)})")
    return problems


def _run_and_save(cfg: RecallConfig, vi: int, seed: int, device: torch.device, out: Path, resume: bool) -> str:
    """Run one job and (rank 0) write its result JSON and final weights; returns the result path."""
    variant = cfg.variants[vi]
    tag = f"{variant.name}_s{seed}"
    res = run_one(cfg, variant, seed, device, out / "ckpt" / tag, resume)
    path = out / "runs" / f"{tag}.json"
    if res is not None:
        state = res.pop("state_dict")
        (out / "weights").mkdir(parents=True, exist_ok=True)
        torch.save({"config": config_to_dict(cfg), "variant": vi, "seed": seed, "model": state},
                   out / "weights" / f"{tag}.pt")  # fmt: skip
        save_json(res | {"settings": run_settings(cfg, vi, seed)}, path)
    barrier()
    return str(path)


def _job(args: tuple[dict, int, int, str, str, bool]) -> str:
    """``--workers`` entry (picklable): one job in its own single process."""
    cfg_dict, vi, seed, device_name, out_dir, resume = args
    torch.set_num_threads(1)
    setup_logging()
    cfg = config_from_dict(RecallConfig, cfg_dict)
    return _run_and_save(cfg, vi, seed, torch.device(device_name), Path(out_dir), resume)


# Rough relative cost per training step (measured on an H200 with 16 concurrent runs, 2026-11-28).
_COST = {"taylor2": 4, "cosformer": 3, "hedgehog": 2, "hedgehog_exp": 2, "t2r": 2, "softmax": 0.5}


def run_sweep(
    cfg: RecallConfig, out_dir: Path, device: torch.device, resume: bool = False, shard: tuple[int, int] = (0, 1)
) -> list[dict]:
    """Every unfinished (variant, seed): in ``workers`` parallel single-process runs, or one after
    another (each on all ranks under torchrun). Returns the finished results (rank 0's view).
    ``shard = (i, n)``: only every n-th job of the cost-sorted list, from the i-th (one GPU of n, each
    running this with its own ``CUDA_VISIBLE_DEVICES`` into the same ``out_dir``)."""
    i_shard, n_shard = shard
    if not 0 <= i_shard < n_shard:
        raise ValueError(f"shard must be I/N with 0 <= I < N, got {i_shard}/{n_shard}")
    cfg_dict = config_to_dict(cfg)
    jobs = [(cfg_dict, vi, s, str(device), str(out_dir), resume) for vi in range(len(cfg.variants)) for s in cfg.seeds]
    # Slowest attentions first, so a parallel sweep does not end waiting on one long run.
    jobs.sort(key=lambda j: -_COST.get(cfg.variants[j[1]].attention, 1) - cfg.variants[j[1]].distill_weight)
    # Round-robin over the cost-sorted list of ALL jobs (shards of similar cost), and only then skip
    # the finished ones: the split must not depend on which runs another shard has finished so far.
    jobs = jobs[i_shard::n_shard]
    todo = []
    for j in jobs:
        name = cfg.variants[j[1]].name
        if (out_dir / "runs" / f"{name}_s{j[2]}.json").exists():
            log.info("skip %s seed %d (already done)", name, j[2])
        else:
            todo.append(j)
    jobs = todo
    barrier()  # every rank has listed the jobs before rank 0 writes results
    t0 = time.perf_counter()
    if cfg.workers > 1 and len(jobs) > 1:
        if world_info().distributed:
            raise ValueError("workers > 1 runs jobs in separate processes; under torchrun set workers: 1")
        import multiprocessing as mp

        # spawn: CUDA cannot be re-initialized in forked children.
        with mp.get_context("spawn").Pool(min(cfg.workers, len(jobs))) as pool:
            for p in pool.imap_unordered(_job, jobs):
                log.info("done %s (%.0f s)", p, time.perf_counter() - t0)
    else:
        for _, vi, s, _, _, _ in jobs:
            p = _run_and_save(cfg, vi, s, device, out_dir, resume)
            log.info("done %s (%.0f s)", p, time.perf_counter() - t0)
    return collect(cfg, out_dir)


def collect(cfg: RecallConfig, out_dir: Path) -> list[dict]:
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
                "valid_acc_per_seed": [r.get("valid_accuracy", float("nan")) for r in rs],
                "lr": cfg.train_for(v).lr,
                "batch_size": cfg.train_for(v).batch_size,
                "steps_per_s": float(sum(r["steps"] / max(r["train_seconds"], 1e-9) for r in rs) / len(rs)),
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
        [
            "attention",
            "lr",
            "test accuracy (mean ± std)",
            "per seed",
            "valid acc per seed",
            "entropy (nats)",
            "steps",
            "s/run",
            "steps/s",
        ],
        [
            [
                r["variant"],
                f"{r['lr']:g}",
                f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f}",
                " / ".join(f"{100 * a:.1f}" for a in r["acc_per_seed"]),
                " / ".join(f"{100 * a:.1f}" for a in r["valid_acc_per_seed"]),
                f"{r['entropy_mean']:.3f} ± {r['entropy_std']:.3f}",
                ",".join(map(str, r["steps"])),
                f"{r['train_seconds']:.0f}",
                f"{r['steps_per_s']:.1f}",
            ]
            for r in rows
        ],
    )
    uniform = results[0]["uniform_entropy"] if results else float("nan")
    n_seeds = sorted({r["seeds"] for r in rows})
    # the parameter count of the softmax variant when it has runs, else of the first one, named either way
    ref = next((r for r in rows if r["attention"] == "softmax"), rows[0] if rows else None)
    params = f"{ref['parameters']} parameters ({ref['variant']} variant)" if ref else "? parameters"
    plot_scatter(cfg, results, rows, out_dir / "recall_scatter.png")
    plot_curves(cfg, results, out_dir / "recall_curves.png")
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
        f"{params}; only the attention differs.",
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
        "![validation accuracy during training](recall_curves.png)",
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
        ax.annotate(r["variant"], (r["entropy_mean"], 100 * r["acc_mean"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    ax.axhline(100 * cfg.task.build().chance_accuracy, color="gray", ls=":", lw=1, label="chance")
    ax.set_xlabel("mean attention entropy (nats)")
    ax.set_ylabel("AR test accuracy (%)")
    ax.set_title("Associative recall: entropy vs accuracy (small dots: seeds)")
    ax.legend(fontsize=7, ncol=2, loc="best")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_curves(cfg: RecallConfig, results: list[dict], path: Path) -> None:
    """Validation accuracy vs step: one panel per attention (small multiples), one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in cfg.variants if any(r["variant"] == v.name for r in results)] or cfg.variants
    ncol = min(4, len(variants))
    nrow = -(-len(variants) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), sharex=True, sharey=True, squeeze=False)
    chance = 100 * cfg.task.build().chance_accuracy
    for ax, v in zip(axes.flat, variants):
        for r in (x for x in results if x["variant"] == v.name):
            c = r["curve"]
            if c:
                ax.plot([p["step"] for p in c], [100 * p["valid_acc"] for p in c], marker="o", ms=2,
                        label=f"seed {r['seed']}")  # fmt: skip
        ax.axhline(chance, color="gray", ls=":", lw=1)
        ax.set_title(v.name, fontsize=9)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(variants) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("valid acc (%)")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Associative recall: validation accuracy during training (dotted: chance)", fontsize=10)
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hedgehog recall", description=__doc__.split("\n\n")[0])
    add_training_arguments(
        p, config_help="YAML/JSON file of RecallConfig (configs/recall.yaml)", strategies="auto | none | ddp"
    )
    p.add_argument(
        "--shard",
        default="0/1",
        metavar="I/N",
        help="run only every N-th job from the I-th (one process per GPU into the same --out)",
    )
    p.add_argument("--bench-steps", type=int, default=0, metavar="N",
                   help="instead of training: time N steps of each variant, eager vs CUDA graph "
                   "(benchmark_step), write <out>/bench.json")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = load_config_from_cli(RecallConfig, args, TRAINING_SHORTCUTS)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    parts = args.shard.split("/")
    if len(parts) != 2 or not all(x.isdigit() for x in parts) or not int(parts[0]) < int(parts[1]):
        log.error("--shard must be I/N with 0 <= I < N (e.g. 0/2), got %r", args.shard)
        return 2
    shard = (int(parts[0]), int(parts[1]))
    out_dir = Path(cfg.out_dir)
    device = pick_device(cfg.device)
    if args.bench_steps > 0:
        rows = []
        for v in cfg.variants:
            rows.append(benchmark_step(cfg, v, device, steps=args.bench_steps))
            log.info("bench %s", json.dumps(rows[-1]))
        save_json({"bench": rows, "environment": environment_info(device)}, out_dir / "bench.json")
        return 0
    stale = stale_runs(cfg, out_dir)
    if stale:  # reusing them would report their numbers under this config's settings
        for line in stale:
            log.error("%s; use another --out, or delete the file to retrain it", line)
        return 2
    info = init_distributed(device=device)  # no-op outside torchrun
    try:
        env = environment_info(device) | {"processes": info.world_size}
        command = ("hedgehog recall " + " ".join(argv if argv is not None else [])).strip()
        env, command = record_run(cfg, out_dir, env, command, report_only=args.report_only, is_main=info.is_main)
        results = collect(cfg, out_dir) if args.report_only else run_sweep(cfg, out_dir, device, args.resume, shard)
        if not info.is_main:
            return 0
        if not results:
            log.error("no finished runs under %s", out_dir)
            return 1
        md = render_report(cfg, results, out_dir, env, command)
        (out_dir / "recall.md").write_text(md)
        save_json({"summary": summarize(cfg, results), "environment": env}, out_dir / "results.json")
        print(md)
        return 0
    finally:
        cleanup_distributed()
