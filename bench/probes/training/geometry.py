"""Are a model's document embeddings collapsing? Mean and spread of pairwise cosines on the Debian dev set.

    python bench/probes/training/geometry.py raw=causal-eos:smollm2-135m LABEL=RUN_DIR ...   (run from anywhere)

For each model: the first 200 Debian dev descriptions embedded as documents (no instruction),
L2-normalized; prints the mean and standard deviation of the off-diagonal cosine similarities. A model
whose embeddings cannot tell texts apart has mean -> 1 and std -> 0 (the InfoNCE loss of such a model is
log of the candidate count, which is where the collapsed runs' loss sits).
"""
import argparse
import os
import sys

import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 3))  # the repository
from gircse import GIRCSE
from gircse.data.debian.dev import load_dev


def geometry(model, texts):
    e = torch.as_tensor(model.encode(texts, batch_size=16, show_progress_bar=False))
    c = e @ e.T
    off = c[~torch.eye(len(texts), dtype=torch.bool)]
    return float(off.mean()), float(off.std())


def main(argv):
    texts = [r["pos"][0] for r in load_dev("dev_retrieval")[:200]]
    print("| model | mean cosine | std of cosines |")
    print("|---|---|---|")
    for item in argv:
        label, _, where = item.partition("=")
        if where.startswith("causal-eos:"):
            model = GIRCSE.from_pretrained(where.split(":", 1)[1], method="causal-eos", max_length=128)
        else:
            model = GIRCSE.from_pretrained(where, max_length=128)
        mean, std = geometry(model, texts)
        print(f"| {label} | {mean:.3f} | {std:.3f} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="LABEL=MODEL",
                        help="MODEL: a saved GIRCSE directory, or causal-eos:NAME for a base model's EOS state")
    main(parser.parse_args().models)
