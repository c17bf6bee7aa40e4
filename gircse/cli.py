"""Command line (console script ``gircse``, also ``python -m gircse``).

  gircse demo                                   embed a small corpus with the default model, search it
  gircse encode --instruction "..." < texts.txt > vectors.npy
  gircse train --model smollm2-135m --data train.jsonl --method gircse --k 5 --out runs/x
  gircse eval --task file.jsonl | scale --task file.jsonl --ks 1,5,20 | explain "text" | eval-mteb --tasks STS12
                                                (gircse/eval_cli.py)

One ``add_<name>_parser`` + ``run_<name>`` pair per subcommand; ``build_parser`` lists them, so a new
subcommand is one function pair and one line.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
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
    import gircse

    with _quiet_loading():
        if args.model in (None, "default"):
            if args.adapter is not None:
                raise SystemExit("gircse: --adapter needs --model (the base model it was trained on)")
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
    parser.add_argument("--k", type=int, default=None, help="soft tokens to generate (default: saved, else 20)")
    parser.add_argument("--adapter", default=None, help="peft adapter directory to attach")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU)")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--prompt-style", choices=("gircse", "reference"), default=None,
                        help="'reference': the authors' prompts (their released adapters); default: saved, else gircse")


# ---------------------------------------------------------------------- demo
def add_demo_parser(sub) -> None:
    parser = sub.add_parser("demo", help="embed a few sentences with the default model and run a semantic search")
    _add_model_arguments(parser)
    parser.set_defaults(func=run_demo)


def run_demo(args) -> int:
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
    expected = {0: 0, 1: 1, 2: 4, 3: 6, 4: 3}  # query index -> the document that answers it
    hits = sum(int(scores[q].argmax() == d) for q, d in expected.items())
    n = len(DEMO_DOCUMENTS) + len(DEMO_QUERIES)
    print(f"\ntop-1 correct: {hits}/{len(expected)} | embedded {n} texts in {encoded - loaded:.2f} s")
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
    parser.add_argument("--input", default="-", help="text file, one text per line (default: stdin)")
    parser.add_argument("--output", default="-", help=".npy path (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-normalize", action="store_true", help="skip L2 normalization")
    parser.add_argument("--all-steps", action="store_true", help="write [n, k, d]: z_1..z_k")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    parser.set_defaults(func=run_encode)


def _read_lines(path: str) -> list[str]:
    if path == "-":
        text = sys.stdin.read()
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise SystemExit(f"gircse encode: line {number} is empty; give one non-empty text per line")
    return lines


def run_encode(args) -> int:
    import numpy as np

    texts = _read_lines(args.input)
    if not texts:
        raise SystemExit("gircse encode: no input texts")
    model = _load(args)
    vectors = model.encode(texts, args.instruction, batch_size=args.batch_size,
                           normalize_embeddings=not args.no_normalize, return_all_steps=args.all_steps,
                           show_progress_bar=args.progress or None)
    if args.output == "-":
        np.save(sys.stdout.buffer, vectors)
        sys.stdout.buffer.flush()
    else:
        np.save(args.output, vectors)
    print(f"gircse encode: {vectors.shape} -> {args.output if args.output != '-' else 'stdout'}",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gircse", description="GIRCSE generative text embeddings")
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
    return args.func(args)
