"""Token blocks for language-model training and attention distillation.

Documents are tokenized, joined with an end-of-text id between them, and cut into fixed-length
blocks (the GPT-2/nanoGPT recipe). Splitting happens at the document level *before* packing, so no
block mixes training and evaluation text.

Example::

    from hedgehog_attention.tasks.lm_data import public_domain_lm_splits
    splits = public_domain_lm_splits(block_size=1024)   # GPT-2 tokenizer, offline corpus
    batch = splits["train"][0]                           # {"input_ids": (1024,), "labels": (1024,)}
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from .corpora import SPLITS, Document, Split, load_hf_dataset, load_public_domain_corpus, split_documents

__all__ = [
    "TokenBlockDataset",
    "load_wikitext103",
    "pack_tokens",
    "public_domain_lm_splits",
    "tokenize_documents",
]


def pack_tokens(token_ids: Sequence[int] | torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut a token stream into consecutive, non-overlapping blocks.

    Args:
        token_ids: 1-D ids (list, tuple or tensor) of length ``L``.
        block_size: tokens per block, >= 1.

    Returns:
        ``LongTensor[N, block_size]`` with ``N = L // block_size``; the last ``L % block_size``
        tokens are dropped (``N`` may be 0: shape ``(0, block_size)``). Block ``i`` is
        ``token_ids[i * block_size : (i + 1) * block_size]``.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(ids.shape)}")
    n = ids.numel() // block_size
    return ids[: n * block_size].reshape(n, block_size).clone()  # (N, block_size)


def tokenize_documents(
    docs: Iterable[Document | str],
    tokenizer: Any,
    eos_id: int | None = None,
    batch_size: int = 256,
) -> list[int]:
    """Tokenize documents and join them into one stream, ``eos_id`` after each document.

    Args:
        docs: documents (or plain strings).
        tokenizer: a HF tokenizer (called on a list of strings, no special tokens added).
        eos_id: separator id; defaults to ``tokenizer.eos_token_id`` (GPT-2: 50256). Pass -1 to
            join without a separator.
    """
    if eos_id is None:
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise ValueError("tokenizer has no eos_token_id; pass eos_id explicitly (or -1 for none)")
    texts = [d.text if isinstance(d, Document) else str(d) for d in docs]
    out: list[int] = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], add_special_tokens=False)["input_ids"]
        for ids in enc:
            out.extend(ids)
            if eos_id >= 0:
                out.append(eos_id)
    return out


class TokenBlockDataset(Dataset):
    """Fixed-length token blocks as a ``torch.utils.data.Dataset``.

    Item ``i`` is ``{"input_ids": LongTensor[block_size], "labels": LongTensor[block_size]}``;
    ``labels`` equals ``input_ids`` (HF causal LMs shift inside the loss). Default collation
    stacks items into ``[B, block_size]``.

    Args:
        token_ids: a 1-D token stream (packed with :func:`pack_tokens`), or an already packed
            ``LongTensor[N, block_size]``.
        block_size: required for a 1-D stream; must match ``blocks.shape[1]`` when given with
            a 2-D tensor.
    """

    def __init__(self, token_ids: Sequence[int] | torch.Tensor, block_size: int | None = None):
        t = torch.as_tensor(token_ids, dtype=torch.long)
        if t.dim() == 2:
            if block_size is not None and block_size != t.shape[1]:
                raise ValueError(f"block_size={block_size} but the packed blocks have {t.shape[1]} tokens")
            self.blocks = t
        elif t.dim() == 1:
            if block_size is None:
                raise ValueError("block_size is required for a 1-D token stream")
            self.blocks = pack_tokens(t, block_size)
        else:
            raise ValueError(f"token_ids must be 1-D or 2-D, got shape {tuple(t.shape)}")
        self.block_size = int(self.blocks.shape[1])

    @classmethod
    def from_documents(
        cls, docs: Iterable[Document | str], tokenizer: Any, block_size: int, eos_id: int | None = None
    ) -> TokenBlockDataset:
        """Tokenize ``docs`` (see :func:`tokenize_documents`) and pack them."""
        return cls(tokenize_documents(docs, tokenizer, eos_id=eos_id), block_size)

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.blocks[i]  # (block_size,)
        return {"input_ids": x, "labels": x}

    def __repr__(self) -> str:
        return f"TokenBlockDataset(blocks={len(self)}, block_size={self.block_size})"


def public_domain_lm_splits(
    block_size: int = 1024,
    tokenizer: Any = None,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    include: Sequence[str] = ("austen", "kjv", "moby_dick"),
) -> dict[Split, TokenBlockDataset]:
    """The offline public-domain corpus (chapters, see
    :func:`~hedgehog_attention.tasks.corpora.load_public_domain_corpus`) split by document name
    into ``train``/``validation``/``test``, then tokenized and packed per split.

    Args:
        block_size: tokens per block.
        tokenizer: defaults to GPT-2's (:func:`~hedgehog_attention.tasks.tokenizers.gpt2_tokenizer`).
        validation_fraction, test_fraction: expected share of documents per split.
        include: corpus sources (see ``load_public_domain_corpus``).
    """
    if tokenizer is None:
        from .tokenizers import gpt2_tokenizer

        tokenizer = gpt2_tokenizer()
    parts = split_documents(load_public_domain_corpus("chapter", include), validation_fraction, test_fraction)
    return {s: TokenBlockDataset.from_documents(parts[s], tokenizer, block_size) for s in SPLITS}


def load_wikitext103(
    split: Split = "train",
    tokenizer: Any = None,
    block_size: int = 1024,
    config: str = "wikitext-103-raw-v1",
) -> TokenBlockDataset:
    """WikiText-103 through HF ``datasets`` (needs a network or a filled HF cache; raises a
    ``RuntimeError`` naming the offline alternatives otherwise). Rows are joined as in the
    original files (each row keeps its own newline) and packed without separators."""
    if tokenizer is None:
        from .tokenizers import gpt2_tokenizer

        tokenizer = gpt2_tokenizer()
    rows = load_hf_dataset("Salesforce/wikitext", split=split, text_field="text", config=config)
    # One stream per split: WikiText rows are lines of articles (each ending in "\n"), not
    # documents. Tokenize groups of rows rather than one 500 MB string to bound memory.
    group = 2048
    chunks = ["".join(d.text for d in rows[i : i + group]) for i in range(0, len(rows), group)]
    return TokenBlockDataset.from_documents(chunks, tokenizer, block_size, eos_id=-1)
