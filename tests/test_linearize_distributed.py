"""`hedgehog linearize` on 2 processes (torchrun, gloo, CPU) against 1 process, with kill + resume.

A tiny Llama (2 layers, GQA, sharpened q/k so Eq. 3 has something to learn) with a character
tokenizer is written as an HF folder; the job reads a generated text file (online capture, LoRA
finetune, checkpoints every 2 steps). Two launches (process start-up dominates the cost):

1. The CLI through this file as worker, which hard-kills rank 0 (``os._exit``) right after
   distillation step ``KILL_AT``; torchrun tears the other rank down.
2. ``torchrun -m hedgehog_attention.cli linearize ... --resume``.

The resumed report (steps 1-4 from the killed run's checkpoint, 5-8 and the finetune from the
resumed one) must match one uninterrupted process with the same global batch: the same distill
and finetune loss trajectories, eval losses, fidelity; only rank 0 writes the report.
(FSDP: ``test_distributed.py`` runs the cached distillation under FSDP in its launches.)

This file is also the kill worker: ``torchrun ... tests/test_linearize_distributed.py --kill-at N -- ARGS``.
"""

from __future__ import annotations

import json
import os
import random
import string
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_distributed import _launch as _launch_worker  # noqa: E402  (launch helper, timeouts, clean kill)

KILL_AT, CKPT_EVERY = 5, 2
COMMON = ["--seq-len", "16", "--train-blocks", "32", "--eval-blocks", "4", "--test-blocks", "2", "--test-items", "2",
          "--batch-size", "4", "--eval-every", "4", "--patience", "0", "--quiet", "--threads", "1"]  # fmt: skip
ONLINE = ["--methods", "hedgehog", "--capture", "online", "--steps", "8", "--finetune", "--finetune-method", "lora",
          "--finetune-steps", "4", "--finetune-lr", "1e-2", "--no-save"]  # fmt: skip
TOL = 2e-5  # 2 processes vs 1: float32 sums in another order


def build_tiny(d: Path) -> None:
    """A tiny LlamaForCausalLM + character tokenizer as an HF folder, and a text file."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    d.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + " .,\n")
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<unk>",
                                               eos_token="<s>")  # fmt: skip
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaky softmax attention
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7))) for _ in range(60)]
    paragraphs = (" ".join(rng.choice(words) for _ in range(40)) + "." for _ in range(60))
    (d / "text.txt").write_text("\n\n".join(paragraphs))


def _args(model: Path, extra: list[str], out: Path, ckpt: Path | None = None) -> list[str]:
    a = ["--model", str(model), "--text", str(model / "text.txt"), *COMMON, *extra, "--output-dir", str(out)]
    return a + (["--checkpoint-dir", str(ckpt), "--checkpoint-every", str(CKPT_EVERY)] if ckpt else [])


def _torchrun(argv: list[str], timeout: float = 150):
    """torchrun -m hedgehog_attention.cli linearize ARGV, through test_distributed's launcher."""
    return _launch_worker("", Path("."), timeout=timeout, argv=["-m", "hedgehog_attention.cli", "linearize", *argv])


def _run_all(d: Path) -> None:
    model = d / "tiny"
    build_tiny(model)
    args = _args(model, ONLINE, d / "two", d / "ckpt")
    killed = _launch_worker("", Path("."), argv=[str(Path(__file__).resolve()), "--kill-at", str(KILL_AT), "--",
                                                 *args])  # fmt: skip
    assert killed.returncode != 0, "the kill run should have made torchrun fail"
    assert not (d / "two" / "report.json").exists(), "the killed run finished?"
    (d / "ckpts_at_kill.json").write_text(json.dumps(sorted(p.name for p in (d / "ckpt").rglob("ckpt-*.pt"))))
    resumed = _torchrun([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    (d / "two.stdout").write_text(resumed.stdout)
    (d / "DONE").touch()


@pytest.fixture(scope="module")
def runs(once_per_session) -> Path:
    """The launches, once per session (shared by the pytest-xdist workers)."""
    return once_per_session("linearize_dist", _run_all)


def _one_process(runs: Path, extra: list[str], name: str) -> dict:
    """The reference: the same job in this process (no torchrun: world size 1)."""
    from hedgehog_attention.convert.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(_args(runs / "tiny", extra, runs / name)) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((runs / name / "report.json").read_text())


def _close(a, b, tol=TOL):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=tol, atol=tol)  # fmt: skip


def test_two_processes_killed_and_resumed_match_one_uninterrupted_process(runs):
    at_kill = json.loads((runs / "ckpts_at_kill.json").read_text())
    assert at_kill == ["ckpt-00000002.pt", "ckpt-00000004.pt"], at_kill  # killed in the distill stage
    got = json.loads((runs / "two" / "report.json").read_text())
    ref = _one_process(runs, ONLINE, "one")
    assert got["world_size"] == 2 and ref["world_size"] == 1
    g, r = got["methods"]["hedgehog"], ref["methods"]["hedgehog"]
    assert g["distill"]["resumed_from"] == 4 and r["distill"]["resumed_from"] is None
    assert g["distill"]["global_batch_size"] == r["distill"]["global_batch_size"] == 4
    assert len(g["distill"]["train_loss"]) == len(r["distill"]["train_loss"]) == 8
    _close(g["distill"]["train_loss"], r["distill"]["train_loss"])
    _close(g["distill"]["eval_loss"], r["distill"]["eval_loss"])
    assert g["distill"]["eval_loss"][-1] < g["distill"]["eval_loss"][0]  # it learned: not two untrained runs
    assert [h["tokens"] for h in g["distill"]["history"]] == [h["tokens"] for h in r["distill"]["history"]]
    for key in ("kl", "ce", "monotonicity_linear"):  # evaluated with the final maps
        _close(g["mean"][key], r["mean"][key])
    assert len(got["finetune"]["train_loss"]) == 4
    _close(got["finetune"]["train_loss"], ref["finetune"]["train_loss"])
    _close(got["finetune"]["eval_loss_after"], ref["finetune"]["eval_loss_after"])
    out = (runs / "two.stdout").read_text()
    assert out.count("[linearize] report:") == 1 and out.count("[linearize] loading") == 1, out
    ck = runs / "ckpt"
    assert sorted(p.name for p in (ck / "distill-hedgehog").glob("ckpt-*.pt")) == [
        f"ckpt-0000000{s}.pt" for s in (6, 8)
    ]
    assert sorted(p.name for p in (ck / "finetune").glob("ckpt-*.pt")) == [f"ckpt-0000000{s}.pt" for s in (2, 4)]


def test_fsdp_online_capture_is_refused_with_a_reason():
    from hedgehog_attention.convert.cli import main

    with pytest.raises(SystemExit, match="cached"):
        main(["--strategy", "fsdp", "--capture", "online", "--no-save"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("capture", ["cached", "online"])
def test_cuda_linearize_both_capture_modes(tmp_path, capture):
    """On a GPU the cached q, k stay on the device (no pinning of CUDA tensors) and both modes learn."""
    from hedgehog_attention.convert.cli import main

    build_tiny(tmp_path / "tiny")
    extra = ["--methods", "hedgehog", "--capture", capture, "--steps", "8", "--device", "cuda", "--no-save",
             "--backend", "chunked"]  # fmt: skip
    assert main(_args(tmp_path / "tiny", extra, tmp_path / "out")) == 0
    d = json.loads((tmp_path / "out" / "report.json").read_text())["methods"]["hedgehog"]["distill"]
    assert d["eval_loss"][-1] < d["eval_loss"][0], d["eval_loss"]


def _kill_worker(kill_at: int, argv: list[str]) -> None:
    """The CLI with a Trainer callback that hard-kills rank 0 after step ``kill_at`` of the first stage."""
    from hedgehog_attention import train
    from hedgehog_attention.convert.cli import main

    class HardKill(train.TrainerCallback):
        def on_step_end(self, trainer, step, loss):
            if step == kill_at and trainer.world.rank == 0:
                os._exit(17)  # no cleanup, no flush: like SIGKILL

    init = train.Trainer.__init__

    def patched(self, *a, **kw):
        kw["callbacks"] = [*kw.get("callbacks", ()), HardKill()]
        init(self, *a, **kw)

    train.Trainer.__init__ = patched
    main(argv)


if __name__ == "__main__":
    i = sys.argv.index("--")
    _kill_worker(int(sys.argv[sys.argv.index("--kill-at") + 1]), sys.argv[i + 1 :])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
