"""The part the conversion experiments share: run a list of methods against one baseline, saving the
results after every method (so a run cut short still leaves a report for ``--merge`` /
``--report-only``), then draw the attention figures and write the markdown report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..convert.report import write_atomic
from .attention_maps import plot_heatmaps, plot_monotonicity, save_snapshots
from .common import load_config_from_cli, save_json

log = logging.getLogger("hedgehog_attention.experiments")


def select_methods(methods: list, names: str) -> list:
    """The methods named in ``names`` (comma-separated), in config order; unknown names raise."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [m.name for m in methods]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(f"--only {names!r}: unknown or no method names {unknown}; the config has {known}")
    return [m for m in methods if m.name in wanted]


def load_sweep_config(cls: type, args: Any) -> Any:
    """``--config`` + ``--set`` + ``--device``/``--out``, then ``--only`` (a subset of the config's
    methods, e.g. one process per GPU). Raises ``ConfigError``/``ValueError`` on bad input."""
    cfg = load_config_from_cli(cls, args, {"device": "device", "out": "out_dir"})
    if args.only:
        cfg.methods = select_methods(cfg.methods, args.only)
    return cfg


def run_methods(
    methods: Sequence[Any],
    run_one: Callable[[Any], dict],
    *,
    results: dict,
    config: dict,
    environment: dict,
    snapshot_meta: dict,
    out: Path,
    max_seconds: float | None,
    t_start: float,
    describe: Callable[[dict], str],
) -> dict:
    """Run ``run_one(method)`` for each of ``methods`` (each has a ``name``) and append its result
    dict to ``results["methods"]``; a result's ``"_maps"`` entry (attention snapshots or None) is
    taken out and collected. After ``max_seconds`` since ``t_start`` the remaining methods are
    listed in ``results["skipped_for_time"]`` instead (the first method always runs: the process
    was started for it). Returns ``{method name: snapshots}``."""
    snaps: dict = {}

    def save() -> None:
        save_json({"config": config, "environment": environment, "results": results}, out / "results.json")

    save()
    for m in methods:
        late = max_seconds is not None and time.perf_counter() - t_start > max_seconds
        if late and results["methods"]:
            results["skipped_for_time"].append(m.name)
            log.warning("max_seconds=%s passed: %s not run", max_seconds, m.name)
            continue
        r = run_one(m)
        maps = r.pop("_maps", None)
        if maps is not None:
            snaps[m.name] = maps
        results["methods"].append(r)
        log.info("%s: %s", m.name, describe(r))
        save()
        save_snapshots(snaps, snapshot_meta, out / "attention_maps.npz")
    save()  # the methods skipped for time after the last one that ran
    return snaps


def write_figures(snaps: dict, meta: dict, out: Path, title: str) -> None:
    """Heat maps per layer and the Fig. 3-style monotonicity plot, when there are snapshots."""
    if not snaps:
        return
    plot_heatmaps(snaps, meta, out, title)
    plot_monotonicity(snaps, meta, out / "monotonicity.png", title)


def write_report(markdown: str, path: Path) -> int:
    """Write the markdown report (atomically: a failed write keeps the previous report whole), print
    it, and return the command's exit status (0)."""
    write_atomic(path, markdown)
    print(markdown)
    return 0
