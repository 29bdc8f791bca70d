"""Unit tests of checkpoint.py: atomic files, pruning, listing, loading, picking the newest valid one."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from hedgehog_attention import checkpoint as ckpt


def _save(d: Path, step: int, keep_last: int | None = 2, **meta):
    return ckpt.save_checkpoint(d, step, {"meta": {"step": step, **meta}, "x": torch.full((2,), float(step))},
                                keep_last=keep_last)  # fmt: skip


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _latest(d: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return ckpt.find_latest_valid(d)


def test_save_list_load_roundtrip_and_pruning(tmp_path: Path):
    for step in range(1, 6):
        path = _save(tmp_path, step, keep_last=2)
        assert path == ckpt.checkpoint_path(tmp_path, step) and path.exists()
    assert _names(tmp_path) == ["ckpt-00000004.json", "ckpt-00000004.pt", "ckpt-00000005.json", "ckpt-00000005.pt"]
    assert json.loads((tmp_path / "ckpt-00000005.json").read_text()) == {"step": 5}
    found = ckpt.find_latest_valid(tmp_path)
    assert found is not None and found[0].name == "ckpt-00000005.pt"
    assert found[1]["format_version"] == ckpt.FORMAT_VERSION and torch.equal(found[1]["x"], torch.full((2,), 5.0))
    for step in range(6, 9):
        _save(tmp_path, step, keep_last=None)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [f"ckpt-0000000{s}.pt" for s in range(4, 9)]
    assert ckpt.list_checkpoints(tmp_path / "missing") == [] and ckpt.find_latest_valid(tmp_path / "missing") is None


@pytest.mark.parametrize("keep_last", [3, 4, 5])
def test_keep_last_keeps_that_many_while_fewer_exist(tmp_path: Path, keep_last: int):
    """Pruning sliced ``older[: len(older) - (keep_last - 1)]``: with fewer older files than
    keep_last - 1 the bound went negative and deleted from the front (keep_last=4 kept only 2)."""
    for step in range(1, 8):
        _save(tmp_path, step, keep_last=keep_last)
        want = list(range(max(1, step - keep_last + 1), step + 1))
        assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [f"ckpt-0000000{s}.pt" for s in want]


def test_keep_last_1_with_a_corrupted_newest_file_keeps_the_new_saves(tmp_path: Path):
    """keep_last=1 ranked by step only: with a corrupted ckpt-6 every new save deleted itself, so a
    resumed run (which found nothing valid and restarted) never had a checkpoint to resume from."""
    _save(tmp_path, 6, keep_last=1)
    (tmp_path / "ckpt-00000006.pt").write_bytes(b"truncated")
    assert _latest(tmp_path) is None  # the resume starts from step 0 ...
    for step in (2, 4):  # ... and saves again
        path = _save(tmp_path, step, keep_last=1)
        assert path.exists(), f"save_checkpoint deleted the checkpoint of step {step} it had just written"
    with pytest.warns(RuntimeWarning, match=r"ckpt-00000006\.pt"):
        found = ckpt.find_latest_valid(tmp_path)
    assert found is not None and found[0].name == "ckpt-00000004.pt"
    assert "ckpt-00000002.pt" not in _names(tmp_path)  # still pruned to keep_last among the lower steps


@pytest.mark.parametrize("keep_last", [1, 2])
def test_save_never_deletes_what_it_wrote_beside_a_higher_step(tmp_path: Path, keep_last: int):
    _save(tmp_path, 100, keep_last=None, run="old")
    for step in (1, 2, 3):
        assert _save(tmp_path, step, keep_last=keep_last).exists()
    kept = [f"ckpt-0000000{s}.pt" for s in (1, 2, 3)[-keep_last:]]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [*kept, "ckpt-00000100.pt"]  # the old run's untouched


def test_resaving_a_step_drops_its_old_sidecar(tmp_path: Path):
    _save(tmp_path, 6, run="old")
    ckpt.save_checkpoint(tmp_path, 6, {"x": torch.zeros(1)}, keep_last=2)  # no meta this time
    assert not (tmp_path / "ckpt-00000006.json").exists(), "the sidecar describes the previous state"


def test_crash_between_pt_and_sidecar_leaves_no_stale_sidecar(tmp_path: Path, monkeypatch):
    _save(tmp_path, 6, run="old")
    real = ckpt.atomic_write_bytes

    def crash_on_json(path, write_fn):
        if path.suffix == ".json":
            raise KeyboardInterrupt("killed after the .pt was replaced")
        real(path, write_fn)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", crash_on_json)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 6, run="new")
    assert ckpt.load_checkpoint(tmp_path / "ckpt-00000006.pt")["meta"]["run"] == "new"
    sidecar = tmp_path / "ckpt-00000006.json"
    assert not sidecar.exists() or json.loads(sidecar.read_text())["run"] == "new"


class _Crash(BaseException):
    pass


def test_crash_while_pruning_leaves_no_orphan_sidecar(tmp_path: Path, monkeypatch):
    _save(tmp_path, 1, keep_last=1)
    real_unlink = Path.unlink

    def crash_after_first(self, missing_ok=False):
        real_unlink(self, missing_ok=missing_ok)
        if self.name.startswith("ckpt-00000001."):
            raise _Crash

    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", crash_after_first)
        with pytest.raises(_Crash):
            _save(tmp_path, 2, keep_last=1)
    _save(tmp_path, 3, keep_last=1)
    assert _names(tmp_path) == ["ckpt-00000003.json", "ckpt-00000003.pt"]


def test_steps_past_8_digits_are_listed(tmp_path: Path):
    path = _save(tmp_path, 10**8 - 1, keep_last=None)
    big = _save(tmp_path, 10**8, keep_last=None)
    assert big.name == "ckpt-100000000.pt"
    assert ckpt.list_checkpoints(tmp_path) == [path, big]
    found = ckpt.find_latest_valid(tmp_path)
    assert found is not None and found[0] == big


def test_only_ascii_canonical_names_are_listed(tmp_path: Path):
    good = _save(tmp_path, 3)
    for name in ["ckpt-\u0660\u0660\u0660\u0660\u0660\u0660\u0661\u0662.pt",  # Arabic-Indic digits: int() reads 12
                 "ckpt-00000009.pt\n", "ckpt-0000007.pt", "ckpt-000000005.pt", "ckpt-00000004.pt.bak",
                 "xckpt-00000008.pt", ".ckpt-00000010.pt.123.tmp"]:  # fmt: skip
        (tmp_path / name).write_bytes(b"x")
    assert ckpt.list_checkpoints(tmp_path) == [good]


def test_bad_step_and_keep_last_raise_before_writing(tmp_path: Path):
    with pytest.raises(ValueError, match="keep_last"):
        _save(tmp_path, 1, keep_last=0)  # used to keep every checkpoint
    with pytest.raises(ValueError, match="step"):
        _save(tmp_path, -1)  # used to write ckpt--0000001.pt, which is never listed
    assert not tmp_path.exists() or _names(tmp_path) == []


def test_corrupted_and_foreign_files_are_skipped(tmp_path: Path):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    torch.save([1, 2], tmp_path / "ckpt-00000006.pt")  # loads, but not a checkpoint dict
    torch.save({"format_version": 99}, tmp_path / "ckpt-00000008.pt")
    (tmp_path / "ckpt-00000010.pt").write_bytes(b"")
    with pytest.warns(RuntimeWarning) as rec:
        found = ckpt.find_latest_valid(tmp_path)
    assert found is not None and found[0].name == "ckpt-00000004.pt"
    assert [m for m in ("00000010", "00000008", "00000006") if any(m in str(w.message) for w in rec)] == [
        "00000010", "00000008", "00000006"]  # fmt: skip
    with pytest.raises(ValueError, match="format 1"):
        ckpt.load_checkpoint(tmp_path / "ckpt-00000008.pt")


def test_stale_temp_files_of_other_writers_are_removed_at_the_next_save(tmp_path: Path):
    _save(tmp_path, 2)
    stale = tmp_path / f".ckpt-00000004.pt.{os.getpid() + 1}.tmp"
    stale.write_bytes(b"partial")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000002.pt"]
    _save(tmp_path, 3)
    assert not stale.exists() and not list(tmp_path.glob(".*.tmp"))
