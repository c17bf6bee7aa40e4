"""``gircse eval-mteb``: MTEB tasks through ``mteb.evaluate`` (needs mteb, and the network for its task data).

    gircse eval-mteb --tasks STS12,SciFact
"""
from __future__ import annotations

import json

from .common import _add_model_arguments, _check_batch_size, _fail, _load


def add_eval_mteb_parser(sub) -> None:
    parser = sub.add_parser("eval-mteb", help="run MTEB tasks with mteb.evaluate (needs mteb; downloads task data)")
    _add_model_arguments(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated MTEB task names, e.g. STS12,SciFact")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output-folder", default=None, help="results cache folder (default: mteb's, ~/.cache/mteb)")
    parser.add_argument("--name", default=None, help="model name the results are filed under (org/name)")
    parser.set_defaults(func=run_eval_mteb)


def run_eval_mteb(args) -> int:
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names:
        _fail("eval-mteb", "--tasks is empty")
    _check_batch_size("eval-mteb", args.batch_size)
    try:
        import mteb
        from mteb.cache import ResultCache

        from ..mteb import GIRCSEEncoder
    except ImportError:
        _fail("eval-mteb", "needs mteb: pip install 'gircse[mteb]'")
    try:
        tasks = mteb.get_tasks(tasks=names)
    except KeyError as exc:
        _fail("eval-mteb", f"unknown task: {exc}")
    model = _load(args)
    kwargs = {"cache": ResultCache(args.output_folder)} if args.output_folder else {}
    results = mteb.evaluate(GIRCSEEncoder(model, name=args.name), tasks, co2_tracker=False,
                            encode_kwargs={"batch_size": args.batch_size}, **kwargs)
    summary = {r.task_name: {split: [s["main_score"] for s in scores] for split, scores in r.scores.items()}
               for r in results.task_results}
    print(json.dumps({"model": args.model, "main_score": summary}, indent=2))
    return 0
