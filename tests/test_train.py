"""Single-process tests of the training engine (train.py, checkpoint.py).

The distributed ones (2 processes, gloo, torchrun) are in test_distributed.py and reuse the tiny
problem defined here: a residual MLP "student" (in a ModuleList, so FSDP wraps each block) regressing
a frozen linear "teacher", in float64 so trajectories compare to ~1e-12.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from hedgehog_attention import checkpoint as ckpt
from hedgehog_attention.train import (
    GlobalBatchSampler,
    LossModule,
    LRSchedule,
    TrainConfig,
    Trainer,
    TrainerCallback,
    _fsdp_blocks,
    call_model,
)

D = 6


class Points(Dataset):
    def __init__(self, n: int, seed: int = 1) -> None:
        self.x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


class TinyNet(nn.Module):
    def __init__(self, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.teacher = nn.Linear(D, D).double()
        self.blocks = nn.ModuleList([nn.Linear(D, D).double() for _ in range(2)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        self.teacher.requires_grad_(False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for b in self.blocks:  # (B, D)
            h = h + self.drop(torch.tanh(b(h)))
        with torch.no_grad():
            t = self.teacher(x)
        return ((h - t) ** 2).mean()


def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


def make_config(**kw) -> TrainConfig:
    base = dict(max_steps=10, lr=1e-1, micro_batch_size=4, log_every=1, eval_every=5, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def run(cfg: TrainConfig, *, dropout: float = 0.0, callbacks=(), n_train: int = 40, eval_data=True):
    model = TinyNet(dropout=dropout)
    trainer = Trainer(model, loss_fn, Points(n_train), Points(10, seed=2) if eval_data else None, cfg,
                      callbacks=callbacks)  # fmt: skip
    return trainer.fit(), model


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class StopAt(TrainerCallback):
    """Simulates a crash right after step k (after any checkpoint of that step)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_step_end(self, trainer, step, loss):
        if step == self.k:
            raise KeyboardInterrupt(f"simulated kill at step {step}")


# --------------------------------------------------------------------------------------------------


class GradSpy(TrainerCallback):
    """Records the gradients the optimizer steps on (after accumulation and clipping)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, trainer):
        def pre_step(opt, args, kwargs):
            self.grads.append({n: p.grad.detach().clone() for n, p in zip(trainer.trainable_names, trainer.params)})

        trainer.optimizer.register_step_pre_hook(pre_step)


def test_accumulation_equals_bigger_micro_batch():
    spies = [GradSpy() for _ in range(3)]
    a, _ = run(make_config(micro_batch_size=8, grad_accum_steps=1), callbacks=[spies[0]])
    b, _ = run(make_config(micro_batch_size=4, grad_accum_steps=2), callbacks=[spies[1]])
    c, _ = run(make_config(micro_batch_size=2, grad_accum_steps=4), callbacks=[spies[2]])
    assert len(a.losses) == 10
    f64 = dict(dtype=torch.float64)  # float32 would round the 1e-12 comparison away
    torch.testing.assert_close(torch.tensor(b.losses, **f64), torch.tensor(a.losses, **f64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(c.losses, **f64), torch.tensor(a.losses, **f64), rtol=1e-12, atol=1e-12)
    evals = [r["eval_loss"] for r in a.history if r["eval_loss"] is not None]
    assert evals[-1] < evals[0]  # it learns
    # AdamW and clipping hide a gradient off by a constant factor: compare the gradients themselves,
    # unclipped, with autograd of the mean loss over step 1's global batch (the first 8 of epoch 0's
    # permutation, seed 0), computed here without the trainer.
    oracle = TinyNet()
    x = Points(40).x[torch.randperm(40, generator=torch.Generator().manual_seed(0))[:8]]
    oracle(x).backward()
    want = {n: p.grad for n, p in oracle.named_parameters() if p.requires_grad}
    for micro, accum in ((8, 1), (4, 2), (2, 4)):
        spy = GradSpy()
        run(make_config(max_steps=1, micro_batch_size=micro, grad_accum_steps=accum, max_grad_norm=None),
            callbacks=[spy], eval_data=False)  # fmt: skip
        assert set(spy.grads[0]) == set(want)
        for n, g in spy.grads[0].items():
            torch.testing.assert_close(g, want[n], rtol=1e-12, atol=1e-14, msg=f"{n} micro {micro} x accum {accum}")
    for s in spies[1:]:  # and every later step's (clipped) gradient agrees across the splits
        for ga, gb in zip(spies[0].grads, s.grads):
            for n in ga:
                torch.testing.assert_close(gb[n], ga[n], rtol=1e-10, atol=1e-13)


def test_frozen_params_untouched_and_not_in_optimizer():
    model = TinyNet()
    before = model.teacher.weight.detach().clone()
    tr = Trainer(model, loss_fn, Points(40), None, make_config(max_steps=3))
    opt_ids = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert id(model.teacher.weight) not in opt_ids and len(opt_ids) == 4
    tr.fit()
    torch.testing.assert_close(model.teacher.weight, before, rtol=0, atol=0)


def test_decay_matrices_only_exempts_biases():
    """With zero gradients AdamW changes a parameter only through decoupled weight decay:
    p <- p * (1 - lr * wd). decay_matrices_only must apply that to weights and not to biases."""

    def zero_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch) * 0.0

    lr, wd = 0.1, 0.5
    for only in (False, True):
        model = TinyNet()
        before = {n: p.detach().clone() for n, p in model.blocks.named_parameters()}
        cfg = make_config(max_steps=1, lr=lr, weight_decay=wd, decay_matrices_only=only, max_grad_norm=None)
        tr = Trainer(model, zero_loss, Points(40), None, cfg)
        assert sum(len(g["params"]) for g in tr.optimizer.param_groups) == 4
        tr.fit()
        for name, p in model.blocks.named_parameters():
            decayed = not (only and name.endswith("bias"))
            factor = 1 - lr * wd if decayed else 1.0
            torch.testing.assert_close(p.detach(), before[name] * factor, rtol=1e-12, atol=1e-12, msg=name)


def test_params_subset_freezes_the_rest():
    model = TinyNet()
    tr = Trainer(model, loss_fn, Points(40), None, make_config(max_steps=2), params=model.blocks[0].parameters())
    assert tr.trainable_names == ["blocks.0.weight", "blocks.0.bias"]
    assert not model.blocks[1].weight.requires_grad


# plateau: lr 0.5 unclipped, an eval every step; the eval of step 5 does not improve, so from step 6
# on the lr is halved: the checkpoint of step 6 must carry the schedule's state.
PLATEAU = dict(scheduler="plateau", plateau_patience=0, eval_every=1, lr=0.5, max_grad_norm=None)


@pytest.mark.parametrize(("dropout", "sched"), [(0.0, {}), (0.2, {}), (0.0, PLATEAU)],
                         ids=["nodrop", "dropout-rng", "plateau-state"])  # fmt: skip
def test_resume_after_kill_matches_uninterrupted(tmp_path: Path, dropout: float, sched: dict):
    # 40 samples / global batch 8 = 5 steps per epoch, so the run crosses epochs; the kill at step 7
    # falls mid-epoch, after the checkpoint of step 6.
    full, m_full = run(make_config(max_steps=12, checkpoint_every=3, checkpoint_dir=str(tmp_path / "a"),
                                   grad_accum_steps=2, **sched), dropout=dropout)  # fmt: skip
    if sched:
        assert {r["step"]: r["lr"] for r in full.history}[7] < sched["lr"], "the lr must have dropped by step 7"
    cfg = make_config(max_steps=12, checkpoint_every=3, checkpoint_dir=str(tmp_path / "b"), grad_accum_steps=2,
                      **sched)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run(cfg, dropout=dropout, callbacks=[StopAt(7)])
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b")] == ["ckpt-00000003.pt", "ckpt-00000006.pt"]
    torch.manual_seed(1234)  # a different global RNG before resuming must not matter
    resumed, m_res = run(make_config(max_steps=12, checkpoint_every=3, checkpoint_dir=str(tmp_path / "b"),
                                     grad_accum_steps=2, resume=True, **sched), dropout=dropout)  # fmt: skip
    assert resumed.resumed_from == 6 and resumed.steps_done == 12
    assert resumed.losses == full.losses  # bit-exact
    for name, p in trainable(m_full).items():
        torch.testing.assert_close(trainable(m_res)[name], p, rtol=0, atol=0)

    def rows(res):  # everything but the wall-clock fields
        return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in res.history]

    assert rows(resumed) == rows(full)  # steps, train/eval losses, lr, cumulative tokens
    assert resumed.best_eval_loss == full.best_eval_loss


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path):
    res, _ = run(make_config(max_steps=2, checkpoint_dir=str(tmp_path), resume=True))
    assert res.resumed_from is None and res.steps_done == 2


def test_resume_of_finished_run_is_a_noop(tmp_path: Path):
    cfg = make_config(max_steps=4, checkpoint_every=2, checkpoint_dir=str(tmp_path))
    first, _ = run(cfg)
    again, _ = run(make_config(max_steps=4, checkpoint_every=2, checkpoint_dir=str(tmp_path), resume=True))
    assert again.resumed_from == 4 and again.losses == first.losses


def test_corrupted_checkpoint_is_skipped_with_warning(tmp_path: Path):
    d = tmp_path / "ck"
    run(make_config(max_steps=6, checkpoint_every=2, checkpoint_dir=str(d), keep_last=3))
    files = ckpt.list_checkpoints(d)
    assert [p.name for p in files] == ["ckpt-00000002.pt", "ckpt-00000004.pt", "ckpt-00000006.pt"]
    data = files[-1].read_bytes()
    files[-1].write_bytes(data[: len(data) // 2])  # truncated
    (d / ".ckpt-00000008.pt.999.tmp").write_bytes(b"partial write")  # a crash mid-save
    with pytest.warns(RuntimeWarning, match=r"skipping corrupted or unreadable checkpoint .*ckpt-00000006\.pt"):
        res, _ = run(make_config(max_steps=6, checkpoint_every=2, checkpoint_dir=str(d), resume=True))
    assert res.resumed_from == 4 and res.steps_done == 6
    assert not list(d.glob(".*.tmp")), "the stale temp file is cleaned at the next save"


class _RunsCode:
    """Unpickling this object would call os.mkdir(path): a checkpoint must never run code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.path),))


def test_checkpoint_is_weights_only_and_trainable_only(tmp_path: Path):
    _, model = run(make_config(max_steps=2, checkpoint_every=2, checkpoint_dir=str(tmp_path)))
    state = ckpt.load_checkpoint(tmp_path / "ckpt-00000002.pt")  # weights_only=True inside
    assert set(state["model"]) == {"blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias"}
    for name, p in trainable(model).items():  # the state after step 2, not a stale copy
        assert torch.equal(state["model"][name], p), name
    marker = tmp_path / "code-ran"
    evil = tmp_path / "ckpt-00000004.pt"
    torch.save({"format_version": ckpt.FORMAT_VERSION, "x": _RunsCode(marker)}, evil)
    with pytest.raises(Exception):  # noqa: B017 -- torch's unpickler error type varies by version
        ckpt.load_checkpoint(evil)
    with pytest.warns(RuntimeWarning, match=r"skipping corrupted or unreadable checkpoint .*ckpt-00000004\.pt"):
        found = ckpt.find_latest_valid(tmp_path)
    assert found is not None and found[0].name == "ckpt-00000002.pt"
    assert not marker.exists(), "loading a checkpoint ran pickled code"
    evil.unlink()
    assert state["meta"]["step"] == 2 and state["meta"]["config"]["max_steps"] == 2
    assert (tmp_path / "ckpt-00000002.json").exists()
    run(make_config(max_steps=2, checkpoint_every=2, checkpoint_dir=str(tmp_path / "f"), full_state_dict=True))
    assert "teacher.weight" in ckpt.load_checkpoint(tmp_path / "f" / "ckpt-00000002.pt")["model"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write_bytes(target, boom)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_loss_raises_with_step(bad: float):
    class BadAt3(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.w * (bad if self.calls == 3 else 0.0)

    model = BadAt3()
    tr = Trainer(model, loss_fn, Points(40), None, make_config(max_steps=5))
    with pytest.raises(FloatingPointError, match=r"training loss is -?(nan|inf) at step 3 "):
        tr.fit()
    assert model.w.item() == 1.0  # the bad loss never reached the weights


def test_early_stopping_and_best_eval():
    # lr 0 is not allowed, so use a tiny lr: the eval loss barely moves, patience 1 stops at the 2nd eval
    # whenever it does not improve; with a huge lr it diverges and stops early.
    res, _ = run(make_config(max_steps=100, lr=5.0, max_grad_norm=None, eval_every=2, early_stopping_patience=2))
    assert res.stopped_early and res.steps_done < 100
    evals = [r["eval_loss"] for r in res.history if r["eval_loss"] is not None]
    assert res.best_eval_loss == min(evals)


def test_history_rows():
    res, _ = run(make_config(max_steps=10, log_every=4, eval_every=5))
    assert [r["step"] for r in res.history] == [4, 5, 8, 10]
    assert [r["eval_loss"] is not None for r in res.history] == [False, True, False, True]
    assert res.history[-1]["tokens"] == 10 * 4 * D  # B*T of the 2-D batch tensor, per step
    assert all(set(r) >= {"step", "train_loss", "eval_loss", "lr", "tokens", "time"} for r in res.history)
    windows = [res.losses[0:4], res.losses[4:5], res.losses[5:8], res.losses[8:10]]  # since the previous row
    for r, w in zip(res.history, windows):
        assert r["train_loss"] == pytest.approx(sum(w) / len(w), rel=1e-12), r["step"]
    assert [r["lr"] for r in res.history] == [0.1] * 4


def test_lr_schedules():
    cos = LRSchedule(make_config(max_steps=10, lr=1.0, scheduler="cosine", warmup_steps=2, min_lr_ratio=0.1))
    assert cos.lr(0) == pytest.approx(0.5) and cos.lr(1) == pytest.approx(1.0)
    assert cos.lr(2) == pytest.approx(1.0) and cos.lr(10) == pytest.approx(0.1)
    assert cos.lr(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    pl = LRSchedule(make_config(lr=1.0, scheduler="plateau", plateau_patience=1, plateau_factor=0.5))
    for v in (1.0, 0.5, 0.6, 0.6):
        pl.observe(v)
    assert pl.lr(5) == pytest.approx(0.5)
    pl2 = LRSchedule(make_config(lr=1.0, scheduler="plateau"))
    pl2.load_state_dict(pl.state_dict())
    assert pl2.lr(5) == pl.lr(5)


def test_lr_schedule_is_what_the_optimizer_steps_with():
    """The schedule must reach every param group at every step (a history row alone would not show it)."""
    seen: list[list[float]] = []

    class LRSpy(TrainerCallback):
        def on_step_end(self, trainer, step, loss):
            seen.append([g["lr"] for g in trainer.optimizer.param_groups])

    cfg = make_config(max_steps=10, lr=0.2, scheduler="cosine", warmup_steps=3, min_lr_ratio=0.1,
                      decay_matrices_only=True, weight_decay=0.1)  # fmt: skip
    res, _ = run(cfg, callbacks=[LRSpy()], eval_data=False)
    # written out: linear warmup (s+1)/3 for steps 0..2, then cosine from 1 to 0.1 over the 7 remaining
    want = [0.2 * (s + 1) / 3 for s in range(3)]
    want += [0.2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 7))) for s in range(3, 10)]
    assert len(seen) == 10 and all(len(groups) == 2 for groups in seen)
    for s, groups in enumerate(seen):
        assert groups == [pytest.approx(want[s], rel=1e-12)] * 2, s
    assert [r["lr"] for r in res.history] == pytest.approx(want, rel=1e-12)


def test_sampler_split_is_independent_of_world_and_accum():
    def step_samples(world, accum, micro, step):
        out = []
        for r in range(world):
            s = GlobalBatchSampler(50, micro=micro, accum=accum, world=world, rank=r, seed=3, epoch=1)
            mbs = list(s)
            out += [i for mb in mbs[step * accum : (step + 1) * accum] for i in mb]
        return sorted(out)

    for step in range(3):
        ref = step_samples(1, 1, 8, step)
        assert step_samples(2, 1, 4, step) == ref and step_samples(2, 2, 2, step) == ref
        assert step_samples(1, 4, 2, step) == ref
    resumed = GlobalBatchSampler(50, micro=4, accum=2, world=1, rank=0, seed=3, epoch=1, start_step=2)
    full = GlobalBatchSampler(50, micro=4, accum=2, world=1, rank=0, seed=3, epoch=1)
    assert list(resumed) == list(full)[4:] and len(resumed) == 2 * (6 - 2)


def test_config_validation():
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainConfig(max_steps=1, checkpoint_every=5)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        TrainConfig(max_steps=1, scheduler="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"max_steps": 1, "lr_rate": 1.0})
    cfg = make_config()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Trainer(TinyNet(), loss_fn, Points(5), None, make_config(micro_batch_size=8))
    with pytest.raises(RuntimeError, match="needs a process group"):
        Trainer(TinyNet(), loss_fn, Points(40), None, make_config(strategy="ddp"))


def test_bad_loss_return_type():
    tr = Trainer(TinyNet(), lambda m, b: m(b).reshape(1), Points(40), None, make_config(max_steps=1))
    with pytest.raises(TypeError, match="scalar tensor"):
        tr.fit()


def test_progress_bar_smoke():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res, _ = run(make_config(max_steps=2, progress=True))
    assert res.steps_done == 2


def test_fsdp_units_are_the_outermost_modulelist_blocks():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer(), nn.ReLU()])
            self.head = nn.Linear(2, 2)

    m = M()
    assert _fsdp_blocks(m) == [m.layers[0], m.layers[1]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_train_checkpoint_resume(tmp_path: Path):
    """The same engine on a GPU: batches moved to the device, CUDA RNG in the checkpoint, bf16 autocast."""
    full, m_full = run(make_config(max_steps=6, device="cuda", checkpoint_every=2, checkpoint_dir=str(tmp_path / "a")),
                       dropout=0.2)  # fmt: skip
    assert next(m_full.parameters()).is_cuda
    with pytest.raises(KeyboardInterrupt):
        run(make_config(max_steps=6, device="cuda", checkpoint_every=2, checkpoint_dir=str(tmp_path / "b")),
            dropout=0.2, callbacks=[StopAt(3)])  # fmt: skip
    res, m_res = run(make_config(max_steps=6, device="cuda", checkpoint_every=2, checkpoint_dir=str(tmp_path / "b"),
                                 resume=True), dropout=0.2)  # fmt: skip
    assert res.resumed_from == 2 and res.losses == full.losses
    bf, _ = run(make_config(max_steps=3, device="cuda", autocast="bf16"))
    assert all(math.isfinite(x) for x in bf.losses)


def test_resume_with_changed_config_warns(tmp_path: Path):
    run(make_config(max_steps=2, checkpoint_every=2, checkpoint_dir=str(tmp_path)))
    with pytest.warns(RuntimeWarning, match=r"different config: \{'lr': \(0\.1, 0\.2\)\}"):
        run(make_config(max_steps=4, lr=0.2, checkpoint_every=2, checkpoint_dir=str(tmp_path), resume=True))


def test_dataloader_workers_give_the_same_trajectory(tmp_path: Path):
    a, _ = run(make_config(max_steps=4))
    b, _ = run(make_config(max_steps=4, num_workers=2))
    assert a.losses == b.losses


def test_empty_eval_data_is_refused():
    with pytest.raises(ValueError, match="eval_data is empty"):
        Trainer(TinyNet(), loss_fn, Points(40), Points(0), make_config())


def test_loss_module_trains_cached_tensors():
    """The cached-capture pattern: no model forward per step, the loss is the wrapped module's forward."""
    blocks = TinyNet().blocks
    teacher = TinyNet().teacher

    def cached_loss(mod, x):  # x: (B, D) cached inputs; targets from the frozen teacher
        h = x
        for b in mod:
            h = h + torch.tanh(b(h))
        return ((h - teacher(x).detach()) ** 2).mean()

    lm = LossModule(blocks, cached_loss)
    res = Trainer(lm, call_model, Points(40), Points(10, seed=2), make_config(max_steps=10)).fit()
    evals = [r["eval_loss"] for r in res.history if r["eval_loss"] is not None]
    assert evals[-1] < evals[0]
    assert Trainer(lm, call_model, Points(40), None, make_config()).trainable_names[0] == "module.0.weight"


def test_online_distillation_recipe_of_a_converted_model():
    """docs/distributed.md's online recipe: TeacherCapture inside loss_fn, the forward through the
    (possibly wrapped) model with grad enabled; only the feature maps train."""
    transformers = pytest.importorskip("transformers")
    from hedgehog_attention.convert import feature_map_parameters, linearize
    from hedgehog_attention.convert.distill import TeacherCapture
    from hedgehog_attention.train import unwrap_model

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaky softmax attention, so Eq. 3 has something to learn
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    linearize(model)
    maps = {id(p) for p in feature_map_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in maps)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    class Tokens(Dataset):
        def __init__(self, n: int, seed: int) -> None:
            self.x = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.x[i]}

    def loss_fn(m, batch):
        with TeacherCapture(unwrap_model(m), compute_loss=True) as cap:
            m(**batch, use_cache=False)
        return sum(cap.losses.values())

    res = Trainer(model, loss_fn, Tokens(16, 0), None, make_config(max_steps=3, micro_batch_size=4)).fit()
    assert all(math.isfinite(x) for x in res.losses) and res.history[-1]["tokens"] == 3 * 4 * 16
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (id(p) in maps), n


def test_restore_best_and_its_resume(tmp_path: Path):
    # lr 3 with no clipping: the eval loss improves, then gets worse; the model must end at the best eval.
    kw = dict(max_steps=12, lr=3.0, max_grad_norm=None, eval_every=2, restore_best=True, checkpoint_every=3)
    full, m_full = run(make_config(checkpoint_dir=str(tmp_path / "a"), **kw))
    evals = {r["step"]: r["eval_loss"] for r in full.history if r["eval_loss"] is not None}
    assert full.best_step == min(evals, key=evals.get) and full.best_step < 12, evals
    tr = Trainer(m_full, loss_fn, Points(40), Points(10, seed=2), make_config())
    assert tr.evaluate() == pytest.approx(full.best_eval_loss, rel=1e-12)
    with pytest.raises(KeyboardInterrupt):
        run(make_config(checkpoint_dir=str(tmp_path / "b"), **kw), callbacks=[StopAt(full.best_step + 2)])
    res, m_res = run(make_config(checkpoint_dir=str(tmp_path / "b"), resume=True, **kw))
    assert res.resumed_from is not None and res.best_step == full.best_step
    for name, p in trainable(m_full).items():
        torch.testing.assert_close(trainable(m_res)[name], p, rtol=0, atol=0)
    with pytest.raises(ValueError, match="restore_best needs eval_data"):
        Trainer(TinyNet(), loss_fn, Points(40), None, make_config(restore_best=True))


def test_min_delta_and_an_early_stopped_run_stays_stopped_on_resume(tmp_path: Path):
    kw = dict(max_steps=60, lr=5.0, max_grad_norm=None, eval_every=2, early_stopping_patience=2, checkpoint_every=2)
    res, _ = run(make_config(checkpoint_dir=str(tmp_path / "a"), **kw))
    assert res.stopped_early and res.steps_done < 60
    again, _ = run(make_config(checkpoint_dir=str(tmp_path / "a"), resume=True, **kw))
    assert again.resumed_from == res.steps_done and again.steps_done == res.steps_done and again.stopped_early
    assert again.losses == res.losses
    # an improvement smaller than min_delta is no improvement: a huge delta stops after `patience` evals
    strict, _ = run(make_config(max_steps=60, eval_every=2, early_stopping_patience=2, early_stopping_min_delta=1e9))
    assert strict.stopped_early and strict.steps_done == 3 * 2  # best at the 1st eval, then 2 without improvement
    with pytest.raises(ValueError, match="early_stopping_min_delta"):
        make_config(early_stopping_min_delta=-1.0)


def test_train_mode_false_keeps_dropout_off():
    modes = []

    class Spy(TrainerCallback):
        def on_step_end(self, trainer, step, loss):
            modes.append(trainer.model.training)

    with_dropout, _ = run(make_config(max_steps=3), dropout=0.5, callbacks=[Spy()])
    eval_mode, _ = run(make_config(max_steps=3, train_mode=False), dropout=0.5, callbacks=[Spy()])
    assert modes == [True] * 3 + [False] * 3
    ref, _ = run(make_config(max_steps=3))  # dropout off in eval mode: the same as no dropout at all
    assert eval_mode.losses == ref.losses and with_dropout.losses != ref.losses


def test_history_train_loss_window_survives_resume(tmp_path: Path):
    # log rows every 4 steps, checkpoints every 3: the resumed run restarts between two rows; the row
    # of step 4 must still be the mean of steps 1..4 (as in the uninterrupted run), not of step 4 alone.
    kw = dict(max_steps=10, log_every=4, eval_every=5, checkpoint_every=3)
    full, _ = run(make_config(checkpoint_dir=str(tmp_path / "a"), **kw))
    with pytest.raises(KeyboardInterrupt):
        run(make_config(checkpoint_dir=str(tmp_path / "b"), **kw), callbacks=[StopAt(4)])
    res, _ = run(make_config(checkpoint_dir=str(tmp_path / "b"), resume=True, **kw))
    assert res.resumed_from == 3 and res.losses == full.losses
    assert [(r["step"], r["train_loss"]) for r in res.history] == [(r["step"], r["train_loss"]) for r in full.history]


class _SqrtAtZero(nn.Module):
    """A finite loss whose gradient is inf: d sqrt(|w|)/dw at w = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.v = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.w.abs()) + (self.v - 2) ** 2 + 0 * x.sum()


@pytest.mark.parametrize("max_grad_norm", [1.0, None], ids=["clip", "noclip"])
def test_nonfinite_gradient_raises_with_step_before_the_update(max_grad_norm):
    model = _SqrtAtZero()
    tr = Trainer(model, loss_fn, Points(40), None, make_config(max_steps=3, max_grad_norm=max_grad_norm))
    with pytest.raises(FloatingPointError, match=r"gradient norm is (nan|inf) at step 1 "):
        tr.fit()
    assert model.w.item() == 0.0 and model.v.item() == 1.0  # no optimizer step on the bad gradient


def test_should_stop_in_on_checkpoint_stops_after_that_step(tmp_path: Path):
    class SaveAndStop(TrainerCallback):
        def on_checkpoint(self, trainer, step, path):
            if step == 4:
                trainer.should_stop = True

    res, _ = run(make_config(max_steps=10, checkpoint_every=2, checkpoint_dir=str(tmp_path)), callbacks=[SaveAndStop()])
    assert res.steps_done == 4
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]


def test_raising_max_steps_after_an_off_grid_final_eval_warns(tmp_path: Path):
    # the first run ends at step 10, off the eval_every=4 grid, with an extra eval that an uninterrupted
    # 20-step run never does (it feeds best/plateau/early stopping): continuing it cannot match.
    kw = dict(eval_every=4, checkpoint_every=4, checkpoint_dir=str(tmp_path))
    run(make_config(max_steps=10, **kw))
    with pytest.warns(RuntimeWarning, match=r"final step 10, .*eval_every=4"):
        run(make_config(max_steps=20, resume=True, **kw))
    run(make_config(max_steps=8, **(kw | {"checkpoint_dir": str(tmp_path / "on_grid")})))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the grid: a clean continuation, no warning
        run(make_config(max_steps=20, resume=True, **(kw | {"checkpoint_dir": str(tmp_path / "on_grid")})))


def test_resume_applies_the_configs_weight_decay_and_betas(tmp_path: Path):
    run(make_config(max_steps=2, checkpoint_every=2, checkpoint_dir=str(tmp_path)))
    cfg = make_config(max_steps=3, checkpoint_every=2, checkpoint_dir=str(tmp_path), resume=True, weight_decay=0.5,
                      betas=(0.8, 0.99), decay_matrices_only=False)  # fmt: skip
    tr = Trainer(TinyNet(), loss_fn, Points(40), None, cfg)
    with pytest.warns(RuntimeWarning, match="different config"):
        tr.fit()
    assert [(g["weight_decay"], tuple(g["betas"])) for g in tr.optimizer.param_groups] == [(0.5, (0.8, 0.99))]


def test_more_config_validation():
    for kw, msg in [(dict(eval_batch_size=0), "eval_batch_size"), (dict(eval_batch_size=-2), "eval_batch_size"),
                    (dict(min_lr_ratio=-0.5), "min_lr_ratio"), (dict(min_lr_ratio=1.5), "min_lr_ratio"),
                    (dict(plateau_patience=-1), "plateau_patience")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            make_config(**kw)


def test_duplicate_params_are_trained_once():
    """A parameter listed twice (e.g. tied embeddings given as embed + lm_head params) must not be stepped twice."""
    ref_model, dup_model = TinyNet(), TinyNet()
    Trainer(ref_model, loss_fn, Points(40), None, make_config(max_steps=2), params=ref_model.blocks.parameters()).fit()
    ps = list(dup_model.blocks.parameters())
    tr = Trainer(dup_model, loss_fn, Points(40), None, make_config(max_steps=2), params=ps + ps[:1])
    assert tr.trainable_names == ["blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias"]
    tr.fit()
    for name, p in trainable(ref_model).items():
        torch.testing.assert_close(trainable(dup_model)[name], p, rtol=0, atol=0)


def test_fresh_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path):
    """Pruning by step would delete a fresh run's ckpt-2 in favour of an older run's ckpt-10, and a
    later resume would continue the old run: a fresh run into such a folder is refused, nothing deleted."""
    ck = str(tmp_path / "ck")
    run(make_config(checkpoint_every=5, checkpoint_dir=ck))
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    with pytest.raises(FileExistsError, match="resume=True"):
        run(make_config(max_steps=2, checkpoint_every=1, checkpoint_dir=ck))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
    res, _ = run(make_config(max_steps=12, checkpoint_every=1, checkpoint_dir=ck, resume=True))  # continuing is fine
    assert res.resumed_from == 10


def test_nonfinite_eval_loss_raises_with_step():
    """A NaN held-out loss would count as "no improvement" and pass unnoticed: it stops the run."""

    class NanOnEval(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            loss = ((x.sum(-1) * self.w) ** 2).mean()
            return loss if self.training else loss * float("nan")

    trainer = Trainer(NanOnEval(), lambda m, b: m(b), Points(40), Points(10, seed=2), make_config(max_steps=6))
    with pytest.raises(FloatingPointError, match="eval loss is nan at step 5"):
        trainer.fit()


class _AtEvalOptimum(nn.Module):
    """Regresses a vector onto the samples; starts at the eval data's mean, the train data's is 1 away:
    every step makes the eval loss worse."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(Points(10, seed=2).x.mean(0))
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.drop(x) - self.w) ** 2).mean()


class _Shifted(Points):
    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.x += 1.0


def test_restore_best_keeps_the_initial_state_when_training_only_hurts(tmp_path: Path):
    """best started at inf, so the first eval (step eval_every) was always "best": a run that only made
    the eval loss worse restored that state, worse than the initial one. The state before the first step
    is evaluated too (history row of step 0), and is the baseline of early stopping."""
    kw = dict(max_steps=8, lr=0.05, eval_every=2, restore_best=True, checkpoint_every=3)
    model = _AtEvalOptimum()
    start = model.w.detach().clone()
    initial = Trainer(_AtEvalOptimum(), loss_fn, _Shifted(40), Points(10, seed=2), make_config()).evaluate()
    res = Trainer(model, loss_fn, _Shifted(40), Points(10, seed=2), make_config(checkpoint_dir=str(tmp_path / "a"),
                                                                               **kw)).fit()  # fmt: skip
    evals = [(r["step"], r["eval_loss"]) for r in res.history if r["eval_loss"] is not None]
    assert [s for s, _ in evals] == [0, 2, 4, 6, 8] and evals[0][1] == pytest.approx(initial, rel=1e-12)
    assert all(b[1] > a[1] for a, b in zip(evals, evals[1:])), evals  # only worse
    assert res.history[0] == res.history[0] | {"step": 0, "train_loss": None, "lr": None, "tokens": 0}
    assert res.best_step == 0 and res.best_eval_loss == evals[0][1]
    torch.testing.assert_close(model.w.detach(), start, rtol=0, atol=0)
    # the extra eval leaves the RNG alone: the steps (dropout masks included) are those of a run without it
    plain_cfg = make_config(max_steps=8, lr=0.05, eval_every=2)
    plain = Trainer(_AtEvalOptimum(), loss_fn, _Shifted(40), Points(10, seed=2), plain_cfg).fit()
    assert res.losses == plain.losses
    # a resume (from the checkpoint of step 6, the baseline inside it) ends at the initial state too
    with pytest.raises(KeyboardInterrupt):
        Trainer(_AtEvalOptimum(), loss_fn, _Shifted(40), Points(10, seed=2),
                make_config(checkpoint_dir=str(tmp_path / "b"), **kw), callbacks=[StopAt(7)]).fit()  # fmt: skip
    resumed_model = _AtEvalOptimum()
    resumed = Trainer(resumed_model, loss_fn, _Shifted(40), Points(10, seed=2),
                      make_config(checkpoint_dir=str(tmp_path / "b"), resume=True, **kw)).fit()  # fmt: skip

    def rows(r):  # everything but the wall-clock fields
        return [{k: v for k, v in row.items() if k not in ("time", "tokens_per_s")} for row in r.history]

    assert resumed.resumed_from == 6 and resumed.best_step == 0 and rows(resumed) == rows(res)
    torch.testing.assert_close(resumed_model.w.detach(), start, rtol=0, atol=0)
    # and early stopping counts from it: patience 2 stops at the 2nd eval after the baseline
    stopped = Trainer(_AtEvalOptimum(), loss_fn, _Shifted(40), Points(10, seed=2),
                      make_config(max_steps=8, lr=0.05, eval_every=2, restore_best=True,
                                  early_stopping_patience=2)).fit()  # fmt: skip
    assert stopped.stopped_early and stopped.steps_done == 4 and stopped.best_step == 0


class _Scalars(nn.Module):
    """Every parameter 0-dim and no buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(-0.3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.a * x[:, 0] + self.b - x[:, 1]) ** 2).mean()


def test_a_model_of_only_scalar_parameters_resumes_and_restores_best(tmp_path: Path):
    """Loading went through torch's full_state_dict path, which finds the device from the model's
    non-scalar tensors and, with none, asks for a process group: resume and restore_best raised
    "Default process group has not been initialized" in a single process."""
    kw = dict(max_steps=6, lr=0.3, eval_every=2, restore_best=True, checkpoint_every=2)
    full_model = _Scalars()
    full = Trainer(full_model, loss_fn, Points(40), Points(10, seed=2),
                   make_config(checkpoint_dir=str(tmp_path / "a"), **kw)).fit()  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        killed_cfg = make_config(checkpoint_dir=str(tmp_path / "b"), **kw)
        Trainer(_Scalars(), loss_fn, Points(40), Points(10, seed=2), killed_cfg, callbacks=[StopAt(3)]).fit()
    model = _Scalars()
    res = Trainer(model, loss_fn, Points(40), Points(10, seed=2),
                  make_config(checkpoint_dir=str(tmp_path / "b"), resume=True, **kw)).fit()  # fmt: skip
    assert res.resumed_from == 2 and res.losses == full.losses and res.best_step == full.best_step
    for name, p in trainable(full_model).items():
        torch.testing.assert_close(trainable(model)[name], p, rtol=0, atol=0)
