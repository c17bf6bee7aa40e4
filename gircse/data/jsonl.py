"""Streaming reader for contrastive training rows (the bge / FlagEmbedding JSONL format).

One JSON object per line: ``{"query": str, "pos": [str, ...], "neg": [str, ...], "instruction": str}``.
``pos`` needs at least one non-empty string; ``neg`` may be empty or absent; ``instruction`` may be
absent or null (the query is then embedded without one). Extra keys are kept. Blank lines are
skipped. ``.gz`` files are decompressed on the fly. Errors name the file and the 1-based line.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Iterator

from ..validation import lone_surrogate

__all__ = ["DataError", "check_row_text", "count_rows", "iter_rows", "json_line", "numbered_lines", "read_jsonl",
           "validate_row", "write_jsonl_gz"]


class DataError(ValueError):
    """A malformed training row; the message names the file and line."""


def numbered_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file (``.gz``: decompressed on the fly), split where Python's
    text mode splits (``\\n``, ``\\r\\n``, ``\\r``). Bytes that are not UTF-8, a ``.gz`` that is not gzip
    data or is cut short, raise DataError naming the file (and the line); a directory, IsADirectoryError."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a JSONL file")
    compressed = path.endswith(".gz")
    number = 0
    with (gzip.open if compressed else open)(path, "rb") as f:
        try:
            for raw in f:  # bytes up to each b"\n": decoded one line at a time, so an error names its line
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(f"{path}:{number + 1}: not UTF-8 text (byte {error.start} of the line: "
                                    f"{error.reason}); save the file as UTF-8") from None
                pieces = text.replace("\r\n", "\n").split("\r")
                if len(pieces) > 1 and pieces[-1] == "":
                    pieces.pop()  # a final lone "\r" ends the last line
                for piece in pieces:
                    number += 1
                    yield number, piece
        except (OSError, EOFError, zlib.error) as error:
            if not compressed:
                raise
            where = f"after line {number}" if number else "at its start"
            raise DataError(f"{path}: not a readable gzip file {where} ({error}); a .gz name must hold "
                            "gzip-compressed JSONL") from None


def json_line(line: str, where: str):
    """One JSONL line parsed; a malformed one raises DataError naming ``where`` (``path:line``)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_jsonl(path: str | os.PathLike) -> list:
    """Every non-blank line of a JSONL(.gz) file, parsed; errors name the file and line."""
    path = os.fspath(path)
    return [json_line(line, f"{path}:{number}") for number, line in numbered_lines(path) if line.strip()]


def check_row_text(value, name: str, where: str) -> str:
    """A non-empty, well-formed string (a JSON ``"\\ud800"`` escape gives a lone surrogate, which is not
    text); DataError naming ``where`` (``path:line``) and the field otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {name} must be a non-empty string, got {value!r:.60}")
    position = lone_surrogate(value)
    if position is not None:
        raise DataError(f"{where}: {name} is not valid Unicode: a lone surrogate {value[position]!r} at character "
                        f"{position}")
    return value


def _nonempty_str_list(value, key: str, where: str, *, min_items: int) -> list[str]:
    if isinstance(value, str):
        value = [value]  # tolerated: a single string for a one-element list
    if not isinstance(value, list):
        raise DataError(f"{where}: {key!r} must be a list of strings, got {type(value).__name__} {value!r:.60}")
    for i, item in enumerate(value):
        check_row_text(item, f"{key}[{i}]", where)
    if len(value) < min_items:
        raise DataError(f"{where}: {key!r} needs at least {min_items} item(s), got {len(value)}")
    return value


def validate_row(row, where: str = "row") -> dict:
    """The row with ``pos``/``neg`` as lists and ``instruction`` present (None if absent); DataError otherwise.

    ``neg`` absent or null means no hard negatives; any other value must be a string or a list of them
    (``0``, ``false``, ``{}`` are errors, not "none"). A text in both ``pos`` and ``neg`` is an error
    (a contradictory row). An empty or whitespace-only ``instruction`` means none.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    check_row_text(row.get("query"), "'query'", where)
    if "pos" not in row:
        raise DataError(f"{where}: missing 'pos' (a list with at least one positive text)")
    out = dict(row)
    out["pos"] = _nonempty_str_list(row["pos"], "pos", where, min_items=1)
    negatives = row.get("neg")
    out["neg"] = [] if negatives is None else _nonempty_str_list(negatives, "neg", where, min_items=0)
    both = set(out["pos"]) & set(out["neg"])
    if both:
        raise DataError(f"{where}: {sorted(both)[0]!r:.60} is in both 'pos' and 'neg'; a text cannot be a positive "
                        "and a hard negative of the same query")
    instruction = row.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise DataError(f"{where}: 'instruction' must be a string or null, got {type(instruction).__name__}")
    if instruction is not None and not instruction.strip():
        instruction = None
    out["instruction"] = None if instruction is None else check_row_text(instruction, "'instruction'", where)
    return out


def iter_rows(path: str | os.PathLike, *, skip: int = 0, min_neg: int = 0) -> Iterator[dict]:
    """Stream validated rows from a JSONL (or .jsonl.gz) file, skipping the first ``skip`` rows
    (still parsed cheaply: only counted). ``min_neg``: require that many hard negatives per row."""
    path = os.fspath(path)
    seen = 0
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        seen += 1
        if seen <= skip:
            continue
        where = f"{path}:{number}"
        row = validate_row(json_line(line, where), where)
        if len(row["neg"]) < min_neg:
            raise DataError(f"{where}: {len(row['neg'])} hard negative(s), training asks for {min_neg} "
                            "per row (lower num_negatives)")
        row["_line"] = number
        yield row


def count_rows(path: str | os.PathLike) -> int:
    """Number of non-blank lines (rows) without parsing them."""
    return sum(1 for _, line in numbered_lines(path) if line.strip())


def write_jsonl_gz(path: str | os.PathLike, rows: list[dict]) -> str:
    """Write ``rows`` as gzip'd JSONL (sorted keys, gzip mtime 0: the same rows give the same bytes), atomically
    (a temporary file, then a rename); returns the SHA-256 of the bytes written."""
    path = os.fspath(path)
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    return hashlib.sha256(buf.getvalue()).hexdigest()
