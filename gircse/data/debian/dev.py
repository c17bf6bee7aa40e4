"""The two Debian dev tasks: summary -> description retrieval, and section classification.

``evaluate(model, ks=(1, 3, 5, 10, 15, 20))`` embeds each text once with K = max(ks) and
``return_all_steps=True`` (z_k, the mean of the first k generated states, is exactly the embedding a
K=k run gives), so the whole test-time scaling curve costs one encoding pass. Baselines (one step)
report a single entry.

* retrieval: the 500 dev summaries (queries, with ``INSTRUCTION``) against all 500 dev descriptions;
  MRR@10, nDCG@10 (one relevant document), Recall@1 and Recall@10;
* classification: leave-one-out 10-nearest-neighbour accuracy (cosine, similarity-weighted vote) of the
  section labels, texts embedded with ``CLASSIFICATION_INSTRUCTION``; no classifier training, so the
  number reflects the embedding geometry only. Chance is 1/12.
"""
from __future__ import annotations

import gzip
import json

__all__ = ["evaluate", "format_table", "knn_accuracy", "load_dev", "retrieval_metrics"]


def load_dev(name: str, path: str | None = None) -> list[dict]:
    """Rows of ``dev_retrieval`` or ``dev_classification`` (shipped unless ``path`` is given)."""
    from . import shipped_path

    with gzip.open(path or shipped_path(f"{name}.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def retrieval_metrics(scores) -> dict:
    """``scores[i, j]``: query i vs document j; the relevant document of query i is j = i."""
    import torch

    scores = torch.as_tensor(scores, dtype=torch.float32)
    gold = scores.diagonal().unsqueeze(1)
    ranks = (scores > gold).sum(1) + 1  # 1-based rank of the relevant document (ties favour it)
    in10 = ranks <= 10
    return {
        "mrr@10": float(torch.where(in10, 1.0 / ranks, torch.zeros_like(ranks, dtype=torch.float)).mean()),
        "ndcg@10": float(torch.where(in10, 1.0 / torch.log2(ranks.float() + 1), torch.zeros(len(ranks))).mean()),
        "recall@1": float((ranks == 1).float().mean()),
        "recall@10": float(in10.float().mean()),
    }


def knn_accuracy(embeddings, labels: list[str], k: int = 10) -> float:
    """Leave-one-out k-NN accuracy with cosine similarity and similarity-weighted votes."""
    import torch

    x = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=-1)
    sims = x @ x.T
    sims.fill_diagonal_(-float("inf"))
    top_s, top_i = sims.topk(min(k, len(labels) - 1), dim=1)
    names = sorted(set(labels))
    y = torch.tensor([names.index(l) for l in labels])
    votes = torch.zeros(len(labels), len(names)).scatter_add_(1, y[top_i], top_s.clamp_min(0) + 1e-6)
    return float((votes.argmax(1) == y).float().mean())


def evaluate(model, *, ks=(1, 3, 5, 10, 15, 20), batch_size: int = 32, limit: int | None = None,
             show_progress_bar: bool = False) -> dict:
    """``{"k": [...], "retrieval": {k: metrics}, "classification": {k: {"knn_accuracy"}}}`` for a ``GIRCSE``."""
    from . import CLASSIFICATION_INSTRUCTION, INSTRUCTION

    retrieval, classification = load_dev("dev_retrieval"), load_dev("dev_classification")
    if limit:
        retrieval, classification = retrieval[:limit], classification[:limit]
    gircse = model.method == "gircse"
    ks = sorted(set(ks)) if gircse else [1]
    kmax = max(ks)
    kw = dict(k=kmax if gircse else None, batch_size=batch_size, return_all_steps=True,
              convert_to_numpy=False, show_progress_bar=show_progress_bar)
    q = model.encode([r["query"] for r in retrieval], [r.get("instruction") or INSTRUCTION for r in retrieval], **kw)
    d = model.encode([r["pos"][0] for r in retrieval], None, **kw)
    c = model.encode([r["text"] for r in classification], CLASSIFICATION_INSTRUCTION, **kw)
    labels = [r["label"] for r in classification]
    result = {"method": model.method, "k": ks, "n_retrieval": len(retrieval), "n_classification": len(labels),
              "retrieval": {}, "classification": {}}
    for k in ks:
        step = k - 1
        result["retrieval"][str(k)] = retrieval_metrics(q[:, step] @ d[:, step].T)
        result["classification"][str(k)] = {"knn_accuracy": knn_accuracy(c[:, step], labels)}
    return result


def format_table(result: dict) -> str:
    lines = ["| K | nDCG@10 | MRR@10 | R@1 | R@10 | section kNN acc |", "|---|---|---|---|---|---|"]
    for k in result["k"]:
        r, c = result["retrieval"][str(k)], result["classification"][str(k)]
        lines.append(f"| {k} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} | {r['recall@1']:.4f} | {r['recall@10']:.4f} "
                     f"| {c['knn_accuracy']:.4f} |")
    return "\n".join(lines)

