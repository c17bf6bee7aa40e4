"""Data: the JSONL row format (streamed, validated), the Debian package-description builder, held-out tasks.

``gircse.data.jsonl``: ``iter_rows(path)`` streams ``{"query", "pos", "neg", "instruction"}`` rows
(plain or .gz) with line-numbered errors. ``gircse.data.debian``: builds and ships the Debian
training/dev sets (``python -m gircse.data.debian build --out DIR``); ``shipped_path(name)`` finds them.
``gircse.data.wordnet``: held-out task files from another domain (English definitions), for evaluation only.
"""
from .jsonl import DataError, count_rows, iter_rows, validate_row

__all__ = ["DataError", "count_rows", "iter_rows", "validate_row"]
