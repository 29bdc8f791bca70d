"""``hedgehog finetuned-conversion``: finetuned-conversion across feature maps (Tables 2 and 5, Fig. 3).

1. Teacher: all-MiniLM-L6-v2 + a classification head, finetuned on the fine-food sentiment train
   split; a dev split carved from train (``data.dev_fraction``) picks the best epoch (early
   stopping). The test split is only scored.
2. For each method: copy the teacher, swap every attention for linear attention
   (:func:`hedgehog_attention.convert.linearize`), distill the feature maps with Eq. 3 when the
   method distills (T2R-HH, Hedgehog; App. C.2: AdamW lr 1e-2, early stopping on dev), then
   finetune the whole model on the task (App. C.2: lr 1e-5) and score the test split.
3. Report test accuracy, "% of the teacher recovered" (accuracy / teacher accuracy; paper:
   Hedgehog 99.3%, T2R 88.9% on GLUE), attention fidelity on dev (entropy, monotonicity, KL to
   softmax), Fig. 3 (weight vs q.k) and Fig. 8-style heat maps for one held-out test sample.

``model.source: tiny`` with ``data.source: synthetic`` is a CPU smoke size (a random 2-layer BERT).

Usage::

    hedgehog finetuned-conversion --config configs/finetuned_conversion.yaml --device cuda
    hedgehog finetuned-conversion --config configs/finetuned_conversion_smoke.yaml
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .attention_maps import plot_heatmaps, plot_monotonicity, save_snapshots, snapshot
from .common import (
    ConfigError,
    config_to_dict,
    environment_info,
    load_config_from_cli,
    markdown_table,
    pick_device,
    save_json,
    setup_logging,
)

log = logging.getLogger("hedgehog_attention.experiments.finetuned_conversion")


@dataclass
class FCData:
    """source: fine_food (offline, 4000 train / 1000 test) or synthetic (smoke). dev_fraction: share
    of train held out for early stopping. max_train / max_test: caps (None = all)."""

    source: Literal["fine_food", "synthetic"] = "fine_food"
    max_length: int = 128
    dev_fraction: float = 0.1
    batch_size: int = 32
    max_train: int | None = None
    max_test: int | None = None
    synthetic_size: int = 256


@dataclass
class FCModel:
    """source: minilm (all-MiniLM-L6-v2) or tiny (random BertConfig of the given size; smoke).
    path: a local HF folder to load instead of the installed package (e.g. a copy carried to a GPU
    machine that has no assets)."""

    source: Literal["minilm", "tiny"] = "minilm"
    path: str | None = None
    tiny_hidden: int = 32
    tiny_layers: int = 2
    tiny_heads: int = 2
    tiny_vocab: int = 64


@dataclass
class FCTeacher:
    epochs: int = 4
    lr: float = 5e-5
    weight_decay: float = 0.01


@dataclass
class FCMethod:
    """name: table label; feature_map: registry name; distill: train the maps with Eq. 3 first."""

    name: str
    feature_map: str
    feature_map_kwargs: dict[str, Any] = field(default_factory=dict)
    distill: bool = False


@dataclass
class FCConvert:
    """App. C.2: distill maps with AdamW lr 1e-2, wd 0, early stopping on dev; then finetune the
    model with lr 1e-5, wd 0."""

    distill_steps: int = 500
    distill_lr: float = 1e-2
    distill_eval_every: int = 25
    distill_patience: int = 4
    finetune_epochs: int = 2
    finetune_lr: float = 1e-5
    finetune_weight_decay: float = 0.0


@dataclass
class FinetunedConversionConfig:
    data: FCData = field(default_factory=FCData)
    model: FCModel = field(default_factory=FCModel)
    teacher: FCTeacher = field(default_factory=FCTeacher)
    convert: FCConvert = field(default_factory=FCConvert)
    methods: list[FCMethod] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/finetuned_conversion"
    map_layers: list[int] = field(default_factory=lambda: [0])
    map_heads: list[int] = field(default_factory=lambda: [0, 1, 2, 3])

    def __post_init__(self) -> None:
        from ..feature_maps import available_feature_maps

        if not self.methods:
            raise ValueError("methods is empty")
        for m in self.methods:
            if m.feature_map not in available_feature_maps():
                raise ValueError(f"method {m.name}: unknown feature_map {m.feature_map!r}")
        if not 0 < self.data.dev_fraction < 1:
            raise ValueError(f"data.dev_fraction must be in (0, 1), got {self.data.dev_fraction}")


# ------------------------------------------------------------------------------------ data/model
def _synthetic_rows(n: int, vocab: int, length: int, gen: torch.Generator) -> list[tuple[list[int], int]]:
    """Label 1 when token 5 occurs more often than token 6 (needs attention to count)."""
    rows = []
    for _ in range(n):
        ids = torch.randint(7, vocab, (length,), generator=gen)
        n5, n6 = torch.randint(0, 4, (2,), generator=gen).tolist()
        pos = torch.randperm(length - 1, generator=gen)[: n5 + n6] + 1
        ids[pos[:n5]], ids[pos[n5:]] = 5, 6
        ids[0] = 2  # a [CLS]-like first token
        rows.append((ids.tolist(), int(n5 > n6)))
    return rows


def load_model_and_data(cfg: FinetunedConversionConfig):
    """``(model, tokenizer-or-None, train_rows, test_rows)``; rows are ``(text or ids, label)``."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )

    torch.manual_seed(cfg.seed)
    if cfg.model.source == "minilm":
        from ..models_zoo import minilm_path

        path = Path(cfg.model.path) if cfg.model.path else minilm_path()
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, attn_implementation="eager", local_files_only=True
        )
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    else:
        m = cfg.model
        bc = BertConfig(
            vocab_size=m.tiny_vocab,
            hidden_size=m.tiny_hidden,
            num_hidden_layers=m.tiny_layers,
            num_attention_heads=m.tiny_heads,
            intermediate_size=4 * m.tiny_hidden,
            max_position_embeddings=max(64, cfg.data.max_length),
            num_labels=2,
            attn_implementation="eager",
        )
        model, tok = BertForSequenceClassification(bc), None
    if cfg.data.source == "fine_food":
        from ..tasks.corpora import load_fine_food

        train_rows, test_rows = load_fine_food()
    else:
        gen = torch.Generator().manual_seed(cfg.seed + 7)
        n = cfg.data.synthetic_size
        vocab = cfg.model.tiny_vocab
        train_rows = _synthetic_rows(n, vocab, min(24, cfg.data.max_length), gen)
        test_rows = _synthetic_rows(n // 2, vocab, min(24, cfg.data.max_length), gen)
    if cfg.data.max_train is not None:
        train_rows = train_rows[: cfg.data.max_train]
    if cfg.data.max_test is not None:
        test_rows = test_rows[: cfg.data.max_test]
    return model, tok, list(train_rows), list(test_rows)


def make_batches(rows, tok, cfg: FinetunedConversionConfig) -> list[dict[str, torch.Tensor]]:
    out = []
    bs = cfg.data.batch_size
    for i in range(0, len(rows), bs):
        chunk = rows[i : i + bs]
        labels = torch.tensor([int(r[1]) for r in chunk])
        if tok is not None:
            enc = tok(
                [r[0] for r in chunk],
                padding=True,
                truncation=True,
                max_length=cfg.data.max_length,
                return_tensors="pt",
            )
            ids, mask = enc["input_ids"], enc["attention_mask"]
        else:
            ids = torch.tensor([r[0] for r in chunk])
            mask = torch.ones_like(ids)
        out.append(
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}
        )
    return out


def _no_labels(batches):
    return [{k: v for k, v in b.items() if k != "labels"} for b in batches]


# ------------------------------------------------------------------------------------- stages
def train_teacher(model, train_b, dev_b, cfg: FinetunedConversionConfig) -> tuple[Any, dict]:
    """Full finetune for ``teacher.epochs`` epochs; keep the epoch with the best dev accuracy."""
    from ..convert import FinetuneConfig
    from ..convert.finetune import evaluate_loss, finetune

    best, best_acc, hist = copy.deepcopy(model.state_dict()), -1.0, []
    for epoch in range(cfg.teacher.epochs):
        fc = FinetuneConfig(
            method="full",
            task="classification",
            steps=len(train_b),
            lr=cfg.teacher.lr,
            weight_decay=cfg.teacher.weight_decay,
            batch_size=cfg.data.batch_size,
            seed=cfg.seed + epoch,
        )
        model, _ = finetune(model, train_b, None, fc, progress=False)
        _, acc = evaluate_loss(model, dev_b, "classification")
        hist.append({"epoch": epoch + 1, "dev_accuracy": acc})
        log.info("teacher epoch %d dev accuracy %.4f", epoch + 1, acc)
        if acc > best_acc:
            best, best_acc = copy.deepcopy(model.state_dict()), acc
    model.load_state_dict(best)
    return model, {"history": hist, "best_dev_accuracy": best_acc}


def convert_one(teacher, method: FCMethod, train_b, dev_b, test_b, sample, cfg: FinetunedConversionConfig) -> dict:
    from ..convert import DistillConfig, FinetuneConfig, LinearizeConfig, linearize
    from ..convert.distill import distill, evaluate_fidelity
    from ..convert.finetune import evaluate_loss, finetune

    t0 = time.perf_counter()
    model = copy.deepcopy(teacher)
    linearize(
        model, LinearizeConfig(feature_map=method.feature_map, feature_map_kwargs=dict(method.feature_map_kwargs))
    )
    res: dict[str, Any] = {"method": method.name, "feature_map": method.feature_map, "distill": method.distill}
    if method.distill:
        dc = DistillConfig(
            steps=cfg.convert.distill_steps,
            lr=cfg.convert.distill_lr,
            eval_every=cfg.convert.distill_eval_every,
            patience=cfg.convert.distill_patience,
            batch_size=cfg.data.batch_size,
            seed=cfg.seed,
        )
        dres = distill(model, _no_labels(train_b), _no_labels(dev_b), dc, progress=False)
        res["distill_steps"] = dres.steps_run
        res["distill_best_eval_loss"] = dres.best_eval_loss
    fid = evaluate_fidelity(model, _no_labels(dev_b[:2]))
    for key in ("kl", "entropy_softmax", "entropy_linear", "monotonicity_linear"):
        res[key] = sum(f[key] for f in fid.values()) / len(fid)
    _, res["dev_accuracy_after_swap"] = evaluate_loss(model, dev_b, "classification")
    maps_before = snapshot(model, sample, cfg.map_layers, cfg.map_heads)
    fc = FinetuneConfig(
        method="full",
        task="classification",
        steps=cfg.convert.finetune_epochs * len(train_b),
        lr=cfg.convert.finetune_lr,
        weight_decay=cfg.convert.finetune_weight_decay,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
    )
    model, _ = finetune(model, train_b, None, fc, progress=False)
    _, res["dev_accuracy"] = evaluate_loss(model, dev_b, "classification")
    _, res["test_accuracy"] = evaluate_loss(model, test_b, "classification")
    res["seconds"] = time.perf_counter() - t0
    maps = snapshot(model, sample, cfg.map_layers, cfg.map_heads)
    maps["softmax"] = maps_before["softmax"]
    maps["softmax_dots"] = maps_before[
        "dots"
    ]  # the teacher's q.k, matching its weights  # the teacher's weights (original projections)
    return res | {"_maps": maps}


def render(cfg: FinetunedConversionConfig, results: dict, env: dict, command: str) -> str:
    teacher = results["teacher"]["test_accuracy"]
    rows = []
    for r in results["methods"]:
        rows.append(
            [
                r["method"],
                "yes" if r["distill"] else "no",
                f"{100 * r['test_accuracy']:.1f}",
                f"{100 * r['test_accuracy'] / teacher:.1f}%",
                f"{100 * r['dev_accuracy_after_swap']:.1f}",
                f"{r['entropy_linear']:.2f}",
                f"{r['monotonicity_linear']:.2f}",
                f"{r['kl']:.3f}",
            ]
        )
    table = markdown_table(
        [
            "method",
            "Eq. 3 distill",
            "test acc %",
            "% of teacher",
            "dev acc before finetune",
            "entropy",
            "monotonicity",
            "KL to softmax",
        ],
        rows,
    )
    ent_sm = results["methods"][0]["entropy_softmax"] if results["methods"] else float("nan")
    return "\n".join(
        [
            "# Finetuned conversion (Tables 2 and 5 analog, Fig. 3)",
            "",
            f"Command: `{command}`",
            "",
            f"Environment: {', '.join(f'{k} {v}' for k, v in env.items())}",
            "",
            f"Data: {results['data']}. Model: {results['model']}.",
            f"Teacher (softmax, finetuned {cfg.teacher.epochs} epochs at lr {cfg.teacher.lr}, best epoch by dev "
            f"accuracy): test accuracy **{100 * teacher:.1f}%** "
            f"(dev {100 * results['teacher']['best_dev_accuracy']:.1f}%).",
            f"Conversion: linearize every attention; Eq. 3 distillation (lr {cfg.convert.distill_lr}, <= "
            f"{cfg.convert.distill_steps} steps, early stopping on dev) where marked; then "
            f"{cfg.convert.finetune_epochs} epochs of full finetuning at lr {cfg.convert.finetune_lr}. Fidelity "
            f"columns (mean over layers and heads, 2 dev batches, before finetuning): softmax entropy {ent_sm:.2f}.",
            "",
            table,
            "",
            "% of teacher = test accuracy / teacher test accuracy (paper, BERT on GLUE: Hedgehog 99.3%, "
            "T2R-HH 93.5%, T2R 88.9%).",
            "",
            "![monotonicity](monotonicity.png)",
            "",
        ]
        + [f"![maps layer {la}](attention_maps_layer{la}.png)" for la in cfg.map_layers]
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hedgehog finetuned-conversion", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML/JSON of FinetunedConversionConfig")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override KEY=VALUE")
    p.add_argument("--device", help="cpu | cuda | auto")
    p.add_argument("--out", help="output folder")
    p.add_argument(
        "--report-only", action="store_true", help="render the table from <out>/results.json (e.g. of a partial run)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = load_config_from_cli(FinetunedConversionConfig, args, {"device": "device", "out": "out_dir"})
    except ConfigError as err:
        log.error("%s", err)
        return 2
    out = Path(cfg.out_dir)
    run_args = [a for a in (argv if argv is not None else []) if a != "--report-only"]
    command = ("hedgehog finetuned-conversion " + " ".join(run_args)).strip()
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        md = render(cfg, saved["results"], saved["environment"], command)
        (out / "finetuned_conversion.md").write_text(md)
        print(md)
        return 0
    device = pick_device(cfg.device)
    env = environment_info(device)
    model, tok, train_rows, test_rows = load_model_and_data(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(train_rows), generator=gen).tolist()
    n_dev = max(1, int(round(cfg.data.dev_fraction * len(train_rows))))
    dev_rows = [train_rows[i] for i in perm[:n_dev]]
    train_rows = [train_rows[i] for i in perm[n_dev:]]
    train_b, dev_b, test_b = (make_batches(r, tok, cfg) for r in (train_rows, dev_rows, test_rows))
    sample = {k: v[:1] for k, v in test_b[0].items()}
    model.to(device)
    teacher, thist = train_teacher(model, train_b, dev_b, cfg)
    from ..convert.finetune import evaluate_loss

    _, t_acc = evaluate_loss(teacher, test_b, "classification")
    log.info("teacher test accuracy %.4f", t_acc)
    results: dict[str, Any] = {
        "data": f"{cfg.data.source}: {len(train_rows)} train / {len(dev_rows)} dev (from train) / "
        f"{len(test_rows)} test",
        "model": f"{cfg.model.source}, {sum(p.numel() for p in teacher.parameters()):,} parameters",
        "teacher": {"test_accuracy": t_acc, **thist},
        "methods": [],
    }
    snaps = {}
    for m in cfg.methods:
        r = convert_one(teacher, m, train_b, dev_b, test_b, sample, cfg)
        snaps[m.name] = r.pop("_maps")
        results["methods"].append(r)
        log.info(
            "%s: test accuracy %.4f (%.1f%% of teacher)", m.name, r["test_accuracy"], 100 * r["test_accuracy"] / t_acc
        )
        save_json({"config": config_to_dict(cfg), "environment": env, "results": results}, out / "results.json")
    ids = sample["input_ids"][0][sample["attention_mask"][0].bool()].tolist()
    tokens = tok.convert_ids_to_tokens(ids) if tok is not None else [str(i) for i in ids]
    meta = {"layers": cfg.map_layers, "heads": cfg.map_heads, "tokens": tokens}
    save_snapshots(snaps, meta, out / "attention_maps.npz")
    plot_heatmaps(snaps, meta, out, "finetuned conversion")
    plot_monotonicity(snaps, meta, out / "monotonicity.png", "finetuned conversion")
    md = render(cfg, results, env, command)
    (out / "finetuned_conversion.md").write_text(md)
    print(md)
    return 0
