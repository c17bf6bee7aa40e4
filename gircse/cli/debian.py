"""``python -m gircse.data.debian``: build the Debian training / dev sets, evaluate a model on the dev tasks.

    python -m gircse.data.debian build --out DIR       (gircse.data.debian.build)
    python -m gircse.data.debian eval [--model ...] [--k 1,3,5,10,15,20] [--output result.json]
"""
from __future__ import annotations

import argparse
import json
import sys

from ..data.debian import DEFAULT_TRANSLATIONS, build
from ..methods import METHODS
from .common import DTYPE_NAMES, OneLineParser, check_output_path, int_at_least, run_command


def _k_list(text: str) -> list[int]:
    """--k: comma-separated K values, each an int >= 1."""
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"every K must be >= 1, got {text!r}")
    return ks


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m gircse.data.debian",
                           description="Build contrastive training/dev sets from Debian package descriptions")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build train / dev_retrieval / dev_classification (.jsonl.gz) + manifest.json")
    b.add_argument("--out", required=True)
    b.add_argument("--translations", default=DEFAULT_TRANSLATIONS, help="glob of Translation-en files (lz4/gz/xz/plain)")
    b.add_argument("--dumpavail", default=None, help="file with 'apt-cache dumpavail' output (default: run it)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--n-train", type=int, default=6000)
    b.add_argument("--n-dev", type=int, default=500)
    b.add_argument("--n-class-per-section", type=int, default=40)
    b.add_argument("--negatives", type=int, default=2)
    b.add_argument("--min-chars", type=int, default=120)
    b.add_argument("--max-chars", type=int, default=700)
    b.add_argument("--max-per-section", type=int, default=700)
    e = sub.add_parser("eval", help="dev retrieval + section classification of a model, per K (scaling curve)")
    e.add_argument("--model", default="default", help="'default', 'smollm2-135m', a saved GIRCSE directory, ...")
    e.add_argument("--method", default=None, choices=METHODS)
    e.add_argument("--k", type=_k_list, default=[1, 3, 5, 10, 15, 20],
                   help="comma-separated K values >= 1 (one pass with max K; default 1,3,5,10,15,20)")
    e.add_argument("--batch-size", type=int_at_least(1), default=32)
    e.add_argument("--limit", type=int_at_least(1), default=None,
                   help="first N >= 1 rows of each dev set (quick checks; default: all)")
    e.add_argument("--dtype", choices=DTYPE_NAMES, default=None)
    e.add_argument("--output", default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.command == "eval":
        return run_command(f"{parser.prog} eval", _run_eval, args)
    manifest = build(args.out, translations=args.translations, dumpavail=args.dumpavail, seed=args.seed,
                     n_train=args.n_train, n_dev=args.n_dev, n_class_per_section=args.n_class_per_section,
                     negatives=args.negatives, min_chars=args.min_chars, max_chars=args.max_chars,
                     max_per_section=args.max_per_section)
    for name, info in manifest["files"].items():
        print(f"{name}: {info['rows']} rows", file=sys.stderr)
    return 0


def _run_eval(args) -> int:
    import gircse

    from .. import loading
    from ..data.debian.dev import evaluate, format_table

    if args.output is not None:
        check_output_path(args.output)
    if args.model == "default":
        model = gircse.load_default(method=args.method, dtype=args.dtype)
    else:
        loading.check_model_reference(args.model, what="--model")
        model = gircse.GIRCSE.from_pretrained(args.model, method=args.method, dtype=args.dtype)
    result = evaluate(model, ks=args.k, batch_size=args.batch_size, limit=args.limit, show_progress_bar=True)
    result["model"] = args.model
    print(format_table(result))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0
