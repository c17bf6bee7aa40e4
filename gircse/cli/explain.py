"""``gircse explain``: the top tokens of each generated soft token (the paper's Table 4).

    gircse explain "text" [--instruction ...] [--k ...] [--top 10] [--json]
"""
from __future__ import annotations

import json

from .common import _add_model_arguments, _fail, _load


def add_explain_parser(sub) -> None:
    parser = sub.add_parser("explain", help="top tokens of each generated soft token (the paper's Table 4)")
    _add_model_arguments(parser)
    parser.add_argument("text", help="the text to embed")
    parser.add_argument("--instruction", default=None)
    parser.add_argument("--top", type=int, default=10, help="tokens shown per step")
    parser.add_argument("--json", action="store_true", help="print [[token, probability], ...] per step as JSON")
    parser.set_defaults(func=run_explain)


def run_explain(args) -> int:
    if not args.text.strip():
        _fail("explain", "the text is empty")
    if args.top < 1:
        _fail("explain", f"--top must be >= 1, got {args.top}")
    if args.method not in (None, "gircse"):
        _fail("explain", f"explain shows soft-token distributions; method {args.method!r} generates none")
    model = _load(args)
    steps = model.explain(args.text, args.instruction, k=model.k, top=args.top)
    if args.json:
        print(json.dumps([[[token, p] for token, p in step] for step in steps], ensure_ascii=False))
    else:
        for number, tokens in enumerate(steps, start=1):
            print(f"s_{number}: " + "  ".join(f"{token!r} {p:.3f}" for token, p in tokens))
    return 0
