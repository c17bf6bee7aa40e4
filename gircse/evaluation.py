"""Local evaluation on JSONL task files, no network: retrieval, STS, pair classification, classification.

A task file holds one JSON object per line (``.gz`` read on the fly); the task type comes from the rows:

* **retrieval** ``{"query": str, "pos": [str, ...], "neg": [str, ...]?}``, plus optional
  ``{"corpus": str | [str, ...]}`` rows (distractor documents). The corpus is every ``pos``, ``neg`` and
  ``corpus`` text, deduplicated; a query's relevant documents are its ``pos``. Queries are embedded with
  their instruction, documents bare (or with ``document_instruction``). nDCG@10, MRR@10, recall@1/10/100.
* **sts** ``{"text1", "text2", "score": number}``: Spearman correlation of the cosine similarity with the score.
* **pair** ``{"text1", "text2", "label": 0 | 1}``: average precision of the cosine similarity.
* **classification** ``{"text", "label": str | int}``: leave-one-out 10-NN accuracy (cosine,
  similarity-weighted votes, as ``gircse.data.debian.dev``), logistic-regression accuracy (stratified 5-fold
  cross-validation, L2 with C = 1 as scikit-learn's default) and clustering V-measure (k-means with as many
  clusters as labels, mean over 10 seeded runs).

Every row may carry an ``"instruction"`` (else the ``instruction`` argument applies); other keys are ignored.
A malformed row raises ``DataError`` naming the file and line.

**Non-finite values are an error**, never a score: every metric refuses NaN or infinite scores and
embeddings (a NaN similarity has no rank; scored as if it had, it can rank first).

**Ties count against the gold item** wherever a rank is computed: a relevant document tied with a
non-relevant one ranks below it, a positive pair tied with a negative pair ranks below it, a true label
tied with another label in a vote or a classifier's scores is an error. Constant embeddings therefore
score at or below chance, never 1.0. Spearman uses average ranks (the standard treatment) and is
reported as 0.0 when the similarities are all equal (no ranking information).

``evaluate(model, task, ks=...)`` encodes each text once: GIRCSE at K = max(ks) with
``return_all_steps=True`` (z_k is exactly what a K=k run gives), so every K costs one pass.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .data.jsonl import DataError, check_row_text, json_line, numbered_lines, validate_row

__all__ = [
    "METRICS", "TASK_TYPES", "Task", "average_precision", "clustering_v_measure", "evaluate", "evaluate_embeddings",
    "kmeans", "knn_accuracy", "load_task", "logistic_regression_accuracy", "retrieval_metrics", "spearman",
    "v_measure",
]

TASK_TYPES = ("retrieval", "sts", "pair", "classification")
METRICS = {  # reported per task type; the first is the main score (plots, summaries)
    "retrieval": ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100"),
    "sts": ("spearman",),
    "pair": ("ap",),
    "classification": ("knn_accuracy", "logreg_accuracy", "v_measure"),
}


# ---------------------------------------------------------------------- task files
@dataclass
class Task:
    """A parsed task file. ``rows``: the validated task rows (each with ``_line``), ``corpus``: the extra
    documents of a retrieval task's ``corpus`` rows."""

    path: str
    type: str
    rows: list[dict]
    corpus: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


def _text(row: dict, key: str, where: str) -> str:
    return check_row_text(row.get(key), repr(key), where)


def _row_type(row: dict, where: str) -> str:
    if "query" in row or "pos" in row:
        return "retrieval"
    if "text1" in row or "text2" in row:
        return "pair" if "label" in row else "sts"
    if "text" in row:
        return "classification"
    if "corpus" in row:
        return "corpus"
    raise DataError(f"{where}: cannot tell the task type from the keys {sorted(row)}; expected "
                    "{query, pos} (retrieval), {corpus} (retrieval documents), {text1, text2, score} (sts), "
                    "{text1, text2, label} (pair) or {text, label} (classification)")


def _validate(row: dict, kind: str, where: str) -> dict:
    instruction = row.get("instruction")
    if instruction is not None:
        check_row_text(instruction, "'instruction'", where)
    if kind == "retrieval":
        return validate_row(row, where)
    out = {"instruction": instruction}
    if kind in ("sts", "pair"):
        out["text1"], out["text2"] = _text(row, "text1", where), _text(row, "text2", where)
    if kind == "sts":
        if "score" not in row:
            raise DataError(f"{where}: missing 'score' (an STS row is {{text1, text2, score}}; a pair-classification "
                            "row has 'label' 0 or 1)")
        score = row.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DataError(f"{where}: 'score' must be a finite number, got {score!r:.60}")
        out["score"] = float(score)
    elif kind == "pair":
        label = row.get("label")
        if isinstance(label, (bool, float)) or label not in (0, 1):
            raise DataError(f"{where}: 'label' must be 0 or 1 (pair classification), got {label!r:.60}")
        out["label"] = int(label)
    elif kind == "classification":
        out["text"] = _text(row, "text", where)
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, str) and not label):
            raise DataError(f"{where}: 'label' must be a non-empty string or an int, got {label!r:.60}")
        out["label"] = label
    return out


def load_task(path: str | os.PathLike) -> Task:
    """Parse and validate a task file; the first task row decides the type, every other row must match."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"task file {path!r} is a directory; name a JSONL file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file {path!r} does not exist")
    rows, corpus, kind, first_line, corpus_line = [], [], None, None, None
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        row = json_line(line, where)
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        row_kind = _row_type(row, where)
        if row_kind == "corpus":
            texts = row["corpus"] if isinstance(row["corpus"], list) else [row["corpus"]]
            for i, text in enumerate(texts):
                check_row_text(text, f"corpus[{i}]", where)
            corpus += texts
            corpus_line = corpus_line or number
            continue
        if kind is None:
            kind, first_line = row_kind, number
        elif row_kind != kind:
            raise DataError(f"{where}: a {row_kind} row in a {kind} task (line {first_line} decides the type)")
        validated = _validate(row, kind, where)
        validated["_line"] = number
        rows.append(validated)
    if kind is None:
        raise DataError(f"{path}: no task rows (only blank lines or corpus rows)")
    if corpus and kind != "retrieval":
        raise DataError(f"{path}:{corpus_line}: 'corpus' rows belong to retrieval tasks, this is a {kind} task")
    task = Task(path=path, type=kind, rows=rows, corpus=corpus)
    _check_task(task)
    return task


def _check_task(task: Task) -> None:
    """Task-level conditions without which a metric is undefined."""
    if task.type == "sts":
        if len(task.rows) < 2 or len({r["score"] for r in task.rows}) < 2:
            raise DataError(f"{task.path}: an STS task needs at least 2 rows with different scores")
    elif task.type == "pair":
        if len({r["label"] for r in task.rows}) < 2:
            raise DataError(f"{task.path}: a pair-classification task needs both label 0 and label 1 rows")
    elif task.type == "classification":
        labels = [r["label"] for r in task.rows]
        if len({type(l) for l in labels}) > 1:
            line = next(r["_line"] for r in task.rows if type(r["label"]) is not type(labels[0]))
            raise DataError(f"{task.path}:{line}: labels mix strings and ints (line {task.rows[0]['_line']} has "
                            f"{labels[0]!r}); use one type")
        if len(set(labels)) < 2:
            raise DataError(f"{task.path}: a classification task needs at least 2 different labels")


# ---------------------------------------------------------------------- metrics
def _check_finite(name: str, values: torch.Tensor) -> torch.Tensor:
    """``values`` unchanged; ValueError naming the first NaN or infinite entry."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) (NaN or infinite; the first at index "
                         f"{where[0] if len(where) == 1 else list(where)}: {float(values[where])}); a NaN has no "
                         "rank, and would be scored as if it had one")
    return values


def _pessimistic_ranks(scores: torch.Tensor, relevant: list[list[int]], chunk: int = 1 << 24) -> list[list[int]]:
    """1-based rank of every relevant document, ties ordered against it: a relevant document ranks below
    every non-relevant one with a score >= its own, and below the relevant ones with higher scores (tied
    relevant documents take consecutive ranks in index order)."""
    n_docs = scores.shape[1]
    pairs = [(q, d) for q, docs in enumerate(relevant) for d in docs]
    is_rel = torch.zeros(scores.shape, dtype=torch.bool)
    for q, d in pairs:
        is_rel[q, d] = True
    column = torch.arange(n_docs)
    ranks: list[list[int]] = [[] for _ in relevant]
    step = max(1, chunk // max(n_docs, 1))
    for start in range(0, len(pairs), step):
        q = torch.tensor([p[0] for p in pairs[start:start + step]])
        d = torch.tensor([p[1] for p in pairs[start:start + step]])
        rows, rel = scores[q], is_rel[q]
        own = rows.gather(1, d[:, None])
        above = ((rows >= own) & ~rel).sum(1) + ((rows > own) & rel).sum(1)
        tied_before = ((rows == own) & rel & (column[None] < d[:, None])).sum(1)
        for qi, rank in zip(q.tolist(), (above + tied_before + 1).tolist()):
            ranks[qi].append(rank)
    return ranks


def retrieval_metrics(scores, relevant: list[list[int]]) -> dict:
    """``scores[q, d]``: query q vs document d; ``relevant[q]``: indices of q's relevant documents (>= 1,
    each once: binary relevance, as MTEB's qrels, which map each document to one grade).

    Binary relevance: nDCG@10 (ideal DCG over min(#relevant, 10) hits), MRR@10 (first relevant), recall@k =
    fraction of the relevant documents in the top k. Ties count against the relevant documents. NaN or
    infinite scores are an error.
    """
    scores = torch.as_tensor(np.asarray(scores), dtype=torch.float32)
    if scores.ndim != 2 or scores.shape[0] != len(relevant):
        raise ValueError(f"scores must be [queries, documents] with one row per relevant list; got "
                         f"{tuple(scores.shape)} and {len(relevant)} lists")
    _check_finite("scores", scores)
    for q, docs in enumerate(relevant):
        if (not docs or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or not 0 <= d < scores.shape[1]
                            for d in docs)):
            raise ValueError(f"relevant[{q}] must list 1+ document indices (ints) in [0, {scores.shape[1]}), "
                             f"got {docs}")
        if len(set(docs)) != len(docs):  # counted twice, one document would give nDCG > 1
            repeated = next(d for d in docs if list(docs).count(d) > 1)
            raise ValueError(f"relevant[{q}] lists document {repeated} more than once, got {docs}; list each "
                             "relevant document once")
    totals = dict.fromkeys(METRICS["retrieval"], 0.0)
    for ranks in _pessimistic_ranks(scores, relevant):
        ranks = sorted(ranks)
        ideal = sum(1 / math.log2(i + 2) for i in range(min(len(ranks), 10)))
        totals["ndcg@10"] += sum(1 / math.log2(r + 1) for r in ranks if r <= 10) / ideal
        totals["mrr@10"] += 1 / ranks[0] if ranks[0] <= 10 else 0.0
        for k in (1, 10, 100):
            totals[f"recall@{k}"] += sum(r <= k for r in ranks) / len(ranks)
    return {name: total / len(relevant) for name, total in totals.items()}


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # mean of 1-based positions start+1..end
            start = end
    return ranks


def _finite_vector(name: str, values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {values.shape}")
    return _check_finite(name, torch.from_numpy(values)).numpy()


def spearman(predicted, gold) -> float:
    """Spearman's rho with average ranks for ties; 0.0 when ``predicted`` is constant (nothing ranked).
    NaN or infinite values in either are an error."""
    predicted, gold = _finite_vector("predicted", predicted), _finite_vector("gold", gold)
    if len(predicted) != len(gold):
        raise ValueError(f"predicted and gold must have the same length, got {len(predicted)} and {len(gold)}")
    a, b = _average_ranks(predicted), _average_ranks(gold)
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def average_precision(scores, labels) -> float:
    """AP of ranking by ``scores`` (descending) for binary ``labels``; tied negatives rank above positives.
    NaN or infinite scores are an error."""
    scores, labels = _finite_vector("scores", scores), np.asarray(labels, dtype=np.int64)
    order = np.lexsort((labels, -scores))  # by score descending, then negatives (0) first within a tie
    hits = labels[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits == 1].mean())


def _label_ids(labels) -> tuple[torch.Tensor, list]:
    names = sorted(set(labels), key=lambda l: (str(type(l)), l))
    index = {name: i for i, name in enumerate(names)}
    return torch.tensor([index[l] for l in labels]), names


def _strictly_best(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Per row: is the gold column strictly above every other column (a tie counts as a miss)?"""
    own = scores.gather(1, gold[:, None])
    others = scores.scatter(1, gold[:, None], float("-inf"))
    return own[:, 0] > others.max(1).values


def _unit(embeddings) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [n, d], got {tuple(x.shape)}")
    return torch.nn.functional.normalize(_check_finite("embeddings", x), dim=-1)


def knn_accuracy(embeddings, labels, k: int = 10) -> float:
    """Leave-one-out k-NN accuracy: cosine similarity, votes weighted by similarity (clamped at 0, + 1e-6).

    Neighbours tied with the k-th one all vote (the result does not depend on the row order), and a true
    label tied with another label's vote counts as a miss.
    """
    x = _unit(embeddings)
    y, names = _label_ids(labels)
    if len(y) < 2:
        raise ValueError("knn_accuracy needs at least 2 rows")
    sims = x @ x.T
    sims.fill_diagonal_(-float("inf"))
    kth = sims.topk(min(k, len(y) - 1), dim=1).values[:, -1:]
    weights = torch.where(sims >= kth, sims.clamp_min(0) + 1e-6, torch.zeros(()))
    votes = torch.zeros(len(y), len(names)).index_add_(1, y, weights)
    return float(_strictly_best(votes, y).float().mean())


def _fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, n_classes: int, c: float = 1.0,
                             max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, scikit-learn's objective: 0.5 ||W||^2 + C * sum(cross-entropy),
    intercept unpenalized, solved with L-BFGS in float64. Returns ``(W [d, classes], b [classes])``."""
    x, n = x.double(), len(y)
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-7,
                                  tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        # Divided by C * n (same minimizer) so the line search sees O(1) values.
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + (weight * weight).sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def logistic_regression_accuracy(embeddings, labels, folds: int = 5) -> float:
    """Accuracy of a logistic-regression classifier on L2-normalized embeddings, by stratified ``folds``-fold
    cross-validation (each label's rows dealt to the folds in turn, in row order: deterministic). A true
    label tied with another label's score counts as a miss."""
    x = _unit(embeddings)
    y, names = _label_ids(labels)
    fold = torch.empty(len(y), dtype=torch.long)
    for label in range(len(names)):
        members = (y == label).nonzero()[:, 0]
        fold[members] = torch.arange(len(members)) % folds
    correct = 0
    for f in range(folds):
        test = fold == f
        if not test.any() or test.all():
            continue
        weight, bias = _fit_logistic_regression(x[~test], y[~test], len(names))
        correct += int(_strictly_best(x[test].double() @ weight + bias, y[test]).sum())
    return correct / len(y)


def kmeans(x: torch.Tensor, n_clusters: int, *, seed: int = 0, max_iter: int = 100) -> torch.Tensor:
    """Cluster ids ``[n]``: k-means++ seeding (``seed``), then Lloyd iterations until assignments settle.
    Points tied between centres go to the lowest cluster id; an emptied cluster keeps its centre."""
    x = torch.as_tensor(x, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=generator)]
    for _ in range(1, n_clusters):
        nearest = torch.cdist(x, centres).min(1).values ** 2
        if nearest.sum() > 0:
            pick = torch.multinomial(nearest / nearest.sum(), 1, generator=generator)
        else:  # every point coincides with a centre: any point will do
            pick = torch.randint(len(x), (1,), generator=generator)
        centres = torch.cat([centres, x[pick]])
    assign = None
    for _ in range(max_iter):
        new = torch.cdist(x, centres).argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for c in range(n_clusters):
            members = assign == c
            if members.any():
                centres[c] = x[members].mean(0)
    return assign


def _entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log()).sum())


def v_measure(labels_true, labels_pred) -> float:
    """Harmonic mean of homogeneity and completeness (scikit-learn's definition, beta = 1)."""
    true, _ = _label_ids(list(labels_true))
    pred, _ = _label_ids(list(labels_pred))
    table = torch.zeros(int(true.max()) + 1, int(pred.max()) + 1, dtype=torch.float64)
    table.index_put_((true, pred), torch.ones(len(true), dtype=torch.float64), accumulate=True)
    h_true, h_pred, h_joint = _entropy(table.sum(1)), _entropy(table.sum(0)), _entropy(table.flatten())
    homogeneity = 1.0 if h_true == 0 else 1 - (h_joint - h_pred) / h_true
    completeness = 1.0 if h_pred == 0 else 1 - (h_joint - h_true) / h_pred
    total = homogeneity + completeness
    return 0.0 if total == 0 else 2 * homogeneity * completeness / total


def clustering_v_measure(embeddings, labels, runs: int = 10) -> float:
    """Mean V-measure of k-means (as many clusters as labels, seeds 0..runs-1) on L2-normalized embeddings."""
    x = _unit(embeddings)
    n_clusters = len(set(labels))
    return float(np.mean([v_measure(labels, kmeans(x, n_clusters, seed=s).tolist()) for s in range(runs)]))


# ---------------------------------------------------------------------- task evaluation
def _retrieval_inputs(task: Task) -> tuple[list[str], list[list[int]]]:
    """``(corpus, relevant)``: deduplicated documents (first appearance order) and each query's relevant ids."""
    index: dict[str, int] = {}
    for row in task.rows:
        for text in row["pos"] + row["neg"]:
            index.setdefault(text, len(index))
    for text in task.corpus:
        index.setdefault(text, len(index))
    return list(index), [sorted({index[t] for t in row["pos"]}) for row in task.rows]


def evaluate_embeddings(task: Task, embeddings: dict[str, torch.Tensor]) -> dict:
    """Metrics of one K from embeddings ``[n, d]`` keyed as ``evaluate`` builds them (queries/documents,
    text1/text2, texts)."""
    if task.type == "retrieval":
        q, d = _unit(embeddings["queries"]), _unit(embeddings["documents"])
        _, relevant = _retrieval_inputs(task)
        return retrieval_metrics(q @ d.T, relevant)
    if task.type in ("sts", "pair"):
        sims = (_unit(embeddings["text1"]) * _unit(embeddings["text2"])).sum(-1)
        if task.type == "sts":
            return {"spearman": spearman(sims.numpy(), [r["score"] for r in task.rows])}
        return {"ap": average_precision(sims.numpy(), [r["label"] for r in task.rows])}
    labels = [r["label"] for r in task.rows]
    x = embeddings["texts"]
    return {"knn_accuracy": knn_accuracy(x, labels), "logreg_accuracy": logistic_regression_accuracy(x, labels),
            "v_measure": clustering_v_measure(x, labels)}


def _resolve_ks(model, ks) -> list[int]:
    if model.method == "gircse":
        ks = [model.k] if ks is None else sorted({int(k) for k in ks})
        if not ks or ks[0] < 1:
            raise ValueError(f"ks must be K values >= 1, got {ks}")
        return ks
    if ks is not None and len(set(ks)) > 1:
        raise ValueError(f"method {model.method!r} has a single embedding per text; evaluating several K "
                         "(test-time scaling) needs method 'gircse'")
    if model.method == "two-stage":  # K = the expansion's length in hard tokens
        return [model.k if ks is None else int(next(iter(ks)))]
    return [1]


def evaluate(model, task: Task | str | os.PathLike, *, ks=None, instruction: str | None = None,
             document_instruction: str | None = None, batch_size: int = 32, show_progress_bar: bool = False) -> dict:
    """Evaluate a ``GIRCSE`` model on a task file (or a loaded ``Task``).

    ``ks``: K values to report (GIRCSE; default ``[model.k]``), all from one encoding pass at max(ks).
    ``instruction``: for rows without their own. ``document_instruction``: retrieval documents (default bare).
    Returns ``{"task", "type", "rows", "method", "k": [...], "metrics": {str(K): {metric: value}}}``.
    """
    if not isinstance(task, Task):
        task = load_task(task)
    ks = _resolve_ks(model, ks)
    gircse = model.method == "gircse"
    encode_kw = dict(k=max(ks) if model.method in ("gircse", "two-stage") else None, batch_size=batch_size,
                     return_all_steps=True, convert_to_numpy=False, show_progress_bar=show_progress_bar)
    instructions = [r.get("instruction") or instruction for r in task.rows]
    if task.type == "retrieval":
        corpus, _ = _retrieval_inputs(task)
        inputs = {"queries": model.encode([r["query"] for r in task.rows], instructions, **encode_kw),
                  "documents": model.encode(corpus, document_instruction, **encode_kw)}
    elif task.type in ("sts", "pair"):
        both = model.encode([r["text1"] for r in task.rows] + [r["text2"] for r in task.rows],
                            instructions + instructions, **encode_kw)
        inputs = {"text1": both[:len(task.rows)], "text2": both[len(task.rows):]}
    else:
        inputs = {"texts": model.encode([r["text"] for r in task.rows], instructions, **encode_kw)}
    metrics = {}
    for k in ks:
        step = k - 1 if gircse else 0
        metrics[str(k)] = evaluate_embeddings(task, {name: e[:, step] for name, e in inputs.items()})
    return {"task": task.path, "type": task.type, "rows": len(task.rows), "method": model.method, "k": ks,
            "metrics": metrics}
