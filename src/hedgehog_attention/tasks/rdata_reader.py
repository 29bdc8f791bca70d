"""Read R lazy-load databases (``<name>.rdx`` + ``<name>.rdb``) without R.

Debian's ``r-cran-*`` packages ship their data sets as lazy-load databases, e.g.
``usr/lib/R/site-library/janeaustenr/data/Rdata.{rdx,rdb}``. The container format (R's
``src/main/serialize.c``, ``lazyLoadDBfetch``/``R_decompress{1,2,3}``):

* ``<name>.rdx`` is a gzip-compressed R serialization of a list with three fields:
  ``variables`` (object name -> ``c(offset, length)`` into the ``.rdb``), ``references``
  (environments, same layout) and ``compressed`` (``TRUE``/1 = zlib, 2 = bzip2, 3 = xz).
* each ``.rdb`` entry is a 4-byte big-endian uncompressed length, then:

  - ``compressed = 1``: zlib data;
  - ``compressed = 2`` or ``3``: one type byte, then the payload: ``'Z'`` raw LZMA2 (xz preset
    9e, no container), ``'2'`` bzip2, ``'1'`` zlib, ``'0'`` stored uncompressed.

The decompressed bytes are an ordinary R serialization (``X\\n`` + version header), which the
PyPI package ``rdata`` parses (``rdata.parser.parse_data`` then ``rdata.conversion.convert``).

Example::

    db = LazyLoadDB("usr/lib/R/site-library/tokenizers/data/Rdata")
    db.names()            # ['mobydick']
    text = db["mobydick"]  # numpy array of one string
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LazyLoadDB",
    "LazyLoadIndex",
    "RDataReaderError",
    "decompress_entry",
    "parse_r_serialized",
]

# R's serialize.c encodes LZMA entries with `lzma_lzma_preset(&opt, 9 | LZMA_PRESET_EXTREME)`
# as a raw LZMA2 filter chain; the decoder must use the same dictionary size, which the preset
# determines (64 MiB for preset 9).
_R_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


class RDataReaderError(ValueError):
    """A lazy-load database entry or index is malformed or uses an unsupported encoding."""


def _require_rdata() -> Any:
    try:
        import rdata
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading R data needs the PyPI package `rdata` (got: not installed); "
            "install it with `pip install 'rdata>=0.11'` or `pip install 'hedgehog-attention[assets]'`"
        ) from exc
    return rdata


def decompress_entry(blob: bytes, compressed: int = 1) -> bytes:
    """Decompress one ``.rdb`` entry (the bytes at ``[offset, offset + length)``).

    Args:
        blob: the raw entry: a 4-byte big-endian uncompressed length, then the payload.
        compressed: the ``compressed`` field of the ``.rdx`` index: 1 (or ``True``) = zlib with
            no type byte; 2 or 3 = a type byte (``'Z'`` LZMA2, ``'2'`` bzip2, ``'1'`` zlib,
            ``'0'`` stored) before the payload.

    Returns:
        The R serialization bytes (starting with ``b"X\\n"`` for binary XDR format).

    Raises:
        RDataReaderError: truncated entry, unknown type byte, or a length that does not match.
    """
    if len(blob) < 4:
        raise RDataReaderError(f"lazy-load entry too short: expected >= 4 bytes, got {len(blob)}")
    (expected_len,) = struct.unpack(">I", blob[:4])
    body = blob[4:]
    compressed = int(compressed)
    try:
        if compressed == 1:
            out = zlib.decompress(body)
        elif compressed in (2, 3):
            if not body:
                raise RDataReaderError("lazy-load entry has a length but no type byte")
            kind, payload = body[:1], body[1:]
            if kind == b"Z":
                out = lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=_R_LZMA_FILTERS)
            elif kind == b"2":
                out = bz2.decompress(payload)
            elif kind == b"1":
                out = zlib.decompress(payload)
            elif kind == b"0":
                out = bytes(payload)
            else:
                raise RDataReaderError(
                    f"unknown lazy-load entry type byte: expected one of b'Z', b'2', b'1', b'0', got {kind!r}"
                )
        elif compressed == 0:
            # `makeLazyLoadDB(compress = FALSE)`: the entry is the serialization itself.
            return bytes(blob)
        else:
            raise RDataReaderError(f"unknown `compressed` value in the .rdx: expected 0-3, got {compressed}")
    except RDataReaderError:
        raise
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as exc:
        # bz2 reports a truncated stream as a plain ValueError, lzma/zlib as their own errors.
        raise RDataReaderError(f"corrupt lazy-load entry (compressed={compressed}): {exc}") from exc
    if len(out) != expected_len:
        raise RDataReaderError(
            f"lazy-load entry length mismatch: header says {expected_len} bytes, decompressed to {len(out)}"
        )
    return out


def parse_r_serialized(raw: bytes) -> Any:
    """Parse R serialization bytes (as from :func:`decompress_entry`) into Python objects.

    Character vectors become numpy string arrays, lists become lists/dicts, data frames become
    ``pandas.DataFrame`` and factors ``pandas.Categorical`` (the conversions of ``rdata``).
    """
    rdata = _require_rdata()
    # extension=".rds": the payload is a bare serialization (no RDX2 magic); saying so
    # silences rdata's "Unknown file type: assumed RDS" warning.
    parsed = rdata.parser.parse_data(bytes(raw), expand_altrep=True, extension=".rds")
    # tibbles (class c("tbl_df", "tbl", "data.frame")) are plain data frames for our purposes;
    # mapping them explicitly avoids one "Missing constructor" warning per class.
    constructors = dict(rdata.conversion.DEFAULT_CLASS_MAP)
    for cls in ("tbl_df", "tbl"):
        constructors.setdefault(cls, rdata.conversion.dataframe_constructor)
    return rdata.conversion.convert(parsed, constructors)


def _as_span(value: Any, what: str) -> tuple[int, int]:
    try:
        offset, length = (int(x) for x in value)
    except (TypeError, ValueError) as exc:
        raise RDataReaderError(f"index entry {what!r}: expected c(offset, length), got {value!r}") from exc
    return offset, length


@dataclass(frozen=True)
class LazyLoadIndex:
    """The parsed ``.rdx``: object name -> (offset, length) in the ``.rdb``."""

    variables: dict[str, tuple[int, int]]
    references: dict[str, tuple[int, int]]
    compressed: int

    @classmethod
    def from_bytes(cls, data: bytes) -> LazyLoadIndex:
        """Parse the raw (gzip-compressed) contents of a ``.rdx`` file."""
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        obj = parse_r_serialized(data)
        if not isinstance(obj, dict) or "variables" not in obj:
            raise RDataReaderError(f"not a lazy-load index: expected a list with `variables`, got {type(obj).__name__}")
        variables = {str(k): _as_span(v, str(k)) for k, v in (obj.get("variables") or {}).items()}
        references = {str(k): _as_span(v, str(k)) for k, v in (obj.get("references") or {}).items()}
        comp = obj.get("compressed", 1)
        try:
            compressed = int(comp[0]) if hasattr(comp, "__len__") else int(comp)
        except (TypeError, ValueError, IndexError) as exc:
            raise RDataReaderError(f"bad `compressed` field in the .rdx: {comp!r}") from exc
        return cls(variables=variables, references=references, compressed=compressed)


class LazyLoadDB:
    """An R lazy-load database on disk.

    Args:
        path: the database prefix (``.../data/Rdata``) or either of its two files
            (``.../data/Rdata.rdx`` or ``.rdb``).

    Raises:
        FileNotFoundError: when the ``.rdx`` or ``.rdb`` file is missing.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        prefix = path.with_suffix("") if path.suffix in (".rdx", ".rdb") else path
        self.rdx_path = prefix.with_name(prefix.name + ".rdx")
        self.rdb_path = prefix.with_name(prefix.name + ".rdb")
        for p in (self.rdx_path, self.rdb_path):
            if not p.is_file():
                raise FileNotFoundError(f"R lazy-load database file not found: {p}")
        self.index = LazyLoadIndex.from_bytes(self.rdx_path.read_bytes())

    def names(self) -> list[str]:
        """Names of the objects stored in the database, in index order."""
        return list(self.index.variables)

    def __contains__(self, name: object) -> bool:
        return name in self.index.variables

    def __iter__(self) -> Iterator[str]:
        return iter(self.index.variables)

    def __len__(self) -> int:
        return len(self.index.variables)

    def read_raw(self, name: str) -> bytes:
        """The decompressed R serialization of object ``name``."""
        if name not in self.index.variables:
            raise KeyError(f"object {name!r} not in {self.rdx_path}; available: {sorted(self.index.variables)}")
        offset, length = self.index.variables[name]
        with self.rdb_path.open("rb") as f:
            f.seek(offset)
            blob = f.read(length)
        if len(blob) != length:
            raise RDataReaderError(
                f"{self.rdb_path} is truncated: object {name!r} needs bytes [{offset}, {offset + length}), "
                f"got {len(blob)}"
            )
        return decompress_entry(blob, self.index.compressed)

    def __getitem__(self, name: str) -> Any:
        """Object ``name`` converted to Python (see :func:`parse_r_serialized`)."""
        return parse_r_serialized(self.read_raw(name))

    def __repr__(self) -> str:
        return f"LazyLoadDB({str(self.rdx_path.with_suffix(''))!r}, objects={len(self)})"
