"""``gircse encode``: one text per input line -> one embedding per row of a .npy array.

    gircse encode --instruction "..." < texts.txt > vectors.npy
"""
from __future__ import annotations

import os
import sys

from .common import (_add_model_arguments, _load, check_instruction_options, check_model_options,
                     check_output_path, int_at_least)


def add_encode_parser(sub) -> None:
    parser = sub.add_parser("encode", help="embed one text per line of stdin (or --input); write a .npy")
    _add_model_arguments(parser)
    parser.add_argument("--instruction", default=None, help="query instruction (omit for documents)")
    parser.add_argument("--input", default="-",
                        help="UTF-8 text file, one text per line: lines end at \\n (and \\r\\n) only (default: stdin)")
    parser.add_argument("--output", default="-", help="file to write the .npy array to, exactly this path "
                                                      "(default: stdout)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    parser.add_argument("--no-normalize", action="store_true", help="skip L2 normalization")
    parser.add_argument("--all-steps", action="store_true", help="write [n, k, d]: z_1..z_k")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    parser.set_defaults(func=run_encode)


def _read_lines(path: str) -> list[str]:
    """One text per line, lines ending at "\\n" only (a "\\r" before it is the CRLF line end and is dropped).
    Not ``str.splitlines``: a form feed, U+2028 or a lone "\\r" inside a line stays in its text, so
    row i of the output is always line i of the input."""
    if path == "-":
        name, stream = "stdin", sys.stdin
        data = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode("utf-8")
    else:
        name = path
        if os.path.isdir(path):
            raise IsADirectoryError(f"--input {path} is a directory; name a text file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input: no such file: {path}")
        with open(path, "rb") as f:  # bytes: text mode would turn a lone CR into a line break
            data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{name} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline ending the last line
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if not lines:
        raise ValueError(f"{name}: no input texts")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{name}: line {number} is empty; give one non-empty text per line")
    return lines


def run_encode(args) -> int:
    import numpy as np

    check_model_options(args)  # before reading stdin (``_load`` checks again; a small JSON read at most)
    check_instruction_options(args)
    if args.output == "-":
        if sys.stdout.isatty():
            raise ValueError("stdout is a terminal; redirect it to a file or give --output FILE.npy")
    else:
        check_output_path(args.output, other_files={"--input": args.input})
    texts = _read_lines(args.input)
    model = _load(args)
    vectors = model.encode(texts, args.instruction, batch_size=args.batch_size,
                           normalize_embeddings=not args.no_normalize, return_all_steps=args.all_steps,
                           show_progress_bar=args.progress or None)
    if args.output == "-":
        np.save(sys.stdout.buffer, vectors)
        sys.stdout.buffer.flush()
    else:
        with open(args.output, "wb") as f:  # np.save(path) would append ".npy" to a path without it
            np.save(f, vectors)
    print(f"gircse encode: {vectors.shape} -> {args.output if args.output != '-' else 'stdout'}",
          file=sys.stderr)
    return 0
