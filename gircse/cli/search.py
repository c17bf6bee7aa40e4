"""``gircse search``: the top-k documents of an encoded corpus for one or more queries.

    gircse search out/ "how do I resize photos" --top 10 --instruction "Given a question, retrieve passages ..."

The queries are embedded with the model the corpus was encoded with (the manifest names it and its settings);
the search is exact: chunked matrix products over the memory-mapped shards, or FAISS's brute force when
``faiss-cpu`` is installed. Prints ``rank<TAB>score<TAB>id`` lines (``--json`` for JSON).
"""
from __future__ import annotations

import json
import sys

from .common import _quiet_loading, check_device, int_at_least


def add_search_parser(sub) -> None:
    parser = sub.add_parser("search", help="top-k documents of an encode-corpus directory for text queries")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="a finished gircse encode-corpus directory")
    parser.add_argument("queries", metavar="QUERY", nargs="+", help="query text(s)")
    parser.add_argument("--top", type=int_at_least(1), default=10, help="results per query (default 10)")
    parser.add_argument("--instruction", default=None, help="query instruction (default: none, the query alone)")
    parser.add_argument("--backend", choices=("auto", "exact", "faiss"), default="auto",
                        help="'exact': numpy; 'faiss': faiss.knn (pip install 'gircse[faiss]'); auto: faiss when "
                             "installed")
    parser.add_argument("--model", default=None, help="embed the queries with this model instead of the one the "
                                                      "manifest names (with the manifest's settings)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    parser.add_argument("--json", action="store_true", help="print JSON: [{query, hits: [{rank, id, score, row}]}]")
    parser.set_defaults(func=run_search)


def run_search(args) -> int:
    from .. import loading
    from ..corpus.model_spec import check_recorded_model
    from ..corpus.search import resolve_backend
    from ..corpus.store import open_corpus

    for number, query in enumerate(args.queries, start=1):
        if not query.strip():
            raise ValueError(f"query {number} is empty")
    if args.instruction is not None and not args.instruction.strip():
        raise ValueError("--instruction is empty")
    corpus = open_corpus(args.out_dir)
    recorded = corpus.manifest["spec"]["model"]
    if args.model not in (None, "default"):
        loading.check_model_reference(args.model, what="--model")
    check_recorded_model(recorded, args.model)
    backend = resolve_backend(args.backend)
    check_device(args.device)
    with _quiet_loading():
        model = corpus.load_model(args.model, device=args.device)
    vectors = model.encode_queries(args.queries, args.instruction, batch_size=args.batch_size)
    results = corpus.search(vectors, args.top, backend=backend)
    if args.json:
        print(json.dumps([{"query": query, "hits": [{"rank": rank, "id": hit.id, "score": hit.score, "row": hit.row}
                                                    for rank, hit in enumerate(hits, start=1)]}
                          for query, hits in zip(args.queries, results)], indent=2, ensure_ascii=False))
        return 0
    for query, hits in zip(args.queries, results):
        if len(args.queries) > 1:
            print(f"# {query}")
        for rank, hit in enumerate(hits, start=1):
            print(f"{rank}\t{hit.score:.4f}\t{hit.id}")
    sys.stdout.flush()
    return 0
