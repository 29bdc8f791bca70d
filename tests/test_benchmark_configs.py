"""The speed benchmark's launch-knob variants name real knobs (a misspelt knob would time the
defaults under the variant's name): every ``SWEEPS`` entry, and ``--config`` / ``--sweep`` JSON."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import attention_speed  # noqa: E402


@pytest.mark.parametrize("sweep", sorted(attention_speed.SWEEPS))
def test_sweep_variants_name_launch_knobs(sweep):
    for name, cfg in attention_speed.SWEEPS[sweep].items():
        assert attention_speed.check_config(cfg, name) is cfg


def test_unknown_knob_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="fix_stage"):
        attention_speed.check_config({"fix_stage": 2}, "--config")
    with pytest.raises(ValueError, match="not launch knobs"):
        attention_speed.main(["--device", "cpu", "--config", '{"fix_stage": 2}', "--out", "/nonexistent/x"])
    # A --sweep JSON variant with a misspelt knob (next to a valid one) is refused before the sweep
    # times anything or writes a result (a time limit of 0 would otherwise record it as "not run").
    sweep = json.dumps({"ok": {"chunk": 64}, "typo": {"fix_stage": 2}})
    args = ["--device", "cpu", "--sweep", sweep, "--sweep-time-limit", "0", "--backends", "", "--extra-backends", "",
            "--no-decode", "--seq-lens", "", "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(ValueError, match=r"'typo'.*fix_stage"):
        attention_speed.main(args)
    assert not (tmp_path / "attention_speed.json").exists()


def test_cpu_smoke_run_writes_its_json_atomically(tmp_path, monkeypatch):
    """``--device cpu`` with no backends runs the whole script (no CUDA calls) and leaves one
    complete JSON, no temporary file; ``save`` replaces the file whole after every backend."""
    writes = []
    replace = attention_speed.os.replace
    monkeypatch.setattr(
        attention_speed.os, "replace", lambda a, b: writes.append(pathlib.Path(b).name) or replace(a, b)
    )
    args = ["--device", "cpu", "--backends", "", "--extra-backends", "", "--no-decode", "--seq-lens", "", "--out"]
    attention_speed.main([*args, str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention_speed.json"]
    assert writes and set(writes) == {"attention_speed.json"}
    meta = json.loads((tmp_path / "attention_speed.json").read_text())["meta"]
    assert meta["gpu"] == "cpu" and meta["tokens"] == attention_speed.TOKENS


def test_sweep_check_has_no_reference_when_the_first_variant_failed(monkeypatch):
    """A failed first variant must not make the second the reference (its zeros would read as checked)."""
    calls = []

    def fake_make_triton(B, T, dev, grad):
        calls.append(dict(attention_speed._launch_config()))
        if len(calls) == 1:
            raise RuntimeError("first variant broke")
        raise AssertionError("no later variant may run as a reference")

    monkeypatch.setattr(attention_speed, "make_triton", fake_make_triton)
    ref: dict = {}
    first = attention_speed._same_function({}, 1, 8, "cpu", ref)
    assert "first variant broke" in first["error"]
    second = attention_speed._same_function({}, 1, 8, "cpu", ref)
    assert second == {"error": "no reference: the first variant failed"} and len(calls) == 1


def test_cpu_smoke_run_skips_the_decode_timing(tmp_path):
    """Decode timing needs CUDA (graphs, events): on the CPU it is skipped, not a crash."""
    args = ["--device", "cpu", "--backends", "", "--extra-backends", "", "--seq-lens", "", "--out", str(tmp_path)]
    attention_speed.main(args)
    assert json.loads((tmp_path / "attention_speed.json").read_text())["decode"] == []
