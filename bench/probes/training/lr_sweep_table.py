"""Print an lr sweep's table (lr-sweep-32-steps/, lr-sweep-150-steps-causal-eos/): mean L_K of the last 10 steps, dev results.

    python bench/probes/training/lr_sweep_table.py [ROOT]
    (ROOT: a sweep's run directories, e.g. what lr-sweep-32-steps.sh wrote; default the committed
    bench/results/training/lr-sweep-32-steps; run from anywhere)
"""
import argparse
import json
import os
import statistics

COMMITTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "results", "training",
                         "lr-sweep-32-steps")
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("root", nargs="?", default=COMMITTED, help="directory holding METHOD-lrLR run directories")
root = parser.parse_args().root
print("| method | lr | steps | L_K, mean of the last 10 steps | K | nDCG@10 | R@1 | section kNN acc |")
print("|---|---|---|---|---|---|---|---|")
for method in ("causal-eos", "gircse"):
    for lr in ("1e-4", "5e-5", "2e-5"):
        d = os.path.join(root, f"{method}-lr{lr}")
        if not os.path.exists(os.path.join(d, "dev.json")):
            continue
        log = [json.loads(l) for l in open(os.path.join(d, "train_log.jsonl"))]
        dev = json.load(open(os.path.join(d, "dev.json")))
        last = statistics.mean(r["L"][-1] for r in log[-10:])
        for k in dev["k"]:
            r, c = dev["retrieval"][str(k)], dev["classification"][str(k)]
            print(f"| {method} | {lr} | {len(log)} | {last:.2f} | {k if method == 'gircse' else '-'} | "
                  f"{r['ndcg@10']:.4f} | {r['recall@1']:.4f} | {c['knn_accuracy']:.4f} |")
