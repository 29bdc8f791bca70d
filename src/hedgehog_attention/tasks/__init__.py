"""Data for experiments: offline text corpora, classification data, LM token blocks.

Submodules:

* :mod:`.corpora` -- Austen, KJV, Moby Dick, Python docs, fine-food reviews, user text files, HF
  ``datasets``; deterministic document-level train/validation/test splits.
* :mod:`.lm_data` -- token packing (:func:`pack_tokens`, :class:`TokenBlockDataset`) and LM splits.
* :mod:`.tokenizers` -- the offline GPT-2 tokenizer.
* :mod:`.rdata_reader` -- a reader for R lazy-load databases (how the Debian R packages ship data).

Install the assets first: ``PYTHON=$(which python) bash scripts/setup_assets.sh --minimal``.
"""

from .corpora import (
    SPLITS,
    AssetNotFoundError,
    Document,
    assets_dir,
    assign_split,
    load_austen,
    load_fine_food,
    load_hf_dataset,
    load_kjv,
    load_moby_dick,
    load_public_domain_corpus,
    load_python_docs,
    load_text_files,
    split_documents,
)
from .lm_data import TokenBlockDataset, load_wikitext103, pack_tokens, public_domain_lm_splits, tokenize_documents
from .rdata_reader import LazyLoadDB, decompress_entry
from .tokenizers import GPT2_EOS_ID, gpt2_tokenizer

__all__ = [
    "GPT2_EOS_ID",
    "SPLITS",
    "AssetNotFoundError",
    "Document",
    "LazyLoadDB",
    "TokenBlockDataset",
    "assets_dir",
    "assign_split",
    "decompress_entry",
    "gpt2_tokenizer",
    "load_austen",
    "load_fine_food",
    "load_hf_dataset",
    "load_kjv",
    "load_moby_dick",
    "load_public_domain_corpus",
    "load_python_docs",
    "load_text_files",
    "load_wikitext103",
    "pack_tokens",
    "public_domain_lm_splits",
    "split_documents",
    "tokenize_documents",
]
