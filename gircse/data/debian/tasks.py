"""The two Debian dev tasks as local task files for ``gircse eval`` / ``gircse.evaluation``.

    python -m gircse.data.debian.tasks [--out DIR]     # default: next to the dev sets (the shipped files)

* ``task_retrieval.jsonl.gz``: ``{"query": summary, "pos": [description], "instruction": INSTRUCTION}`` per
  dev retrieval row. The corpus is every row's ``pos`` (the dev rows' hard negatives are other rows'
  positives, so dropping them leaves the corpus unchanged): 500 summaries against 500 descriptions.
* ``task_classification.jsonl.gz``: ``{"text", "label": section, "instruction": CLASSIFICATION_INSTRUCTION}``.

``gircse.evaluation.evaluate`` on these files gives the retrieval metrics and the k-NN accuracy of
``gircse.data.debian.dev.evaluate`` (tested), plus the metrics the dev script does not report.
"""
from __future__ import annotations

import argparse
import os

from ..jsonl import write_jsonl_gz
from . import CLASSIFICATION_INSTRUCTION, HERE, INSTRUCTION
from .dev import load_dev

__all__ = ["TASK_FILES", "build_task_files", "task_path"]

TASK_FILES = {"retrieval": "task_retrieval.jsonl.gz", "classification": "task_classification.jsonl.gz"}


def task_path(name: str) -> str:
    """Path of a shipped task file: ``name`` is "retrieval" or "classification"."""
    if name not in TASK_FILES:
        raise ValueError(f"name must be one of {tuple(TASK_FILES)}, got {name!r}")
    return os.path.join(HERE, TASK_FILES[name])


def build_task_files(out: str = HERE, *, retrieval_path: str | None = None,
                     classification_path: str | None = None) -> dict[str, str]:
    """Convert the dev sets (shipped unless paths are given) into task files in ``out``; returns
    ``{file name: sha256}`` (byte-identical for the same inputs)."""
    retrieval = [{"query": r["query"], "pos": r["pos"], "instruction": r.get("instruction") or INSTRUCTION}
                 for r in load_dev("dev_retrieval", retrieval_path)]
    classification = [{"text": r["text"], "label": r["label"], "instruction": CLASSIFICATION_INSTRUCTION}
                      for r in load_dev("dev_classification", classification_path)]
    os.makedirs(out, exist_ok=True)
    return {TASK_FILES[name]: write_jsonl_gz(os.path.join(out, TASK_FILES[name]), rows)
            for name, rows in (("retrieval", retrieval), ("classification", classification))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gircse.data.debian.tasks", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=HERE, help="output directory (default: the package's data directory)")
    args = parser.parse_args(argv)
    for name, digest in build_task_files(args.out).items():
        print(f"{os.path.join(args.out, name)}  sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
