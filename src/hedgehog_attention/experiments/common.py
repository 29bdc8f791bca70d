"""Shared pieces of the experiment commands: strict typed configs, run metadata, tables, plots.

Configs are dataclasses. :func:`load_config` reads a YAML or JSON file into one, recursing into
nested dataclasses and ``list[Dataclass]`` fields, and fails on unknown or missing keys and on
values of the wrong type, naming the offending key and the valid ones. ``--set a.b=value``
overrides (:func:`apply_overrides`) go through the same checks.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import re
import subprocess
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import torch

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "environment_info",
    "load_config",
    "markdown_table",
    "pick_device",
    "save_json",
    "setup_logging",
]

T = TypeVar("T")
log = logging.getLogger("hedgehog_attention.experiments")


class ConfigError(ValueError):
    """A config file or override does not match its dataclass."""


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Convert/check ``value`` against the annotation ``tp``; returns the typed value."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return config_from_dict(tp, value, where)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(value, a, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} matches none of {args}: {'; '.join(errors)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (inner, *_) = get_args(tp) or (Any,)
        items = [_check_value(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")


def config_from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data`` strictly (unknown keys, missing required keys and wrong
    types raise :class:`ConfigError`); the dataclass's ``__post_init__`` checks run last."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_value(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from err


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _read_mapping(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        data = _yaml_load(text)
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ConfigError(f"{path}: expected a .yaml, .yml or .json config file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def _yaml_load(text: str) -> Any:
    """``yaml.safe_load``, except that exponent numbers without a dot (``1e-3``, ``5E4``) are floats, as
    in YAML 1.2 (PyYAML follows YAML 1.1 and would read them as strings)."""
    import yaml  # transformers depends on PyYAML, so it is always installed with this package

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))
    return yaml.load(text, Loader=Loader)  # a SafeLoader subclass: no arbitrary objects


def _parse_scalar(text: str) -> Any:
    return _yaml_load(text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML scalars/lists) to a raw mapping."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a mapping")
        node[parts[-1]] = _parse_scalar(raw)
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML/JSON file (or its defaults when ``path`` is None) plus overrides."""
    data = _read_mapping(Path(path)) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return config_from_dict(cls, data, str(path or cls.__name__))


def load_config_from_cli(cls: type[T], args, shortcuts: dict[str, str]) -> T:
    """The config of an experiment command: ``--config`` + ``--set KEY=VALUE`` + shortcut flags.

    ``shortcuts`` maps an argparse attribute to the config key it overrides (e.g.
    ``{"device": "device", "out": "out_dir"}``); a flag left unset overrides nothing. The shortcuts
    are applied after ``--set``, so ``--device cuda`` wins over ``--set device=cpu``. Raises
    :class:`ConfigError` (the commands log it and exit with 2).
    """
    overrides = list(args.overrides)
    for attr, key in shortcuts.items():
        value = getattr(args, attr)
        if value:
            # JSON-quoted: a flag's value is taken as given (``--out 2024`` is the folder "2024", not a number).
            overrides.append(f"{key}={json.dumps(value)}")
    return load_config(cls, args.config, overrides)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch.cuda.is_available() is False")
    return dev


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_info(device: torch.device | None = None) -> dict:
    """Date, versions and hardware, for the report header."""
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": os.environ.get("HEDGEHOG_GIT_COMMIT") or _git_commit(),
        "host_cpus": os.cpu_count(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4g}" if abs(x) < 1e-3 or abs(x) >= 1e5 else f"{x:.3f}".rstrip("0").rstrip(".")
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def save_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)  # atomic: a killed run never leaves half a result behind


def check_map_indices(model: Any, layers: list[int], heads: list[int]) -> None:
    """``ValueError`` (naming ``map_layers`` / ``map_heads`` and the model's size) unless every index
    is a layer / attention head of the HF ``model`` (``config.num_hidden_layers`` /
    ``num_attention_heads``, the query heads). The conversion commands call it as soon as the model is
    loaded: :func:`~hedgehog_attention.experiments.attention_maps.snapshot` would otherwise fail only
    after the teacher and the first method's distillation have run."""
    if not layers or not heads:
        raise ValueError(f"map_layers and map_heads must not be empty, got {layers} and {heads}")
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    n_heads = getattr(config, "num_attention_heads", None)
    bad = [li for li in layers if n_layers is not None and not 0 <= li < n_layers]
    if bad:
        raise ValueError(f"map_layers {bad} out of range: the model has {n_layers} layers 0..{n_layers - 1}")
    bad = [h for h in heads if n_heads is not None and not 0 <= h < n_heads]
    if bad:
        raise ValueError(f"map_heads {bad} out of range: the model has {n_heads} attention heads 0..{n_heads - 1}")


def setup_logging(verbose: bool = True) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# ---- Trainer settings shared by the from-scratch experiments (lm, recall) ---------------------------


def micro_batch_size(global_batch: int, grad_accum_steps: int) -> int:
    """Per-process micro-batch that keeps ``global_batch`` samples per optimizer step under the
    current world size (torchrun) and ``grad_accum_steps``; raises when it does not divide."""
    from ..train import world_info

    world = world_info().world_size
    split = world * grad_accum_steps
    if global_batch % split:
        raise ValueError(
            f"train.batch_size={global_batch} (the global batch) must divide by world_size x grad_accum_steps "
            f"= {world} x {grad_accum_steps}"
        )
    return global_batch // split


def trainer_placement(device: torch.device, dtype: str) -> dict[str, str]:
    """``device`` / ``autocast`` arguments of :class:`~hedgehog_attention.train.TrainConfig`.

    A plain ``cuda`` stays plain so that the Trainer picks ``cuda:LOCAL_RANK`` under torchrun;
    bf16 autocast only on CUDA (the CPU runs keep fp32)."""
    return {
        "device": device.type if device.type == "cuda" and device.index is None else str(device),
        "autocast": "bf16" if dtype == "bfloat16" and device.type == "cuda" else "none",
    }


# ---- Merging method subsets run separately (e.g. on two GPUs) ----------------------------------------


def _check_merged_settings(
    d: Path, saved: dict | None, config: dict, methods: list[str], per_run_keys: tuple[str, ...]
) -> None:
    """``ValueError`` unless the run in ``d`` (saved config ``saved``) ran ``methods`` with ``config``'s
    settings (see :func:`merge_method_runs`)."""
    if saved is None:
        raise ValueError(f"merge: {d}/results.json has no saved config: cannot tell which settings it ran")
    drop = set(per_run_keys) | {"methods"}
    diff = settings_diff({k: v for k, v in saved.items() if k not in drop},
                         {k: v for k, v in config.items() if k not in drop})  # fmt: skip
    if diff:
        raise ValueError(f"merge: {d} ran with other settings than this config: {'; '.join(diff)}")
    ran = {m["name"]: m for m in saved.get("methods", [])}
    wanted = {m["name"]: m for m in config.get("methods", [])}
    for name in methods:
        if name not in wanted:
            raise ValueError(f"merge: method {name!r} of {d} is not in this config's methods {sorted(wanted)}")
        mdiff = settings_diff(ran.get(name, {}), wanted[name])
        if mdiff:
            raise ValueError(f"merge: method {name!r} of {d} ran with other settings: {'; '.join(mdiff)}")


def merge_method_runs(
    dirs: list[Path],
    out: Path,
    *,
    config: dict,
    method_order: list[str],
    baseline: typing.Callable[[dict], float],
    baseline_name: str,
    tolerance: float,
    relative: bool = False,
    per_run_keys: tuple[str, ...] = ("out_dir", "device", "max_seconds"),
) -> tuple[dict, dict, dict, dict]:
    """Combine the ``results.json`` (+ ``attention_maps.npz``) of runs that each did a subset of
    the methods of one experiment, into ``out``; methods end up in ``method_order``.

    The runs must share one baseline: ``baseline(results)`` (e.g. the teacher's test accuracy) may
    differ from the first run's by at most ``tolerance`` (absolute, or relative with ``relative``),
    else ``ValueError`` naming ``baseline_name``. Each run must also have been run with ``config``'s
    settings (the merged report states them): its saved config may differ only in ``per_run_keys``
    and in which methods it ran, and each of its methods must be in ``config`` with the same
    settings, else ``ValueError`` naming the keys. A method present in two runs raises
    ``ValueError``; folders without ``results.json`` are skipped with a warning. Of a run's
    ``attention_maps.npz`` only the snapshots of the methods its ``results.json`` reports are taken,
    and they must be of ``config``'s ``map_layers`` / ``map_heads`` and agree with the other runs'
    (layers, heads, tokens), else ``ValueError``.
    Returns ``(results, environment, snapshots, snapshot_meta)``."""
    import copy

    from .attention_maps import load_snapshots, save_snapshots

    results: dict[str, Any] | None = None
    env: dict = {}
    snaps: dict = {}
    meta: dict = {}
    skipped: list[str] = []
    for d in dirs:
        path = d / "results.json"
        if not path.is_file():
            log.warning("merge: %s has no results.json (run did not finish a method); skipped", d)
            continue
        saved = json.loads(path.read_text())
        r = saved["results"]
        _check_merged_settings(d, saved.get("config"), config, [m["method"] for m in r["methods"]], per_run_keys)
        if results is None:
            results, env = copy.deepcopy(r), saved["environment"]
            results["methods"] = []
        else:
            a, b = baseline(results), baseline(r)
            if (abs(b / a - 1) if relative else abs(b - a)) > tolerance:
                raise ValueError(f"merge: {d} was measured against another {baseline_name} ({b} vs {a})")
        skipped.extend(r.get("skipped_for_time", []))
        for m in r["methods"]:
            if any(x["method"] == m["method"] for x in results["methods"]):
                raise ValueError(f"merge: method {m['method']!r} appears in more than one run")
            results["methods"].append(m)
        ran = {m["method"] for m in r["methods"]}
        if ran and (d / "attention_maps.npz").is_file():
            s, m_meta = load_snapshots(d / "attention_maps.npz")
            # Only the snapshots of the methods this results.json reports: a run killed during its first
            # method leaves the attention_maps.npz of an earlier run in its folder (other methods or settings).
            s = {m: v for m, v in s.items() if m in ran}
            if s:
                want = {k: config[f"map_{k}"] for k in ("layers", "heads") if f"map_{k}" in config}
                got = {k: m_meta[k] for k in want}
                if got != want:
                    raise ValueError(f"merge: the attention maps of {d} are of {got}, not this config's {want}")
                if meta and meta != m_meta:
                    raise ValueError(f"merge: the attention maps of {d} were taken with other settings ({m_meta}) "
                                     f"than those of the runs before it ({meta})")  # fmt: skip
                snaps.update(s)
                meta = m_meta
    if results is None:
        raise FileNotFoundError(f"merge: none of {[str(d) for d in dirs]} has a results.json")
    rank = {name: i for i, name in enumerate(method_order)}
    results["methods"].sort(key=lambda r: rank.get(r["method"], len(rank)))
    names = [r["method"] for r in results["methods"]]
    results["skipped_for_time"] = [m for m in dict.fromkeys(skipped) if m not in names]
    snaps = {m: snaps[m] for m in names if m in snaps}
    save_json({"config": config, "environment": env, "results": results}, out / "results.json")
    if snaps:
        save_snapshots(snaps, meta, out / "attention_maps.npz")
    return results, env, snaps, meta


# ---- CLI and bookkeeping shared by the from-scratch training experiments (lm, recall) ---------------


def add_training_arguments(p, *, config_help: str, strategies: str) -> None:
    """The flags every training experiment takes: config + overrides, device, run placement,
    output folder, resume and report-only (shortcut flags override the config's fields)."""
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override KEY=VALUE (dotted)")
    p.add_argument("--device", help="cpu | cuda | auto (overrides the config)")
    p.add_argument("--workers", type=int, help="runs trained at once in separate single-process runs")
    p.add_argument("--strategy", help=f"{strategies} (under torchrun; auto = ddp)")
    p.add_argument("--out", help="output folder (overrides the config's out_dir)")
    p.add_argument("--resume", action="store_true", help="continue unfinished runs from their checkpoints")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")


TRAINING_SHORTCUTS = {"device": "device", "workers": "workers", "out": "out_dir", "strategy": "strategy"}
"""``load_config_from_cli`` shortcuts for the flags of :func:`add_training_arguments`."""


def record_run(
    cfg: Any, out_dir: Path, env: dict, command: str, *, report_only: bool, is_main: bool
) -> tuple[dict, str]:
    """A training run writes its config, environment and command to ``out_dir/config.json`` (rank
    0); ``--report-only`` reads them back so the rebuilt report names the run that produced the
    numbers, not the report command (which never writes it). Returns ``(environment, command)`` for the
    report."""
    path = out_dir / "config.json"
    if report_only:
        if path.exists():
            saved = json.loads(path.read_text())
            return saved["environment"], saved.get("command", command)
        return env, command
    if is_main:
        save_json({"config": config_to_dict(cfg), "environment": env, "command": command}, path)
    return env, command


def save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_diff(saved: dict, current: dict) -> list[str]:
    """``"key: old -> new"`` for every (dotted) key whose value differs between a finished run's saved
    settings and the current config's: a finished run is reused only when this is empty."""
    old, new = _flatten(saved), _flatten(current)
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in sorted(set(old) | set(new))
            if old.get(k, "<unset>") != new.get(k, "<unset>")]  # fmt: skip
