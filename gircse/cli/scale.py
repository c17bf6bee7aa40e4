"""``gircse scale``: test-time scaling, the task's metrics for several K from one encoding pass (JSON + PNG).

    gircse scale --task file.jsonl --ks 1,3,5,10,15,20

Arguments are checked (and the task file parsed) before the model loads; a user error prints one
``gircse scale: ...`` line and exits with status 2.
"""
from __future__ import annotations

import os
import sys

from .common import (_add_task_arguments, _check_batch_size, _fail, _load, _load_task, _write_json,
                     check_output_path)


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
    from ..evaluation import evaluate

    ks = _parse_ks(args.ks)
    _check_batch_size("scale", args.batch_size)
    if args.method not in (None, "gircse"):
        _fail("scale", f"test-time scaling needs method gircse (method {args.method!r} has one embedding per text)")
    try:
        import matplotlib  # noqa: F401  (checked before the model loads)
    except ImportError:
        _fail("scale", "the plot needs matplotlib: pip install matplotlib")
    plot = args.plot or os.path.splitext(args.output)[0] + ".png"
    check_output_path(args.output, other_files={"--task": args.task})
    check_output_path(plot, "--plot" if args.plot else "--plot (--output with .png)",
                      other_files={"--task": args.task, "--output": args.output})
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
