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


def test_launch_defaults_pass_the_value_checks():
    cfg = dict(attention_speed._launch_config())
    assert attention_speed.check_config(cfg, "defaults") is cfg


@pytest.mark.parametrize(
    "cfg",
    [
        {"fallback": "alway"},  # the launcher reads any value but "always" as "never": silently the defaults
        {"seg_fold": "False"},  # a truthy string: silently the default
        {"maxnreg": {"_bwd_kernal": 168}},  # a misspelt kernel is never capped: silently the defaults
        {"maxnreg": {"_fc_fix_kernel": 300}},
        {"fix_tma_maxnreg": 16},
        {"fc_forward": "inferense"},
        {"design": "fused"},
        {"fc_tma": "yes"},
        {"sums": 9},
        {"min_block": 48},
        {"fix_warps": 3},
        {"fc_chunk": "auto"},
        {"fix_programs": "4"},
        ["chunk"],
    ],
)
def test_invalid_knob_values_are_refused(cfg):
    with pytest.raises(ValueError, match="--config"):
        attention_speed.check_config(cfg, "--config")


def test_valid_knob_values_pass():
    for cfg in ({"maxnreg": {"_bwd_kernel_q": 168, "_fc_fix_kernel": 168, "_bwd_kernel": 255}}, {"sums": 5},
                {"fc_tma": False, "fc_forward": "inference_all", "chunk": "auto", "bwd_warps": 8, "min_block": 64},
                {"fc_train_max_len": 16384, "fallback": "never", "out_persist": 0}):  # fmt: skip
        assert attention_speed.check_config(cfg, "x") is cfg


def test_kernel_resources_cover_the_correction_pass_and_dw_kernels(monkeypatch):
    """The s12fix sweep tunes _fc_fix_kernel: its registers and spills must be reported."""
    from hedgehog_attention.ops.triton import _fused_chunk as FC
    from hedgehog_attention.ops.triton import _weight_grad as WG

    class Md:
        num_warps, num_stages, shared = 4, 3, 1024

    class Ck:
        metadata, n_regs, n_spills = Md(), 168, 32

    class FakeKernel:
        fn = None

        def __init__(self):
            self.device_caches = {0: ({"key": Ck()}, None, None, None)}

    monkeypatch.setattr(FC, "_fc_fix_kernel", FakeKernel())
    monkeypatch.setattr(WG, "_dw_kernel", FakeKernel())
    lines = attention_speed.kernel_resources()
    for name in ("_fc_fix_kernel", "_dw_kernel"):
        assert any(x.startswith(f"{name} w4 s3 ") and "regs 168 spills 32 smem 1024" in x for x in lines), lines


def _no_timing(monkeypatch):
    calls = []
    monkeypatch.setattr(attention_speed, "time_backend", lambda *a, **k: calls.append(a) or {})
    return calls


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--sweep", "s12fx"], "neither a SWEEPS name"),
        (["--sweep", '{"a": {"fix_tma_stages": 2}, "b": {"fix_tma_programs": "4"}}'], "'b'.*fix_tma_programs"),
        (["--sweep", "[1]"], "JSON object"),
        (["--pick"], "--pick needs a --sweep"),
        (["--pick", "--sweep", "s12fix", "--sweep-seq-lens", ""], "--pick needs"),
    ],
)
def test_bad_sweep_or_pick_is_refused_before_the_fla_warm_up(tmp_path, monkeypatch, extra, match):
    """--warm-fla takes 130-150 s on a fresh GPU machine: a bad --sweep / --pick fails before it."""
    calls = _no_timing(monkeypatch)
    args = ["--device", "cpu", "--warm-fla", "--backends", "", "--extra-backends", "", "--no-decode", "--seq-lens",
            "", "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(ValueError, match=match):
        attention_speed.main([*args, *extra])
    assert calls == [] and not (tmp_path / "attention_speed.json").exists()


def test_pick_keeps_the_config_when_no_variant_was_timed(tmp_path, monkeypatch):
    """A sweep cut by its time limit before any variant ran must not put an unmeasured variant in the table."""
    _no_timing(monkeypatch)
    sweep = json.dumps({"a": {"chunk": 64}, "b": {}})
    args = ["--device", "cpu", "--sweep", sweep, "--sweep-time-limit", "-1", "--pick", "--sweep-seq-lens", "4096",
            "--backends", "", "--extra-backends", "", "--no-decode", "--seq-lens", "", "--out",
            str(tmp_path)]  # fmt: skip
    attention_speed.main(args)
    res = json.loads((tmp_path / "attention_speed.json").read_text())
    assert res["meta"]["picked"] is None and res["meta"]["config"] == {}
    assert res["sweep"][0]["triton fused @a"] == {"error": "not run (time limit)"}
    assert attention_speed.BACKEND_CONFIG["triton fused"] == {}


def test_gpu_run_sh_passes_exactly_the_runner_arguments(tmp_path):
    """gpu_run.sh with stub python3 / nvidia-smi: the benchmark gets the arguments after the two
    time limits (none from them, also when only one is given), quoted ones whole, and SWEEP_ARGS."""
    import os
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls.txt"
    (stubs / "python3").write_text('#!/usr/bin/env bash\nprintf "%s|" "$@" >> "$CALLS"; echo >> "$CALLS"\n')
    (stubs / "nvidia-smi").write_text("#!/usr/bin/env bash\necho gpu\n")
    for f in stubs.iterdir():
        f.chmod(0o755)
    prefix = f"test{os.getpid()}_"

    def run(*argv, **env):
        calls.write_text("")
        e = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", CALLS=str(calls), OUT=str(tmp_path / "out"),
                 PREFIX=prefix)  # fmt: skip
        e.update({"SWEEP_ARGS": "", "SWEEP_S": "0", **env})
        try:
            subprocess.run(["bash", str(root / "benchmarks/gpu_run.sh"), *argv], cwd=root, env=e, check=True,
                           capture_output=True, timeout=60)  # fmt: skip
        finally:
            subprocess.run(["rm", "-rf", f"/tmp/{prefix}work"])
        return [x for x in calls.read_text().splitlines() if x.startswith("benchmarks/attention_speed.py")]

    w = f"/tmp/{prefix}work"
    assert run("0", "5", "--warm-fla", "--backends", "sdpa,triton fused") == [
        f"benchmarks/attention_speed.py|--out|{w}|--warm-fla|--backends|sdpa,triton fused|"
    ]
    assert run("0") == [f"benchmarks/attention_speed.py|--out|{w}|"]  # was: ...|--out|W|0|
    sweep = run("0", "0", SWEEP_S="30", SWEEP_ARGS="--sweep s12fix --sweep-seq-lens 32768,131072 --sweep-profile")
    assert sweep == [
        f"benchmarks/attention_speed.py|--out|{w}/sweep|--backends||--extra-backends||--seq-lens||--no-decode|"
        "--sweep|s12fix|--sweep-seq-lens|32768,131072|--sweep-profile|"
    ]
