"""``hedgehog pretrained-conversion``: linearize a pretrained decoder (Table 3 analog).

SmolLM2-135M (Llama family, GQA) is converted with each method (Hedgehog, T2R, 1+ELU): swap every
attention (:func:`hedgehog_attention.convert.linearize`), distill the maps with Eq. 3 on training
text where the method distills (App. C.2, as for GPT-2 in the paper), then finetune with the
next-token loss on the training corpus (App. C.2: lr 6e-4, wd 0.01 for full finetuning; LoRA is an
option). Reports held-out perplexity vs the softmax original and the tokens used by each stage,
plus Fig. 2/4-style heat maps of one held-out block.

Data: the offline public-domain corpus (Austen + KJV + Moby Dick, split by chapter), tokenized with
the model's own tokenizer; ``synthetic`` + ``model.source: tiny`` is a CPU smoke size.
``max_train_blocks`` takes a seeded random subset of the training blocks (not the first ones,
which would all be Austen). For a machine without the assets, ``--prepare-data NPZ`` writes the
blocks the config uses (``uint16``; ``data.source: tokens`` + ``data.path`` reads them), and
``model.gguf`` names a carried GGUF file to dequantize instead of the installed package.

Several processes can each run a subset of ``methods`` (the original model is loaded, not
trained, so they agree on it); ``--merge DIR ...`` renders one report from their outputs.

Usage::

    hedgehog pretrained-conversion --config configs/pretrained_conversion.yaml --device cuda
    hedgehog pretrained-conversion --config configs/pretrained_conversion_smoke.yaml
    hedgehog pretrained-conversion --config configs/pretrained_conversion.yaml --prepare-data .carry/pc/tokens.npz
    hedgehog pretrained-conversion --config CFG --out runs/pc --merge runs/pc_a runs/pc_b
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..metrics import perplexity as ppl_of_nll
from .attention_maps import snapshot
from .common import (
    ConfigError,
    check_map_indices,
    config_to_dict,
    environment_info,
    markdown_table,
    merge_method_runs,
    pick_device,
    setup_logging,
)
from .method_sweep import load_sweep_config, run_methods, write_figures, write_report

log = logging.getLogger("hedgehog_attention.experiments.pretrained_conversion")
TITLE = "pretrained conversion"  # figure titles


@dataclass
class PCData:
    """block_size: tokens per sequence. max_train_blocks: a seeded random subset of the training
    blocks (None = all); max_eval_blocks: the first blocks of validation and test. source
    ``tokens``: the blocks in ``path`` (an NPZ from ``--prepare-data``)."""

    source: Literal["public_domain", "tokens", "synthetic"] = "public_domain"
    path: str | None = None
    block_size: int = 512
    batch_size: int = 8
    max_train_blocks: int | None = None
    max_eval_blocks: int | None = 64


@dataclass
class PCModel:
    """source: smollm2 (SmolLM2-135M-Instruct) or tiny (random LlamaConfig; smoke). path: a local HF
    folder (e.g. the float32 SmolLM2 cache of ``models_zoo``) to load instead of the installed GGUF;
    gguf: a GGUF file to dequantize instead (e.g. one carried to a GPU machine)."""

    source: Literal["smollm2", "tiny"] = "smollm2"
    path: str | None = None
    gguf: str | None = None
    tiny_hidden: int = 32
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_kv_heads: int = 2
    tiny_vocab: int = 64


# ``feature_map: softmax`` is the baseline: the original model finetuned on the same tokens, unconverted
# (separates what finetuning on this corpus does from what the conversion costs).
SOFTMAX = "softmax"


@dataclass
class PCMethod:
    name: str
    feature_map: str
    feature_map_kwargs: dict[str, Any] = field(default_factory=dict)
    distill: bool = False


@dataclass
class PCStages:
    distill_steps: int = 300
    distill_lr: float = 1e-2
    distill_eval_every: int = 25
    distill_patience: int = 4
    distill_capture: Literal["cached", "online"] = "cached"  # online: no q,k cache (large models)
    finetune_method: Literal["full", "lora"] = "full"
    finetune_steps: int = 300
    finetune_lr: float = 6e-4
    finetune_weight_decay: float = 0.01


@dataclass
class PretrainedConversionConfig:
    data: PCData = field(default_factory=PCData)
    model: PCModel = field(default_factory=PCModel)
    stages: PCStages = field(default_factory=PCStages)
    methods: list[PCMethod] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/pretrained_conversion"
    map_layers: list[int] = field(default_factory=lambda: [0, 15])
    map_heads: list[int] = field(default_factory=lambda: [0, 1, 2])
    map_tokens: int | None = 64  # heat maps show the first this-many tokens of the held-out block
    backend: str = "auto"  # linear-attention op backend (ops.BACKENDS); "reference" = quadratic, exact
    matmul_precision: Literal["highest", "high"] = "highest"  # "high" allows TF32 matmuls on CUDA
    max_seconds: float | None = None  # no method starts after this (from the process start), except the first

    def __post_init__(self) -> None:
        from ..feature_maps import available_feature_maps

        if not self.methods:
            raise ValueError("methods is empty")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}")
        if self.data.source == "tokens" and not self.data.path:
            raise ValueError("data.source: tokens needs data.path (an NPZ written by --prepare-data)")
        for m in self.methods:
            if m.feature_map != SOFTMAX and m.feature_map not in available_feature_maps():
                raise ValueError(f"method {m.name}: unknown feature_map {m.feature_map!r}")
            if m.feature_map == SOFTMAX and m.distill:
                raise ValueError(f"method {m.name}: the softmax baseline has nothing to distill")


def load_model_and_blocks(cfg: PretrainedConversionConfig) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    torch.manual_seed(cfg.seed)
    bs = cfg.data.block_size
    if cfg.model.source == "smollm2":
        from ..models_zoo import load_smollm2

        if cfg.model.gguf:
            model, tok = load_gguf(Path(cfg.model.gguf))
        elif cfg.model.path:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(cfg.model.path, attn_implementation="eager")
            tok = AutoTokenizer.from_pretrained(cfg.model.path)
        else:
            model, tok = load_smollm2()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        m = cfg.model
        lc = LlamaConfig(
            vocab_size=m.tiny_vocab,
            hidden_size=m.tiny_hidden,
            intermediate_size=4 * m.tiny_hidden,
            num_hidden_layers=m.tiny_layers,
            num_attention_heads=m.tiny_heads,
            num_key_value_heads=m.tiny_kv_heads,
            max_position_embeddings=max(128, bs),
            attn_implementation="eager",
        )
        model, tok = LlamaForCausalLM(lc), None
    if cfg.data.source == "tokens":
        with np.load(cfg.data.path) as z:
            blocks = {s: torch.from_numpy(z[s].astype(np.int64)) for s in ("train", "validation", "test")}
        got = blocks["train"].shape[1]
        if got != bs:
            raise ValueError(f"{cfg.data.path} holds blocks of {got} tokens; the config asks for {bs}")
    elif cfg.data.source == "public_domain":
        from ..tasks.lm_data import public_domain_lm_splits

        splits = public_domain_lm_splits(block_size=bs, tokenizer=tok)
        blocks = {s: d.blocks for s, d in splits.items()}
    else:
        gen = torch.Generator().manual_seed(cfg.seed + 3)
        period = torch.randint(0, cfg.model.tiny_vocab, (16,), generator=gen)

        def stream(n):  # a periodic sequence with 10% noise: learnable, so perplexity can move
            s = period.repeat(n * bs // 16 + 1)[: n * bs]
            noise = torch.rand(s.shape, generator=gen) < 0.1
            return torch.where(noise, torch.randint(0, cfg.model.tiny_vocab, s.shape, generator=gen), s).view(n, bs)

        blocks = {"train": stream(32), "validation": stream(8), "test": stream(8)}
    if cfg.data.max_train_blocks is not None and cfg.data.max_train_blocks < len(blocks["train"]):
        # A random subset: the corpus is packed book by book, so the first blocks are one author.
        gen = torch.Generator().manual_seed(cfg.seed + 11)
        keep = torch.randperm(len(blocks["train"]), generator=gen)[: cfg.data.max_train_blocks]
        blocks["train"] = blocks["train"][keep.sort().values]
    for s in ("validation", "test"):
        if cfg.data.max_eval_blocks is not None:
            blocks[s] = blocks[s][: cfg.data.max_eval_blocks]
    return model, tok, blocks


def load_gguf(path: Path) -> tuple[Any, Any]:
    """Dequantize a Llama-family GGUF file into a plain float32 ``*ForCausalLM`` (eager attention)
    and its tokenizer, without writing a cache (as ``models_zoo.load_smollm2`` does once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    src = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.load_state_dict(src.state_dict())
    model.tie_weights()
    return model.eval(), tok


def prepare_data(cfg: PretrainedConversionConfig, path: Path) -> dict[str, int]:
    """Write the blocks this config uses (train subset, capped validation/test) as uint16 NPZ."""
    _, _, blocks = load_model_and_blocks(cfg)
    if max(int(b.max()) for b in blocks.values()) >= 2**16:
        raise ValueError("token ids do not fit uint16")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{s: b.numpy().astype(np.uint16) for s, b in blocks.items()})
    return {s: int(b.numel()) for s, b in blocks.items()}


def lm_batches(blocks: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in blocks.split(batch_size)
    ]


def perplexity(model, batches) -> float:
    from ..convert.finetune import evaluate_loss

    loss, _ = evaluate_loss(model, batches, "lm")
    return ppl_of_nll(loss)


def _finetune_config(cfg: PretrainedConversionConfig):
    from ..convert import FinetuneConfig

    st = cfg.stages
    return FinetuneConfig(
        method=st.finetune_method,
        task="lm",
        steps=st.finetune_steps,
        lr=st.finetune_lr,
        weight_decay=st.finetune_weight_decay,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
    )


def convert_one(original, method: PCMethod, train_b, valid_b, test_b, sample, cfg: PretrainedConversionConfig) -> dict:
    from ..convert import DistillConfig, LinearizeConfig, linearize
    from ..convert.distill import distill
    from ..convert.finetune import finetune

    t0 = time.perf_counter()
    st = cfg.stages
    tokens_per_step = cfg.data.batch_size * cfg.data.block_size
    # Seeded per method: a random feature map's init (T2R, Performer) must not depend on which methods
    # ran before it in this process (--only subsets).
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(original)
    res: dict[str, Any] = {"method": method.name, "feature_map": method.feature_map, "distill": method.distill}
    if method.feature_map == SOFTMAX:
        res["distill_tokens"] = 0
        model, _ = finetune(model, train_b, None, _finetune_config(cfg), progress=False)
        res["finetune_tokens"] = st.finetune_steps * tokens_per_step
        res["test_ppl"] = perplexity(model, test_b)
        res["seconds"] = time.perf_counter() - t0
        return res | {"_maps": None}
    linearize(
        model,
        LinearizeConfig(
            feature_map=method.feature_map, feature_map_kwargs=dict(method.feature_map_kwargs), backend=cfg.backend
        ),
    )
    res["ppl_after_swap"] = perplexity(model, test_b)
    res["distill_tokens"] = 0
    if method.distill:
        dc = DistillConfig(
            steps=st.distill_steps,
            lr=st.distill_lr,
            eval_every=st.distill_eval_every,
            patience=st.distill_patience,
            batch_size=cfg.data.batch_size,
            capture=st.distill_capture,
            seed=cfg.seed,
        )
        nolab = [{k: v for k, v in b.items() if k != "labels"} for b in train_b]
        dres = distill(
            model, nolab, [{k: v for k, v in b.items() if k != "labels"} for b in valid_b], dc, progress=False
        )
        res["distill_steps"] = dres.steps_run
        res["distill_tokens"] = dres.steps_run * tokens_per_step
        res["ppl_after_distill"] = perplexity(model, test_b)
    maps_before = snapshot(model, sample, cfg.map_layers, cfg.map_heads)
    model, _ = finetune(model, train_b, None, _finetune_config(cfg), progress=False)
    res["finetune_tokens"] = st.finetune_steps * tokens_per_step
    res["test_ppl"] = perplexity(model, test_b)
    res["seconds"] = time.perf_counter() - t0
    maps = snapshot(model, sample, cfg.map_layers, cfg.map_heads)
    # The softmax panels show the original model: its q, k before finetuning moves the projections.
    maps["softmax"] = maps_before["softmax"]
    maps["softmax_dots"] = maps_before["dots"]
    return res | {"_maps": maps}


def render(cfg: PretrainedConversionConfig, results: dict, env: dict, command: str) -> str:
    rows = [["softmax (original)", "-", f"{results['original_test_ppl']:.2f}", "-", "-", "0", "0"]]
    for r in results["methods"]:
        rows.append(
            [
                r["method"],
                "yes" if r["distill"] else "no",
                f"{r['test_ppl']:.2f}",
                f"{r['ppl_after_swap']:.1f}" if "ppl_after_swap" in r else "-",
                f"{r['ppl_after_distill']:.1f}" if "ppl_after_distill" in r else "-",
                f"{r['distill_tokens']:,}",
                f"{r['finetune_tokens']:,}",
            ]
        )
    table = markdown_table(
        [
            "model",
            "Eq. 3 distill",
            "test ppl",
            "ppl after swap",
            "ppl after distill",
            "distill tokens",
            "finetune tokens",
        ],
        rows,
    )
    st = cfg.stages
    return "\n".join(
        [
            "# Pretrained conversion (Table 3 analog)",
            "",
            f"Command: `{command}`",
            "",
            f"Environment: {', '.join(f'{k} {v}' for k, v in env.items())}",
            "",
            f"Data: {results['data']}. Model: {results['model']}.",
            f"Stages: Eq. 3 distillation (lr {st.distill_lr}, <= {st.distill_steps} steps, early stopping on "
            f"validation) where marked; then {st.finetune_method} finetuning, {st.finetune_steps} steps at lr "
            f"{st.finetune_lr}, wd {st.finetune_weight_decay}, on the training split. Perplexity on the test split. "
            f"Linear-attention backend: {cfg.backend}; matmul precision: {cfg.matmul_precision}.",
            "",
            table,
            "",
        ]
        + (
            [f"Not run (max_seconds reached): {', '.join(results['skipped_for_time'])}.", ""]
            if results.get("skipped_for_time")
            else []
        )
        + [
            "Paper (GPT-2 125M on WikiText-103): GPT-2 28.0, T2R-GPT-2 19.4, Hedgehog-GPT-2 16.7 (after finetuning).",
            "",
        ]
        + [f"![maps layer {la}](attention_maps_layer{la}.png)" for la in cfg.map_layers]
        + ["", "![monotonicity](monotonicity.png)", ""]
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hedgehog pretrained-conversion", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML/JSON of PretrainedConversionConfig")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override KEY=VALUE")
    p.add_argument("--device", help="cpu | cuda | auto")
    p.add_argument("--out", help="output folder")
    p.add_argument("--only", metavar="NAMES", help="run only these methods (comma-separated names from the config)")
    p.add_argument("--prepare-data", metavar="NPZ", help="write the token blocks this config uses to NPZ, exit")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="combine runs (method subsets) into <out>, render")
    return p


def merge_runs(cfg: PretrainedConversionConfig, dirs: list[Path], out: Path) -> tuple[dict, dict, dict, dict]:
    """Combine ``results.json`` + ``attention_maps.npz`` of runs of the same original model.

    Raises ``ValueError`` when their original perplexities differ by more than 0.1% (another model
    or data) or a method appears twice.
    """

    return merge_method_runs(
        dirs, out, config=config_to_dict(cfg), method_order=[m.name for m in cfg.methods],
        baseline=lambda r: r["original_test_ppl"], baseline_name="original model (test ppl)", tolerance=1e-3,
        relative=True,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = load_sweep_config(PretrainedConversionConfig, args)
    except (ConfigError, ValueError) as err:
        log.error("%s", err)
        return 2
    if args.prepare_data:
        counts = prepare_data(cfg, Path(args.prepare_data))
        log.info("wrote %s: %s tokens", args.prepare_data, counts)
        return 0
    out = Path(cfg.out_dir)
    command = ("hedgehog pretrained-conversion " + " ".join(argv if argv is not None else [])).strip()
    if args.merge:
        results, env, snaps, meta = merge_runs(cfg, [Path(d) for d in args.merge], out)
        write_figures(snaps, meta, out, TITLE)
        return write_report(render(cfg, results, env, command), out / "pretrained_conversion.md")
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.matmul_precision == "high"
    env = environment_info(device) | {"matmul_precision": cfg.matmul_precision}
    model, tok, blocks = load_model_and_blocks(cfg)
    try:  # before the distillations, not at the first snapshot
        check_map_indices(model, cfg.map_layers, cfg.map_heads)
    except ValueError as err:
        log.error("%s", err)
        return 2
    model.to(device)
    bsz = cfg.data.batch_size
    train_b, valid_b, test_b = (lm_batches(blocks[s], bsz) for s in ("train", "validation", "test"))
    n_map = cfg.map_tokens or cfg.data.block_size
    sample = {k: v[:1, :n_map] for k, v in test_b[0].items()}
    results: dict[str, Any] = {
        "data": f"{cfg.data.source}: "
        + ", ".join(f"{s} {blocks[s].numel():,} tokens" for s in ("train", "validation", "test"))
        + f", blocks of {cfg.data.block_size}",
        "model": f"{cfg.model.source}, {sum(p.numel() for p in model.parameters()):,} parameters",
        "original_test_ppl": perplexity(model, test_b),
        "methods": [],
        "skipped_for_time": [],
    }
    log.info("original test ppl %.2f", results["original_test_ppl"])
    ids = sample["input_ids"][0].tolist()
    tokens = tok.convert_ids_to_tokens(ids) if tok is not None else [str(i) for i in ids]
    meta = {"layers": cfg.map_layers, "heads": cfg.map_heads, "tokens": tokens}
    snaps = run_methods(
        cfg.methods, lambda m: convert_one(model, m, train_b, valid_b, test_b, sample, cfg),
        results=results, config=config_to_dict(cfg), environment=env, snapshot_meta=meta, out=out,
        max_seconds=cfg.max_seconds, t_start=t_start,
        describe=lambda r: f"test ppl {r['test_ppl']:.2f} ({r['seconds']:.0f} s)",
    )  # fmt: skip
    write_figures(snaps, meta, out, TITLE)
    return write_report(render(cfg, results, env, command), out / "pretrained_conversion.md")
