"""Figures of the report (matplotlib: ``pip install matplotlib``, listed in requirements-ci.txt and the
``bench`` extra). Drawn from the report's tables, so ``python -m bench.plots report.json`` redraws them."""
from __future__ import annotations

import os
import sys

ENCODE_PLOT = "encode_vs_k.png"


def encode_vs_k(rows: list[dict], path: str, title: str) -> bool:
    """Encode time per batch against K: GIRCSE cached and uncached, Causal-EOS as a line; one panel
    per input length. False when the rows hold no GIRCSE measurement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["n"] for r in rows if r["method"].startswith("GIRCSE")})
    if not lengths:
        return False
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        for method, style in (("GIRCSE, KV cache", "o-"), ("GIRCSE, no cache", "s--")):
            points = sorted((r["k"], r["seconds"]) for r in rows if r["n"] == n and r["method"] == method)
            if points:
                ax.plot(*zip(*points), style, label=method)
        for method, style in (("Causal-EOS", ":"), ("Bidirectional-Avg", "-.")):
            base = [r["seconds"] for r in rows if r["n"] == n and r["method"] == method]
            if base:
                ax.axhline(base[0], linestyle=style, color="gray" if method == "Causal-EOS" else "silver",
                           label=method)
        ax.set_title(f"N = {n} tokens")
        ax.set_xlabel("K (soft tokens)")
        ax.set_ylabel("seconds per batch")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def add_plots(report, directory: str) -> None:
    """Draw the figures a :class:`bench.report.Report` has data for into ``directory`` and list them."""
    from .harness import describe

    model = report.sections.get("model")
    table = next((t for t in model.tables if t.id == "model/encode"), None) if model else None
    if table is None:
        return
    os.makedirs(directory, exist_ok=True)
    if encode_vs_k(table.rows, os.path.join(directory, ENCODE_PLOT), f"{model.title}\n{describe(report.env)}"):
        report.figures.append({"path": ENCODE_PLOT, "caption": "encode time vs K: cached / uncached / Causal-EOS"})


def main(argv: list[str] | None = None) -> int:
    from .report import find_table, load

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.plots bench/results/<machine>/report.json", file=sys.stderr)
        return 2
    data = load(argv[0])
    table = find_table(data, "model/encode")
    if table is None:
        print(f"{argv[0]}: no model/encode table", file=sys.stderr)
        return 1
    directory = os.path.dirname(os.path.abspath(argv[0])) if argv[0].endswith(".json") else argv[0]
    path = os.path.join(directory, ENCODE_PLOT)
    encode_vs_k(table["rows"], path, "encode time vs K")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
