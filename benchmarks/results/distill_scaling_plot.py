"""Summarize and plot the 1- vs 2-GPU distillation run (issue #7) from the two linearize reports.

    python benchmarks/results/distill_scaling_plot.py benchmarks/results/distill_x2_2026-11-28

Writes ``summary.json`` into that folder and ``docs/figures/distill_scaling_loss.png``. Tokens/s is
the steady state between the Trainer's history rows of steps 10 and S-10 (no load, no warm-up, no
evaluation: the last row, step S, includes the final evaluation).
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

folder = Path(sys.argv[1])
root = Path(__file__).resolve().parents[2]
runs = {}
for n in (1, 2):
    rep = json.loads((folder / f"distill_n{n}.json").read_text())
    d = rep["methods"]["hedgehog"]["distill"]
    s = d["steps_run"]
    h = {r["step"]: r for r in d["history"]}
    a, b = h[10], h[s - 10]
    runs[n] = {
        "world_size": rep["world_size"],
        "global_batch_size": d["global_batch_size"],
        "seq_len": rep["data"]["seq_len"],
        "steps": s,
        "tokens_per_s": (b["tokens"] - a["tokens"]) / (b["time"] - a["time"]),
        "ms_per_step": (b["time"] - a["time"]) / (s - 20) * 1e3,
        "distill_stage_s": d["seconds"],
        "job_s": rep["runtime_seconds"],
        "train_loss": d["train_loss"],
        "eval_loss": d["eval_loss"],
    }
l1, l2 = runs[1]["train_loss"], runs[2]["train_loss"]
diff = [abs(x - y) for x, y in zip(l1, l2, strict=True)]
summary = {
    "scaling_efficiency": runs[2]["tokens_per_s"] / (2 * runs[1]["tokens_per_s"]),
    "loss_max_abs_diff": max(diff),
    "loss_max_rel_diff": max(d / abs(x) for d, x in zip(diff, l1, strict=True)),
    "eval_loss_abs_diff": abs(runs[1]["eval_loss"][-1] - runs[2]["eval_loss"][-1]),
    "runs": runs,
}
(folder / "summary.json").write_text(json.dumps(summary, indent=1))
for n, r in runs.items():
    print(f"{n} GPU(s): {r['tokens_per_s']:.0f} tok/s, {r['ms_per_step']:.1f} ms/step")
print({k: v for k, v in summary.items() if k != "runs"})

fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
steps = range(1, len(l1) + 1)
ax.plot(steps, l1, label=f"1 GPU (micro-batch {runs[1]['global_batch_size']})", lw=2)
ax.plot(steps, l2, "--", label=f"2 GPUs (micro-batch {runs[2]['global_batch_size'] // 2} each)", lw=1.5)
ax.set(xlabel="step", ylabel="Eq. 3 loss, sum over 30 layers", title="SmolLM2-135M arch., global batch 8 x 512")
ax.legend()
bx.semilogy(steps, [max(d, 1e-12) for d in diff])
bx.set(
    xlabel="step",
    ylabel="|loss(1 GPU) - loss(2 GPUs)| (0 drawn at 1e-12)",
    title=f"max {max(diff):.2g} (relative {summary['loss_max_rel_diff']:.2g})",
)
fig.tight_layout()
fig.savefig(root / "docs" / "figures" / "distill_scaling_loss.png", dpi=120)
