"""README artefacts from dev-evaluation JSONs: the comparison table and the test-time scaling plot.

    python -m gircse.data.debian.report raw=raw.json causal-eos=ce.json gircse=g.json \
        --plot docs/k_scaling.png

Each JSON is what ``python -m gircse.data.debian eval --output`` writes. The plot needs matplotlib
(not a dependency of the package; ``pip install matplotlib``).
"""
from __future__ import annotations

import argparse


def comparison_table(results: dict[str, dict]) -> str:
    """One row per (model, K): every K for GIRCSE-method results, the single entry for baselines."""
    lines = ["| model | method | K | nDCG@10 | MRR@10 | R@1 | R@10 | section kNN acc |",
             "|---|---|---|---|---|---|---|---|"]
    for label, result in results.items():
        for k in result["k"]:
            r, c = result["retrieval"][str(k)], result["classification"][str(k)]
            k_text = str(k) if result["method"] == "gircse" else "-"
            lines.append(f"| {label} | {result['method']} | {k_text} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} | "
                         f"{r['recall@1']:.4f} | {r['recall@10']:.4f} | {c['knn_accuracy']:.4f} |")
    return "\n".join(lines)


def plot_k_scaling(results: dict[str, dict], path: str) -> None:
    """nDCG@10 and kNN accuracy against K; one-step baselines drawn as horizontal lines."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    metrics = [("retrieval", "ndcg@10", "retrieval nDCG@10"), ("classification", "knn_accuracy", "section kNN accuracy")]
    baseline_styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]  # one per one-step baseline, so they stay apart
    baseline_colors = ["black", "tab:brown", "tab:cyan", "tab:olive"]  # trained baselines; raw ones are gray
    for ax, (task, metric, title) in zip(axes, metrics):
        baselines = trained = 0
        for label, result in results.items():
            ks = result["k"]
            ys = [result[task][str(k)][metric] for k in ks]
            if result["method"] == "gircse":
                ax.plot(ks, ys, marker="o", label=label)
            else:
                raw = "raw" in label
                ax.axhline(ys[0], linestyle=baseline_styles[baselines % len(baseline_styles)],
                           color="gray" if raw else baseline_colors[trained % len(baseline_colors)], label=label)
                baselines += 1
                trained += not raw
        ax.set_xlabel("K (soft tokens at test time)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    # one legend under both panels, so no curve hides behind it
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("Debian dev tasks, SmolLM2-135M: test-time scaling with K (GIRCSE trained at K=5)")
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(results) + 2) // 3), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    from ...loading import read_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="label=path.json, in table order")
    parser.add_argument("--plot", help="write the K-scaling PNG here")
    args = parser.parse_args(argv)
    results = {}
    for item in args.results:
        label, sep, path = item.rpartition("=")  # labels may contain "=", paths rarely do
        if not sep:
            parser.error(f"results must be label=path.json, got {item!r}")
        results[label] = read_json(path)  # a malformed file is named
    print(comparison_table(results))
    if args.plot:
        plot_k_scaling(results, args.plot)


if __name__ == "__main__":
    main()
