"""Atomic training checkpoints: write to a temp file in the same folder, fsync, ``os.replace``.

One checkpoint is one file ``ckpt-<step:08d>.pt`` (``torch.save`` of plain containers: tensors,
numbers, strings, lists, dicts), loaded with ``torch.load(weights_only=True)`` so a checkpoint
can never run code. A crash while writing leaves only a ``.ckpt-*.tmp`` file, which is ignored;
a final-named file that fails to load (disk error, truncated copy) is reported with a warning and
the next older one is used. A JSON sidecar ``ckpt-<step>.json`` holds the human-readable
metadata (step, data position, config) for inspection; the ``.pt`` file is the source of truth
(a sidecar is removed before its ``.pt`` is replaced or pruned, so a crash can leave a ``.pt`` without
its sidecar but never a sidecar describing another state).
"""

from __future__ import annotations

import json
import logging
import operator
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# ASCII digits only (``\d`` takes any Unicode digit, which ``int`` parses); ``\Z``, not ``$``, which
# also matches before a trailing newline; 9+ digits for steps >= 10**8 (``{step:08d}`` widens).
CKPT_RE = re.compile(r"^ckpt-([0-9]{8}|[1-9][0-9]{8,})\.pt\Z")
FORMAT_VERSION = 1


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:08d}.pt"


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable (POSIX); not available on Windows, where it is a no-op.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write_fn) -> None:
    """Call ``write_fn(fileobj)`` on a temp file beside ``path``, fsync it, then rename onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict[str, Any], *, keep_last: int | None) -> Path:
    """Write ``state`` atomically as ``ckpt-<step>.pt`` (+ JSON sidecar of ``state['meta']``); prune old ones.

    Args:
        directory: checkpoint folder (created if missing).
        step: optimizer steps done; part of the file name.
        state: plain containers of tensors/numbers/strings (loadable with ``weights_only=True``).
        keep_last: keep this many newest checkpoints (``None`` keeps all): the one just written and
            the ``keep_last - 1`` newest of lower steps. The one just written is never deleted, and
            files of higher steps (a corrupted newest file a resume skipped, or another run's) are
            left alone, neither deleted nor counted.

    Returns:
        The final path.
    """
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0 (got {step})")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None (got {keep_last})")
    directory = Path(directory)
    path = checkpoint_path(directory, step)
    # Temp files of earlier writers of this folder that died mid-write (only one process writes a
    # run's checkpoints, so any other pid's temp file is stale).
    if directory.is_dir():
        for stale in directory.glob(".ckpt-*.tmp"):
            if not stale.name.endswith(f".{os.getpid()}.tmp"):
                stale.unlink(missing_ok=True)
    state = {"format_version": FORMAT_VERSION, **state}
    sidecar = path.with_suffix(".json")
    if sidecar.exists():  # an earlier save of this step: never leave its metadata beside the new state
        sidecar.unlink(missing_ok=True)
        _fsync_dir(directory)
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    meta = state.get("meta")
    if meta is not None:
        text = json.dumps(meta, indent=2, sort_keys=True, default=str).encode()
        atomic_write_bytes(sidecar, lambda f: f.write(text))
    if keep_last is not None:
        older = [p for s, p in _steps_and_paths(directory) if s < step]
        # max(0, ...): with fewer older files than keep_last - 1 a negative bound would slice from the end
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            old.with_suffix(".json").unlink(missing_ok=True)  # sidecar first: a crash leaves no orphan .json
            old.unlink(missing_ok=True)
    return path


def _steps_and_paths(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := CKPT_RE.match(p.name)))


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Final-named checkpoint files in ``directory``, oldest first (temp files are never listed)."""
    return [p for _, p in _steps_and_paths(Path(directory))]


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load one checkpoint file on CPU with ``weights_only=True``; raises on a corrupted file."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is not a hedgehog_attention checkpoint of format {FORMAT_VERSION} "
            f"(got format_version={state.get('format_version') if isinstance(state, dict) else type(state)})"
        )
    return state


def find_latest_valid(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """Newest checkpoint in ``directory`` that loads; corrupted ones are skipped with a warning.

    Returns ``(path, state)`` or ``None`` when there is no loadable checkpoint.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 -- any load failure means "not usable", report and fall back
            warnings.warn(
                f"skipping corrupted or unreadable checkpoint {path}: {type(e).__name__}: {e}; "
                "trying the next older one",
                RuntimeWarning,
                stacklevel=2,
            )
    return None
