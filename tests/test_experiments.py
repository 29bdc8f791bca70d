"""Experiment commands: strict configs, shipped configs load, CPU smoke runs write tables and plots."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from hedgehog_attention.experiments.common import ConfigError, apply_overrides, config_from_dict, load_config
from hedgehog_attention.experiments.lm import LMConfig, gap_closed
from hedgehog_attention.experiments.lm import main as lm_main
from hedgehog_attention.experiments.recall import RecallConfig
from hedgehog_attention.experiments.recall import main as recall_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class _Inner:
    a: int = 1
    b: float | None = None


@dataclass
class _Outer:
    name: str
    inner: _Inner = field(default_factory=_Inner)
    items: list[_Inner] = field(default_factory=list)


def test_strict_loader_rejects_unknown_and_wrong_types():
    ok = config_from_dict(_Outer, {"name": "x", "inner": {"a": 3, "b": 2}, "items": [{"a": 5}]})
    assert ok.inner.a == 3 and ok.inner.b == 2.0 and ok.items[0].a == 5
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['typo'\]; valid keys: \['a', 'b'\]"):
        config_from_dict(_Outer, {"name": "x", "inner": {"typo": 1}})
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict(_Outer, {"name": "x", "items": [{"a": 1, "c": 2}]})
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        config_from_dict(_Outer, {})
    with pytest.raises(ConfigError, match="expected an integer"):
        config_from_dict(_Outer, {"name": "x", "inner": {"a": "3"}})
    with pytest.raises(ConfigError, match="expected an integer"):
        config_from_dict(_Outer, {"name": "x", "inner": {"a": True}})


def test_overrides_and_post_init_checks(tmp_path):
    data = apply_overrides({"train": {"steps": 5}}, ["train.steps=7", "seeds=[1, 2]"])
    assert data == {"train": {"steps": 7}, "seeds": [1, 2]}
    p = tmp_path / "c.yaml"
    p.write_text("variants: [{name: a, attention: softmax}]\nmodel: {d_model: 30}\n")
    with pytest.raises(ConfigError, match="divisible"):
        load_config(RecallConfig, p)
    p.write_text("variants: [{name: a, attention: nope}]\n")
    with pytest.raises(ConfigError, match="unknown attention"):
        load_config(RecallConfig, p)
    p.write_text("variants: [{name: a, attention: softmax}]\nunknown_top: 1\n")
    with pytest.raises(ConfigError, match="unknown_top"):
        load_config(RecallConfig, p)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_give_their_command(path):
    header = path.read_text().splitlines()[:8]
    assert any("hedgehog_attention.cli" in line or "hedgehog " in line for line in header), "header lacks the command"
    from hedgehog_attention.experiments.finetuned_conversion import FinetunedConversionConfig
    from hedgehog_attention.experiments.pretrained_conversion import PretrainedConversionConfig

    classes = {
        "recall": RecallConfig,
        "lm": LMConfig,
        "finetuned": FinetunedConversionConfig,
        "pretrained": PretrainedConversionConfig,
    }
    load_config(classes[path.stem.split("_")[0]], path)


def test_recall_paper_config_has_all_attentions():
    cfg = load_config(RecallConfig, CONFIGS / "recall.yaml")
    assert (cfg.task.vocab_size, cfg.task.seq_len, cfg.model.n_layers, cfg.model.n_heads) == (40, 128, 4, 4)
    atts = {(v.attention, v.distill_weight > 0) for v in cfg.variants}
    for a in ("softmax", "elu", "relu", "performer", "cosformer", "taylor2", "t2r"):
        assert (a, False) in atts
    assert ("hedgehog", False) in atts and ("hedgehog", True) in atts
    temps = sorted(v.feature_map_kwargs["temperature"] for v in cfg.variants if v.attention == "exp_t")
    assert temps == [1.0, 2.0]
    assert len(cfg.seeds) >= 3


def test_recall_cli_smoke_writes_report(tmp_path):
    out = tmp_path / "recall"
    rc = recall_main(["--config", str(CONFIGS / "recall_smoke.yaml"), "--out", str(out), "--set", "train.steps=8"])
    assert rc == 0
    md = (out / "recall.md").read_text()
    assert "| softmax |" in md and "| hedgehog-distill |" in md
    assert (out / "recall_scatter.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())["summary"]
    assert {r["variant"] for r in res} == {"softmax", "hedgehog", "hedgehog-distill"}
    assert all(0 <= r["acc_mean"] <= 1 and r["entropy_mean"] > 0 for r in res)
    assert all(r["steps"] == [8] for r in res)
    assert (out / "weights" / "hedgehog_s0.pt").exists()
    # The summary and the table hold the runs' own numbers (one seed: the mean is that run's value).
    for r in res:
        run = json.loads((out / "runs" / f"{r['variant']}_s0.json").read_text())
        assert r["acc_per_seed"] == [run["test_accuracy"]] and r["acc_mean"] == run["test_accuracy"]
        assert r["entropy_mean"] == run["entropy"] and r["acc_std"] == r["entropy_std"] == 0.0
        acc, valid = 100 * run["test_accuracy"], 100 * run["valid_accuracy"]
        row = f"| {r['variant']} | 0.003 | {acc:.1f} ± 0.0 | {acc:.1f} | {valid:.1f} | {run['entropy']:.3f} ± 0.000 |"
        assert row in md, (row, md)
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3
    # A rerun skips finished runs (resume at run granularity) and rebuilds the same table.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    smoke = ["--config", str(CONFIGS / "recall_smoke.yaml"), "--out", str(out)]
    assert recall_main([*smoke, "--set", "train.steps=8"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == stamps
    assert recall_main([*smoke, "--set", "train.steps=8", "--report-only"]) == 0
    assert [line for line in (out / "recall.md").read_text().splitlines() if line.startswith("|")] == table


def test_recall_resume_continues_exactly(tmp_path):
    """Checkpoints every 4 steps; dropping the last one and the result, ``--resume`` continues from
    step 4 and ends where the uninterrupted run ended (same accuracy, entropy and curve)."""
    out = tmp_path / "recall"
    args = ["--config", str(CONFIGS / "recall_smoke.yaml"), "--out", str(out), "--set", "train.steps=8",
            "--set", "train.checkpoint_every=4", "--set", "train.keep_last=2", "--set", "train.log_every=2",
            "--set", "variants=[{name: hedgehog, attention: hedgehog}]"]  # fmt: skip
    assert recall_main(args) == 0
    first = json.loads((out / "runs" / "hedgehog_s0.json").read_text())
    ckpt = out / "ckpt" / "hedgehog_s0"
    assert sorted(p.name for p in ckpt.glob("*.pt")) == ["ckpt-00000004.pt", "ckpt-00000008.pt"]
    for p in ckpt.glob("ckpt-00000008.*"):
        p.unlink()
    (out / "runs" / "hedgehog_s0.json").unlink()
    assert recall_main([*args, "--resume"]) == 0
    again = json.loads((out / "runs" / "hedgehog_s0.json").read_text())
    assert again["steps"] == 8
    assert again["test_accuracy"] == first["test_accuracy"] and again["entropy"] == pytest.approx(first["entropy"])
    assert [c["step"] for c in again["curve"]] == [2, 4, 6, 8]
    for a, b in zip(again["curve"], first["curve"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["valid_acc"] == b["valid_acc"]


def _toy_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    # A learnable toy stream over 64 ids: a repeated pattern with noise.
    base = np.tile(np.arange(64, dtype=np.uint16), 200)
    noise = rng.integers(0, 64, base.shape).astype(np.uint16)
    stream = np.where(rng.random(base.shape) < 0.1, noise, base).astype(np.uint16)
    npz = tmp_path / "toks.npz"
    np.savez(npz, train=stream, validation=stream[:2000], test=stream[2000:4000])
    return npz


def test_lm_cli_smoke_and_resume(tmp_path):
    npz = _toy_npz(tmp_path)
    out = tmp_path / "lm"
    args = [
        "--config", str(CONFIGS / "lm_smoke.yaml"), "--out", str(out),
        "--set", f"data.npz_path={npz}", "--set", "data.vocab_size=64", "--set", "train.steps=30",
        "--set", "train.log_every=15", "--set", "train.checkpoint_every=15", "--set", "train.keep_last=2",
    ]  # fmt: skip
    assert lm_main(args) == 0
    res = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert set(res) == {"softmax", "hedgehog", "elu"}
    for r in res.values():
        assert r["steps"] == 30 and r["test_ppl"] < 64  # learned something: below uniform over 64 ids
        assert len(r["losses"]) == 30 and r["world_size"] == 1
    assert (out / "ckpt" / "softmax" / "ckpt-00000015.pt").exists() and (out / "lm_curves.png").exists()
    md = (out / "lm.md").read_text()
    assert "gap elu->softmax closed" in md and "| softmax |" in md and "at step 30" in md
    # Test perplexity = exp(mean next-token NLL) over the full non-overlapping blocks of the test
    # stream (max_eval_blocks: 8 of 64 tokens), recomputed from the final weights (the step-30 checkpoint).
    import torch

    from hedgehog_attention.models import RotaryTransformer

    cfg = load_config(LMConfig, CONFIGS / "lm_smoke.yaml", [f"data.npz_path={npz}", "data.vocab_size=64"])
    model = RotaryTransformer(cfg.model_config(cfg.variants[0], 64))
    model.load_state_dict(torch.load(out / "ckpt" / "softmax" / "ckpt-00000030.pt", weights_only=False)["model"])
    model.eval()
    test = torch.from_numpy(np.load(npz)["test"].astype(np.int64))[: 8 * 64 + 1]
    x, y = test[:-1].view(8, 64), test[1:].view(8, 64)  # block i predicts tokens 64 i + 1 .. 64 i + 64
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1).double(), y.flatten())
    assert res["softmax"]["test_ppl"] == pytest.approx(float(nll.exp()), rel=1e-4)
    assert res["softmax"]["test_tokens"] == 8 * 64
    # The table holds those numbers; gap closed = (ppl[elu] - ppl[x]) / (ppl[elu] - ppl[softmax]).
    ppl = {k: r["test_ppl"] for k, r in res.items()}
    gap = 100 * (ppl["elu"] - ppl["hedgehog"]) / (ppl["elu"] - ppl["softmax"])
    assert f"| hedgehog | {ppl['hedgehog']:.2f} | {res['hedgehog']['valid_ppl']:.2f} | {gap:.1f}% | 30/30 |" in md
    assert f"| softmax | {ppl['softmax']:.2f} | {res['softmax']['valid_ppl']:.2f} | 100.0% | 30/30 |" in md
    assert f"| elu | {ppl['elu']:.2f} | {res['elu']['valid_ppl']:.2f} | 0.0% | 30/30 |" in md
    # As if killed after step 15: drop the last checkpoint and the result; --resume continues from
    # step 15 and reproduces the uninterrupted run exactly (same losses, curve and perplexity).
    for p in (out / "ckpt" / "softmax").glob("ckpt-00000030.*"):
        p.unlink()
    (out / "runs" / "softmax.json").unlink()
    assert lm_main([*args, "--resume"]) == 0
    r2 = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["results"]}["softmax"]
    assert r2["steps"] == 30 and [h["step"] for h in r2["history"]] == [15, 30]
    assert r2["losses"] == pytest.approx(res["softmax"]["losses"], rel=1e-6)
    assert r2["test_ppl"] == pytest.approx(res["softmax"]["test_ppl"], rel=1e-6)
    # Without --resume a run starts over (the old checkpoints are removed first). Only softmax: the
    # finished 30-step runs of the others are not reused under a 5-step config.
    (out / "runs" / "softmax.json").unlink()
    assert lm_main([*args, "--set", "train.steps=5"]) == 2
    assert lm_main([*args, "--set", "train.steps=5", "--set", "variants=[{name: softmax, attention: softmax}]"]) == 0
    assert sorted(p.name for p in (out / "ckpt" / "softmax").glob("*.pt")) == ["ckpt-00000005.pt"]


def test_lm_token_windows():
    from hedgehog_attention.experiments.lm import TokenWindows

    stream = np.arange(23, dtype=np.uint16)
    w = TokenWindows(stream, block=4)  # windows of 5 tokens every 4: starts 0, 4, ..., 16
    assert len(w) == 5 and w[1].tolist() == [4, 5, 6, 7, 8] and w[4].tolist() == [16, 17, 18, 19, 20]
    assert len(TokenWindows(stream, block=4, stride=2)) == 10  # starts 0, 2, ..., 18
    assert len(TokenWindows(stream, 4, max_windows=2)) == 2
    with pytest.raises(IndexError):
        w[5]
    with pytest.raises(ValueError, match="shorter than one window"):
        TokenWindows(stream[:4], block=4)


def test_gap_closed():
    assert gap_closed(25.6, 25.6, 18.6) == 0.0
    assert gap_closed(18.6, 25.6, 18.6) == 1.0
    assert gap_closed(20.8, 25.6, 18.6) == pytest.approx(0.6857, abs=1e-4)  # the paper's 68.6%


def test_load_config_from_cli_applies_set_then_shortcut_flags():
    import argparse

    from hedgehog_attention.experiments.common import ConfigError, load_config_from_cli
    from hedgehog_attention.experiments.recall import RecallConfig, build_parser

    args = build_parser().parse_args(
        ["--config", "configs/recall_smoke.yaml", "--set", "device=cpu", "--set", "workers=3", "--device", "cuda"]
    )
    cfg = load_config_from_cli(RecallConfig, args, {"device": "device", "workers": "workers", "out": "out_dir"})
    assert cfg.device == "cuda" and cfg.workers == 3  # the shortcut flag wins over --set; unset flags change nothing
    bad = argparse.Namespace(config="configs/recall_smoke.yaml", overrides=["no_such_key=1"], device=None)
    with pytest.raises(ConfigError):
        load_config_from_cli(RecallConfig, bad, {"device": "device"})


def test_exponent_numbers_are_floats_in_overrides_and_files(tmp_path):
    # YAML 1.2 reads 1e-3 as a number; PyYAML (YAML 1.1) reads it as the string '1e-3'.
    assert apply_overrides({}, ["train.lr=1e-3", "b=[5E4, 2]", "c=-2e+1", "d=1e"]) == {
        "train": {"lr": 1e-3}, "b": [5e4, 2], "c": -20.0, "d": "1e"
    }  # fmt: skip
    cfg = load_config(LMConfig, CONFIGS / "lm_smoke.yaml", ["train.lr=3e-4"])
    assert cfg.train.lr == 3e-4
    p = tmp_path / "c.yaml"
    p.write_text("variants: [{name: a, attention: softmax}]\ntrain: {lr: 1e-2, weight_decay: 1E-1}\n")
    cfg = load_config(LMConfig, p)
    assert (cfg.train.lr, cfg.train.weight_decay) == (1e-2, 0.1)


def test_shortcut_flags_are_taken_verbatim():
    from hedgehog_attention.experiments.common import TRAINING_SHORTCUTS, load_config_from_cli
    from hedgehog_attention.experiments.lm import build_parser

    for out in ("2024", "on", "runs/a: b", "#x"):
        args = build_parser().parse_args(["--config", str(CONFIGS / "lm_smoke.yaml"), "--out", out, "--workers", "3"])
        cfg = load_config_from_cli(LMConfig, args, TRAINING_SHORTCUTS)
        assert cfg.out_dir == out and cfg.workers == 3


def test_lm_refuses_finished_runs_of_other_settings(tmp_path):
    """A finished run is reused only under the settings it was trained with; otherwise the report
    would print this config's seed / lr / model above another config's numbers."""
    npz = _toy_npz(tmp_path)
    out = tmp_path / "lm"
    sets = [f"data.npz_path={npz}", "data.vocab_size=64", "variants=[{name: softmax, attention: softmax}]",
            "train.steps=2", "train.log_every=2", "train.checkpoint_every=2"]  # fmt: skip
    args = ["--config", str(CONFIGS / "lm_smoke.yaml"), "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    assert lm_main(args) == 0
    run = json.loads((out / "runs" / "softmax.json").read_text())
    table = [line for line in (out / "lm.md").read_text().splitlines() if line.startswith("| softmax")]
    # Same settings (bookkeeping such as log_every, workers and the gap baseline may differ): reused.
    assert lm_main([*args, "--set", "train.log_every=1", "--set", "gap_high=x", "--workers", "2"]) == 0
    assert [line for line in (out / "lm.md").read_text().splitlines() if line.startswith("| softmax")] == table
    for changed in ("seed=1", "train.lr=1.0e-3", "model.d_model=64", "dtype=bfloat16"):
        assert lm_main([*args, "--set", changed]) == 2, changed
        assert lm_main([*args, "--set", changed, "--report-only"]) == 2, changed
    assert json.loads((out / "runs" / "softmax.json").read_text()) == run  # neither retrained nor reported
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 0


def test_seed_summary_of_one_seed_prints_no_nan():
    from hedgehog_attention.experiments.seeds import seeds_markdown, summarize_seeds

    runs = [{"seed": 0, "teacher": {"test_accuracy": 0.8}, "methods": [{"method": "h", "test_accuracy": 0.6}]}]
    md = seeds_markdown(summarize_seeds(runs))
    assert "nan" not in md
    assert md.splitlines()[0].startswith("Seeds [0]; teacher test accuracy 80.0% (per seed: 80.0).")


def test_monotonicity_plot_keeps_zero_weights(tmp_path, monkeypatch):
    """Fig. 3 plots every attended query-key pair: a ReLU-like map's exactly-zero weights stay in."""
    import matplotlib.axes

    from hedgehog_attention.experiments.attention_maps import plot_monotonicity

    counts = []
    orig = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(
        matplotlib.axes.Axes, "scatter", lambda self, x, y, **kw: counts.append(len(x)) or orig(self, x, y, **kw)
    )
    rng = np.random.default_rng(0)
    dots = rng.normal(size=(1, 1, 4, 4))
    full = np.exp(dots) / np.exp(dots).sum(-1, keepdims=True)  # non-causal teacher: 16 pairs
    relu = np.maximum(dots, 0) / np.maximum(dots, 0).sum(-1, keepdims=True).clip(1e-9)
    causal = np.tril(np.ones((4, 4)))
    cw = full * causal / (full * causal).sum(-1, keepdims=True)  # causal teacher: 10 pairs
    meta = {"layers": [0], "heads": [0]}
    plot_monotonicity({"relu": {"softmax": full, "linear": relu, "dots": dots}}, meta, tmp_path / "a.png", "t")
    assert (relu == 0).any() and counts == [16, 16]
    counts.clear()
    snaps = {"relu": {"softmax": cw, "linear": relu * causal, "dots": dots}}
    plot_monotonicity(snaps, meta, tmp_path / "b.png", "t")
    assert counts == [10, 10]


def test_record_run_report_only_never_writes_the_run_record(tmp_path):
    from hedgehog_attention.experiments.common import record_run

    cfg = load_config(LMConfig, CONFIGS / "lm_smoke.yaml")
    # A report rebuilt where no run was recorded names itself, and does not pose as the run that trained.
    assert record_run(cfg, tmp_path, {"e": 1}, "report", report_only=True, is_main=True) == ({"e": 1}, "report")
    assert not (tmp_path / "config.json").exists()
    assert record_run(cfg, tmp_path, {"e": 2}, "train", report_only=False, is_main=True) == ({"e": 2}, "train")
    assert record_run(cfg, tmp_path, {"e": 3}, "report", report_only=True, is_main=True) == ({"e": 2}, "train")


def test_recall_refuses_finished_runs_of_other_settings(tmp_path):
    """A finished (variant, seed) is reused only under the settings it was trained with: a rerun
    with another lr or step count would report its numbers under the new header."""
    out = tmp_path / "recall"
    args = ["--config", str(CONFIGS / "recall_smoke.yaml"), "--out", str(out), "--set", "train.steps=2",
            "--set", "variants=[{name: softmax, attention: softmax}]"]  # fmt: skip
    assert recall_main(args) == 0
    first = (out / "runs" / "softmax_s0.json").read_text()
    assert recall_main([*args, "--set", "train.lr=0.05"]) == 2
    assert recall_main([*args, "--set", "train.steps=3", "--report-only"]) == 2
    assert (out / "runs" / "softmax_s0.json").read_text() == first  # nothing retrained or rewritten
    assert recall_main([*args, "--set", "train.log_every=1", "--report-only"]) == 0  # bookkeeping only: reused


def test_token_streams_are_compacted_without_wrapping():
    """Token streams are stored as uint16 only when every id fits: a vocabulary past 65,535 keeps its ids."""
    from hedgehog_attention.experiments.lm import compact_token_ids

    small = compact_token_ids(np.array([0, 5, 50256]))
    assert small.dtype == np.uint16 and small.tolist() == [0, 5, 50256]
    big = compact_token_ids(np.array([3, 65535, 65536, 151_000]))
    assert big.tolist() == [3, 65535, 65536, 151_000]
    assert compact_token_ids(np.array([], dtype=np.int64)).size == 0
    with pytest.raises(ValueError, match="token ids"):
        compact_token_ids(np.array([-1, 2]))


def _snaps(*names):
    a = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    return {n: {"softmax": a + i, "linear": a * 2 + i, "dots": a - i} for i, n in enumerate(names)}


def test_snapshots_round_trip_any_method_name(tmp_path):
    """A method named with "/" (a table label) or a leading "__" comes back under its own name."""
    from hedgehog_attention.experiments.attention_maps import load_snapshots, save_snapshots

    snaps = _snaps("t2r/hh", "__x", "hedgehog")
    meta = {"layers": [0], "heads": [0, 1], "tokens": ["a", "b"]}
    save_snapshots(snaps, meta, tmp_path / "m.npz")
    back, back_meta = load_snapshots(tmp_path / "m.npz")
    assert list(back) == list(snaps) and back_meta == meta
    for m, d in snaps.items():
        assert list(back[m]) == list(d) and all(np.array_equal(back[m][k], v) for k, v in d.items())
        assert all(back[m][k].dtype == np.float32 for k in d)


def test_snapshots_saved_atomically(tmp_path):
    """The sweeps rewrite attention_maps.npz after every method: a write that fails midway leaves the
    previous file readable, and no temporary file behind."""
    from hedgehog_attention.experiments.attention_maps import load_snapshots, save_snapshots

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    path = tmp_path / "attention_maps.npz"
    meta = {"layers": [0], "heads": [0, 1]}
    save_snapshots(_snaps("a"), meta, path)
    bad = _snaps("a", "b")
    bad["b"]["linear"] = np.array([Unsaveable()], dtype=object)  # fails after "a" is written
    with pytest.raises(RuntimeError, match="mid-write"):
        save_snapshots(bad, meta, path)
    back, _ = load_snapshots(path)
    assert list(back) == ["a"] and np.array_equal(back["a"]["linear"], _snaps("a")["a"]["linear"])
    assert [p.name for p in tmp_path.iterdir()] == ["attention_maps.npz"]


def test_write_report_keeps_the_previous_report_when_a_write_fails(tmp_path, capsys):
    from hedgehog_attention.experiments.method_sweep import write_report

    path = tmp_path / "report.md"
    assert write_report("# first\n", path) == 0
    with pytest.raises(UnicodeEncodeError):
        write_report("# second \ud800\n", path)  # cannot be encoded: the write fails midway
    assert path.read_text() == "# first\n" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_snapshot_matches_the_model_and_rejects_bad_layer_and_head_indices():
    """Snapshot weights are the model's own attention probabilities for the chosen layers and heads,
    padding dropped; indices outside the model are refused by name (not IndexError, not layer -1)."""
    import torch
    from transformers import BertConfig, BertModel

    from hedgehog_attention.convert import LinearizeConfig, linearize
    from hedgehog_attention.experiments.attention_maps import snapshot

    torch.manual_seed(0)
    cfg = BertConfig(
        attn_implementation="eager",
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(1, 50, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 7:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    linearize(model, LinearizeConfig(feature_map="hedgehog"))
    batch = {"input_ids": ids, "attention_mask": mask}
    s = snapshot(model, batch, [2, 0], [3, 1])
    assert s["softmax"].shape == s["linear"].shape == s["dots"].shape == (2, 2, 7, 7)
    for i, li in enumerate([2, 0]):
        for j, h in enumerate([3, 1]):
            np.testing.assert_allclose(s["softmax"][i, j], ref[li][0, h, :7, :7].numpy(), atol=1e-6)
    for layers in ([3], [-1]):
        with pytest.raises(ValueError, match=r"map layers \[-?\d\] out of range: the model has 3 layers"):
            snapshot(model, batch, layers, [0])
    with pytest.raises(ValueError, match=r"map heads \[4\] out of range: layer 0 has 4 heads"):
        snapshot(model, batch, [0], [0, 4])
