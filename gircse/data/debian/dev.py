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

__all__ = ["evaluate", "format_table", "gold_ranks", "knn_accuracy", "load_dev", "retrieval_metrics"]


def load_dev(name: str, path: str | None = None) -> list[dict]:
    """Rows of ``dev_retrieval`` or ``dev_classification`` (shipped unless ``path`` is given)."""
    from ..jsonl import read_jsonl
    from . import shipped_path

    return read_jsonl(path or shipped_path(f"{name}.jsonl.gz"))


def gold_ranks(scores, gold=None):
    """1-based rank of each query's gold document, ties counted against it: ``1 +`` the number of other
    documents whose score is not strictly below the gold one (a NaN score is never below). Constant
    scores put every gold item last, so a degenerate model cannot look good.

    ``scores[i, j]``: query i vs document j; ``gold[i]``: the index of query i's document (default i).
    """
    import torch

    scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be [queries, documents], got shape {tuple(scores.shape)}")
    if gold is None:
        if scores.shape[0] > scores.shape[1]:
            raise ValueError(f"scores {tuple(scores.shape)}: without gold=, query i's document is column i")
        gold = torch.arange(scores.shape[0])
    gold = torch.as_tensor(gold, dtype=torch.long).reshape(-1, 1)
    gold_score = scores.gather(1, gold)
    not_below = ~(scores < gold_score)  # includes the gold column itself, ties and NaN
    return not_below.sum(1)


def retrieval_metrics(scores) -> dict:
    """``scores[i, j]``: query i vs document j; the relevant document of query i is j = i. Ties count
    against the relevant document (``gold_ranks``)."""
    import torch

    ranks = gold_ranks(scores)
    in10 = ranks <= 10
    return {
        "mrr@10": float(torch.where(in10, 1.0 / ranks, torch.zeros_like(ranks, dtype=torch.float)).mean()),
        "ndcg@10": float(torch.where(in10, 1.0 / torch.log2(ranks.float() + 1), torch.zeros(len(ranks))).mean()),
        "recall@1": float((ranks == 1).float().mean()),
        "recall@10": float(in10.float().mean()),
    }


def knn_accuracy(embeddings, labels: list[str], k: int = 10) -> float:
    """Leave-one-out k-NN accuracy with cosine similarity and similarity-weighted votes.

    Ties count against the true label, at both places a rank is taken: among neighbours tied in
    similarity, those of other labels are taken first; the prediction is right only when the true
    label's vote is strictly the largest. Constant embeddings score 0, not the share of one label.
    """
    import torch

    from ...validation import as_int

    k = as_int("k", k, minimum=1)
    x = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=-1)
    if x.ndim != 2 or x.shape[0] != len(labels):
        raise ValueError(f"embeddings must be [n, d] with n = len(labels) = {len(labels)}, got {tuple(x.shape)}")
    names = sorted(set(labels))
    y = torch.tensor([names.index(l) for l in labels])
    sims = torch.nan_to_num(x @ x.T, nan=-2.0)
    same = y[:, None] == y[None, :]
    # Neighbour order: similarity descending; among equal similarities, other labels before the true one.
    by_label = torch.argsort(same.to(torch.uint8), dim=1, stable=True)
    by_sim = torch.argsort(sims.gather(1, by_label), dim=1, descending=True, stable=True)
    order = by_label.gather(1, by_sim)
    order = order[order != torch.arange(len(labels))[:, None]].reshape(len(labels), -1)  # leave one out
    top_i = order[:, :min(k, len(labels) - 1)]
    top_s = sims.gather(1, top_i)
    votes = torch.zeros(len(labels), len(names)).scatter_add_(1, y[top_i], top_s.clamp_min(0) + 1e-6)
    true_vote = votes.gather(1, y[:, None])[:, 0]
    best_other = votes.scatter(1, y[:, None], -1.0).amax(1)
    return float((true_vote > best_other).float().mean())


def evaluate(model, *, ks=(1, 3, 5, 10, 15, 20), batch_size: int = 32, limit: int | None = None,
             show_progress_bar: bool = False) -> dict:
    """``{"k": [...], "retrieval": {k: metrics}, "classification": {k: {"knn_accuracy"}}}`` for a ``GIRCSE``.

    ``ks``: the K values to report (ints >= 1); ``limit``: None (every row) or the first ``limit`` >= 1
    rows of each dev set.
    """
    from ...validation import as_int
    from . import CLASSIFICATION_INSTRUCTION, INSTRUCTION

    if isinstance(ks, (str, bytes)) or not hasattr(ks, "__iter__"):
        raise TypeError(f"ks must be a list of ints >= 1, got {ks!r}")
    ks = sorted({as_int("each K in ks", k, minimum=1) for k in ks})
    if not ks:
        raise ValueError("ks is empty; give at least one K >= 1")
    batch_size = as_int("batch_size", batch_size, minimum=1)
    limit = None if limit is None else as_int("limit", limit, minimum=1)
    retrieval, classification = load_dev("dev_retrieval"), load_dev("dev_classification")
    if limit is not None:
        retrieval, classification = retrieval[:limit], classification[:limit]
    gircse = model.method == "gircse"
    ks = ks if gircse else [1]
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

