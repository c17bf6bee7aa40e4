"""``gircse demo``: embed a small corpus with the default model, search it, show what the soft tokens say."""
from __future__ import annotations

import time

from .common import _add_model_arguments, _load

DEMO_DOCUMENTS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "A good night's sleep improves memory and concentration.",
    "Python is a popular programming language for data science and machine learning.",
    "The Amazon rainforest is home to millions of species of plants and animals.",
    "Mount Everest is the highest mountain above sea level, in the Himalayas.",
    "Regular exercise lowers the risk of heart disease.",
]
DEMO_QUERIES = [
    "famous landmark in the French capital",
    "how do plants make food from sunlight",
    "which language should I learn to write machine learning code",
    "tallest peak on Earth",
    "why is sleep important for the brain",
]
DEMO_INSTRUCTION = "Given a question, retrieve passages that answer it"
DEMO_ANSWERS = {0: 0, 1: 1, 2: 4, 3: 6, 4: 3}  # query index -> the document that answers it


def add_demo_parser(sub) -> None:
    parser = sub.add_parser("demo", help="embed a few sentences with the default model and run a semantic search")
    _add_model_arguments(parser)
    parser.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from ..data.debian.dev import gold_ranks

    start = time.perf_counter()
    model = _load(args)
    loaded = time.perf_counter()
    print(f"model: {model.base_model} | method={model.method} k={model.k} | "
          f"adapter={'yes' if hasattr(model.model, 'peft_config') else 'no (untrained base)'} | "
          f"d={model.embedding_dim} | loaded in {loaded - start:.1f} s")
    docs = model.encode_documents(DEMO_DOCUMENTS)
    queries = model.encode_queries(DEMO_QUERIES, DEMO_INSTRUCTION)
    encoded = time.perf_counter()
    scores = model.similarity(queries, docs)
    for qi, query in enumerate(DEMO_QUERIES):
        ranking = scores[qi].argsort()[::-1]
        print(f"\nquery: {query}")
        for rank, di in enumerate(ranking[:2], start=1):
            print(f"  {rank}. {scores[qi, di]:.3f}  {DEMO_DOCUMENTS[di]}")
    ranks = gold_ranks(scores[list(DEMO_ANSWERS)], list(DEMO_ANSWERS.values()))  # ties count against
    hits = int((ranks == 1).sum())
    n = len(DEMO_DOCUMENTS) + len(DEMO_QUERIES)
    print(f"\ntop-1 correct: {hits}/{len(DEMO_ANSWERS)} | embedded {n} texts in {encoded - loaded:.2f} s")
    if model.method == "gircse":
        # The paper's Table 4 view: what each soft token "says" (top tokens of s_k).
        print(f"\nsoft tokens generated for: {DEMO_DOCUMENTS[0]}")
        for step, tokens in enumerate(model.explain(DEMO_DOCUMENTS[0], k=min(model.k, 5), top=5), start=1):
            print(f"  s_{step}: " + "  ".join(f"{tok!r} {p:.2f}" for tok, p in tokens))
    return 0
