"""``gircse eval``: metrics of a model on a local JSONL task file, as JSON (``gircse.evaluation``).

    gircse eval --task file.jsonl [--instruction ...] [--k ...]

Arguments are checked (and the task file parsed) before the model loads; a user error prints one
``gircse eval: ...`` line and exits with status 2.
"""
from __future__ import annotations

from .common import _add_task_arguments, _check_batch_size, _load, _load_task, _write_json, check_output_path


def add_eval_parser(sub) -> None:
    parser = sub.add_parser("eval", help="evaluate on a local JSONL task file (retrieval, STS, pairs, classification)")
    _add_task_arguments(parser)
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    parser.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from ..evaluation import evaluate

    _check_batch_size("eval", args.batch_size)
    if args.output is not None:
        check_output_path(args.output, other_files={"--task": args.task})  # before the evaluation, not after it
    task = _load_task("eval", args.task)
    model = _load(args)
    result = evaluate(model, task, instruction=args.instruction, document_instruction=args.document_instruction,
                      batch_size=args.batch_size, show_progress_bar=args.progress)
    result["model"] = args.model
    _write_json(result, args.output)
    return 0
