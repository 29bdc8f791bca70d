"""Associative recall data (App. B.3 statistics, correct answers) and a tiny model that learns it."""

import math

import pytest
import torch

from hedgehog_attention.experiments.recall import (
    RecallConfig,
    RecallModel,
    RecallTask,
    RecallTrain,
    RecallVariant,
    run_one,
)
from hedgehog_attention.tasks.associative_recall import (
    AssociativeRecallConfig,
    make_batch,
    recall_accuracy,
    recall_statistics,
)


def test_paper_setting_statistics():
    task = AssociativeRecallConfig(vocab_size=40, seq_len=128)
    assert (task.num_keys, task.num_values, task.num_pairs) == (20, 20, 64)
    assert task.expected_recurrence == pytest.approx(3.32, abs=0.01)  # "three times on average" (App. B.3)
    x, y = make_batch(task, 2000, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (2000, 128) and x.dtype == torch.long
    stats = recall_statistics(x, y, task)
    assert stats["mean_recurrence"] == pytest.approx(task.expected_recurrence, rel=0.01)
    expected_distinct = 20 * (1 - (19 / 20) ** 64)
    assert stats["distinct_keys_per_sequence"] == pytest.approx(expected_distinct, rel=0.01)
    assert stats["queries_per_sequence"] == pytest.approx(64 - expected_distinct, rel=0.01)


def test_layout_and_answers_are_correct():
    task = AssociativeRecallConfig(vocab_size=12, seq_len=40)
    x, y = make_batch(task, 64, torch.Generator().manual_seed(3))
    keys, values = x[:, 0::2], x[:, 1::2]
    assert (keys < 6).all() and (values >= 6).all() and (values < 12).all()
    assert (y[:, 1::2] == -100).all()  # value positions are never queries
    for b in range(64):
        seen: dict[int, int] = {}
        for i in range(task.num_pairs):
            k, v = int(keys[b, i]), int(values[b, i])
            if k in seen:
                assert seen[k] == v  # one mapping per sequence
                assert int(y[b, 2 * i]) == v  # the label is the value paired earlier
            else:
                assert int(y[b, 2 * i]) == -100  # first occurrence: unpredictable, no label
                seen[k] = v


def test_reproducible_and_accuracy_counts():
    task = AssociativeRecallConfig(vocab_size=8, seq_len=16)
    a = make_batch(task, 4, torch.Generator().manual_seed(5))
    b = make_batch(task, 4, torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    x, y = a
    perfect = torch.nn.functional.one_hot(y.clamp_min(0), 8).float()
    c, n = recall_accuracy(perfect, y)
    assert c == n == int((y != -100).sum()) and n > 0


def test_task_validation():
    with pytest.raises(ValueError, match="even"):
        AssociativeRecallConfig(vocab_size=41)
    with pytest.raises(ValueError, match="even"):
        AssociativeRecallConfig(seq_len=33)


def test_softmax_transformer_learns_recall():
    """A 2-layer softmax model forms an induction circuit within ~100 steps on a tiny task (4 keys,
    4 values, 8 pairs): far above chance (25%) and above copying a value seen in context (~55%)."""
    cfg = RecallConfig(
        task=RecallTask(vocab_size=8, seq_len=16),
        model=RecallModel(d_model=32, n_layers=2, n_heads=2),
        train=RecallTrain(
            steps=150,
            batch_size=32,
            lr=3e-3,
            weight_decay=0.0,
            warmup_steps=50,
            log_every=150,
            valid_sequences=32,
            test_sequences=512,
            entropy_sequences=8,
        ),  # fmt: skip
        variants=[RecallVariant("softmax", "softmax")],
        seeds=[0],
        device="cpu",
    )
    res = run_one(cfg, cfg.variants[0], 0, torch.device("cpu"))
    assert res["test_accuracy"] > 0.9, res["test_accuracy"]
    # A model that recalls has spiky attention: mean entropy well below uniform causal weights.
    assert res["uniform_entropy"] == pytest.approx(torch.log(torch.arange(1.0, 17)).mean().item())
    assert res["entropy"] < res["uniform_entropy"] - 0.5
    assert not math.isnan(res["entropy"])
