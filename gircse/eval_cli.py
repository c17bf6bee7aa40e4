"""Evaluation subcommands of the ``gircse`` command line (registered in ``gircse.cli.build_parser``).

  gircse eval --task file.jsonl [--instruction ...] [--k ...]     metrics as JSON (gircse.evaluation)
  gircse scale --task file.jsonl --ks 1,3,5,10,15,20             score vs K: JSON + PNG, one encoding pass
  gircse explain "text" [--instruction ...] [--k ...] [--top 10]  top tokens of each soft token (paper Table 4)
  gircse eval-mteb --tasks STS12,SciFact                          mteb.evaluate (needs mteb and network)

Arguments are checked (and task files parsed) before the model loads; a user error prints one
``gircse <command>: ...`` line and exits with status 2.
"""
from __future__ import annotations

import json
import os
import sys

from .cli import _add_model_arguments, _load, check_output_path

__all__ = ["add_eval_mteb_parser", "add_eval_parser", "add_explain_parser", "add_scale_parser", "run_eval",
           "run_eval_mteb", "run_explain", "run_scale"]


def _fail(command: str, message: str):
    print(f"gircse {command}: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load_task(command: str, path: str):
    from .data.jsonl import DataError
    from .evaluation import load_task

    try:
        return load_task(path)
    except (DataError, FileNotFoundError) as exc:
        _fail(command, str(exc))


def _add_task_arguments(parser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--task", required=True, help="JSONL task file (.gz ok); see gircse.evaluation for the rows")
    parser.add_argument("--instruction", default=None, help="instruction for rows without their own")
    parser.add_argument("--document-instruction", default=None, help="retrieval documents (default: bare)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--progress", action="store_true", help="show encoding progress bars")


def _write_json(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=2)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)


def _check_batch_size(command: str, batch_size: int) -> None:
    if batch_size < 1:
        _fail(command, f"--batch-size must be >= 1, got {batch_size}")


# ---------------------------------------------------------------------- eval
def add_eval_parser(sub) -> None:
    parser = sub.add_parser("eval", help="evaluate on a local JSONL task file (retrieval, STS, pairs, classification)")
    _add_task_arguments(parser)
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    parser.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from .evaluation import evaluate

    _check_batch_size("eval", args.batch_size)
    if args.output is not None:
        check_output_path(args.output)  # before the evaluation, not after it
    task = _load_task("eval", args.task)
    model = _load(args)
    result = evaluate(model, task, instruction=args.instruction, document_instruction=args.document_instruction,
                      batch_size=args.batch_size, show_progress_bar=args.progress)
    result["model"] = args.model
    _write_json(result, args.output)
    return 0


# ---------------------------------------------------------------------- scale
def add_scale_parser(sub) -> None:
    parser = sub.add_parser("scale", help="test-time scaling: task metrics for several K from one encoding pass")
    _add_task_arguments(parser)
    parser.add_argument("--ks", default="1,3,5,10,15,20", help="comma-separated K values")
    parser.add_argument("--output", default="scale.json", help="JSON result (default: scale.json)")
    parser.add_argument("--plot", default=None, help="PNG of score vs K (default: --output with .png)")
    parser.set_defaults(func=run_scale)


def _parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        _fail("scale", f"--ks must be comma-separated integers, got {text!r}")
    if not ks or ks[0] < 1:
        _fail("scale", f"--ks must list K values >= 1, got {text!r}")
    return ks


def plot_scaling(result: dict, path: str) -> None:
    """Every metric of the task against K (one line each), written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = result["k"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric in result["metrics"][str(ks[0])]:
        ax.plot(ks, [result["metrics"][str(k)][metric] for k in ks], marker="o", label=metric)
    ax.set_xlabel("K (soft tokens generated at test time)")
    ax.set_ylabel("score")
    ax.set_title(f"{os.path.basename(result['task'])} ({result['type']}): {result.get('model', '')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_scale(args) -> int:
    from .evaluation import evaluate

    ks = _parse_ks(args.ks)
    _check_batch_size("scale", args.batch_size)
    if args.method not in (None, "gircse"):
        _fail("scale", f"test-time scaling needs method gircse (method {args.method!r} has one embedding per text)")
    try:
        import matplotlib  # noqa: F401  (checked before the model loads)
    except ImportError:
        _fail("scale", "the plot needs matplotlib: pip install matplotlib")
    plot = args.plot or os.path.splitext(args.output)[0] + ".png"
    check_output_path(args.output)
    check_output_path(plot, "--plot")
    task = _load_task("scale", args.task)
    model = _load(args)
    if model.method != "gircse":
        _fail("scale", f"test-time scaling needs method gircse; {args.model} is {model.method!r}")
    result = evaluate(model, task, ks=ks, instruction=args.instruction,
                      document_instruction=args.document_instruction, batch_size=args.batch_size,
                      show_progress_bar=args.progress)
    result["model"] = args.model
    _write_json(result, args.output)
    plot_scaling(result, plot)
    print(f"gircse scale: wrote {args.output} and {plot}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- explain
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


# ---------------------------------------------------------------------- eval-mteb
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

        from .mteb import GIRCSEEncoder
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
