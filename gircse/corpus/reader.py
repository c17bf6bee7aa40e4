"""Reading a corpus: JSONL rows with an id and a text field, or plain text (one text per line, id = line number).

Both are streamed (``.gz`` decompressed on the fly), never read whole. ``scan`` makes one pass that checks every
row (blank texts, duplicate ids, malformed JSON) and fingerprints the input, before any model is loaded; the
encoding pass reads the same rows again with ``iter_records``. Errors name the file and the 1-based line.
"""
from __future__ import annotations

import array
import dataclasses
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Iterator

import numpy as np

__all__ = ["FORMATS", "CorpusInputError", "InputSummary", "Record", "input_format", "iter_records", "scan"]

FORMATS = ("jsonl", "text")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


class CorpusInputError(ValueError):
    """A malformed corpus input; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Record:
    row: int  # 0-based position among the corpus rows
    line: int  # 1-based line of the file
    id: str
    text: str


@dataclasses.dataclass(frozen=True)
class InputSummary:
    path: str
    format: str
    rows: int
    sha256: str  # of the decompressed bytes: the same content is the same input, wherever it lies


def input_format(path: str, fmt: str = "auto") -> str:
    """``fmt``, or for "auto" the format the file name says: ``.jsonl`` / ``.ndjson`` / ``.json`` (``.gz`` too)
    is JSONL, anything else plain text."""
    if fmt == "auto":
        name = path[:-3] if path.endswith(".gz") else path
        return "jsonl" if name.endswith(_JSONL_SUFFIXES) else "text"
    if fmt not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {fmt!r}")
    return fmt


def _lines(path: str, digest=None) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)``: lines end at b"\\n" only, so a form feed or a lone CR stays in its line.
    Read errors (a truncated or corrupt .gz) become one CorpusInputError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input: no such file: {path}")
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as stream:
            for number, raw in enumerate(stream, start=1):
                if digest is not None:
                    digest.update(raw)
                yield number, raw
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise CorpusInputError(f"{path}: cannot be read ({error})") from None


def _decode(raw: bytes, where: str, first: bool) -> str:
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as error:
        raise CorpusInputError(f"{where}: not UTF-8 (byte {error.start}: {error.reason})") from None
    if text.endswith("\n"):
        text = text[:-1]
    return text[:-1] if text.endswith("\r") else text


def _jsonl_record(line: str, where: str, id_field: str, text_field: str) -> tuple[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise CorpusInputError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise CorpusInputError(f"{where}: expected a JSON object with {id_field!r} and {text_field!r}, "
                               f"got {type(row).__name__}")
    if id_field not in row:
        raise CorpusInputError(f"{where}: no {id_field!r} field (choose the id field with --id-field)")
    identifier = row[id_field]
    if isinstance(identifier, bool) or not isinstance(identifier, (str, int)):
        raise CorpusInputError(f"{where}: {id_field!r} must be a string or an integer, got "
                               f"{type(identifier).__name__} {identifier!r:.60}")
    identifier = str(identifier)
    if not identifier.strip():
        raise CorpusInputError(f"{where}: {id_field!r} is empty")
    if text_field not in row:
        raise CorpusInputError(f"{where}: no {text_field!r} field (choose the text field with --text-field)")
    text = row[text_field]
    if not isinstance(text, str):
        raise CorpusInputError(f"{where}: {text_field!r} must be a string, got {type(text).__name__} {text!r:.60}")
    return identifier, text


def iter_records(path: str, fmt: str = "auto", *, id_field: str = "id", text_field: str = "text",
                 digest=None, keep=None) -> Iterator[Record]:
    """The corpus rows in file order, each text checked non-blank. Plain text: every line is a row, its id
    the line number (``"1"``, ``"2"``, ...). JSONL: ids are strings (an integer id becomes its decimal string);
    blank lines between rows are skipped. ``digest``: a hashlib object updated with every raw line read.
    ``keep``: a predicate on the row index; other rows are counted, not parsed or checked (a rank reading
    only its own shards, after ``scan`` checked them all)."""
    path = os.fspath(path)
    fmt = input_format(path, fmt)
    row = 0
    for number, raw in _lines(path, digest):
        where = f"{path}:{number}"
        line = _decode(raw, where, number == 1)
        if fmt == "jsonl" and not line.strip():
            continue
        if keep is not None and not keep(row):
            row += 1
            continue
        if fmt == "text":
            identifier, text = str(number), line
        else:
            identifier, text = _jsonl_record(line, where, id_field, text_field)
        if not text.strip():
            raise CorpusInputError(f"{where}: the text is empty (or only whitespace); an empty text has no "
                                   "embedding")
        yield Record(row, number, identifier, text)
        row += 1


def _id_hash(identifier: str) -> int:
    return int.from_bytes(hashlib.blake2b(identifier.encode("utf-8"), digest_size=8).digest(), "little")


def scan(path: str, fmt: str = "auto", *, id_field: str = "id", text_field: str = "text") -> InputSummary:
    """Check every row and fingerprint the input in one streamed pass; memory: 8 bytes per row.

    Duplicate ids are found through 64-bit hashes of the ids (sorted once at the end); only when two hashes
    collide is the file read again to name the first repeated id and both of its lines."""
    path = os.fspath(path)
    fmt = input_format(path, fmt)
    digest = hashlib.sha256()
    hashes = array.array("Q")
    for record in iter_records(path, fmt, id_field=id_field, text_field=text_field, digest=digest):
        hashes.append(_id_hash(record.id))
    if not hashes:
        raise CorpusInputError(f"{path}: no texts")
    ordered = np.sort(np.frombuffer(hashes, dtype=np.uint64))
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(repeated):
        _raise_first_duplicate(path, fmt, id_field, text_field, {int(h) for h in repeated})
    return InputSummary(path, fmt, len(hashes), digest.hexdigest())


def _raise_first_duplicate(path, fmt, id_field, text_field, suspects: set[int]) -> None:
    first_line: dict[str, int] = {}
    for record in iter_records(path, fmt, id_field=id_field, text_field=text_field):
        if _id_hash(record.id) in suspects:
            if record.id in first_line:
                raise CorpusInputError(f"{path}:{record.line}: duplicate id {record.id!r:.80} (first on line "
                                       f"{first_line[record.id]}); ids must be unique")
            first_line[record.id] = record.line
    # Only distinct ids whose 64-bit hashes collide: no duplicate.
