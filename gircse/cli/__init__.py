"""Command line (console script ``gircse``, also ``python -m gircse``).

  gircse demo                                   embed a small corpus with the default model, search it
  gircse encode --instruction "..." < texts.txt > vectors.npy
  gircse encode-corpus docs.jsonl.gz out/       resumable shards; torchrun --nproc_per_node N -m gircse encode-corpus ...
  gircse search out/ "query" --top 10           exact top-k over an encoded corpus
  gircse train --model smollm2-135m --data train.jsonl --method gircse --k 5 --out runs/x
  gircse serve --model runs/x --port 8000       OpenAI-compatible embeddings server
  gircse eval --task file.jsonl | scale --task file.jsonl --ks 1,5,20 | explain "text" | eval-mteb --tasks STS12

One module per subcommand (``gircse.cli.demo``, ``.encode``, ``.encode_corpus``, ``.search``, ``.train``,
``.serve``, ``.eval``, ``.scale``, ``.explain``, ``.eval_mteb``), each with an ``add_<name>_parser`` + ``run_<name>`` pair; ``build_parser``
lists them, so a new subcommand is one module and one line. ``gircse.cli.common`` holds what they share;
``gircse.cli.debian`` is the command line of ``python -m gircse.data.debian``. The library never imports
from this package.

User errors (a bad option, a missing or malformed file) print one line, ``gircse <cmd>: <what is wrong>``,
and exit with status 2, before any model is loaded wherever they can be detected that early. Building the
parser imports neither torch nor the server's dependencies.
"""
from __future__ import annotations

import argparse

from . import demo, encode, encode_corpus, eval, eval_mteb, explain, scale, search, serve, train
from .common import OneLineParser, run_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gircse", description="GIRCSE generative text embeddings")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_demo_parser(sub)
    encode.add_encode_parser(sub)
    encode_corpus.add_encode_corpus_parser(sub)
    search.add_search_parser(sub)
    train.add_train_parser(sub)
    serve.add_serve_parser(sub)
    eval.add_eval_parser(sub)
    scale.add_scale_parser(sub)
    explain.add_explain_parser(sub)
    eval_mteb.add_eval_mteb_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"gircse {args.command}", args.func, args)
