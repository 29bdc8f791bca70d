"""Typed, strictly loaded settings of a conversion: which layers, which feature map, how to distill.

Defaults reproduce the paper's App. C.2 distillation settings (AdamW, lr 1e-2, weight decay 0,
early stopping on held-out loss). ``from_dict`` rejects unknown keys, so a typo in a saved config
fails at load instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..feature_maps import available_feature_maps

__all__ = ["DistillConfig", "EngineOptions", "FinetuneConfig", "LinearizeConfig"]


def _strict_kwargs(cls, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(names)}")
    return dict(data)


def _check_engine(cfg) -> None:
    """Validate the training-engine fields shared by DistillConfig and FinetuneConfig."""
    name = type(cfg).__name__
    if cfg.strategy not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"{name}: strategy must be 'auto', 'ddp' or 'fsdp', got {cfg.strategy!r}")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise ValueError(f"{name}: max_grad_norm must be > 0 or None, got {cfg.max_grad_norm}")
    if cfg.checkpoint_every is not None and cfg.checkpoint_every < 1:
        raise ValueError(f"{name}: checkpoint_every must be >= 1 or None, got {cfg.checkpoint_every}")
    if (cfg.checkpoint_every is not None or cfg.resume) and not cfg.checkpoint_dir:
        raise ValueError(f"{name}: checkpoint_every/resume need checkpoint_dir")
    if cfg.log_every < 1:
        raise ValueError(f"{name}: log_every must be >= 1, got {cfg.log_every}")


@dataclass
class LinearizeConfig:
    """What to swap and into what.

    Attributes:
        feature_map: registry name (``hedgehog``, ``elu``, ``t2r``, ``performer``, ...).
        feature_map_kwargs: passed to the registry (e.g. ``{"activation": "exp"}``).
        tie_qk: one map for q and k (needs as many KV heads as query heads).
        keep_softmax_layers: layer indices (0-based, negative counts from the end) left as softmax.
        targets: explicit module names to convert (exact names from ``named_modules()``); ``None``
            takes the architecture's default targets (every self-attention module).
        backend: op backend of the linear attention (``auto`` = Triton on CUDA, else chunked).
        eps: normalizer epsilon of the linear attention.
    """

    feature_map: str = "hedgehog"
    feature_map_kwargs: dict[str, Any] = field(default_factory=dict)
    tie_qk: bool = False
    keep_softmax_layers: list[int] = field(default_factory=list)
    targets: list[str] | None = None
    backend: str = "auto"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.feature_map not in available_feature_maps():
            raise ValueError(
                f"unknown feature_map {self.feature_map!r}; valid names: {', '.join(available_feature_maps())}"
            )
        self.keep_softmax_layers = [int(i) for i in self.keep_softmax_layers]
        if self.targets is not None:
            self.targets = [str(t) for t in self.targets]
            if not self.targets:
                raise ValueError("targets=[] converts nothing; pass None for the architecture's defaults")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinearizeConfig:
        return cls(**_strict_kwargs(cls, data))


@dataclass
class EngineOptions:
    """How a conversion stage runs on :class:`hedgehog_attention.train.Trainer` (shared by
    :class:`DistillConfig` and :class:`FinetuneConfig`).

    Attributes:
        seed: RNG seed (batch order; initialisation where the stage has any).
        max_grad_norm: clip the global gradient norm (None: no clipping, as App. C.2).
        strategy: ``auto`` (DDP under torchrun, plain with one process), ``ddp`` or ``fsdp``.
        checkpoint_dir / checkpoint_every / resume: atomic checkpoints of the run every N steps
            and exact continuation of a killed run (see docs/distributed.md).
        log_every: steps per row of the training history (loss, tokens/s).
    """

    seed: int = 0
    max_grad_norm: float | None = None
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    log_every: int = 10

    def __post_init__(self) -> None:
        _check_engine(self)


@dataclass
class DistillConfig(EngineOptions):
    """Attention transfer (Eq. 3) of all converted layers at once.

    Attributes:
        steps: maximum optimizer steps.
        lr: AdamW learning rate (App. C.2: 1e-2).
        weight_decay: AdamW weight decay (App. C.2: 0).
        batch_size: sequences per step.
        eval_every: steps between held-out evaluations (early stopping and best-state tracking).
        patience: evaluations without improvement before stopping (0 = never stop early).
        min_delta: an evaluation improves only when it beats the best by more than this.
        output_mse_weight: weight of LoLCATs' attention-output MSE added to Eq. 3 (0 = Eq. 3 only).
        query_chunk_size: queries per chunk inside the loss (memory ``O(T * chunk)`` per head).
        capture: ``cached`` records the teacher's q, k once and trains on them (fast: no model
            forward per step; memory ~ tokens x layers x heads x head_dim); ``online`` runs the
            frozen model every step in distill mode (memory-bounded, for large corpora/GPUs).
        seed / max_grad_norm / strategy / checkpoint_dir / checkpoint_every / resume / log_every:
            see :class:`EngineOptions`.
    """

    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 8
    eval_every: int = 25
    patience: int = 4
    min_delta: float = 1e-4
    output_mse_weight: float = 0.0
    query_chunk_size: int = 256
    capture: Literal["cached", "online"] = "cached"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 0 or self.batch_size < 1 or self.eval_every < 1 or self.patience < 0:
            raise ValueError(
                "expected steps >= 0, batch_size >= 1, eval_every >= 1, patience >= 0; got "
                f"steps={self.steps}, batch_size={self.batch_size}, eval_every={self.eval_every}, "
                f"patience={self.patience}"
            )
        if not self.lr > 0:  # also refuses NaN
            raise ValueError(f"lr must be > 0, got {self.lr}")
        # each of these was accepted and then silently misbehaved: a negative weight was ignored
        # (the MSE term only applies when > 0), a chunk size < 1 made the loss 0 (no query chunk) or
        # failed deep inside the loss, a negative min_delta or weight decay failed only after capture
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")
        if not self.output_mse_weight >= 0:
            raise ValueError(f"output_mse_weight must be >= 0 (0 = Eq. 3 only), got {self.output_mse_weight}")
        if self.query_chunk_size < 1:
            raise ValueError(f"query_chunk_size must be >= 1, got {self.query_chunk_size}")
        if self.capture not in ("cached", "online"):
            raise ValueError(f"capture must be 'cached' or 'online', got {self.capture!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        return cls(**_strict_kwargs(cls, data))


@dataclass
class FinetuneConfig(EngineOptions):
    """Finetuning after the swap.

    Attributes:
        method: ``lora`` (peft adapters on the attention projections) or ``full``.
        task: ``lm`` (next-token loss; decoders) or ``classification`` (cross-entropy on labels).
        steps: optimizer steps.
        lr: AdamW learning rate (LoLCATs: 1e-4 for LoRA).
        weight_decay: AdamW weight decay.
        batch_size: sequences per step.
        lora_r / lora_alpha / lora_dropout: LoRA rank, scale and dropout.
        lora_targets: module-name suffixes that get adapters; ``None`` = the architecture's q/k/v/o.
        train_feature_maps: also train the (distilled) feature maps (LoLCATs keeps them frozen).
        seed / max_grad_norm / strategy / checkpoint_dir / checkpoint_every / resume / log_every:
            see :class:`EngineOptions` (the run goes through ``hedgehog_attention.train.Trainer``).
    """

    method: Literal["lora", "full"] = "lora"
    task: Literal["lm", "classification"] = "lm"
    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None
    train_feature_maps: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in ("lora", "full"):
            raise ValueError(f"method must be 'lora' or 'full', got {self.method!r}")
        if self.task not in ("lm", "classification"):
            raise ValueError(f"task must be 'lm' or 'classification', got {self.task!r}")
        if self.steps < 0 or self.batch_size < 1 or self.lora_r < 1:
            raise ValueError(
                f"expected steps >= 0, batch_size >= 1, lora_r >= 1; got {self.steps}, {self.batch_size}, {self.lora_r}"
            )
        if not self.lr > 0:  # also refuses NaN
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        return cls(**_strict_kwargs(cls, data))
