"""Plot ``attention_speed.json`` like the paper's Fig. 7: time vs T (log-log), peak memory, decode.

python benchmarks/_plot_attention_speed.py path/to/attention_speed.json docs/figures/attention_speed.png

Also reads a "combined" JSON (``{"series": {key: {"label", "runs", "points": [[T, fwd, fwdbwd, GB]]}}}``)
that gathers points of several runs, each series naming its runs.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "sdpa": ("SDPA (flash)", "k", "o"),
    "sdpa (auto)": ("SDPA (PyTorch's default backend pick)", "gray", "x"),
    "fla+torch map": ("fla 0.6.0 + PyTorch Hedgehog map", "tab:blue", "s"),
    "chunked (torch)": ("chunked PyTorch op + map", "tab:green", "^"),
    "triton fused": ("Triton, Hedgehog map fused (ours)", "tab:red", "D"),
    "taylor2 (torch)": ("2nd-order Taylor map (chunked PyTorch)", "tab:purple", "v"),
}


SERIES_STYLE = {
    "sdpa": ("k", "o", "-"),
    "sdpa_run3": ("k", "o", ":"),
    "fla": ("tab:blue", "s", "-"),
    "chunked": ("tab:green", "^", "-"),
    "taylor": ("tab:purple", "v", "-"),
    "old": ("tab:red", "D", "--"),
    "new": ("tab:red", "D", "-"),
    "new_fwd_run3": ("tab:orange", "d", ":"),
}


def _decode_panel(ax, dec: list[dict], launch_label: str, title: str, legend_size: float) -> None:
    """Decode-step time vs context length: SDPA on a KV cache, our step per launch and from a CUDA graph."""
    if not dec:  # a run with --no-decode: no empty panel
        ax.set_axis_off()
        return
    ctx = [d["context"] for d in dec]
    for key, label, color, marker in (
        ("sdpa_ms", "SDPA, bf16 KV cache", "k", "o"),
        ("triton_ms", launch_label, "tab:red", "D"),
        ("triton_graph_ms", "ours, CUDA-graph replay", "tab:orange", "d"),
    ):
        ax.plot(ctx, [d[key] for d in dec], marker=marker, color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length")
    ax.set_ylabel("ms per decode step (B=16, H=16)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


def _rows_from_series(res):
    """Turn a combined JSON into per-series point lists keyed like STYLE (label with runs)."""
    out = {}
    for key, sr in res["series"].items():
        color, marker, ls = SERIES_STYLE.get(key, ("gray", ".", "-"))
        out[key] = (f"{sr['label']} [{sr['runs']}]", color, marker, ls, sr["points"])
    return out


def main(src: str, dst: str) -> None:
    with open(src) as f:
        res = json.load(f)
    if "series" in res:
        return _main_series(res, dst)
    rows = res["rows"]
    # meta["labels"]: label overrides, e.g. for rows merged in from another run
    style = {n: (res["meta"].get("labels", {}).get(n, lab), c, mk) for n, (lab, c, mk) in STYLE.items()}
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    for key, ax, title in [("fwd_ms", axes[0], "forward"), ("fwdbwd_ms", axes[1], "forward + backward")]:
        for name, (label, color, marker) in style.items():
            pts = [(r["T"], r[name][key]) for r in rows if name in r and key in r.get(name, {})]
            if pts:
                ax.plot(*zip(*pts), marker=marker, color=color, label=label)
        target = {"fwd_ms": 1.0, "fwdbwd_ms": 4.0}[key]  # the targets for the fused kernel
        ax.axhline(target, color="tab:red", linestyle=":", linewidth=1, label=f"target for ours ({target:g} ms)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"sequence length T (B*T = {res['meta']['tokens']} tokens)")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{title}, H=16, D=64, bf16, causal")
        ax.grid(True, which="both", alpha=0.3)
    for name, (label, color, marker) in style.items():
        pts = [(r["T"], r[name]["peak_gb"]) for r in rows if name in r and "peak_gb" in r.get(name, {})]
        if pts:
            axes[2].plot(*zip(*pts), marker=marker, color=color, label=label)
    sd = [r["sdpa"]["peak_gb"] for r in rows if "peak_gb" in r.get("sdpa", {})]
    if sd:  # the memory target: no more than SDPA
        axes[2].axhline(max(sd), color="k", linestyle=":", linewidth=1, label="target for ours (SDPA's)")
    axes[2].set_yscale("log")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("sequence length T")
    axes[2].set_ylabel("peak memory of fwd+bwd, GB")
    axes[2].set_title("memory")
    axes[2].grid(True, alpha=0.3)
    dec = res.get("decode") or []  # a list of rows, or {"error": ...} when decode failed
    _decode_panel(axes[3], dec if isinstance(dec, list) else [], "ours, one launch", "decode step", 8)
    axes[0].legend(fontsize=8)
    m = res["meta"]
    fig.suptitle(f"{m['gpu']}, torch {m['torch']}, triton {m['triton']}, fla {m['fla']}, {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


def _main_series(res, dst: str) -> None:
    series = _rows_from_series(res)
    fig, axes = plt.subplots(1, 4, figsize=(22, 5.2))
    for col, ax, title in [(1, axes[0], "forward"), (2, axes[1], "forward + backward"), (3, axes[2], "memory")]:
        for label, color, marker, ls, pts in series.values():
            xy = [(p[0], p[col]) for p in pts if p[col] is not None]
            if xy:
                ax.plot(*zip(*xy), marker=marker, color=color, linestyle=ls, label=label)
        ax.set_xscale("log", base=2)
        if col < 3:
            ax.set_yscale("log")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{title}, B*T={res['meta']['tokens']}, H=16, D=64, bf16, causal")
        else:
            ax.set_ylabel("peak memory of fwd+bwd, GB")
            ax.set_title("memory")
        ax.set_xlabel("sequence length T")
        ax.grid(True, which="both", alpha=0.3)
    _decode_panel(
        axes[3], res.get("decode") or [], "ours, one launch (host busy compiling tests)", "decode step (run 4)", 7
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7.5)
    m = res["meta"]
    fig.suptitle(f"{m['gpu']}, torch {m['torch']}, triton {m['triton']}, fla {m['fla']}; {m['note']}", fontsize=8)
    fig.tight_layout(rect=(0, 0.13, 1, 0.96))
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
