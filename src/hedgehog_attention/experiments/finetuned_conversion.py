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

For a machine without the assets (the GPU machine), ``--pack DIR`` writes what the run needs into
one folder: the fine-food rows (``fine_food.json.gz``, read through ``data.path``) and a compact
MiniLM (``minilm/``, read through ``model.path``): every weight in float16, and of the word
embeddings only the rows of tokens that occur in the packed data (10,302 of 30,522 at 128
tokens), ~31 MB instead of 91 MB. The loader rebuilds a float32 copy (in a temporary folder) with
the other rows zero, which changes nothing for that data (those rows are never read), and it checks
that every token id of the run is among the kept rows.

Several processes can share one teacher (``teacher_path``: loaded when the file exists, else
trained and saved there; one saved with other data, model, teacher or seed settings is refused)
and each run a subset of ``methods``; ``--merge DIR ...`` then renders one report from their
outputs. ``max_seconds`` stops starting new methods once that much time has passed (results are
saved after every method).

Usage::

    hedgehog finetuned-conversion --config configs/finetuned_conversion.yaml --device cuda
    hedgehog finetuned-conversion --config configs/finetuned_conversion_smoke.yaml
    hedgehog finetuned-conversion --config configs/finetuned_conversion.yaml --pack .carry/fc
    hedgehog finetuned-conversion --config CFG --out runs/fc --merge runs/fc_a runs/fc_b
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .attention_maps import snapshot
from .common import (
    ConfigError,
    check_map_indices,
    config_from_dict,
    config_to_dict,
    environment_info,
    markdown_table,
    merge_method_runs,
    pick_device,
    settings_diff,
    setup_logging,
)
from .method_sweep import load_sweep_config, run_methods, write_figures, write_report

log = logging.getLogger("hedgehog_attention.experiments.finetuned_conversion")
TITLE = "finetuned conversion"  # figure titles


@dataclass
class FCData:
    """source: fine_food (offline, 4000 train / 1000 test) or synthetic (smoke). dev_fraction: share
    of train held out for early stopping. max_train / max_test: caps (None = all). path: a
    ``fine_food.json.gz`` written by ``--pack`` to read instead of the assets folder."""

    source: Literal["fine_food", "synthetic"] = "fine_food"
    path: str | None = None
    max_length: int = 128
    dev_fraction: float = 0.1
    batch_size: int = 32
    max_train: int | None = None
    max_test: int | None = None
    synthetic_size: int = 256


@dataclass
class FCModel:
    """source: minilm (all-MiniLM-L6-v2) or tiny (random BertConfig of the given size; smoke).
    path: a local HF folder to load instead of the installed package (e.g. the compact copy that
    ``--pack`` writes, carried to a GPU machine that has no assets)."""

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
    backend: str = "auto"  # linear-attention op backend (ops.BACKENDS); "reference" = quadratic, exact


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
    teacher_path: str | None = None
    max_seconds: float | None = None  # no method starts after this (from the process start), except the first

    def __post_init__(self) -> None:
        from ..feature_maps import available_feature_maps

        if not self.methods:
            raise ValueError("methods is empty")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}")
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
        if (path / COMPACT_WEIGHTS).is_file():
            path = unpack_compact_weights(path)
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
    if cfg.data.source == "fine_food" and cfg.data.path:
        with gzip.open(cfg.data.path, "rt", encoding="utf-8") as f:
            packed = json.load(f)
        train_rows = [(str(t), int(y)) for t, y in packed["train"]]
        test_rows = [(str(t), int(y)) for t, y in packed["test"]]
    elif cfg.data.source == "fine_food":
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


# ----------------------------------------------------------------------------- packing for a GPU
COMPACT_WEIGHTS = "compact.safetensors"
_EMB = "embeddings.word_embeddings.weight"
_KEPT = "__kept_token_ids"
_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _used_token_ids(tok, rows, max_length: int) -> list[int]:
    ids = set(tok.all_special_ids)
    enc = tok([r[0] for r in rows], truncation=True, max_length=max_length)
    for seq in enc["input_ids"]:
        ids.update(seq)
    return sorted(ids)


def pack(
    cfg: FinetunedConversionConfig,
    dest: Path,
    rows: tuple[list[tuple[str, int]], list[tuple[str, int]]] | None = None,
    source: Path | None = None,
) -> dict[str, Any]:
    """Write ``dest/fine_food.json.gz`` and ``dest/minilm/`` (compact float16 weights, see the module
    docstring) for a machine without assets. ``rows``: ``(train, test)`` to pack instead of the
    installed fine-food data; ``source``: a BERT folder to pack instead of the installed MiniLM
    (``model.path`` is where the packed copy will be read from, so it is not the source).
    Returns sizes and counts."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from ..models_zoo import minilm_path

    src = Path(source) if source is not None else minilm_path()
    if rows is None:
        from ..tasks.corpora import load_fine_food

        rows = load_fine_food()
    train_rows, test_rows = (list(r) for r in rows)
    dest.mkdir(parents=True, exist_ok=True)
    food = dest / "fine_food.json.gz"
    with gzip.open(food, "wt", encoding="utf-8") as f:
        json.dump({"train": train_rows, "test": test_rows}, f)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    kept = _used_token_ids(tok, train_rows + test_rows, cfg.data.max_length)
    state = load_file(str(src / "model.safetensors"))
    if _EMB not in state:
        raise KeyError(f"{src / 'model.safetensors'} has no {_EMB!r}; keys: {sorted(state)[:5]}...")
    for name, t in state.items():
        if t.is_floating_point() and float(t.abs().max()) > 6e4:
            raise ValueError(f"{name} exceeds the float16 range; cannot pack it")
    compact = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items() if k != _EMB}
    compact[_EMB] = state[_EMB][kept].half()
    compact[_KEPT] = torch.tensor(kept, dtype=torch.int64)
    compact[_EMB + ".__vocab_size"] = torch.tensor([state[_EMB].shape[0]], dtype=torch.int64)
    mdir = dest / "minilm"
    mdir.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in compact.items()}, str(mdir / COMPACT_WEIGHTS))
    for name in _MODEL_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, mdir / name)
    sizes = {p.name: p.stat().st_size for p in [food, mdir / COMPACT_WEIGHTS]}
    return {"kept_token_ids": len(kept), "vocab_size": int(state[_EMB].shape[0]), "bytes": sizes}


def unpack_compact_weights(path: Path) -> Path:
    """Rebuild a float32 copy of the compact folder that :func:`pack` wrote (unused embedding rows
    zero) in a temporary folder keyed by the compact file's size and mtime, so the carried folder
    stays small; returns that folder (built once)."""
    import tempfile

    from safetensors.torch import load_file, save_file

    st = (path / COMPACT_WEIGHTS).stat()
    out = Path(tempfile.gettempdir()) / f"hedgehog_minilm_{st.st_size}_{int(st.st_mtime)}"
    if (out / "model.safetensors").is_file():
        return out
    compact = load_file(str(path / COMPACT_WEIGHTS))
    kept = compact.pop(_KEPT)
    vocab = int(compact.pop(_EMB + ".__vocab_size")[0])
    rows = compact.pop(_EMB).float()
    emb = torch.zeros(vocab, rows.shape[1])
    emb[kept] = rows
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in compact.items()}
    state[_EMB] = emb
    out.mkdir(parents=True, exist_ok=True)
    for name in _MODEL_FILES:
        if (path / name).is_file():
            shutil.copy(path / name, out / name)
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(out / "model.safetensors")  # atomic: a parallel process never loads half a file
    return out


def check_token_ids(batches, model_path: str | None) -> None:
    """With compact weights, every token id of the run must have a kept embedding row."""
    if not model_path or not (Path(model_path) / COMPACT_WEIGHTS).is_file():
        return
    from safetensors import safe_open

    with safe_open(str(Path(model_path) / COMPACT_WEIGHTS), "pt") as f:
        kept = set(f.get_tensor(_KEPT).tolist())
    used = set(torch.cat([b["input_ids"].flatten() for b in batches]).tolist())
    missing = sorted(used - kept)
    if missing:
        raise ValueError(
            f"{len(missing)} token ids of this run have no embedding row in the compact weights of {model_path} "
            f"(e.g. {missing[:5]}); re-run --pack with this config's data.max_length"
        )


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


def teacher_settings(cfg: FinetunedConversionConfig) -> dict:
    """What determines the teacher (data and its train/dev split, model, recipe, seed), saved with it
    in ``teacher_path``; folder locations (``data.path``, ``model.path``) are not settings."""
    d = config_to_dict(cfg)
    out = {k: d[k] for k in ("data", "model", "teacher", "seed")}
    out["data"] = {k: v for k, v in out["data"].items() if k != "path"}
    out["model"] = {k: v for k, v in out["model"].items() if k != "path"}
    return out


def convert_one(teacher, method: FCMethod, train_b, dev_b, test_b, sample, cfg: FinetunedConversionConfig) -> dict:
    from ..convert import DistillConfig, FinetuneConfig, LinearizeConfig, linearize
    from ..convert.distill import distill, evaluate_fidelity
    from ..convert.finetune import evaluate_loss, finetune

    t0 = time.perf_counter()
    # Seeded per method: a random feature map's init (T2R, Performer) must not depend on which methods
    # ran before it in this process (--only subsets, a loaded vs trained teacher).
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(teacher)
    linearize(
        model,
        LinearizeConfig(
            feature_map=method.feature_map,
            feature_map_kwargs=dict(method.feature_map_kwargs),
            backend=cfg.convert.backend,
        ),
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
    # The softmax panels show the teacher: the weights and q.k of the original projections, taken
    # before finetuning moves them.
    maps["softmax"] = maps_before["softmax"]
    maps["softmax_dots"] = maps_before["dots"]
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
            f"{cfg.convert.finetune_epochs} epochs of full finetuning at lr {cfg.convert.finetune_lr} "
            f"(linear-attention backend: {cfg.convert.backend}). Fidelity "
            f"columns (mean over layers and heads, 2 dev batches, before finetuning): softmax entropy {ent_sm:.2f}.",
            "",
            table,
            "",
            "% of teacher = test accuracy / teacher test accuracy (paper, BERT on GLUE: Hedgehog 99.3%, "
            "T2R-HH 93.5%, T2R 88.9%).",
            "",
        ]
        + (
            [f"Not run (max_seconds reached): {', '.join(results['skipped_for_time'])}.", ""]
            if results.get("skipped_for_time")
            else []
        )
        + [
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
    p.add_argument("--only", metavar="NAMES", help="run only these methods (comma-separated names from the config)")
    p.add_argument(
        "--report-only", action="store_true", help="render the table from <out>/results.json (e.g. of a partial run)"
    )
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="combine the outputs of runs that shared one teacher (teacher_path) into <out>, then render",
    )
    p.add_argument("--pack", metavar="DIR", help="write the data + compact MiniLM for a machine without assets, exit")
    return p


def merge_runs(cfg: FinetunedConversionConfig, dirs: list[Path], out: Path) -> tuple[dict, dict, dict, dict]:
    """Combine ``results.json`` + ``attention_maps.npz`` of runs that shared one teacher.

    Raises ``ValueError`` when their teachers differ (test accuracy by more than 0.5 points) or a
    method appears twice.
    """

    # The same teacher weights scored on another GPU may flip a borderline review or two, no more;
    # runs with different teachers must share one through teacher_path.
    return merge_method_runs(
        dirs, out, config=config_to_dict(cfg), method_order=[m.name for m in cfg.methods],
        baseline=lambda r: r["teacher"]["test_accuracy"], baseline_name="teacher (test accuracy)", tolerance=0.005,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = load_sweep_config(FinetunedConversionConfig, args)
    except (ConfigError, ValueError) as err:
        log.error("%s", err)
        return 2
    if args.pack:
        info = pack(cfg, Path(args.pack))
        log.info("packed into %s: %s", args.pack, info)
        print(json.dumps(info))
        return 0
    out = Path(cfg.out_dir)
    run_args = [a for a in (argv if argv is not None else []) if a != "--report-only"]
    command = ("hedgehog finetuned-conversion " + " ".join(run_args)).strip()
    if args.merge:
        results, env, snaps, meta = merge_runs(cfg, [Path(d) for d in args.merge], out)
        write_figures(snaps, meta, out, TITLE)
        return write_report(render(cfg, results, env, command), out / "finetuned_conversion.md")
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        # The settings the run used (its --set overrides included), not this invocation's config.
        run_cfg = config_from_dict(FinetunedConversionConfig, saved["config"], str(out / "results.json"))
        md = render(run_cfg, saved["results"], saved["environment"], command)
        return write_report(md, out / "finetuned_conversion.md")
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    env = environment_info(device)
    model, tok, train_rows, test_rows = load_model_and_data(cfg)
    try:  # before the teacher and the distillations, not at the first snapshot
        check_map_indices(model, cfg.map_layers, cfg.map_heads)
    except ValueError as err:
        log.error("%s", err)
        return 2
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(train_rows), generator=gen).tolist()
    n_dev = max(1, int(round(cfg.data.dev_fraction * len(train_rows))))
    dev_rows = [train_rows[i] for i in perm[:n_dev]]
    train_rows = [train_rows[i] for i in perm[n_dev:]]
    train_b, dev_b, test_b = (make_batches(r, tok, cfg) for r in (train_rows, dev_rows, test_rows))
    check_token_ids(train_b + dev_b + test_b, cfg.model.path if cfg.model.source == "minilm" else None)
    sample = {k: v[:1] for k, v in test_b[0].items()}
    model.to(device)
    from ..convert.finetune import evaluate_loss

    tpath = Path(cfg.teacher_path) if cfg.teacher_path else None
    if tpath is not None and tpath.is_file():
        saved_t = torch.load(tpath, map_location=device, weights_only=True)
        diff = settings_diff(saved_t["settings"], teacher_settings(cfg)) if "settings" in saved_t else []
        if diff:  # its dev rows, data or recipe are not this run's: reusing it would report it as this config's
            log.error("%s was trained with other settings (%s); use another teacher_path", tpath, "; ".join(diff))
            return 2
        model.load_state_dict(saved_t["state_dict"])
        teacher, thist = model, saved_t["history"]
        log.info("teacher loaded from %s", tpath)
    else:
        teacher, thist = train_teacher(model, train_b, dev_b, cfg)
        if tpath is not None:
            tpath.parent.mkdir(parents=True, exist_ok=True)
            tmp = tpath.with_suffix(tpath.suffix + ".tmp")
            torch.save({"state_dict": teacher.state_dict(), "history": thist, "settings": teacher_settings(cfg)}, tmp)
            tmp.replace(tpath)  # atomic: a process waiting for the file never reads half of it
    _, t_acc = evaluate_loss(teacher, test_b, "classification")
    log.info("teacher test accuracy %.4f", t_acc)
    results: dict[str, Any] = {
        "data": f"{cfg.data.source}: {len(train_rows)} train / {len(dev_rows)} dev (from train) / "
        f"{len(test_rows)} test",
        "model": f"{cfg.model.source}, {sum(p.numel() for p in teacher.parameters()):,} parameters",
        "teacher": {"test_accuracy": t_acc, **thist},
        "methods": [],
        "skipped_for_time": [],
    }
    ids = sample["input_ids"][0][sample["attention_mask"][0].bool()].tolist()
    tokens = tok.convert_ids_to_tokens(ids) if tok is not None else [str(i) for i in ids]
    meta = {"layers": cfg.map_layers, "heads": cfg.map_heads, "tokens": tokens}
    snaps = run_methods(
        cfg.methods, lambda m: convert_one(teacher, m, train_b, dev_b, test_b, sample, cfg),
        results=results, config=config_to_dict(cfg), environment=env, snapshot_meta=meta, out=out,
        max_seconds=cfg.max_seconds, t_start=t_start,
        describe=lambda r: f"test accuracy {r['test_accuracy']:.4f} ({r['test_accuracy'] / t_acc:.1%} of teacher)",
    )  # fmt: skip
    write_figures(snaps, meta, out, TITLE)
    return write_report(render(cfg, results, env, command), out / "finetuned_conversion.md")
