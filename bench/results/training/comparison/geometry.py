"""Embedding geometry of Causal-EOS checkpoints: are the documents' embeddings collapsing?

    python bench/results/training/comparison/geometry.py raw=causal-eos:smollm2-135m label=ADAPTER_DIR ...

For each model: the first 200 Debian dev descriptions embedded as documents (no instruction),
L2-normalized; prints the mean and standard deviation of the off-diagonal cosine similarities. A model
whose embeddings cannot tell texts apart has mean -> 1 and std -> 0 (the InfoNCE loss of such a model is
log of the candidate count, which is where the collapsed runs' loss sits).
"""
import sys

import torch

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
    main(sys.argv[1:])
