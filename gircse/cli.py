"""Command line (console script ``gircse``, also ``python -m gircse``).

  gircse demo                                   embed a small corpus with the default model, search it
  gircse encode --instruction "..." < texts.txt > vectors.npy
  gircse train --model smollm2-135m --data train.jsonl --method gircse --k 5 --out runs/x
  gircse eval --task file.jsonl | scale --task file.jsonl --ks 1,5,20 | explain "text" | eval-mteb --tasks STS12
                                                (gircse/eval_cli.py)

One ``add_<name>_parser`` + ``run_<name>`` pair per subcommand; ``build_parser`` lists them, so a new
subcommand is one function pair and one line.

User errors (a bad option, a missing or malformed file) print one line, ``gircse <cmd>: <what is wrong>``,
and exit with status 2, before any model is loaded wherever they can be detected that early.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time

DEMO_DOCUMENTS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "A good night's sleep improves memory and concentration.",
    "Python is a popular programming language for data science and machine learning.",
    "The Amazon rainforest is home to millions of species of plants and animals.",
    "Mount Everest is the highest mountain above sea level, in the Himalayas.",
    "Regular exercise lowers the risk of heart disease.",
]
DEMO_QUERIES = [
    "famous landmark in the French capital",
    "how do plants make food from sunlight",
    "which language should I learn to write machine learning code",
    "tallest peak on Earth",
    "why is sleep important for the brain",
]
DEMO_INSTRUCTION = "Given a question, retrieve passages that answer it"
DEMO_ANSWERS = {0: 0, 1: 1, 2: 4, 3: 6, 4: 3}  # query index -> the document that answers it
# --dtype names (== gircse.loading.DTYPES, tested; not imported here so parsing needs no torch)
DTYPE_NAMES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


# ---------------------------------------------------------------------- errors and option types
class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, ``<prog>: <message>``, and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def user_error(prog: str, error: BaseException) -> int:
    """Print ``<prog>: <message>`` as one line on stderr; the exit status of a user error (2)."""
    print(f"{prog}: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def run_command(prog: str, func, args) -> int:
    """``func(args)``, with user errors (ValueError, e.g. a bad option or a malformed file; OSError,
    e.g. a missing file; ImportError, a package the chosen model or command needs and the error names)
    reported as one line and status 2 instead of a traceback."""
    try:
        return func(args)
    except (ValueError, OSError, ImportError) as error:
        return user_error(prog, error)


def int_at_least(minimum: int):
    """An argparse ``type``: an int >= ``minimum``, checked while parsing (before anything is loaded)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def check_device(device: str | None) -> None:
    """--device names a device torch knows and this machine has."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r}: {error}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine")


def check_model_options(args) -> None:
    """Every model option that can be checked without loading the model (numbers and --dtype are
    checked by the parser)."""
    from . import loading

    if args.model in (None, "default"):
        if args.adapter is not None:
            raise ValueError("--adapter needs --model (the base model it was trained on)")
        loading.resolve_model_source("smollm2-135m")  # the default's base: its package must be installed
    else:
        model = loading.check_model_reference(args.model, what="--model")
        if model.lower() in loading.SMOLLM2_ALIASES:
            loading.resolve_model_source(model)
        if loading.is_gircse_dir(model):
            loading.read_config(model)  # a malformed or inconsistent config fails here, not after loading
    if args.adapter is not None and not os.path.isfile(os.path.join(args.adapter, loading.ADAPTER_CONFIG_FILE)):
        raise FileNotFoundError(f"--adapter: no peft adapter in {args.adapter} (no {loading.ADAPTER_CONFIG_FILE})")
    check_device(args.device)


def check_output_path(path: str, option: str = "--output") -> None:
    """A file path that can be written: not a directory, in an existing, writable directory."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{option} {path} is a directory; name a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        raise PermissionError(f"{option} {path}: not writable")


@contextlib.contextmanager
def _quiet_loading():
    """Hide transformers' loading bars (the GGUF de-quantization bar is a bare tqdm) in CLI output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        hf_logging.enable_progress_bar()


def _load(args):
    """The model every command runs, after ``check_model_options`` (so no command ignores an option)."""
    import gircse

    check_model_options(args)
    with _quiet_loading():
        if args.model in (None, "default"):
            return gircse.load_default(method=args.method, k=args.k, device=args.device, dtype=args.dtype,
                                       max_length=args.max_length, prompt_style=args.prompt_style)
        return gircse.GIRCSE.from_pretrained(args.model, method=args.method, k=args.k, adapter=args.adapter,
                                             device=args.device, dtype=args.dtype, max_length=args.max_length,
                                             prompt_style=args.prompt_style)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M + shipped adapter), 'smollm2-135m', a saved GIRCSE "
                             "directory, or a transformers causal LM path/id")
    parser.add_argument("--method", choices=("gircse", "causal-eos", "bidirectional-avg", "two-stage"), default=None,
                        help="default: the saved directory's method, else gircse")
    parser.add_argument("--k", type=int_at_least(1), default=None,
                        help="soft tokens to generate (default: saved, else 20; 5 with --prompt-style reference)")
    parser.add_argument("--adapter", default=None, help="peft adapter directory to attach")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--max-length", type=int_at_least(2), default=None,
                        help="input tokens kept (default: saved, else 512; the shipped model: 128)")
    parser.add_argument("--prompt-style", choices=("gircse", "reference"), default=None,
                        help="'reference': the authors' prompts (their released adapters); default: saved, else gircse")


# ---------------------------------------------------------------------- demo
def add_demo_parser(sub) -> None:
    parser = sub.add_parser("demo", help="embed a few sentences with the default model and run a semantic search")
    _add_model_arguments(parser)
    parser.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from .data.debian.dev import gold_ranks

    start = time.perf_counter()
    model = _load(args)
    loaded = time.perf_counter()
    print(f"model: {model.base_model} | method={model.method} k={model.k} | "
          f"adapter={'yes' if hasattr(model.model, 'peft_config') else 'no (untrained base)'} | "
          f"d={model.embedding_dim} | loaded in {loaded - start:.1f} s")
    docs = model.encode_documents(DEMO_DOCUMENTS)
    queries = model.encode_queries(DEMO_QUERIES, DEMO_INSTRUCTION)
    encoded = time.perf_counter()
    scores = model.similarity(queries, docs)
    for qi, query in enumerate(DEMO_QUERIES):
        ranking = scores[qi].argsort()[::-1]
        print(f"\nquery: {query}")
        for rank, di in enumerate(ranking[:2], start=1):
            print(f"  {rank}. {scores[qi, di]:.3f}  {DEMO_DOCUMENTS[di]}")
    ranks = gold_ranks(scores[list(DEMO_ANSWERS)], list(DEMO_ANSWERS.values()))  # ties count against
    hits = int((ranks == 1).sum())
    n = len(DEMO_DOCUMENTS) + len(DEMO_QUERIES)
    print(f"\ntop-1 correct: {hits}/{len(DEMO_ANSWERS)} | embedded {n} texts in {encoded - loaded:.2f} s")
    if model.method == "gircse":
        # The paper's Table 4 view: what each soft token "says" (top tokens of s_k).
        print(f"\nsoft tokens generated for: {DEMO_DOCUMENTS[0]}")
        for step, tokens in enumerate(model.explain(DEMO_DOCUMENTS[0], k=min(model.k, 5), top=5), start=1):
            print(f"  s_{step}: " + "  ".join(f"{tok!r} {p:.2f}" for tok, p in tokens))
    return 0


# ---------------------------------------------------------------------- encode
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
    if args.output == "-":
        if sys.stdout.isatty():
            raise ValueError("stdout is a terminal; redirect it to a file or give --output FILE.npy")
    else:
        check_output_path(args.output)
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


# ---------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gircse", description="GIRCSE generative text embeddings")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    add_encode_parser(sub)
    from gircse.training.cli import add_train_parser  # gircse train (no torch import at parse time)

    add_train_parser(sub)
    from gircse.serve.cli import add_serve_parser  # gircse serve (fastapi is imported only when it runs)
    add_serve_parser(sub)
    from gircse import eval_cli  # gircse eval / scale / explain / eval-mteb (no torch import at parse time)

    eval_cli.add_eval_parser(sub)
    eval_cli.add_scale_parser(sub)
    eval_cli.add_explain_parser(sub)
    eval_cli.add_eval_mteb_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"gircse {args.command}", args.func, args)
