"""``hedgehog attention-maps``: heat maps of softmax vs linear attention weights (Fig. 2, 4, 8) and
attention weight vs q.k scatter plots (Fig. 3), from snapshots the conversion experiments save.

The conversion commands (``finetuned-conversion``, ``pretrained-conversion``) call
:func:`snapshot` on one held-out sample for every method and save all snapshots to
``<out>/attention_maps.npz``; this command renders them (and they render them themselves at the
end of a run). Every panel prints the mean entropy (nats) of its weights.

Usage::

    hedgehog attention-maps --from runs/finetuned_conversion/attention_maps.npz --out docs/results/minilm
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

import numpy as np
import torch

from ..metrics import attention_entropy
from ..ops import linear_attention_weights, softmax_attention_weights

__all__ = [
    "entropy_table",
    "snapshot",
    "save_snapshots",
    "load_snapshots",
    "plot_heatmaps",
    "plot_monotonicity",
    "main",
]


@torch.no_grad()
def snapshot(model: torch.nn.Module, batch: dict, layers: list[int], heads: list[int]) -> dict[str, np.ndarray]:
    """Weights of a linearized model on one sample (``batch`` with batch size 1).

    Returns ``softmax [L, H, T, T]`` (the softmax of the layer's own q, k: the teacher's weights
    while the projections are the original ones), ``linear [L, H, T, T]``, and ``dots [L, H, T, T]``
    (``q.k * scale``) for the chosen layer and head indices; padded positions are dropped.
    """
    from ..convert import linearized_modules
    from ..convert.distill import capture_qkv

    mods = linearized_modules(model)
    # Indices are checked here, not left to list/array indexing: a negative one would be shown as
    # "layer -1", and an IndexError would name neither the option nor the model's size.
    bad = [li for li in layers if not 0 <= li < len(mods)]
    if bad:
        raise ValueError(f"map layers {bad} out of range: the model has {len(mods)} layers 0..{len(mods) - 1}")
    recs = capture_qkv(model, [{k: v for k, v in batch.items() if k != "labels"}])
    out: dict[str, list] = {"softmax": [], "linear": [], "dots": []}
    for li in layers:
        name, layer = mods[li]
        r = recs[name][0]
        q, k, mask = r.q.float(), r.k.float(), r.mask
        bad = [h for h in heads if not 0 <= h < q.shape[2]]
        if bad:
            raise ValueError(f"map heads {bad} out of range: layer {li} has {q.shape[2]} heads 0..{q.shape[2] - 1}")
        if mask is not None:
            keep = mask[0].bool()
            q, k, mask = q[:, keep], k[:, keep], None
        p = softmax_attention_weights(q, k, causal=layer.causal, scale=layer.scale)
        fq, fk = layer.attn.features(q.to(next(layer.attn.parameters(), q).dtype), k)
        w = linear_attention_weights(fq.float(), fk.float(), causal=layer.causal)
        hk = k.shape[2]
        group = q.shape[2] // hk
        kk = k.repeat_interleave(group, dim=2)
        dots = torch.einsum("bihd,bjhd->bhij", q, kk) * layer.scale
        out["softmax"].append(p[0, heads].cpu().numpy())
        out["linear"].append(w[0, heads].cpu().numpy())
        out["dots"].append(dots[0, heads].cpu().numpy())
    return {key: np.stack(v) for key, v in out.items()}


def save_snapshots(snaps: dict[str, dict[str, np.ndarray]], meta: dict, path: Path) -> None:
    """``snaps[method] = snapshot(...)``; ``meta``: ``layers``, ``heads``, ``tokens`` (list of str)."""
    from ..convert.report import write_atomic

    flat = {f"{m}/{k}": v for m, d in snaps.items() for k, v in d.items()}
    flat["__layers"] = np.array(meta["layers"])
    flat["__heads"] = np.array(meta["heads"])
    flat["__tokens"] = np.array(meta.get("tokens", []), dtype=object).astype(str)
    # Atomic, as results.json: the sweeps rewrite this file after every method, and a run killed
    # mid-write must keep the previous snapshots readable (for --merge / --report-only).
    buf = io.BytesIO()
    np.savez_compressed(buf, **flat)
    write_atomic(path, buf.getvalue())


def load_snapshots(path: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    with np.load(path, allow_pickle=False) as z:
        snaps: dict[str, dict[str, np.ndarray]] = {}
        for key in z.files:
            if "/" not in key:  # the meta entries __layers, __heads, __tokens
                continue
            m, k = key.rsplit("/", 1)  # a method's name may hold "/" or start with "__"
            snaps.setdefault(m, {})[k] = z[key]
        meta = {"layers": z["__layers"].tolist(), "heads": z["__heads"].tolist(), "tokens": z["__tokens"].tolist()}
    return snaps, meta


def _entropy(w: np.ndarray) -> float:
    return float(attention_entropy(torch.from_numpy(w)[None, None]).mean())


def plot_heatmaps(snaps: dict[str, dict[str, np.ndarray]], meta: dict, out_dir: Path, title: str) -> list[Path]:
    """One PNG per chosen layer: rows = heads, columns = softmax then each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(snaps)
    first = snaps[methods[0]]
    paths = []
    for li, layer in enumerate(meta["layers"]):
        nh = len(meta["heads"])
        cols = 1 + len(methods)
        fig, axes = plt.subplots(nh, cols, figsize=(2.1 * cols, 2.1 * nh + 0.4), squeeze=False)
        for hi, head in enumerate(meta["heads"]):
            panels = [("softmax", first["softmax"][li, hi])] + [(m, snaps[m]["linear"][li, hi]) for m in methods]
            for ci, (name, w) in enumerate(panels):
                ax = axes[hi, ci]
                # Clip the colour scale at the panel's 99th percentile of non-zero weights: one
                # attention-sink column (often the first token) would otherwise hide the rest.
                nz = w[w > 0]
                top = float(np.quantile(nz, 0.99)) if nz.size else 0.0
                ax.imshow(w, cmap="viridis", vmin=0, vmax=max(top, 1e-6))
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{name}\nH={_entropy(w):.2f}", fontsize=7)
                if ci == 0:
                    ax.set_ylabel(f"head {head}", fontsize=7)
        fig.suptitle(
            f"{title}: layer {layer} (H = mean entropy, nats; colours clipped at each panel's 99th percentile)",
            fontsize=9,
        )
        fig.tight_layout()
        path = out_dir / f"attention_maps_layer{layer}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_monotonicity(snaps: dict[str, dict[str, np.ndarray]], meta: dict, path: Path, title: str) -> Path:
    """Fig. 3: attention weight vs scaled q.k for the first chosen layer and head, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(snaps)
    first = snaps[methods[0]]
    # Older snapshots lack "softmax_dots"; their softmax panel pairs the teacher's weights with the
    # first method's q.k after finetuning.
    sdots = first.get("softmax_dots", first["dots"])
    panels = [("softmax", sdots[0, 0], first["softmax"][0, 0])]
    panels += [(m, snaps[m]["dots"][0, 0], snaps[m]["linear"][0, 0]) for m in methods]
    cols = min(5, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    # Every query-key pair the teacher attends over (all of them, or the causal lower triangle), in
    # every panel: a linear map's exactly-zero weights (ReLU, T2R, cosFormer) are part of its trend.
    teacher = first["softmax"][0, 0]
    vis = np.tril(np.ones_like(teacher, dtype=bool)) | (teacher > 0)
    for ax, (name, dots, w) in zip(axes.flat, panels):
        ax.scatter(dots[vis], w[vis], s=3, alpha=0.4)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("q.k / sqrt(d)", fontsize=7)
        ax.set_ylabel("weight", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{title}: layer {meta['layers'][0]}, head {meta['heads'][0]}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def entropy_table(snaps: dict[str, dict[str, np.ndarray]], meta: dict) -> str:
    """Markdown table of the mean entropy (nats, over the chosen heads) of each panel row: the
    softmax teacher and every method, per chosen layer (the numbers printed on the heat maps,
    averaged over heads)."""
    from .common import markdown_table

    methods = list(snaps)
    first = snaps[methods[0]]
    layers = meta["layers"]
    rows = [["softmax (teacher)"] + [f"{_mean_entropy(first['softmax'][li]):.2f}" for li in range(len(layers))]]
    rows += [[m] + [f"{_mean_entropy(snaps[m]['linear'][li]):.2f}" for li in range(len(layers))] for m in methods]
    return markdown_table(["attention"] + [f"layer {la}" for la in layers], rows)


def _mean_entropy(w_heads: np.ndarray) -> float:
    return float(np.mean([_entropy(w) for w in w_heads]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hedgehog attention-maps", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="src", required=True, help="attention_maps.npz written by a conversion command")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--title", default="attention weights")
    p.add_argument("--table", action="store_true", help="also print the mean entropy per method and layer")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    snaps, meta = load_snapshots(Path(args.src))
    out = Path(args.out)
    paths = plot_heatmaps(snaps, meta, out, args.title)
    paths.append(plot_monotonicity(snaps, meta, out / "monotonicity.png", args.title))
    for p in paths:
        print(p)
    if args.table:
        print(entropy_table(snaps, meta))
    return 0
