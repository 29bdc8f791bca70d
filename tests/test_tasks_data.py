"""Data plumbing: the R lazy-load reader, corpora, splits, token packing, offline tokenizer/models.

Tests marked ``assets`` read the real texts installed by ``scripts/setup_assets.sh --minimal`` and
are skipped when they are missing. The rest build their inputs here.
"""

from __future__ import annotations

import gzip
import importlib.util
import lzma
import struct
import sys
import zlib
from collections import Counter

import pytest
import torch

from hedgehog_attention.tasks import corpora, rdata_reader
from hedgehog_attention.tasks.corpora import Document, assign_split, split_documents
from hedgehog_attention.tasks.lm_data import TokenBlockDataset, pack_tokens, tokenize_documents
from hedgehog_attention.tasks.rdata_reader import LazyLoadDB, RDataReaderError, decompress_entry

HAS_RDATA = importlib.util.find_spec("rdata") is not None
needs_rdata = pytest.mark.skipif(not HAS_RDATA, reason="needs the PyPI package rdata")


def _have(*parts: str) -> bool:
    return corpora.assets_dir().joinpath(*parts).exists()


HAVE_TEXTS = HAS_RDATA and _have("debs", "r-cran-janeaustenr") and _have("debs", "r-cran-tokenizers")
HAVE_FINE_FOOD = HAS_RDATA and _have("debs", "r-cran-modeldata")
HAVE_KJV = _have("kjv", "kjv.txt")
HAVE_GPT2 = _have("gpt2-tokenizer", "vocab.json") and _have("gpt2-tokenizer", "merges.txt")
SETUP = "run scripts/setup_assets.sh --minimal"


# --------------------------------------------------------------------------------------------
# A minimal R serializer (XDR binary, format version 3), enough for character vectors, integer
# vectors and named lists -- the shapes a lazy-load index and a text data set have.

_HAS_ATTR = 1 << 9
_HAS_TAG = 1 << 10
_ASCII_GP = 64 << 12  # CHARSXP levels: ASCII_MASK in the gp field (bits 12-27)
_UTF8_GP = 8 << 12


def _i(x: int) -> bytes:
    return struct.pack(">i", x)


def _charsxp(s: str) -> bytes:
    b = s.encode("utf-8")
    gp = _ASCII_GP if s.isascii() else _UTF8_GP
    return _i(9 | gp) + _i(len(b)) + b


def _r(obj, names: list[str] | None = None) -> bytes:
    if isinstance(obj, dict):
        return _r(list(obj.values()), names=list(obj.keys()))
    attrs = b""
    if names is not None:
        # pairlist(names = <chr>): LISTSXP with a tag, the SYMSXP "names", the value, then NILVALUE.
        attrs = _i(2 | _HAS_TAG) + _i(1) + _charsxp("names") + _r(names) + _i(254)
    flag = _HAS_ATTR if names is not None else 0
    if isinstance(obj, list) and obj and all(isinstance(x, str) for x in obj):  # STRSXP
        return _i(16 | flag) + _i(len(obj)) + b"".join(_charsxp(s) for s in obj) + attrs
    if isinstance(obj, list):  # generic vector (VECSXP)
        return _i(19 | flag) + _i(len(obj)) + b"".join(_r(x) for x in obj) + attrs
    if isinstance(obj, tuple):  # integer vector (INTSXP)
        return _i(13) + _i(len(obj)) + b"".join(_i(x) for x in obj)
    if isinstance(obj, bool):  # logical scalar (LGLSXP)
        return _i(10) + _i(1) + _i(int(obj))
    raise TypeError(type(obj))


def _serialize(obj) -> bytes:
    # "X\n", format 3, written by R 4.2.1, readable by R >= 3.5.0, native encoding UTF-8.
    return b"X\n" + _i(3) + _i(0x040201) + _i(0x030500) + _i(5) + b"UTF-8" + _r(obj)


def _entry(raw: bytes, compressed: int) -> bytes:
    head = struct.pack(">I", len(raw))
    if compressed == 1:
        return head + zlib.compress(raw)
    return head + b"Z" + lzma.compress(raw, format=lzma.FORMAT_RAW, filters=rdata_reader._R_LZMA_FILTERS)


def _write_db(tmp_path, objects: dict, compressed: int):
    rdb, variables, offset = b"", {}, 0
    for name, obj in objects.items():
        e = _entry(_serialize(obj), compressed)
        variables[name] = (offset, len(e))
        rdb += e
        offset += len(e)
    index = {"variables": variables, "references": [], "compressed": compressed == 1 or (compressed,)}
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index)))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    return tmp_path / "Rdata"


# --------------------------------------------------------------------------------------------
# container format


@pytest.mark.parametrize("kind", ["zlib", "Z-lzma2", "2-bzip2", "1-zlib", "0-stored"])
def test_decompress_entry_formats(kind):
    import bz2

    raw = b"X\n" + bytes(range(256)) * 40
    head = struct.pack(">I", len(raw))
    blob, compressed = {
        "zlib": (head + zlib.compress(raw), 1),
        "Z-lzma2": (
            head + b"Z" + lzma.compress(raw, format=lzma.FORMAT_RAW, filters=rdata_reader._R_LZMA_FILTERS),
            3,
        ),
        "2-bzip2": (head + b"2" + bz2.compress(raw), 3),
        "1-zlib": (head + b"1" + zlib.compress(raw), 3),
        "0-stored": (head + b"0" + raw, 3),
    }[kind]
    assert decompress_entry(blob, compressed) == raw


def test_decompress_entry_errors():
    raw = b"hello world"
    with pytest.raises(RDataReaderError, match="length mismatch"):
        decompress_entry(struct.pack(">I", 99) + zlib.compress(raw), 1)
    with pytest.raises(RDataReaderError, match="type byte"):
        decompress_entry(struct.pack(">I", len(raw)) + b"Q" + raw, 3)
    with pytest.raises(RDataReaderError, match="too short"):
        decompress_entry(b"\x00\x01", 1)
    with pytest.raises(RDataReaderError, match="corrupt"):
        decompress_entry(struct.pack(">I", len(raw)) + b"not zlib", 1)


@pytest.mark.parametrize("kind", [b"2", b"1", b"Z"])
def test_decompress_entry_truncated_is_reader_error(kind):
    """A truncated entry raises RDataReaderError (as documented) for every codec, bzip2 included
    (whose decompressor reports truncation as a plain ValueError)."""
    import bz2

    raw = b"X\n" + bytes(range(256)) * 8
    payload = {
        b"2": bz2.compress(raw),
        b"1": zlib.compress(raw),
        b"Z": lzma.compress(raw, format=lzma.FORMAT_RAW, filters=rdata_reader._R_LZMA_FILTERS),
    }[kind]
    blob = struct.pack(">I", len(raw)) + kind + payload
    with pytest.raises(RDataReaderError, match="corrupt"):
        decompress_entry(blob[:-5], 3)


@needs_rdata
@pytest.mark.parametrize("compressed", [1, 3], ids=["zlib", "xz"])
def test_lazy_load_db_round_trip(tmp_path, compressed):
    lines = ["EMMA", "", "CHAPTER I", "Emma Woodhouse, handsome, clever, and rich", "caf\u00e9 \u2014 na\u00efve"]
    prefix = _write_db(tmp_path, {"book": lines, "other": ["x"]}, compressed)
    for p in (prefix, prefix.with_suffix(".rdx"), prefix.with_suffix(".rdb")):
        db = LazyLoadDB(p)
        assert db.names() == ["book", "other"] and len(db) == 2 and "book" in db
        assert db.index.compressed == compressed
        assert [str(x) for x in db["book"]] == lines
        assert [str(x) for x in db["other"]] == ["x"]
    with pytest.raises(KeyError, match="available"):
        db["missing"]


@needs_rdata
def test_lazy_load_db_missing_and_truncated(tmp_path):
    with pytest.raises(FileNotFoundError, match="Rdata.rdx"):
        LazyLoadDB(tmp_path / "Rdata")
    prefix = _write_db(tmp_path, {"a": ["abc"]}, 1)
    rdb = prefix.with_suffix(".rdb")
    rdb.write_bytes(rdb.read_bytes()[:-3])
    with pytest.raises(RDataReaderError, match="truncated"):
        LazyLoadDB(prefix)["a"]


# --------------------------------------------------------------------------------------------
# splits


def _docs(n: int) -> list[Document]:
    return [Document(f"doc-{i}", f"text {i}") for i in range(n)]


def test_split_deterministic_disjoint_and_complete():
    docs = _docs(2000)
    a = split_documents(docs, 0.1, 0.1)
    b = split_documents(list(reversed(docs)), 0.1, 0.1)
    names = {s: {d.name for d in v} for s, v in a.items()}
    assert names == {s: {d.name for d in v} for s, v in b.items()}  # order-independent
    assert not (names["train"] & names["validation"] or names["train"] & names["test"])
    assert not names["validation"] & names["test"]
    assert sum(map(len, names.values())) == 2000
    for s in ("validation", "test"):  # binomial(2000, 0.1): mean 200, sd ~13
        assert 140 < len(names[s]) < 260, (s, len(names[s]))
    # Adding documents never moves an existing one.
    c = split_documents(_docs(3000), 0.1, 0.1)
    assert names["test"] <= {d.name for d in c["test"]}
    # Each fraction goes to its own split (unequal fractions: swapping them would show), every
    # document lands where assign_split puts it, and the input order is kept within a split.
    d = split_documents(docs, 0.3, 0.05)
    assert 520 < len(d["validation"]) < 680 and 60 < len(d["test"]) < 140, {s: len(v) for s, v in d.items()}
    for s, part in d.items():
        assert all(assign_split(doc.name, 0.3, 0.05) == s for doc in part)
        in_part = {doc.name for doc in part}
        assert [doc.name for doc in part] == [doc.name for doc in docs if doc.name in in_part]


def test_split_pinned_values():
    # Pinned: a silent change of the hash recipe would move test documents into training for
    # anyone comparing against older checkpoints.
    got = [assign_split(f"doc-{i}", 0.3, 0.3) for i in range(8)]
    assert got == ["train", "train", "validation", "validation", "test", "train", "test", "test"]
    # The salt re-draws the assignment.
    assert [assign_split(f"doc-{i}", 0.3, 0.3, salt="other") for i in range(8)] != got


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="duplicate"):
        split_documents([Document("a", "1"), Document("a", "2")])
    with pytest.raises(ValueError, match="sum < 1"):
        assign_split("a", 0.6, 0.5)


# --------------------------------------------------------------------------------------------
# packing


@pytest.mark.parametrize("n,block", [(0, 4), (3, 4), (4, 4), (10, 4), (97, 16), (5, 1)])
def test_pack_tokens_shapes(n, block):
    ids = list(range(n))
    out = pack_tokens(ids, block)
    assert out.dtype == torch.long and out.shape == (n // block, block)
    assert out.flatten().tolist() == ids[: (n // block) * block]
    assert torch.equal(pack_tokens(torch.arange(n), block), out)


def test_public_domain_lm_splits_pack_each_split_of_documents(monkeypatch):
    """Split by document before packing: each split's stream is its own documents (eos-joined, in
    corpus order), so no block mixes training and held-out text; the fractions go to their splits."""
    from hedgehog_attention.tasks import lm_data

    docs = [Document(f"book/{i:03d}", chr(0x4E00 + i) * (1 + i % 3)) for i in range(400)]  # one char per doc
    monkeypatch.setattr(lm_data, "load_public_domain_corpus", lambda unit, include: docs)
    splits = lm_data.public_domain_lm_splits(block_size=1, tokenizer=_CharTokenizer(), validation_fraction=0.25,
                                             test_fraction=0.05)  # fmt: skip
    assert set(splits) == {"train", "validation", "test"}
    want = split_documents(docs, 0.25, 0.05)
    assert 70 < len(want["validation"]) < 130 and 5 < len(want["test"]) < 40
    owner = {}
    for s, ds in splits.items():
        stream = ds.blocks.flatten().tolist()
        assert stream == tokenize_documents(want[s], _CharTokenizer())
        for t in set(stream) - {0}:
            assert owner.setdefault(t, s) == s  # a document's text is in one split only
    assert len(owner) == len(docs)
    with_blocks = lm_data.public_domain_lm_splits(block_size=4, tokenizer=_CharTokenizer(), validation_fraction=0.25,
                                                  test_fraction=0.05)  # fmt: skip
    for s in splits:
        n = len(splits[s].blocks) // 4 * 4
        assert with_blocks[s].blocks.flatten().tolist() == splits[s].blocks.flatten().tolist()[:n]


def test_pack_tokens_errors():
    with pytest.raises(ValueError, match="positive int"):
        pack_tokens([1, 2], 0)
    with pytest.raises(ValueError, match="1-D"):
        pack_tokens(torch.zeros(2, 2, dtype=torch.long), 2)


class _CharTokenizer:
    """Stands in for a HF tokenizer: one id per character, eos = 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_token_block_dataset():
    docs = [Document("a", "abc"), Document("b", "de")]
    stream = tokenize_documents(docs, _CharTokenizer())
    assert stream == [97, 98, 99, 0, 100, 101, 0]
    ds = TokenBlockDataset.from_documents(docs, _CharTokenizer(), block_size=3)
    assert len(ds) == 2 and ds.block_size == 3 and ds.num_tokens == 6
    item = ds[1]
    assert item["input_ids"].tolist() == [0, 100, 101] and torch.equal(item["labels"], item["input_ids"])
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 3)
    assert len(TokenBlockDataset(ds.blocks)) == 2
    with pytest.raises(ValueError, match="block_size"):
        TokenBlockDataset([1, 2, 3])
    assert tokenize_documents(["ab"], _CharTokenizer(), eos_id=-1) == [97, 98]


# --------------------------------------------------------------------------------------------
# user files and the hub path


def test_load_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub" / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("no")
    docs = corpora.load_text_files(tmp_path)
    assert [d.text for d in docs] == ["second", "first"]
    assert corpora.load_text_files(str(tmp_path / "skip.md"))[0].text == "no"
    with pytest.raises(FileNotFoundError):
        corpora.load_text_files(tmp_path / "nope.txt")


def test_load_text_files_split_does_not_depend_on_how_the_path_is_spelled(tmp_path, monkeypatch):
    """Names (and so the split) are the same for a relative and an absolute spelling of one folder,
    from any working directory: held-out files of one run must not be trained on by the next."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(40):
        (corpus / ("sub" if i % 2 else "") / f"f{i:02d}.txt").write_text(f"text {i}")
    monkeypatch.chdir(tmp_path)
    rel = corpora.load_text_files("corpus")
    monkeypatch.chdir(corpus / "sub")
    absolute, dot = corpora.load_text_files(corpus), corpora.load_text_files("..")
    assert [d.name for d in rel] == [d.name for d in absolute] == [d.name for d in dot]
    assert "corpus/sub/f01.txt" in {d.name for d in rel} and "corpus/f00.txt" in {d.name for d in rel}
    assert corpora.load_text_files(corpus / "sub" / "f01.txt")[0].name == "sub/f01.txt"
    parts = [split_documents(docs, 0.2, 0.2) for docs in (rel, absolute, dot)]
    texts = [{s: {d.text for d in p[s]} for s in corpora.SPLITS} for p in parts]
    assert texts[0] == texts[1] == texts[2] and texts[0]["test"]


def test_hf_dataset_without_datasets_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        corpora.load_hf_dataset("Salesforce/wikitext", "train", config="wikitext-103-raw-v1")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs HF datasets")
def test_hf_dataset_local_files(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("line one\nline two\n")
    docs = corpora.load_hf_dataset("text", "train", data_files={"train": str(f)})
    assert [d.text for d in docs] == ["line one", "line two"]


def test_missing_asset_names_the_setup_command(monkeypatch, tmp_path):
    monkeypatch.setenv(corpora.ASSETS_ENV, str(tmp_path))
    assert corpora.assets_dir() == tmp_path
    with pytest.raises(corpora.AssetNotFoundError, match="setup_assets.sh"):
        corpora.load_kjv()
    from hedgehog_attention.tasks.tokenizers import gpt2_tokenizer

    with pytest.raises(corpora.AssetNotFoundError, match="setup_assets.sh"):
        gpt2_tokenizer()


def test_missing_model_names_the_setup_command(monkeypatch):
    from hedgehog_attention import models_zoo

    monkeypatch.setattr(models_zoo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models_zoo.ModelNotInstalledError, match="setup_assets.sh"):
        models_zoo.smollm2_gguf_path()


def _fake_gguf_transformers(monkeypatch, during_dequantize):
    """transformers' Auto classes replaced by stand-ins that write a plausible HF folder."""
    import transformers

    class Model:
        config = type("Config", (), {})()

        def state_dict(self):
            return {}

        def load_state_dict(self, sd):
            pass

        def tie_weights(self):
            pass

        def save_pretrained(self, d):
            (d / "config.json").write_text("{}")
            (d / "model.safetensors").write_bytes(b"this process")

    class Auto:
        @staticmethod
        def from_pretrained(*a, **k):
            during_dequantize()
            return Model()

        @staticmethod
        def from_config(cfg, **k):
            return Model()

    class Tok:
        @staticmethod
        def from_pretrained(*a, **k):
            return Tok()

        def save_pretrained(self, d):
            pass

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Auto)
    monkeypatch.setattr(transformers, "AutoTokenizer", Tok)


@pytest.mark.parametrize("other_first", [True, False], ids=["other-process-finished-first", "stale-cache"])
def test_smollm2_conversion_keeps_a_cache_another_process_finished(tmp_path, monkeypatch, other_first):
    """Every rank of a multi-process run calls load_smollm2: a conversion that finishes second must
    keep the valid cache the first one wrote (it may be loading it), not delete and replace it; a
    stale cache is replaced. No temporary folders are left behind."""
    import json

    from hedgehog_attention import models_zoo

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")
    cache, stamp = tmp_path / "cache" / "smollm2", models_zoo._gguf_stamp(gguf)

    def other_process_writes_cache(valid):
        cache.mkdir(parents=True)
        (cache / "config.json").write_text("{}")
        (cache / "model.safetensors").write_bytes(b"other process")
        (cache / "hedgehog_source.json").write_text(json.dumps(stamp if valid else {**stamp, "size": -1}))

    if not other_first:
        other_process_writes_cache(valid=False)
    _fake_gguf_transformers(monkeypatch, lambda: other_process_writes_cache(valid=True) if other_first else None)
    assert not models_zoo._cache_valid(cache, stamp)
    models_zoo._convert_gguf(gguf, cache, stamp)
    assert models_zoo._cache_valid(cache, stamp)
    want = b"other process" if other_first else b"this process"
    assert (cache / "model.safetensors").read_bytes() == want
    assert [p.name for p in cache.parent.iterdir()] == ["smollm2"]


# --------------------------------------------------------------------------------------------
# real assets


@pytest.mark.assets
@pytest.mark.skipif(not HAVE_GPT2, reason=f"GPT-2 tokenizer not installed; {SETUP}")
def test_gpt2_tokenizer_round_trip():
    from hedgehog_attention.tasks.tokenizers import GPT2_EOS_ID, gpt2_tokenizer

    tok = gpt2_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    text = "Call me Ishmael. Some years ago\u2014never mind how long precisely\n\n  caf\u00e9"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token_id == GPT2_EOS_ID and len(tok) == 50257


@pytest.mark.assets
@pytest.mark.skipif(not HAVE_FINE_FOOD, reason=f"r-cran-modeldata not installed; {SETUP}")
def test_fine_food():
    train, test = corpora.load_fine_food()
    assert (len(train), len(test)) == (4000, 1000)
    for rows in (train, test):
        labels = Counter(label for _, label in rows)
        assert set(labels) == {0, 1}
        assert 0.6 < labels[1] / len(rows) < 0.7  # "great" is the majority (65.8% overall)
        assert all(isinstance(t, str) and t for t, _ in rows)


@pytest.mark.assets
@pytest.mark.skipif(not (HAVE_TEXTS and HAVE_KJV), reason=f"texts not installed; {SETUP}")
def test_corpora_non_empty_and_split():
    austen = corpora.load_austen()
    assert list(austen) == list(corpora.AUSTEN_BOOKS.values())
    assert all(len(t) > 400_000 for t in austen.values())
    assert "It is a truth universally acknowledged" in austen["Pride & Prejudice"]
    moby = corpora.load_moby_dick()
    assert "Call me Ishmael." in moby and "Gutenberg-tm" not in moby and "\r" not in moby
    kjv = corpora.load_kjv()
    assert kjv.lstrip().startswith("Genesis 1") and "In the beginning God created" in kjv
    docs = corpora.load_public_domain_corpus()
    by_source = Counter(d.name.split("/")[0] for d in docs)
    assert by_source["kjv"] == 1189 and by_source["moby_dick"] >= 135 and by_source["austen"] >= 270
    parts = split_documents(docs)
    assert all(parts[s] for s in corpora.SPLITS)
    assert sum(len(d.text) for d in docs) == sum(len(d.text) for v in parts.values() for d in v)


@pytest.mark.assets
@pytest.mark.skipif(not HAVE_TEXTS, reason=f"texts not installed; {SETUP}")
def test_real_lazy_load_dbs():
    base = corpora.assets_dir() / "debs"
    db = LazyLoadDB(base / "r-cran-janeaustenr" / corpora._R_LIB / "janeaustenr" / "data" / "Rdata")
    assert db.index.compressed == 1 and sorted(db.names()) == sorted(corpora.AUSTEN_BOOKS)
    if HAVE_FINE_FOOD:
        db = LazyLoadDB(base / "r-cran-modeldata" / corpora._R_LIB / "modeldata" / "data" / "Rdata")
        assert db.index.compressed == 3  # entries are 'Z' + raw LZMA2
        assert "training_data" in db and "testing_data" in db


def test_wikitext_loader_packs_rows(monkeypatch):
    from hedgehog_attention.tasks import lm_data

    rows = [Document(f"w/{i}", t) for i, t in enumerate([" = A = \n", "ab\n", "", "cd\n"])]
    seen = {}

    def fake_load(name, split, text_field, config):
        seen.update(name=name, split=split, config=config)
        return rows

    monkeypatch.setattr(lm_data, "load_hf_dataset", fake_load)
    ds = lm_data.load_wikitext103("validation", tokenizer=_CharTokenizer(), block_size=4)
    assert seen == {"name": "Salesforce/wikitext", "split": "validation", "config": "wikitext-103-raw-v1"}
    stream = [ord(c) for c in " = A = \nab\ncd\n"]  # rows joined, no separators
    assert ds.blocks.flatten().tolist() == stream[: len(stream) // 4 * 4]
