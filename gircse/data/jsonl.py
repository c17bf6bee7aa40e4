"""Streaming reader for contrastive training rows (the bge / FlagEmbedding JSONL format).

One JSON object per line: ``{"query": str, "pos": [str, ...], "neg": [str, ...], "instruction": str}``.
``pos`` needs at least one non-empty string; ``neg`` may be empty or absent; ``instruction`` may be
absent or null (the query is then embedded without one). Extra keys are kept. Blank lines are
skipped. ``.gz`` files are decompressed on the fly. Errors name the file and the 1-based line.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator

__all__ = ["DataError", "count_rows", "iter_rows", "json_line", "open_text", "read_jsonl", "validate_row"]


class DataError(ValueError):
    """A malformed training row; the message names the file and line."""


def open_text(path: str | os.PathLike) -> io.TextIOBase:
    path = os.fspath(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def json_line(line: str, where: str):
    """One JSONL line parsed; a malformed one raises DataError naming ``where`` (``path:line``)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_jsonl(path: str | os.PathLike) -> list:
    """Every non-blank line of a JSONL(.gz) file, parsed; errors name the file and line."""
    path = os.fspath(path)
    with open_text(path) as f:
        return [json_line(line, f"{path}:{number}") for number, line in enumerate(f, start=1) if line.strip()]


def _nonempty_str_list(value, key: str, where: str, *, min_items: int) -> list[str]:
    if isinstance(value, str):
        value = [value]  # tolerated: a single string for a one-element list
    if not isinstance(value, list):
        raise DataError(f"{where}: {key!r} must be a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise DataError(f"{where}: {key}[{i}] must be a non-empty string, got {item!r:.60}")
    if len(value) < min_items:
        raise DataError(f"{where}: {key!r} needs at least {min_items} item(s), got {len(value)}")
    return value


def validate_row(row, where: str = "row") -> dict:
    """The row with ``pos``/``neg`` as lists and ``instruction`` present (None if absent); DataError otherwise."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    query = row.get("query")
    if not isinstance(query, str) or not query.strip():
        raise DataError(f"{where}: 'query' must be a non-empty string, got {query!r:.60}")
    if "pos" not in row:
        raise DataError(f"{where}: missing 'pos' (a list with at least one positive text)")
    out = dict(row)
    out["pos"] = _nonempty_str_list(row["pos"], "pos", where, min_items=1)
    out["neg"] = _nonempty_str_list(row.get("neg") or [], "neg", where, min_items=0)
    instruction = row.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise DataError(f"{where}: 'instruction' must be a string or null, got {type(instruction).__name__}")
    out["instruction"] = instruction if instruction else None
    return out


def iter_rows(path: str | os.PathLike, *, skip: int = 0, min_neg: int = 0) -> Iterator[dict]:
    """Stream validated rows from a JSONL (or .jsonl.gz) file, skipping the first ``skip`` rows
    (still parsed cheaply: only counted). ``min_neg``: require that many hard negatives per row."""
    path = os.fspath(path)
    seen = 0
    with open_text(path) as f:
        for number, line in enumerate(f, start=1):
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
    with open_text(path) as f:
        return sum(1 for line in f if line.strip())
