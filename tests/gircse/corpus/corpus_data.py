"""Small corpora for the corpus and command-line tests."""
from __future__ import annotations

import gzip
import json

# Lengths vary (the encode sort reorders them) and two texts repeat under different ids.
TEXTS = [f"document {i}: " + " ".join(["alpha", "beta", "gamma", "delta"][j % 4] for j in range(i % 9 + 1))
         for i in range(29)] + ["document 3: alpha beta gamma delta", "document 3: alpha beta gamma delta"]


def write_jsonl(path, rows) -> str:
    lines = "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")
    with (gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb")) as f:
        f.write(lines)
    return str(path)


def corpus_rows(texts=TEXTS):
    return [{"id": f"doc-{i:03d}", "text": text, "extra": i} for i, text in enumerate(texts)]
