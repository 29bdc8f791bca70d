"""Text corpora that work offline, plus the hub path for users with a network.

The offline texts come from Debian packages that ``scripts/setup_assets.sh`` extracts into the
assets folder (``$HEDGEHOG_ASSETS``, default ``<repo>/.assets``):

==========================  =====================================  ==========================
corpus                      source                                 loader
==========================  =====================================  ==========================
Jane Austen, 6 novels       ``r-cran-janeaustenr`` (R lazy-load)   :func:`load_austen`
King James Bible            ``bible-kjv`` (decoded to kjv.txt)     :func:`load_kjv`
Moby Dick                   ``r-cran-tokenizers`` (R lazy-load)    :func:`load_moby_dick`
Python 3 docs (reST)        ``python3-doc`` (optional step)        :func:`load_python_docs`
Amazon fine-food reviews    ``r-cran-modeldata`` (R lazy-load)     :func:`load_fine_food`
==========================  =====================================  ==========================

Evaluation text must never be trained on: :func:`split_documents` assigns every document to
``train``/``validation``/``test`` by a hash of its name, so the assignment is the same on every
machine and does not change when other documents are added or removed.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from .rdata_reader import LazyLoadDB

__all__ = [
    "ASSETS_ENV",
    "SPLITS",
    "AssetNotFoundError",
    "Document",
    "assets_dir",
    "assign_split",
    "load_austen",
    "load_fine_food",
    "load_hf_dataset",
    "load_kjv",
    "load_moby_dick",
    "load_public_domain_corpus",
    "load_python_docs",
    "load_text_files",
    "split_documents",
]

ASSETS_ENV = "HEDGEHOG_ASSETS"
SETUP_HINT = "run `PYTHON=$(which python) bash scripts/setup_assets.sh --minimal` from the repository root"

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")

# janeaustenr object name -> title (the names austen_books() uses).
AUSTEN_BOOKS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

_R_LIB = Path("usr/lib/R/site-library")


class AssetNotFoundError(FileNotFoundError):
    """An offline asset is not installed; the message names the setup command."""


@dataclass(frozen=True)
class Document:
    """One named text. ``name`` is unique within a corpus and decides its split."""

    name: str
    text: str

    def __repr__(self) -> str:
        return f"Document(name={self.name!r}, chars={len(self.text)})"


# --------------------------------------------------------------------------------------------
# locating assets


def _repo_root() -> Path | None:
    # src/hedgehog_attention/tasks/corpora.py -> repository root, when running from a checkout.
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() else None


def assets_dir() -> Path:
    """The assets folder: ``$HEDGEHOG_ASSETS``, else ``<repo>/.assets`` in a source checkout,
    else ``~/.cache/hedgehog_attention/assets``. The folder may not exist yet."""
    env = os.environ.get(ASSETS_ENV)
    if env:
        return Path(env).expanduser()
    root = _repo_root()
    if root is not None:
        return root / ".assets"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "hedgehog_attention" / "assets"


def _asset(*parts: str | Path, what: str) -> Path:
    path = assets_dir().joinpath(*parts)
    if not path.exists():
        raise AssetNotFoundError(
            f"{what} is not installed: expected {path} (assets folder from ${ASSETS_ENV} or "
            f"<repo>/.assets); {SETUP_HINT}"
        )
    return path


def _r_db(deb: str, rpkg: str) -> LazyLoadDB:
    folder = _asset("debs", deb, _R_LIB, rpkg, "data", what=f"Debian package {deb}")
    return LazyLoadDB(folder / "Rdata")


# --------------------------------------------------------------------------------------------
# corpora


@lru_cache(maxsize=1)
def _austen_cached(root: str) -> tuple[tuple[str, str], ...]:
    db = _r_db("r-cran-janeaustenr", "janeaustenr")
    missing = [k for k in AUSTEN_BOOKS if k not in db]
    if missing:
        raise AssetNotFoundError(f"janeaustenr database lacks {missing}; it has {db.names()}")
    # Each book is a character vector of lines; "" marks a paragraph break.
    return tuple((title, "\n".join(str(x) for x in db[key])) for key, title in AUSTEN_BOOKS.items())


def load_austen() -> dict[str, str]:
    """Jane Austen's six novels: title -> full text (lines joined with ``"\\n"``).

    About 4.0 MB / 1.0M GPT-2 tokens. Titles: ``Sense & Sensibility``, ``Pride & Prejudice``,
    ``Mansfield Park``, ``Emma``, ``Northanger Abbey``, ``Persuasion``.
    """
    return dict(_austen_cached(str(assets_dir())))


def load_kjv() -> str:
    """The King James Bible as printed by ``bible -l0``: a ``"Genesis 1"`` heading per chapter,
    then one ``"  N text"`` line per verse. About 4.3 MB / 1.1M GPT-2 tokens."""
    return _asset("kjv", "kjv.txt", what="the King James Bible (kjv.txt)").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _moby_cached(root: str) -> str:
    raw = _r_db("r-cran-tokenizers", "tokenizers")["mobydick"]
    text = str(raw[0]).lstrip("\ufeff").replace("\r\n", "\n")
    # Drop the Project Gutenberg header and licence (not Melville's text).
    start = re.search(r"^\*\*\* ?START OF .*$", text, flags=re.MULTILINE)
    end = re.search(r"^(End of Project Gutenberg|\*\*\* ?END OF )", text, flags=re.MULTILINE)
    if start is None or end is None or end.start() <= start.end():
        raise ValueError("Moby Dick text lacks the expected Project Gutenberg START/END markers")
    return text[start.end() : end.start()].strip() + "\n"


def load_moby_dick() -> str:
    """Moby Dick (Gutenberg #2701) without the Project Gutenberg header and licence, ``\\n`` line
    ends. About 1.2 MB / 0.3M GPT-2 tokens."""
    return _moby_cached(str(assets_dir()))


def _split_on_headings(text: str, pattern: str) -> list[tuple[str, str]]:
    """Split ``text`` before every line matching ``pattern``; returns ``(heading, body)`` pairs.
    Text before the first heading is returned with heading ``"front matter"`` when non-blank."""
    heads = list(re.finditer(pattern, text, flags=re.MULTILINE))
    out: list[tuple[str, str]] = []
    if not heads:
        return [("all", text)]
    front = text[: heads[0].start()]
    if front.strip():
        out.append(("front matter", front))
    for i, m in enumerate(heads):
        stop = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        out.append((m.group(0).strip(), text[m.start() : stop]))
    return out


def _chapters(source: str, text: str, pattern: str) -> list[Document]:
    # The running index keeps names unique even when a heading repeats (e.g. "VOLUME I" chapters).
    return [
        Document(f"{source}/{i:04d} {head}", body) for i, (head, body) in enumerate(_split_on_headings(text, pattern))
    ]


def load_public_domain_corpus(
    granularity: Literal["chapter", "book"] = "chapter",
    include: Sequence[str] = ("austen", "kjv", "moby_dick"),
) -> list[Document]:
    """The offline public-domain corpus as a list of :class:`Document`.

    Args:
        granularity: ``"chapter"`` (default; ~1,500 documents, fine enough for a document-level
            train/validation/test split) or ``"book"`` (8 documents: 6 novels, KJV, Moby Dick).
        include: which sources, any of ``"austen"``, ``"kjv"``, ``"moby_dick"``, ``"python_docs"``.

    Names look like ``"austen/Emma/0003 CHAPTER II"``, ``"kjv/0000 Genesis 1"``,
    ``"moby_dick/0001 CHAPTER 1. Loomings."``; ``"python_docs/<path>"`` for the docs (one file per
    document at either granularity). About 9.6 MB / 2.4M GPT-2 tokens without the docs.
    """
    valid = ("austen", "kjv", "moby_dick", "python_docs")
    unknown = [s for s in include if s not in valid]
    if unknown:
        raise ValueError(f"unknown corpus source(s) {unknown}; valid sources: {list(valid)}")
    if granularity not in ("chapter", "book"):
        raise ValueError(f"granularity must be 'chapter' or 'book', got {granularity!r}")
    docs: list[Document] = []
    if "austen" in include:
        for title, text in load_austen().items():
            if granularity == "book":
                docs.append(Document(f"austen/{title}", text))
            else:
                docs += _chapters(f"austen/{title}", text, r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?\s*$")
    if "kjv" in include:
        text = load_kjv()
        if granularity == "book":
            docs.append(Document("kjv", text))
        else:
            # A chapter heading is the only kind of line that does not start with a space.
            docs += _chapters("kjv", text, r"^\S.*$")
    if "moby_dick" in include:
        text = load_moby_dick()
        if granularity == "book":
            docs.append(Document("moby_dick", text))
        else:
            docs += _chapters("moby_dick", text, r"^(CHAPTER \d+\..*|Epilogue)$")
    if "python_docs" in include:
        docs += load_python_docs()
    return docs


def load_python_docs(max_files: int | None = None) -> list[Document]:
    """The Python documentation's reST sources (``python3-doc``; ``setup_assets.sh`` step
    ``pydocs``, not part of ``--minimal``), one :class:`Document` per file, sorted by path, named
    ``"python_docs/<relative path>"``. About 500 files / 11 MB.

    Args:
        max_files: keep only the first ``max_files`` files (in sorted order); ``None`` = all.
    """
    root = _asset("debs", "python3-doc", "_sources", what="the Python docs (setup step `pydocs`)")
    files = sorted(root.rglob("*.rst.txt"))
    if max_files is not None:
        files = files[:max_files]
    return [Document(f"python_docs/{p.relative_to(root).as_posix()}", p.read_text("utf-8")) for p in files]


@lru_cache(maxsize=1)
def _fine_food_cached(root: str) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
    db = _r_db("r-cran-modeldata", "modeldata")

    def rows(name: str) -> tuple[tuple[str, int], ...]:
        df = db[name]
        labels = sorted({str(s) for s in df["score"]})
        if labels != ["great", "other"]:
            raise ValueError(f"modeldata::{name}$score: expected levels ['great', 'other'], got {labels}")
        return tuple((str(r), int(str(s) == "great")) for r, s in zip(df["review"], df["score"]))

    return rows("training_data"), rows("testing_data")


def load_fine_food() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Amazon fine-food reviews (``modeldata::training_data`` / ``testing_data``).

    Returns:
        ``(train, test)``: 4,000 and 1,000 ``(review_text, label)`` pairs; ``label`` is 1 when the
        score is ``"great"`` and 0 for ``"other"`` (65% / 66% of rows are ``"great"``).
    """
    train, test = _fine_food_cached(str(assets_dir()))
    return list(train), list(test)


def load_text_files(paths: str | Path | Iterable[str | Path], pattern: str = "*.txt") -> list[Document]:
    """A user's own text: each file is one :class:`Document`.

    A document is named by its path from its folder *including that folder's own name*
    (``"corpus/sub/a.txt"`` for ``corpus/sub/a.txt`` found under ``corpus``; a file given directly
    is named ``"<its folder's name>/<file name>"``), never by the path as spelled: the split
    (:func:`split_documents`) must not depend on the working directory or on where the files are.

    Args:
        paths: files and/or folders; a folder contributes its files matching ``pattern``
            (recursively, sorted).
        pattern: glob for folders (default ``"*.txt"``).

    Raises:
        FileNotFoundError: a path does not exist, or nothing matched.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[tuple[str, Path]] = []
    for p in map(Path, paths):
        if p.is_dir():
            base = p.resolve().name
            found = sorted(f for f in p.rglob(pattern) if f.is_file())
            files += [(f"{base}/{f.relative_to(p).as_posix()}", f) for f in found]
        elif p.is_file():
            files.append((f"{p.resolve().parent.name}/{p.name}", p))
        else:
            raise FileNotFoundError(f"text file or folder not found: {p}")
    if not files:
        raise FileNotFoundError(f"no files matching {pattern!r} under {list(map(str, paths))}")
    return [Document(name, f.read_text(encoding="utf-8", errors="replace")) for name, f in files]


def load_hf_dataset(
    name: str,
    split: str = "train",
    text_field: str = "text",
    config: str | None = None,
    **load_kwargs: Any,
) -> list[Document]:
    """Rows of a dataset through HF ``datasets`` (``pip install datasets``): a hub name such as
    ``("Salesforce/wikitext", config="wikitext-103-raw-v1")`` needs a network or a filled hub
    cache; a builder on local files works offline, e.g.
    ``load_hf_dataset("text", data_files={"train": "my.txt"})``.

    Each row becomes ``Document(f"{name}/{split}/{row:08d}", row[text_field])``.

    Raises:
        ImportError: ``datasets`` is not installed.
        KeyError: ``text_field`` is not a column.
        RuntimeError: the dataset could not be loaded (offline, unknown name); the message names
            the offline alternatives.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            "load_hf_dataset needs HF `datasets` (got: not installed); `pip install datasets`, or use "
            "load_public_domain_corpus() / load_text_files() offline"
        ) from exc
    try:
        ds = datasets.load_dataset(name, config, split=split, **load_kwargs)
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        raise RuntimeError(
            f"could not load dataset {name!r} (config={config!r}, split={split!r}): "
            f"{type(exc).__name__}: {exc}. Hub datasets need a network or a filled HF cache"
            f"{' (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)' if offline else ''}; offline, use "
            f"load_public_domain_corpus() or load_text_files(paths)"
        ) from exc
    if text_field not in ds.column_names:
        raise KeyError(f"dataset {name!r} has no column {text_field!r}; columns: {ds.column_names}")
    return [Document(f"{name}/{split}/{i:08d}", str(t)) for i, t in enumerate(ds[text_field])]


# --------------------------------------------------------------------------------------------
# splits


def assign_split(
    key: str,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    salt: str = "hedgehog-split-v1",
) -> Split:
    """The split of one item, from the SHA-256 of ``salt + key`` mapped to [0, 1):
    ``[0, test)`` -> ``"test"``, ``[test, test + validation)`` -> ``"validation"``, rest ->
    ``"train"``. Deterministic across machines and Python versions (unlike ``hash()``)."""
    if validation_fraction < 0 or test_fraction < 0 or validation_fraction + test_fraction >= 1:
        raise ValueError(
            "expected validation_fraction >= 0, test_fraction >= 0 and their sum < 1, got "
            f"{validation_fraction} and {test_fraction}"
        )
    digest = hashlib.sha256((salt + key).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


def split_documents(
    docs: Iterable[Document],
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    salt: str = "hedgehog-split-v1",
) -> dict[Split, list[Document]]:
    """Split documents into ``train``/``validation``/``test`` by :func:`assign_split` on the
    document *name* (so cleaning a text does not move it between splits). Order within a split
    follows the input. A document never appears in two splits.

    Raises:
        ValueError: two documents share a name (they could land in different splits).
    """
    out: dict[Split, list[Document]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for doc in docs:
        if doc.name in seen:
            raise ValueError(f"duplicate document name {doc.name!r}: names must be unique to split by name")
        seen.add(doc.name)
        out[assign_split(doc.name, validation_fraction, test_fraction, salt)].append(doc)
    return out
