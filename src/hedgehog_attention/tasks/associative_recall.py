"""Associative recall (Ba et al., 2016; the paper's App. B.1, Table 4), multi-query form.

A sequence is ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...``. Keys come from the first half of
the vocabulary, values from the second half (split vocabularies, as in Zoology's MQAR), and each
sequence draws its own random key -> value mapping, so nothing can be memorized across sequences:
the value must be *recalled from context*. Keys are drawn uniformly with replacement, so a key
recurs and every repeated key is a query: at its position the model must predict the value it was
paired with earlier. First occurrences carry no label (``-100``): they are unpredictable.

With the paper's setting (vocabulary 40 -> 20 keys and 20 values, sequence length 128 -> 64
pairs) a key that occurs recurs ``64 / 20 / (1 - (19/20)^64) ~= 3.3`` times on average ("pairs
that only occur three times on average in-context", App. B.3), and a sequence holds ~45 queries.
Chance accuracy is ``1 / num_values`` (5%).

Example::

    task = AssociativeRecallConfig()                 # vocab 40, length 128
    x, y = make_batch(task, 64, torch.Generator().manual_seed(0))
    # x: [64, 128] ids; y: [64, 128] value at query positions (key positions seen before), else -100
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AssociativeRecallConfig", "make_batch", "recall_accuracy", "recall_statistics"]


@dataclass(frozen=True)
class AssociativeRecallConfig:
    """Args:
    vocab_size: total tokens; the first half are keys, the second half values (must be even).
    seq_len: tokens per sequence (even: ``seq_len / 2`` key-value pairs).
    """

    vocab_size: int = 40
    seq_len: int = 128

    def __post_init__(self) -> None:
        if self.vocab_size < 4 or self.vocab_size % 2:
            raise ValueError(f"vocab_size must be an even number >= 4 (keys | values), got {self.vocab_size}")
        if self.seq_len < 4 or self.seq_len % 2:
            raise ValueError(f"seq_len must be an even number >= 4 (key-value pairs), got {self.seq_len}")

    @property
    def num_keys(self) -> int:
        return self.vocab_size // 2

    @property
    def num_values(self) -> int:
        return self.vocab_size - self.num_keys

    @property
    def num_pairs(self) -> int:
        return self.seq_len // 2

    @property
    def chance_accuracy(self) -> float:
        return 1.0 / self.num_values

    @property
    def expected_recurrence(self) -> float:
        """Expected occurrences of a key that occurs at least once (~3.3 for the paper's setting)."""
        p_seen = 1.0 - (1.0 - 1.0 / self.num_keys) ** self.num_pairs
        return self.num_pairs / (self.num_keys * p_seen)


def make_batch(
    task: AssociativeRecallConfig,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``batch_size`` sequences.

    Returns:
        ``input_ids [B, seq_len]`` (long) and ``labels [B, seq_len]`` aligned with the inputs:
        ``labels[b, t]`` is the value that should follow the key at ``t`` when that key occurred
        earlier in the sequence (a query), else ``-100``. Drawn on the CPU with ``generator``
        (reproducible for a seed), then moved to ``device``.
    """
    nk, nv, npairs = task.num_keys, task.num_values, task.num_pairs
    # Per-sequence random mapping key -> value (with replacement: values may repeat across keys).
    mapping = torch.randint(0, nv, (batch_size, nk), generator=generator)  # (B, nk)
    keys = torch.randint(0, nk, (batch_size, npairs), generator=generator)  # (B, P)
    values = torch.gather(mapping, 1, keys)  # (B, P)
    input_ids = torch.stack([keys, values + nk], dim=-1).reshape(batch_size, task.seq_len)  # (B, T)
    # A key is a query when the same key appears at an earlier pair of the sequence.
    earlier = (keys[:, :, None] == keys[:, None, :]).tril(-1).any(-1)  # (B, P)
    labels = torch.full_like(input_ids, -100)
    key_labels = torch.where(earlier, values + nk, torch.full_like(values, -100))
    labels[:, 0::2] = key_labels
    return input_ids.to(device), labels.to(device)


def recall_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) argmax predictions at query positions (``labels != -100``)."""
    mask = labels != -100
    pred = logits.argmax(-1)
    return int((pred[mask] == labels[mask]).sum()), int(mask.sum())


def recall_statistics(input_ids: torch.Tensor, labels: torch.Tensor, task: AssociativeRecallConfig) -> dict:
    """Empirical statistics of a batch: mean recurrence of occurring keys, queries per sequence."""
    keys = input_ids[:, 0::2]
    counts = torch.stack([(keys == k).sum(1) for k in range(task.num_keys)], dim=1)  # (B, nk)
    seen = counts > 0
    return {
        "mean_recurrence": float(counts[seen].float().mean()),
        "queries_per_sequence": float((labels != -100).sum(1).float().mean()),
        "distinct_keys_per_sequence": float(seen.sum(1).float().mean()),
    }
