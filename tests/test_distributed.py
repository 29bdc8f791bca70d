"""2-process tests of the training engine on CPU (gloo), launched through torchrun.

This file is also the worker script: ``torchrun ... tests/test_distributed.py worker --modes ...``.
Two launches serve every test (process start-up dominates the cost):

1. ``ddp,fsdp,ddp-accum,fsdp-accum,kill``: uninterrupted DDP and FSDP2 runs (micro-batch 4, and
   micro-batch 2 x accumulation 2: global batch 8 each time), then a DDP run with checkpoints
   that rank 0 hard-kills (``os._exit``) right after step 5 -- torchrun tears the other rank down.
2. ``resume``: the killed run resumed from its newest checkpoint (step 4).

Each run is compared with one in-process run of the same global batch (1 process x accumulation 2),
in float64.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
STEPS, KILL_AT, CKPT_EVERY = 8, 5, 2
WORKER_DEADLINE_S = 240
BEST_KW = {"lr": 3.0, "max_grad_norm": None, "eval_every": 2, "restore_best": True}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(**kw):
    from test_train import make_config

    return make_config(**{"max_steps": STEPS, "micro_batch_size": 4, **kw})


# --------------------------------------------------------------------------------------------------
# worker (runs under torchrun)
# --------------------------------------------------------------------------------------------------


def _worker(modes: list[str], out_dir: Path) -> None:
    from test_train import Points, TinyNet, TrainerCallback, loss_fn

    from hedgehog_attention.train import Trainer, cleanup_distributed, init_distributed

    signal.alarm(WORKER_DEADLINE_S)  # a stuck worker (e.g. a peer died in a collective) ends itself
    gc.disable()  # no collection by chance: the check at the end sees what cleanup_distributed itself frees
    torch.set_num_threads(1)
    info = init_distributed()
    assert info.world_size == (1 if all(m.startswith("cuda") for m in modes) else 2), info

    class HardKill(TrainerCallback):
        def on_step_end(self, trainer, step, loss):
            if step == KILL_AT and info.rank == 0:
                os._exit(17)  # no cleanup, no flush: like SIGKILL

    for mode in modes:
        if mode == "ddp-misuse":
            (out_dir / "ddp-misuse.json").write_text(json.dumps(_misuse(info.rank)))
            continue
        if mode == "linearize-fsdp":  # convert.distill, cached capture, FSDP; per-rank RNG before the swap
            res, maps = _linearize_distill(seed=info.rank, strategy="fsdp")
            ft = {m: _finetune_tiny(m, strategy="fsdp") for m in ("full", "lora")}
            if info.rank == 0:
                rec = {"losses": res.train_loss, "eval": res.eval_loss, "best": res.best_eval_loss, "maps": maps,
                       "finetune": ft}  # fmt: skip
                (out_dir / "linearize-fsdp.json").write_text(json.dumps(rec))
            continue
        if mode == "stop-rank1":  # a callback stops rank 1 only: every rank must stop at that step

            class StopRank1(TrainerCallback):
                def on_step_end(self, trainer, step, loss):
                    if step == 3 and info.rank == 1:
                        trainer.should_stop = True

            res = Trainer(TinyNet(), loss_fn, Points(40), None, _cfg(strategy="ddp"), callbacks=[StopRank1()]).fit()
            steps = [None] * info.world_size
            torch.distributed.all_gather_object(steps, res.steps_done)
            if info.rank == 0:
                (out_dir / "stop-rank1.json").write_text(json.dumps({"steps_done": steps}))
            continue
        ckdir = str(out_dir / "ckpt")
        if mode in ("ddp", "fsdp"):
            cfg = _cfg(strategy=mode)
        elif mode.startswith("cuda-"):  # one GPU process through torchrun: nccl, DDP/FSDP of world size 1
            cfg = _cfg(strategy=mode.split("-")[1], micro_batch_size=8, device=f"cuda:{info.local_rank}")
        elif mode.endswith("-accum"):  # 2 processes x accumulation 2 x micro-batch 2: global batch 8 too
            cfg = _cfg(strategy=mode.split("-")[0], micro_batch_size=2, grad_accum_steps=2)
        elif mode == "fsdp-best":  # diverging lr: restore_best must gather and restore the best state
            cfg = _cfg(strategy="fsdp", **BEST_KW)
        elif mode == "fsdp-ckpt":  # every checkpoint kept; the test then hides the newer ones
            cfg = _cfg(strategy="fsdp", checkpoint_every=CKPT_EVERY, checkpoint_dir=str(out_dir / "ckpt_fsdp"),
                       keep_last=None)  # fmt: skip
        elif mode == "fsdp-resume":
            cfg = _cfg(strategy="fsdp", checkpoint_every=CKPT_EVERY, checkpoint_dir=str(out_dir / "ckpt_fsdp_part"),
                       resume=True)  # fmt: skip
        else:  # kill / resume
            cfg = _cfg(strategy="ddp", checkpoint_every=CKPT_EVERY, checkpoint_dir=ckdir, resume=mode == "resume")
        model = TinyNet()
        trainer = Trainer(model, loss_fn, Points(40), Points(10, seed=2), cfg,
                          callbacks=[HardKill()] if mode == "kill" else [])  # fmt: skip
        res = trainer.fit()
        params = {}
        for name, p in model.named_parameters():
            t = p.detach()
            if hasattr(t, "full_tensor"):  # FSDP2 DTensor shard -> full (collective)
                t = t.full_tensor()
            params[name] = t.tolist()
        if info.rank == 0:
            rec = {"losses": res.losses, "history": res.history, "params": params,
                   "resumed_from": res.resumed_from, "best": res.best_eval_loss}  # fmt: skip
            (out_dir / f"{mode}.json").write_text(json.dumps(rec))
    trainer = model = res = None  # what the worker still holds; DDP's own reference cycles remain
    cleanup_distributed()
    # cleanup_distributed frees DDP wrappers (their reducers hold the gloo group) while the group and the
    # interpreter are whole; left to interpreter exit they aborted a CI run ("terminate called...").
    leaked = [o for o in gc.get_objects() if isinstance(o, torch.nn.parallel.DistributedDataParallel)]
    assert not leaked, f"{len(leaked)} DDP wrapper(s) alive after cleanup_distributed"


def _linearize_distill(seed: int, strategy: str = "auto"):
    """A tiny converted Llama with randomly initialized T2R maps (drawn after ``manual_seed(seed)``),
    distilled with cached capture; returns the DistillResult and the final maps as lists."""
    import transformers

    from hedgehog_attention.convert import DistillConfig, LinearizeConfig, feature_map_parameters, linearize
    from hedgehog_attention.convert.distill import distill

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaky softmax attention
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    torch.manual_seed(seed)  # under torchrun each rank draws its own maps: FSDP must start from rank 0's
    linearize(model, LinearizeConfig(feature_map="t2r"))
    g = torch.Generator().manual_seed(5)
    batches = [{"input_ids": torch.randint(0, 64, (4, 12), generator=g)} for _ in range(4)]
    held = [{"input_ids": torch.randint(0, 64, (4, 12), generator=g)}]
    dcfg = DistillConfig(steps=6, eval_every=3, patience=0, batch_size=4, capture="cached", strategy=strategy)
    res = distill(model, batches, held, dcfg, progress=False)
    return res, [p.detach().tolist() for p in feature_map_parameters(model)]


def _finetune_tiny(method: str, strategy: str = "auto") -> dict:
    """convert.finetune (full or LoRA) of a tiny converted Llama: its losses and the eval loss after."""
    import transformers

    from hedgehog_attention.convert import FinetuneConfig, linearize
    from hedgehog_attention.convert.finetune import finetune

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    linearize(model)
    g = torch.Generator().manual_seed(6)
    batches = [{"input_ids": (x := torch.randint(0, 64, (4, 12), generator=g)), "labels": x} for _ in range(4)]
    fcfg = FinetuneConfig(method=method, steps=5, lr=1e-2, batch_size=4, strategy=strategy)
    _, res = finetune(model, batches, batches[:1], fcfg, progress=False)
    return {"losses": res.train_loss, "after": res.eval_loss_after}


def _misuse(rank: int) -> dict[str, str]:
    """Two loss_fns that would silently skip DDP's gradient sync; the trainer must refuse both."""
    from test_train import Points, TinyNet

    from hedgehog_attention.train import Trainer, unwrap_model

    def bypass(model, batch):  # calls the inner module, not the DDP wrapper
        return unwrap_model(model)(batch)

    def nograd_forward(model, batch):  # wrapper forward under no_grad, loss built in a hook
        out = {}

        def hook(mod, inp, output):
            with torch.enable_grad():
                out["loss"] = (torch.nn.functional.linear(inp[0], mod.weight, mod.bias) ** 2).mean()

        h = unwrap_model(model).blocks[0].register_forward_hook(hook)
        with torch.no_grad():
            model(batch)
        h.remove()
        return out["loss"]

    errors = {}
    for name, fn in (("bypass", bypass), ("nograd_forward", nograd_forward)):
        try:
            Trainer(TinyNet(), fn, Points(40), None, _cfg(strategy="ddp", max_steps=2)).fit()
            errors[name] = "no error"
        except RuntimeError as e:
            errors[name] = str(e)
    return errors


# --------------------------------------------------------------------------------------------------
# launcher + tests
# --------------------------------------------------------------------------------------------------


def _launch(
    modes: str, out_dir: Path, timeout: float = 150, nproc: int = 2, argv: list[str] | None = None
) -> subprocess.CompletedProcess:
    """torchrun on a free port; on timeout the whole process group (agent + workers) is killed.
    Runs this file's worker with ``modes``, or, with ``argv``, that program (``["-m", "pkg.cli", ...]``
    or ``[script, ...]``; used by test_linearize_distributed.py)."""
    target = argv if argv is not None else [str(Path(__file__).resolve()), "worker", "--modes", modes, "--out",
                                            str(out_dir)]  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "--monitor_interval=0.1", *target,
    ]  # fmt: skip
    src = HERE.parent / "src"  # a source checkout works without an install
    path = os.pathsep.join(p for p in (str(src) if src.is_dir() else "", os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the torchrun agent stop its workers (they run in sessions of their own, so a
        # process-group kill would not reach them); then SIGKILL whatever is left of the agent.
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = "", ""
        pytest.fail(f"torchrun {modes or argv!r} did not finish in {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _run_all(out: Path) -> None:
    first = _launch("ddp,fsdp,ddp-accum,fsdp-accum,fsdp-ckpt,fsdp-best,kill", out)
    assert first.returncode != 0, "the kill run should have made torchrun fail"
    assert (out / "ddp.json").exists() and (out / "fsdp.json").exists(), first.stdout + first.stderr
    assert not (out / "kill.json").exists(), "the killed run finished?"
    # Keep FSDP's checkpoints up to step 4 (as if it had died at step 5), in two copies: one to
    # resume under FSDP with 2 processes, one to resume on 1 process (test below).
    for name in ("ckpt_fsdp_part", "ckpt_fsdp_single"):
        (out / name).mkdir()
        for step in (2, 4):
            for ext in ("pt", "json"):
                shutil.copy(out / "ckpt_fsdp" / f"ckpt-{step:08d}.{ext}", out / name)
    # (linearize-fsdp first: its gc.collect() calls would hide a DDP wrapper that cleanup_distributed leaves)
    second = _launch("linearize-fsdp,resume,fsdp-resume,ddp-misuse,stop-rank1", out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    (out / "DONE").touch()


@pytest.fixture(scope="module")
def runs(once_per_session) -> dict:
    """The two launches, once per session (shared by the pytest-xdist workers, not one torchrun pair each)."""
    out = once_per_session("dist_runs", _run_all)
    modes = ("ddp", "fsdp", "ddp-accum", "fsdp-accum", "fsdp-ckpt", "fsdp-best", "resume", "fsdp-resume",
             "ddp-misuse", "stop-rank1", "linearize-fsdp")  # fmt: skip
    recs = {m: json.loads((out / f"{m}.json").read_text()) for m in modes}
    recs["ckpts"] = sorted(p.name for p in (out / "ckpt").glob("ckpt-*.pt"))
    recs["dir"] = out
    return recs


@pytest.fixture(scope="module")
def single():
    """The reference: one process, accumulation 2 -> the same global batch of 8."""
    from test_train import Points, TinyNet, loss_fn

    from hedgehog_attention.train import Trainer

    model = TinyNet()
    res = Trainer(model, loss_fn, Points(40), Points(10, seed=2), _cfg(grad_accum_steps=2)).fit()
    return res, {n: p.detach() for n, p in model.named_parameters()}


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=tol, atol=tol)  # fmt: skip


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-accum", "fsdp-accum"])
def test_two_processes_match_one_process_same_global_batch(runs, single, mode):
    res, params = single
    rec = runs[mode]
    assert len(rec["losses"]) == STEPS
    _close(rec["losses"], res.losses)
    _close([r["eval_loss"] or 0.0 for r in rec["history"]], [r["eval_loss"] or 0.0 for r in res.history])
    assert [r["tokens"] for r in rec["history"]] == [r["tokens"] for r in res.history]
    for name, p in params.items():
        _close(rec["params"][name], p)


def test_two_process_kill_then_resume_matches_uninterrupted(runs):
    rec, ref = runs["resume"], runs["ddp"]
    assert rec["resumed_from"] == 4  # killed after step 5; the newest checkpoint is step 4
    assert runs["ckpts"][-1] == f"ckpt-{STEPS:08d}.pt"
    _close(rec["losses"], ref["losses"], tol=1e-12)
    for name, p in ref["params"].items():
        _close(rec["params"][name], p, tol=1e-12)
    assert rec["best"] == pytest.approx(ref["best"], rel=1e-12)


def test_ddp_refuses_a_loss_fn_that_skips_the_gradient_sync(runs):
    for name, msg in runs["ddp-misuse"].items():
        assert "with gradients enabled" in msg, (name, msg)


def test_fsdp_restore_best(runs):
    from test_train import Points, TinyNet, loss_fn

    from hedgehog_attention.train import Trainer

    model = TinyNet()
    res = Trainer(model, loss_fn, Points(40), Points(10, seed=2), _cfg(grad_accum_steps=2, **BEST_KW)).fit()
    rec = runs["fsdp-best"]
    assert res.best_step < STEPS and rec["best"] == pytest.approx(res.best_eval_loss, rel=1e-10)
    for name, p in model.named_parameters():
        _close(rec["params"][name], p.detach())


def test_a_stop_on_one_rank_stops_every_rank(runs):
    assert runs["stop-rank1"]["steps_done"] == [3, 3]


def test_fsdp_checkpoint_resumes_under_fsdp(runs):
    rec, ref = runs["fsdp-resume"], runs["fsdp"]
    assert rec["resumed_from"] == 4
    _close(rec["losses"], ref["losses"], tol=1e-12)
    for name, p in ref["params"].items():
        _close(rec["params"][name], p, tol=1e-12)


def test_fsdp_checkpoint_resumes_on_one_process(runs, single):
    """Full (unsharded, name-keyed) state: 2 FSDP ranks -> 1 process, same global batch."""
    from test_train import Points, TinyNet, loss_fn

    from hedgehog_attention.train import Trainer

    model = TinyNet()
    cfg = _cfg(grad_accum_steps=2, checkpoint_dir=str(runs["dir"] / "ckpt_fsdp_single"), resume=True)
    res = Trainer(model, loss_fn, Points(40), Points(10, seed=2), cfg).fit()
    assert res.resumed_from == 4
    _close(res.losses, single[0].losses)
    for name, p in single[1].items():
        _close(dict(model.named_parameters())[name].detach(), p)


def test_cached_distillation_under_fsdp_matches_one_process(runs):
    """convert.distill's cached mode on 2 FSDP ranks (the maps sharded, each rank with its own random
    initial maps) == 1 process from rank 0's maps, and the model holds plain tensors afterwards."""
    pytest.importorskip("transformers")
    res, maps = _linearize_distill(seed=0)
    rec = runs["linearize-fsdp"]
    assert len(rec["losses"]) == 6 and rec["eval"][-1] < rec["eval"][0]
    _close(rec["losses"], res.train_loss, tol=1e-5)
    _close(rec["eval"], res.eval_loss, tol=1e-5)
    for got, want in zip(rec["maps"], maps, strict=True):
        _close(got, want, tol=1e-5)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_under_fsdp_matches_one_process(runs, method):
    """convert.finetune on 2 FSDP ranks (LoRA through peft, and full) == 1 process, and the returned
    (gathered) model evaluates the same."""
    pytest.importorskip("transformers")
    if method == "lora":
        pytest.importorskip("peft")
    ref = _finetune_tiny(method)
    got = runs["linearize-fsdp"]["finetune"][method]
    assert len(got["losses"]) == 5 and got["losses"][-1] < got["losses"][0]
    _close(got["losses"], ref["losses"], tol=1e-5)
    _close(got["after"], ref["after"], tol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torchrun_one_gpu_ddp_and_fsdp(tmp_path, single):
    proc = _launch("cuda-ddp,cuda-fsdp", tmp_path, timeout=120, nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for mode in ("cuda-ddp", "cuda-fsdp"):
        rec = json.loads((tmp_path / f"{mode}.json").read_text())
        _close(rec["losses"], single[0].losses, tol=1e-9)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["worker"])
    ap.add_argument("--modes", required=True)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    _worker(a.modes.split(","), a.out)
    # Leave without running C++ static destructors: after the deliberate-misuse scenarios a gloo
    # worker thread can still be joinable at interpreter exit, and its destructor then aborts the
    # process ("terminate called without an active exception", seen once in 2 CI runs) although every
    # result file was already written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
