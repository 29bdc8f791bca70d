"""The `hedgehog linearize` report: report.json (for scripts), report.md (for people), report.png.

Every file is written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["LAYER_KEYS", "write_atomic", "write_report", "summarize_layers"]

# Per-layer fidelity figures (head- and batch-averaged), in the order the tables show them.
LAYER_KEYS = ("ce", "kl", "entropy_softmax", "entropy_linear", "monotonicity_softmax", "monotonicity_linear")


def write_atomic(path: str | Path, data: str | bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give them the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def summarize_layers(layers: list[dict[str, Any]]) -> dict[str, float]:
    return {k: sum(layer[k] for layer in layers) / len(layers) for k in LAYER_KEYS} if layers else {}


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4f}"
    return str(x)


def markdown(report: dict[str, Any]) -> str:
    methods = report["methods"]
    e2e_keys = sorted({k for m in methods.values() for k in m.get("end_to_end", {})})
    lines = [
        f"# hedgehog linearize: {report['model']}",
        "",
        f"{report['architecture']} model, {report['num_layers']} attention layers x {report['num_heads']} heads "
        f"({report['num_kv_heads']} KV heads), head dim {report['head_dim']}; device {report['device']}, "
        f"dtype {report['dtype']}, {report['threads']} threads; total {report['runtime_seconds']:.1f} s.",
        "",
        f"Text: {report['data']['source']}; document-level split; distilled on {report['data']['train_blocks']} "
        f"blocks x {report['data']['seq_len']} tokens, early stopping on {report['data']['eval_blocks']} held-out "
        f"blocks, attention metrics on {report['data']['test_blocks']} test blocks, end-to-end on "
        f"{report['data']['test_items']} test items.",
        "",
        "## Averages over layers",
        "",
        "| method | " + " | ".join(LAYER_KEYS) + " | " + " | ".join(e2e_keys) + " | distill steps | distill s |",
        "|---" * (len(LAYER_KEYS) + len(e2e_keys) + 3) + "|",
    ]
    for name, m in methods.items():
        d = m.get("distill") or {}
        lines.append(
            f"| {name} | "
            + " | ".join(_fmt(m["mean"][k]) for k in LAYER_KEYS)
            + " | "
            + " | ".join(_fmt(m.get("end_to_end", {}).get(k, math.nan)) for k in e2e_keys)
            + f" | {d.get('steps_run', 0)} | {_fmt(float(d.get('seconds', 0.0)))} |"
        )
    lines += [
        "",
        "CE and KL: softmax (teacher) vs linear attention weights, nats per query (lower is better);",
        "entropy in nats; monotonicity: Spearman correlation of weights with q.k (softmax = 1).",
        "",
    ]
    for name, m in methods.items():
        lines += [
            f"## {name} per layer",
            "",
            "| layer | " + " | ".join(LAYER_KEYS) + " |",
            "|---" * (len(LAYER_KEYS) + 1) + "|",
        ]
        for layer in m["layers"]:
            lines.append(f"| {layer['layer']} | " + " | ".join(_fmt(layer[k]) for k in LAYER_KEYS) + " |")
        lines.append("")
    if report.get("finetune"):
        # the same values as report.json's "finetune" (NaN/inf as null), as strict JSON
        block = json.dumps(_finite_or_null(report["finetune"]), indent=2, default=float, allow_nan=False)
        lines += ["## Finetuning", "", "```", block, "```", ""]
    if report.get("saved_model"):
        lines += [f"Converted model saved to `{report['saved_model']}`.", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax_kl, ax_ent, ax_mono, ax_e2e = axes.ravel()
    for name, m in methods.items():
        xs = [layer["layer"] for layer in m["layers"]]
        ax_kl.plot(xs, [layer["kl"] for layer in m["layers"]], marker="o", label=name)
        ax_ent.plot(xs, [layer["entropy_linear"] for layer in m["layers"]], marker="o", label=name)
        ax_mono.plot(xs, [layer["monotonicity_linear"] for layer in m["layers"]], marker="o", label=name)
    first = next(iter(methods.values()))
    xs = [layer["layer"] for layer in first["layers"]]
    ax_ent.plot(xs, [layer["entropy_softmax"] for layer in first["layers"]], "k--", marker="s", label="softmax")
    ax_kl.set(title="KL(softmax || linear) per layer", xlabel="layer", ylabel="nats")
    ax_ent.set(title="attention entropy", xlabel="layer", ylabel="nats")
    ax_mono.set(title="monotonicity (Spearman vs q.k)", xlabel="layer", ylim=(-0.1, 1.05))
    key = report.get("primary_end_to_end")
    vals = [m.get("end_to_end", {}).get(key, math.nan) for m in methods.values()]
    ax_e2e.bar(list(methods), vals, color="tab:blue")
    ax_e2e.set(title=f"end to end: {key}")
    ax_e2e.tick_params(axis="x", rotation=20)
    for ax in (ax_kl, ax_ent, ax_mono):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"hedgehog linearize: {report['model']}")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _finite_or_null(x: Any) -> Any:
    """``x`` with every non-finite float (also in nested dicts, lists, tuples) replaced by None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_null(v) for v in x]
    return x


def write_report(report: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png into ``output_dir``; returns their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "report.png"}
    # strict JSON: a value that is not a number (NaN: no accuracy for a decoder) is written as null
    write_atomic(paths["json"], json.dumps(_finite_or_null(report), indent=2, default=float, allow_nan=False))
    write_atomic(paths["md"], markdown(report))
    plot(report, paths["png"])
    return paths
