"""Attention transfer for converted models: teacher capture, all-layer Eq. 3 training, fidelity.

The teacher is the frozen original inside each converted layer. :class:`TeacherCapture` is the one
explicit way to reach it: inside ``with TeacherCapture(model, ...)`` every converted layer

1. computes its ``q, k`` (after RoPE for Llama) and ``v`` with the original projections,
2. hands them to the collector (which records them and/or computes the layer's Eq. 3 loss), and
3. returns the ORIGINAL softmax output, so the residual stream, and hence every later layer's
   input, equals the original model's (LoLCATs' layer-local training on teacher hidden states).

Outside the block the layers run linear attention. No flags are flipped from anywhere else.

Two training modes (:class:`~hedgehog_attention.convert.config.DistillConfig.capture`):
``cached`` records every layer's ``q, k`` on the training text once and then trains the maps on
those tensors (no model forward per step: the fast path on CPUs); ``online`` runs the frozen
model in capture mode every step and backpropagates the per-layer losses (bounded memory).
"""

from __future__ import annotations

import copy
import gc
import inspect
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..distill import attention_distillation_loss, attention_output_mse
from ..metrics import attention_fidelity
from ..ops import softmax_attention_reference
from .base import LinearizedAttention, feature_map_parameters, linearized_modules
from .config import DistillConfig

__all__ = [
    "DistillResult",
    "TeacherCapture",
    "capture_qkv",
    "distill",
    "layer_losses",
    "evaluate_fidelity",
]

log = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]


@dataclass
class LayerRecord:
    """One layer's captured tensors for one batch: ``q [B,T,H,D]``, ``k``/``v [B,T,Hk,D]``, mask ``[B,T]``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor | None
    mask: torch.Tensor | None


class TeacherCapture:
    """Run a converted model as its original (softmax) self, observing each converted layer.

    Args:
        model: a model with :class:`LinearizedAttention` layers.
        record: keep each layer's ``q, k`` (and ``v`` when ``record_v``) per forward in
            ``self.records[name]`` (detached, on ``record_device`` if given).
        compute_loss: compute each layer's Eq. 3 loss (with gradients into its feature maps) into
            ``self.losses[name]``; ``output_mse_weight > 0`` adds LoLCATs' output MSE.
        query_chunk_size: queries per chunk of the Eq. 3 loss.

    With neither ``record`` nor ``compute_loss`` it is simply "teacher mode": the model's outputs
    are the original model's.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        record: bool = False,
        record_v: bool = False,
        record_device: torch.device | str | None = None,
        compute_loss: bool = False,
        output_mse_weight: float = 0.0,
        query_chunk_size: int = 256,
    ) -> None:
        self.layers = linearized_modules(model)
        if not self.layers:
            raise ValueError("TeacherCapture needs a linearized model (no LinearizedAttention layer found)")
        self.record, self.record_v, self.record_device = record, record_v, record_device
        self.compute_loss, self.output_mse_weight = compute_loss, output_mse_weight
        self.query_chunk_size = query_chunk_size
        self.records: dict[str, list[LayerRecord]] = {n: [] for n, _ in self.layers}
        self.losses: dict[str, torch.Tensor] = {}

    def __enter__(self) -> TeacherCapture:
        busy = [n for n, m in self.layers if m._collector is not None]
        if busy:
            raise RuntimeError(f"layers {busy} are already being captured (nested TeacherCapture)")
        for _, m in self.layers:
            m._collector = self
        return self

    def __exit__(self, *exc) -> None:
        for _, m in self.layers:
            m._collector = None

    def observe(
        self,
        layer: LinearizedAttention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> None:
        q, k, v = q.detach(), k.detach(), v.detach()
        if self.record:
            dev = self.record_device
            self.records[layer.name].append(
                LayerRecord(
                    q.to(dev) if dev else q,
                    k.to(dev) if dev else k,
                    (v.to(dev) if dev else v) if self.record_v else None,
                    None if mask is None else (mask.to(dev) if dev else mask),
                )
            )
        if self.compute_loss:
            with torch.enable_grad():
                self.losses[layer.name] = layer_losses(
                    layer, q, k, v, mask, self.output_mse_weight, self.query_chunk_size
                )


def layer_losses(
    layer: LinearizedAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    mask: torch.Tensor | None,
    output_mse_weight: float = 0.0,
    query_chunk_size: int = 256,
) -> torch.Tensor:
    """Eq. 3 of one layer (plus ``output_mse_weight`` x output MSE when ``v`` is given)."""
    fq, fk = layer.attn.features(q, k)
    loss = attention_distillation_loss(
        q, k, fq, fk, causal=layer.causal, attention_mask=mask, scale=layer.scale, query_chunk_size=query_chunk_size
    )
    if output_mse_weight > 0:
        if v is None:
            raise ValueError("output_mse_weight > 0 needs the values v (capture with record_v=True)")
        o_s = layer.attn(q, k, v, attention_mask=mask).o
        o_t = softmax_attention_reference(q, k, v, causal=layer.causal, attention_mask=mask, scale=layer.scale)
        loss = loss + output_mse_weight * attention_output_mse(o_s, o_t, mask)
    return loss


def _to(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in batch.items()}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(model: nn.Module, batch: Batch):
    """``model(**batch)`` without labels, without a KV cache (nothing here decodes) and, for causal
    LMs, with the logits of the last position only; ``model`` may be a DDP wrapper (called as is,
    so that DDP prepares its gradient sync)."""
    from ..train import unwrap_model

    kwargs = _to({k: t for k, t in batch.items() if k != "labels"}, _device(model))
    params = inspect.signature(unwrap_model(model).forward).parameters
    if "use_cache" in params:
        kwargs["use_cache"] = False
    if "logits_to_keep" in params:
        # no caller reads the logits (the layers report q, k, v): the LM head of the last position
        # only, not a [B, T, vocab] matmul and its float32 copy every step (vocab 49k for SmolLM2)
        kwargs["logits_to_keep"] = 1
    return model(**kwargs)


@torch.no_grad()
def capture_qkv(
    model: nn.Module, batches: Iterable[Batch], *, record_v: bool = False, device: torch.device | str | None = None
) -> dict[str, list[LayerRecord]]:
    """Every converted layer's teacher ``q, k`` (and ``v``) on ``batches``: ``{name: [record per batch]}``.

    The model runs in eval mode (dropout off, as in :func:`distill`; its mode is restored after):
    the records are the deterministic teacher's, whatever mode the model was left in."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with TeacherCapture(model, record=True, record_v=record_v, record_device=device) as cap:
            for batch in batches:
                _forward(model, batch)
    finally:
        for m, training in modes:
            m.training = training
    return cap.records


@dataclass
class DistillResult:
    """History of one distillation run. Losses are the sum over layers of the per-layer Eq. 3."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    best_step: int = 0
    best_eval_loss: float = math.nan
    steps_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    eval_loss_per_layer: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    """the Trainer's log rows (step, train_loss, eval_loss, lr, tokens, time, tokens_per_s)"""
    global_batch_size: int = 0
    resumed_from: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _rows(batch: Batch) -> int:
    """Sequences in a batch (the first dimension of its tensors)."""
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim >= 1)


def _eval_cached(layers, cache: dict[str, list[LayerRecord]], cfg: DistillConfig) -> dict[str, float]:
    """Per layer, the held-out loss with each batch weighted by its sequences (as the Trainer's)."""
    out = {}
    with torch.no_grad():
        for name, layer in layers:
            recs = cache[name]
            out[name] = sum(
                layer_losses(layer, r.q, r.k, r.v, r.mask, cfg.output_mse_weight, cfg.query_chunk_size).item()
                * r.q.shape[0]
                for r in recs
            ) / max(sum(r.q.shape[0] for r in recs), 1)
    return out


def _eval_online(model, layers, batches: Sequence[Batch], cfg: DistillConfig) -> dict[str, float]:
    sums = {n: 0.0 for n, _ in layers}
    rows = 0
    with torch.no_grad():
        for batch in batches:
            with TeacherCapture(
                model, compute_loss=True, output_mse_weight=cfg.output_mse_weight, query_chunk_size=cfg.query_chunk_size
            ) as cap:
                _forward(model, batch)
            b = _rows(batch)
            rows += b
            for n in sums:
                sums[n] += cap.losses[n].item() * b
    return {n: s / max(rows, 1) for n, s in sums.items()}


# ------------------------------------------------------------------------------------- Trainer glue
def _key(name: str) -> str:
    """Module name -> ModuleDict key (no dots allowed there)."""
    return name.replace(".", "__")


class _CachedRows(torch.utils.data.Dataset):
    """Cached teacher tensors, one example per sequence: ``{"<layer>/q": [T,H,D], "<layer>/k": [T,Hk,D],
    ("<layer>/v"), "mask": [T]}`` (views of the captured batches; the key-padding mask is the same for
    every layer and is all ones for unpadded rows, so rows of different lengths can be padded)."""

    def __init__(self, records: dict[str, list[LayerRecord]]) -> None:
        names = list(records)
        self.rows: list[dict[str, torch.Tensor]] = []
        for bi in range(len(records[names[0]])):
            first = records[names[0]][bi]
            b, t = first.q.shape[:2]
            mask = first.mask if first.mask is not None else torch.ones(b, t, dtype=torch.bool, device=first.q.device)
            for j in range(b):
                row = {"mask": mask[j]}
                for n in names:
                    r = records[n][bi]
                    row[f"{_key(n)}/q"], row[f"{_key(n)}/k"] = r.q[j], r.k[j]
                    if r.v is not None:
                        row[f"{_key(n)}/v"] = r.v[j]
                self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def _cached_loss_module(layers, cfg: DistillConfig):
    """``LossModule`` over an ``nn.ModuleDict`` of the layers' linear attentions (their feature maps
    are all it holds that trains): its forward is the sum over layers of Eq. 3 on a cached batch."""
    from ..train import LossModule

    meta = {_key(n): layer for n, layer in layers}

    def cached_eq3_loss(attns: nn.ModuleDict, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["mask"]
        mask = None if bool(mask.all()) else mask
        # attns[key] is meta[key].attn: layer_losses reads the maps through the layer
        return sum(
            layer_losses(meta[key], batch[f"{key}/q"], batch[f"{key}/k"], batch.get(f"{key}/v"), mask,
                         cfg.output_mse_weight, cfg.query_chunk_size)
            for key in attns
        )  # fmt: skip

    return LossModule(nn.ModuleDict({_key(n): layer.attn for n, layer in layers}), cached_eq3_loss)


def _online_loss_fn(cfg: DistillConfig):
    """``loss_fn`` of online distillation: the (wrapped) model's forward in teacher mode, with
    gradients on, so DDP prepares its all-reduce; each layer adds its Eq. 3 on the fly."""
    from ..train import unwrap_model

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        with TeacherCapture(
            unwrap_model(model), compute_loss=True, output_mse_weight=cfg.output_mse_weight,
            query_chunk_size=cfg.query_chunk_size,
        ) as cap:  # fmt: skip
            _forward(model, batch)
        return sum(cap.losses.values())

    return loss_fn


def _plain_maps_after_fsdp(loss_module: nn.Module) -> None:
    """Cached distillation under FSDP shards only the ``LossModule`` (the maps); the model shares
    those modules. Gather each sharded map parameter (``DTensor.full_tensor``, collective: every
    rank runs this in the same order) and put a plain parameter back in its place, so the model
    holds ordinary tensors again (FSDP's hooks were on the discarded root module only)."""
    for sub in loss_module.module.modules():
        for pname, p in list(sub.named_parameters(recurse=False)):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            setattr(sub, pname, nn.Parameter(full.detach().clone(), requires_grad=p.requires_grad))


def global_batch(cfg_batch_size: int, n: int, world_size: int, what: str = "batch_size") -> tuple[int, int]:
    """``(global batch, per-process micro-batch)``: ``batch_size`` sequences per step over all
    processes (so 1 and N processes train on the same batches), clamped to the data set when it is
    smaller (to a multiple of the world size)."""
    if cfg_batch_size < world_size:
        raise ValueError(f"{what}={cfg_batch_size} is smaller than the {world_size} processes: each needs a sequence")
    g = min(cfg_batch_size, n - n % world_size)
    if g < world_size:
        raise ValueError(f"{n} training sequence(s) cannot be split over {world_size} processes")
    if g % world_size:
        raise ValueError(
            f"{what}={cfg_batch_size} is not divisible by the {world_size} processes: each process takes "
            f"{what} / world_size sequences per step (the same global batch as one process)"
        )
    return g, g // world_size


def distill(
    model: nn.Module,
    train_batches: Sequence[Batch],
    eval_batches: Sequence[Batch] | None = None,
    config: DistillConfig | None = None,
    *,
    progress: bool = True,
    desc: str = "distill",
    train_records: dict[str, list[LayerRecord]] | None = None,
    eval_records: dict[str, list[LayerRecord]] | None = None,
) -> DistillResult:
    """Train every converted layer's feature maps at once with Eq. 3 (App. C.2 defaults), on
    :class:`hedgehog_attention.train.Trainer` (one process, or DDP/FSDP under ``torchrun``).

    Only the feature maps train (everything else is frozen for the duration and restored after).
    The loss of a step is the sum over layers of each layer's Eq. 3 on ``config.batch_size``
    sequences (the rows of ``train_batches``, regrouped and reshuffled every epoch; under torchrun
    each of the N processes takes ``batch_size / N`` of them, so the global batch, and hence the
    trajectory, is that of one process). Every ``eval_every`` steps the held-out loss is measured;
    the maps with the best held-out loss are kept (``restore_best``), and training stops after
    ``patience`` evaluations without improvement. With ``config.checkpoint_dir`` the run writes
    atomic checkpoints every ``checkpoint_every`` steps and ``config.resume`` continues a killed
    run exactly. A map without parameters (``elu``) is only evaluated.

    Args:
        model: a linearized model.
        train_batches: dicts for ``model(**batch)`` (``input_ids``, ``attention_mask``, ...).
        eval_batches: held-out batches (different documents) for early stopping; None disables it.
        config: :class:`DistillConfig`.
        train_records / eval_records: ``capture="cached"`` only: teacher tensors already captured
            with :func:`capture_qkv` on the same batches (they do not depend on the feature map, so
            several conversions of one model can share them).
        progress / desc: the Trainer's progress bar (rank 0) and its label.

    Every process returns the same result. ``eval_loss_per_layer`` is measured at the end, on the
    kept maps, over ``eval_batches`` as given, each batch weighted by its sequences (as the
    Trainer weights its held-out batches).
    """
    from ..train import TrainConfig, Trainer, call_model, world_info
    from .data import BatchRows, pad_collate

    cfg = config or DistillConfig()
    layers = linearized_modules(model)
    if not layers:
        raise ValueError("distill needs a linearized model; call linearize(model) first")
    train_batches = list(train_batches)
    eval_batches = list(eval_batches or [])
    if not train_batches:
        raise ValueError("train_batches is empty")
    params = [p for p in feature_map_parameters(model) if p.is_floating_point()]
    frozen = {id(p): p.requires_grad for p in model.parameters()}
    map_ids = {id(p) for p in params}
    result = DistillResult()
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()  # dropout off: the teacher must be deterministic
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in map_ids)
        cached = cfg.capture == "cached"
        if cached:
            rv = cfg.output_mse_weight > 0
            train_cache = train_records or capture_qkv(model, train_batches, record_v=rv)
            eval_cache = (eval_records or capture_qkv(model, eval_batches, record_v=rv)) if eval_batches else None

        def evaluate() -> dict[str, float] | None:
            if not eval_batches:
                return None
            return _eval_cached(layers, eval_cache, cfg) if cached else _eval_online(model, layers, eval_batches, cfg)

        trainable = [p for p in params if p.requires_grad]
        if cfg.steps > 0 and trainable and cfg.strategy == "fsdp" and not cached:
            # Measured (2 gloo ranks): the maps never changed. Each layer's Eq. 3 is built inside
            # the layer's forward from its map parameters, not from the layer's output, so FSDP2's
            # backward hooks (on the block outputs) never run and the map gradients never reach the
            # sharded parameters.
            raise ValueError(
                "strategy='fsdp' does not support capture='online' distillation (the per-layer losses bypass "
                "FSDP's backward hooks, so the maps would not train); use strategy='ddp' (teacher replicated) "
                "or capture='cached'"
            )
        if cfg.steps > 0 and trainable:
            if cached:
                module, loss_fn = _cached_loss_module(layers, cfg), None
                train_ds = _CachedRows(train_cache)
                eval_ds = _CachedRows(eval_cache) if eval_batches else None
            else:
                module, loss_fn = model, _online_loss_fn(cfg)
                train_ds = BatchRows(train_batches)
                eval_ds = BatchRows(eval_batches) if eval_batches else None
            gb, micro = global_batch(cfg.batch_size, len(train_ds), world_info().world_size)
            tcfg = TrainConfig(
                max_steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, micro_batch_size=micro,
                max_grad_norm=cfg.max_grad_norm, eval_every=cfg.eval_every,
                early_stopping_patience=cfg.patience or None, early_stopping_min_delta=cfg.min_delta,
                restore_best=eval_ds is not None, train_mode=False, seed=cfg.seed, progress=progress,
                progress_desc=desc,
                checkpoint_dir=cfg.checkpoint_dir, checkpoint_every=cfg.checkpoint_every, resume=cfg.resume,
                strategy=cfg.strategy, device=str(_device(model)), log_every=cfg.log_every,
                pin_memory=False if cached else None,  # the cached q, k stay where they were captured
            )  # fmt: skip
            trainer = Trainer(
                module, loss_fn or call_model, train_ds, eval_ds, tcfg, params=trainable, collate_fn=pad_collate
            )
            tres = trainer.fit()
            if trainer.strategy == "fsdp":
                _plain_maps_after_fsdp(module)
            del trainer
            gc.collect()  # drop the DDP reducer (and its gradient hooks) before the model trains again
            result.steps = list(range(1, len(tres.losses) + 1))
            result.train_loss = list(tres.losses)
            result.steps_run = tres.steps_done
            result.stopped_early = tres.stopped_early
            result.history = list(tres.history)
            result.global_batch_size = gb
            result.resumed_from = tres.resumed_from
            rows = [r for r in tres.history if r["eval_loss"] is not None]
            result.eval_steps = [r["step"] for r in rows]
            result.eval_loss = [r["eval_loss"] for r in rows]
            if tres.best_step is not None:
                result.best_step = tres.best_step
        per_layer = evaluate()  # on the kept (best) maps, on every process
        if per_layer is not None:
            result.eval_loss_per_layer = per_layer
            result.best_eval_loss = sum(per_layer.values())
    finally:
        for p in model.parameters():
            p.requires_grad_(frozen.get(id(p), True))
        model.train(was_training)
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def evaluate_fidelity(
    model: nn.Module, batches: Iterable[Batch], *, records: dict[str, list[LayerRecord]] | None = None
) -> dict[str, dict[str, float]]:
    """Per converted layer, the diagnostics of
    :func:`hedgehog_attention.metrics.attention_fidelity` on ``batches``: ``ce`` (Eq. 3), ``kl``,
    ``entropy_softmax``, ``entropy_linear``, ``monotonicity_softmax``, ``monotonicity_linear``,
    averaged over heads and over batches, each batch weighted by its sequences (as the held-out
    loss of :func:`distill`). Pass ``records`` (from :func:`capture_qkv`) to reuse captured ``q, k``."""
    layers = linearized_modules(model)
    if records is None:
        records = capture_qkv(model, batches)
    out: dict[str, dict[str, float]] = {}
    for name, layer in layers:
        acc: dict[str, float] = {}
        recs = records[name]
        for r in recs:
            fq, fk = layer.attn.features(r.q, r.k)
            fid = attention_fidelity(r.q, r.k, fq, fk, causal=layer.causal, attention_mask=r.mask, scale=layer.scale)
            for key, val in fid.items():
                if key == "uniform_entropy":
                    continue
                acc[key] = acc.get(key, 0.0) + float(val.mean()) * r.q.shape[0]  # batches weighted by rows
        out[name] = {k: v / max(sum(r.q.shape[0] for r in recs), 1) for k, v in acc.items()}
    return out


def copy_maps(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """A detached copy of every converted layer's feature-map state (to compare or restore)."""
    return {n: copy.deepcopy(m.attn.state_dict()) for n, m in linearized_modules(model)}
