"""`hedgehog lm` and `hedgehog recall` on the Trainer under torchrun: 2 gloo processes vs 1 process.

A tiny LM config (toy 64-id stream, 2 layers, context 16, global batch 4) trains the softmax and
Hedgehog variants for a few steps in this process and under ``torchrun --nproc_per_node=2 -m
hedgehog_attention.cli lm`` (DDP on CPU, the same global batch split 2 x 2). The per-step training
losses, the validation curve and the test perplexity must agree within float32 reordering
tolerance, and the 2-process report must say it ran on 2 processes (only rank 0 writes). The
recall test does the same against 1 process with 2 accumulated micro-batches (its loss is a mean
of micro-batch means). One launch each; process start-up dominates the cost.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_distributed import _launch  # noqa: E402  (torchrun on a free port, timeouts, clean kill)

CONFIG = HERE.parent / "configs" / "lm_smoke.yaml"
TOL = 2e-5  # relative: the same float32 math with the gradient all-reduce summing in another order


def _toy_npz(path: Path) -> None:
    rng = np.random.default_rng(0)
    base = np.tile(np.arange(64, dtype=np.uint16), 100)
    stream = np.where(rng.random(base.shape) < 0.1, rng.integers(0, 64, base.shape), base).astype(np.uint16)
    np.savez(path, train=stream[:5000], validation=stream[5000:5600], test=stream[5600:6200])


def _args(npz: Path, out: Path) -> list[str]:
    sets = [
        f"data.npz_path={npz}", "data.vocab_size=64", "data.block_size=16", "data.max_eval_blocks=6",
        "model.d_model=16", "train.steps=6", "train.batch_size=4", "train.warmup_steps=2", "train.log_every=3",
        "train.eval_batch_size=3", "train.checkpoint_every=3", "train.lr=0.003",
        "variants=[{name: softmax, attention: softmax}, {name: hedgehog, attention: hedgehog}]",
    ]  # fmt: skip
    return ["--config", str(CONFIG), "--out", str(out), "--device", "cpu", *(a for s in sets for a in ("--set", s))]


def test_lm_two_processes_match_one(tmp_path):
    import torch

    from hedgehog_attention.experiments.lm import main as lm_main

    npz = tmp_path / "toks.npz"
    _toy_npz(npz)
    torch.set_num_threads(1)
    assert lm_main(_args(npz, tmp_path / "one")) == 0
    two = _launch(
        "", Path("."), timeout=120, argv=["-m", "hedgehog_attention.cli", "lm", *_args(npz, tmp_path / "two")]
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-5000:]

    def load(name: str) -> dict:
        return {r["variant"]: r for r in json.loads((tmp_path / name / "results.json").read_text())["results"]}

    one, dist = load("one"), load("two")
    assert set(one) == set(dist) == {"softmax", "hedgehog"}
    for name in one:
        a, b = one[name], dist[name]
        assert (a["world_size"], b["world_size"]) == (1, 2) and b["strategy"] == "ddp"
        assert len(a["losses"]) == len(b["losses"]) == 6
        assert a["losses"][-1] < a["losses"][0]  # it trained
        np.testing.assert_allclose(b["losses"], a["losses"], rtol=TOL)
        np.testing.assert_allclose([h["valid_ppl"] for h in b["history"]], [h["valid_ppl"] for h in a["history"]],
                                   rtol=TOL)  # fmt: skip
        assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [3, 6]
        assert b["test_ppl"] == pytest.approx(a["test_ppl"], rel=TOL)
        assert b["tokens_seen"] == a["tokens_seen"] == 6 * 4 * 16
    env = json.loads((tmp_path / "two" / "config.json").read_text())["environment"]
    assert env["processes"] == 2
    assert "| hedgehog |" in (tmp_path / "two" / "lm.md").read_text()
    assert sorted(p.name for p in (tmp_path / "two" / "ckpt" / "softmax").glob("*.pt")) == ["ckpt-00000006.pt"]


RECALL_CONFIG = HERE.parent / "configs" / "recall_smoke.yaml"


def test_recall_two_processes_match_one_with_accumulation(tmp_path):
    """``hedgehog recall`` under torchrun: the step loss is the mean of the micro-batch means (the
    number of queries varies per sequence), so 2 processes x 16 sequences match 1 process with 2
    accumulated micro-batches of 16 (not 1 x 32); with the distilled variant's Eq. 3 term too."""
    from hedgehog_attention.experiments.recall import main as recall_main

    sets = ["train.steps=8", "train.log_every=4", "train.checkpoint_every=4",
            "variants=[{name: softmax, attention: softmax}, {name: hedgehog-distill, attention: hedgehog, "
            "distill_weight: 1.0}]"]  # fmt: skip
    args = ["--config", str(RECALL_CONFIG), *(a for s in sets for a in ("--set", s))]
    import torch

    torch.set_num_threads(1)
    assert recall_main([*args, "--set", "train.grad_accum_steps=2", "--out", str(tmp_path / "one")]) == 0
    two = _launch("", Path("."), timeout=120,
                  argv=["-m", "hedgehog_attention.cli", "recall", *args, "--out", str(tmp_path / "two")])  # fmt: skip
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-5000:]
    for name in ("softmax", "hedgehog-distill"):
        a, b = (json.loads((tmp_path / d / "runs" / f"{name}_s0.json").read_text()) for d in ("one", "two"))
        assert (a["world_size"], b["world_size"]) == (1, 2) and a["engine"] == b["engine"] == "trainer"
        assert a["steps"] == b["steps"] == 8
        assert [c["step"] for c in a["curve"]] == [c["step"] for c in b["curve"]] == [4, 8]
        np.testing.assert_allclose([c["loss"] for c in b["curve"]], [c["loss"] for c in a["curve"]], rtol=TOL)
        assert a["curve"][-1]["loss"] < a["curve"][0]["loss"]  # it trained
        assert [c["valid_acc"] for c in b["curve"]] == [c["valid_acc"] for c in a["curve"]]
        assert b["test_accuracy"] == a["test_accuracy"] and b["entropy"] == pytest.approx(a["entropy"], rel=TOL)
    assert "| hedgehog-distill |" in (tmp_path / "two" / "recall.md").read_text()
