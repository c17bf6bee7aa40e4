import json, os, statistics, sys
root = sys.argv[1]
rows = []
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
