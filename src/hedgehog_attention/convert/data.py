"""Text -> model batches for conversion: distillation blocks and held-out passages.

Documents are split into train/validation/test by name (:func:`hedgehog_attention.tasks.
split_documents`), so no held-out text is ever distilled on. Blocks never cross documents.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..tasks.corpora import Document
from ..tasks.lm_data import pack_tokens

__all__ = ["make_batches", "passages", "text_blocks"]


def _specials(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Ids to put before/after a block: [CLS] ... [SEP] for BERT, BOS ... for decoders that use one."""
    cls_id, sep_id = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls_id is not None and sep_id is not None:
        return [cls_id], [sep_id]
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []), []


def text_blocks(
    docs: Sequence[Document], tokenizer: Any, seq_len: int, max_blocks: int, *, seed: int = 0
) -> torch.Tensor:
    """Up to ``max_blocks`` full blocks ``LongTensor[N, seq_len]`` cut from the documents, each within
    one document, with the tokenizer's special tokens around the text; a random sample of all
    blocks (deterministic in ``seed``) so every document can contribute."""
    head, tail = _specials(tokenizer)
    body = seq_len - len(head) - len(tail)
    if body < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for text between the special tokens")
    blocks = []
    for doc in docs:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        for row in pack_tokens(ids, body):
            blocks.append(head + row.tolist() + tail)
    if not blocks:
        raise ValueError(f"the {len(docs)} document(s) are too short for one block of {seq_len} tokens")
    random.Random(seed).shuffle(blocks)
    return torch.tensor(blocks[:max_blocks], dtype=torch.long)


def passages(
    docs: Sequence[Document], max_passages: int, *, min_words: int = 8, max_words: int = 120, seed: int = 0
) -> list[str]:
    """Paragraph-sized passages (blank-line separated, ``min_words``..``max_words`` words, longer ones
    cut) for end-to-end checks such as sentence-embedding agreement; variable lengths on purpose,
    so batches are padded."""
    out = []
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc.text):
            words = para.split()
            if len(words) >= min_words:
                out.append(" ".join(words[:max_words]))
    random.Random(seed).shuffle(out)
    return out[:max_passages]


def make_batches(blocks: torch.Tensor, batch_size: int, *, labels: bool = False) -> list[dict[str, torch.Tensor]]:
    """Full (unpadded) blocks -> ``[{"input_ids", "attention_mask"(, "labels")}]``."""
    out = []
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size]
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if labels:
            b["labels"] = ids.clone()
        out.append(b)
    return out


def tokenize_passages(
    texts: Sequence[str], tokenizer: Any, batch_size: int, max_length: int
) -> list[dict[str, torch.Tensor]]:
    """Padded batches of passages (right padding; ``attention_mask`` marks real tokens)."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]),
            padding=True,
            padding_side="right",  # whatever the tokenizer's default (decoder tokenizers often pad left)
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


# ------------------------------------------------------------------------------------- Trainer data
class BatchRows(torch.utils.data.Dataset):
    """The rows of a list of batches as a map-style dataset (one example per row), for
    :class:`hedgehog_attention.train.Trainer`, which regroups rows into its own (rank-sharded)
    micro-batches: ``rows[i] = {key: batch[key][j]}`` (``[T]`` token tensors, ``[]`` class labels).
    The rows are views of the given tensors (no copy)."""

    def __init__(self, batches: Sequence[dict[str, Any]]) -> None:
        self.rows: list[dict[str, Any]] = []
        for bi, b in enumerate(batches):
            sizes = {k: len(v) for k, v in b.items() if isinstance(v, torch.Tensor) and v.ndim >= 1}
            if not sizes or len(set(sizes.values())) != 1:
                raise ValueError(f"batch {bi}: expected tensors with one common first (batch) dimension, got {sizes}")
            n = next(iter(sizes.values()))
            self.rows.extend({k: v[j] for k, v in b.items() if k in sizes} for j in range(n))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


# padding value per key when rows of different lengths meet in one micro-batch
_PAD_VALUE = {"labels": -100}


def pad_collate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack rows into a batch; rows of different lengths (padded passages from different batches)
    are padded to the longest along their first dimension, ``attention_mask``/``mask`` with 0 (so
    padding stays padding), token ``labels`` with -100, everything else with 0. The side follows
    the data: left when the rows are left-padded (``attention_mask[0] == 0``), else right."""
    keys = rows[0].keys()
    lengths = {len(r[k]) for r in rows for k in keys if isinstance(r[k], torch.Tensor) and r[k].ndim >= 1}
    if len(lengths) <= 1:
        return {k: torch.stack([r[k] for r in rows]) for k in keys}
    mask_key = next((k for k in ("attention_mask", "mask") if k in keys), None)
    left = mask_key is not None and any(
        len(r[mask_key]) and not bool(r[mask_key][0]) and bool(r[mask_key].any()) for r in rows
    )
    n = max(lengths)
    out = {}
    for k in keys:
        vals = []
        for r in rows:
            v = r[k]
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and len(v) < n:
                pad = v.new_full((n - len(v), *v.shape[1:]), _PAD_VALUE.get(k, 0))
                v = torch.cat([pad, v] if left else [v, pad])
            vals.append(v)
        out[k] = torch.stack(vals)
    return out
