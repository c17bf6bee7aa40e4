"""Print the training table of docs/training.md (every dev result of issues 16 and 26 and the first runs).

Reads the committed runs under bench/results/training/ (run from anywhere):

    python bench/probes/training/comparison_table.py
"""
import argparse
import json
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "results", "training")
RUNS = [  # (label, dev results, training config or None for an untrained model)
    ("raw SmolLM2, EOS state", "untrained/causal-eos/dev.json", None),
    ("raw SmolLM2, GIRCSE", "untrained/gircse/dev.json", None),
    ("Causal-EOS, first run", "first-runs/313-steps/causal-eos/dev.json", "first-runs/313-steps/causal-eos/train_config.json"),
    ("GIRCSE, first run (default adapter until now)", "first-runs/313-steps/gircse/dev.json",
     "first-runs/313-steps/gircse/train_config.json"),
    ("Causal-EOS, 150 steps", "lr-sweep-150-steps-causal-eos/causal-eos-lr1e-4/dev.json",
     "lr-sweep-150-steps-causal-eos/causal-eos-lr1e-4/train_config.json"),
    ("Causal-EOS, tau 0.05", "comparison/causal-eos-tau0.05/dev.json", "comparison/causal-eos-tau0.05/train_config.json"),
    ("GIRCSE, tau 0.05 (the default adapter until issue 26)", "comparison/gircse-tau0.05/dev.json",
     "comparison/gircse-tau0.05/train_config.json"),
    ("GIRCSE, tau 0.05, at step 200", "comparison/gircse-tau0.05/step200-dev.json",
     "comparison/gircse-tau0.05/train_config.json"),
    ("GIRCSE, tau 0.05, step losses averaged", "comparison/gircse-tau0.05-mean/dev.json",
     "comparison/gircse-tau0.05-mean/train_config.json"),
    ("GIRCSE, tau 0.05, clipped, at step 200", "issue26/gircse-clip1-s200/dev.json",
     "issue26/gircse-clip1-s200/train_config.json"),
    ("GIRCSE, tau 0.05, clipped (the default adapter)", "issue26/gircse-clip1/dev.json",
     "issue26/gircse-clip1/train_config.json"),
    ("Causal-EOS, tau 0.05, clipped, at step 200", "issue26/causal-eos-clip1-s200/dev.json",
     "issue26/causal-eos-clip1-s200/train_config.json"),
    ("Causal-EOS, tau 0.05, clipped", "issue26/causal-eos-clip1/dev.json", "issue26/causal-eos-clip1/train_config.json"),
]


def main():
    print("| model | tau | hard negatives | lr | step losses | grad clip | steps trained (of its schedule) | K | nDCG@10 "
          "| MRR@10 | R@1 | R@10 | section kNN acc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, dev_path, config_path in RUNS:
        dev = json.load(open(os.path.join(ROOT, dev_path)))
        if config_path:
            c = json.load(open(os.path.join(ROOT, config_path)))
            steps = label.rsplit("step ", 1)[1] if "at step" in label else str(c["total_steps"])
            reduction = c.get("step_reduction", "sum") if c["method"] == "gircse" else "-"
            clip = "-" if c.get("max_grad_norm") is None else f"{c['max_grad_norm']:g}"
            setting = [str(c["temperature"]), str(c["num_negatives"]), f"{c['lr']:g}", reduction, clip,
                       f"{steps} ({c['total_steps']})"]
        else:
            setting = ["-"] * 6
        for k in dev["k"]:
            r, cl = dev["retrieval"][str(k)], dev["classification"][str(k)]
            k_text = str(k) if dev["method"] == "gircse" else "-"
            print(f"| {label} | " + " | ".join(setting) + f" | {k_text} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} | "
                  f"{r['recall@1']:.4f} | {r['recall@10']:.4f} | {cl['knn_accuracy']:.4f} |")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
