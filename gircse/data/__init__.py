"""Training data: the JSONL row format (streamed, validated) and the Debian package-description builder.

``gircse.data.jsonl``: ``iter_rows(path)`` streams ``{"query", "pos", "neg", "instruction"}`` rows
(plain or .gz) with line-numbered errors. ``gircse.data.debian``: builds and ships the Debian
training/dev sets (``python -m gircse.data.debian build --out DIR``); ``shipped_path(name)`` finds them.
"""
from .jsonl import DataError, count_rows, iter_rows, validate_row

__all__ = ["DataError", "count_rows", "iter_rows", "validate_row"]
