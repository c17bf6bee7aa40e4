"""Score models on the held-out WordNet tasks (``gircse.data.wordnet``: English definitions, a domain no
model here was trained or tuned on) at several K from one encoding pass, and print one table.

    python bench/probes/training/heldout_eval.py --out DIR [--k 1,5,10] NAME=MODEL[:METHOD] ...

MODEL: ``default`` (the shipped adapter), ``smollm2-135m`` (the base model, no adapter) or a saved run
directory; METHOD overrides the model's method (e.g. ``smollm2-135m:causal-eos``). Each model's result goes
to ``DIR/NAME.json`` (both tasks, every K); a model whose file exists is not scored again. Runs in fp32 with
the shipped model's max_length (128), as the Debian dev evaluation.
"""
import argparse
import json
import os
import sys

import gircse
from gircse.data.wordnet import task_path
from gircse.evaluation import evaluate

TASKS = ("retrieval", "classification")
MAIN = {"retrieval": "ndcg@10", "classification": "knn_accuracy"}


def score(model_spec: str, ks: list[int]) -> dict:
    reference, _, method = model_spec.partition(":")
    method = method or None
    if reference == "default":
        model = gircse.load_default(method=method, dtype="float32")
    else:
        model = gircse.GIRCSE.from_pretrained(reference, method=method, dtype="float32", max_length=128)
    ks = ks if model.method == "gircse" else None
    return {"model": model_spec, "method": model.method,
            "tasks": {name: evaluate(model, task_path(name), ks=ks) for name in TASKS}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for NAME.json results")
    parser.add_argument("--k", default="1,5,10", help="comma-separated K values for GIRCSE models")
    parser.add_argument("models", nargs="+", metavar="NAME=MODEL[:METHOD]")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.k.split(",")]
    specs = []
    for item in args.models:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            parser.error(f"models: expected NAME=MODEL[:METHOD], got {item!r}")
        specs.append((name, spec))
    os.makedirs(args.out, exist_ok=True)
    print("| model | method | K | WordNet retrieval nDCG@10 | WordNet category kNN acc |")
    print("|---|---|---|---|---|")
    for name, spec in specs:
        path = os.path.join(args.out, f"{name}.json")
        if not os.path.isfile(path):
            result = score(spec, ks)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
        result = json.load(open(path, encoding="utf-8"))
        for k in result["tasks"]["retrieval"]["k"]:
            cells = [f"{result['tasks'][t]['metrics'][str(k)][MAIN[t]]:.4f}" for t in TASKS]
            print(f"| {name} | {result['method']} | {k} | {cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
