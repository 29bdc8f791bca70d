"""Several seeds of one conversion experiment in one table: mean, standard deviation and the per-seed values.

Each seed of ``hedgehog finetuned-conversion`` is a separate run with its own teacher (the seed also
draws the dev split and initialises the head), so runs cannot be merged method by method
(``--merge`` refuses different teachers); this summarises their ``results.json`` files instead.
"% of teacher" is computed per seed against that seed's teacher, then averaged.

Usage::

    python -m hedgehog_attention.experiments.seeds runs/fc_seed0/results.json runs/fc_seed1/results.json \\
        --out docs/results/finetuned_conversion_seeds.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["load_seed_runs", "summarize_seeds", "seeds_markdown"]

# (key in a method's results, column title, scale for printing)
METRICS: tuple[tuple[str, str, float], ...] = (
    ("test_accuracy", "test acc %", 100.0),
    ("pct_of_teacher", "% of teacher", 100.0),
    ("dev_accuracy_after_swap", "dev acc before finetune %", 100.0),
    ("kl", "KL to softmax", 1.0),
    ("monotonicity_linear", "monotonicity", 1.0),
)


def load_seed_runs(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Read the ``results.json`` of each seed's run; each must hold a teacher and a list of methods."""
    runs = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        res = d.get("results", d)
        if "teacher" not in res or "methods" not in res:
            raise ValueError(f"{p}: not a conversion results file (needs results.teacher and results.methods)")
        seed = d.get("config", {}).get("seed")
        runs.append({"path": str(p), "seed": seed, "teacher": res["teacher"], "methods": res["methods"]})
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the runs must have distinct seeds, got {seeds} from {[r['path'] for r in runs]}")
    return runs


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarize_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method and metric: values per seed (in run order), the seeds they come from, mean and
    sample standard deviation.

    A method missing from some seeds is summarised over the seeds that have it (``n`` says how many,
    ``seeds`` which).
    """
    teacher = [r["teacher"]["test_accuracy"] for r in runs]
    order: list[str] = []
    values: dict[str, dict[str, list[tuple[Any, float]]]] = {}  # (seed, value) pairs
    for r, t_acc in zip(runs, teacher, strict=True):
        for m in r["methods"]:
            name = m["method"]
            if name not in values:
                order.append(name)
                values[name] = {k: [] for k, _, _ in METRICS}
            row = dict(m, pct_of_teacher=m["test_accuracy"] / t_acc)
            for k, _, _ in METRICS:
                if row.get(k) is not None:
                    values[name][k].append((r["seed"], float(row[k])))

    def stats(sv: list[tuple[Any, float]]) -> dict[str, Any]:
        v = [x for _, x in sv]
        mean, std = _mean_std(v)
        return {"values": v, "seeds": [s for s, _ in sv], "mean": mean, "std": std, "n": len(v)}

    return {
        "seeds": [r["seed"] for r in runs],
        "teacher": {"values": teacher, "mean_std": _mean_std(teacher)},
        "methods": {name: {k: stats(v) for k, v in values[name].items() if v} for name in order},
    }


def seeds_markdown(summary: dict[str, Any]) -> str:
    """A markdown table: one row per method, ``mean ± std (n)`` per metric, then the per-seed values."""
    seeds = summary["seeds"]
    t_vals = summary["teacher"]["values"]
    t_mean, t_std = summary["teacher"]["mean_std"]
    t_pm = "" if math.isnan(t_std) else f" ± {t_std * 100:.1f}"  # one seed: no sample std, as in the rows
    lines = [
        f"Seeds {seeds}; teacher test accuracy {t_mean * 100:.1f}{t_pm}% "
        f"(per seed: {', '.join(f'{x * 100:.1f}' for x in t_vals)}). mean ± sample std over seeds.",
        "",
        "| method | " + " | ".join(title for _, title, _ in METRICS) + " | test acc % per seed |",
        "|---|" + "---|" * (len(METRICS) + 1),
    ]
    for name, cols in summary["methods"].items():
        cells = []
        for k, _, scale in METRICS:
            c = cols.get(k)
            if c is None:
                cells.append("-")
                continue
            digits = 1 if scale == 100.0 else 3
            std = "" if math.isnan(c["std"]) else f" ± {c['std'] * scale:.{digits}f}"
            cells.append(f"{c['mean'] * scale:.{digits}f}{std} ({c['n']})")
        acc = cols.get("test_accuracy")
        # one entry per seed of the header, "-" where this method did not run: a method missing from
        # some seeds must not have its values read as those of the first seeds
        by_seed = dict(zip(acc["seeds"], acc["values"], strict=True)) if acc else {}
        per_seed = ", ".join(f"{by_seed[s] * 100:.1f}" if s in by_seed else "-" for s in seeds)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per_seed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="results.json of each seed's run")
    ap.add_argument("--out", help="write the markdown table here (and a .json summary beside it)")
    args = ap.parse_args(argv)
    if args.out and Path(args.out).suffix == ".json":
        ap.error(f"--out {args.out}: the markdown table's path; the .json summary goes beside it")
    summary = summarize_seeds(load_seed_runs(args.results))
    md = seeds_markdown(summary)
    print(md)
    if args.out:
        from ..convert.report import write_atomic

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, md)
        write_atomic(out.with_suffix(".json"), json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
