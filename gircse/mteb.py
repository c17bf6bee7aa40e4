"""MTEB v2 integration: ``GIRCSEEncoder`` wraps a ``GIRCSE`` model as an ``mteb`` encoder.

    import mteb, gircse
    from gircse.mteb import GIRCSEEncoder
    encoder = GIRCSEEncoder(gircse.load_default())
    results = mteb.evaluate(encoder, mteb.get_tasks(tasks=["STS12"]), co2_tracker=False)

Instructions per task come from ``gircse/data/mteb_instructions.json`` (the authors' table: every MTEB(eng, v2)
task is covered): queries are instructed, retrieval corpora are embedded bare (except CQADupstack's, whose
documents are questions too), reranking documents and symmetric tasks (STS, classification, clustering,
pair classification) instructed. ``instructions=`` adds
or overrides entries (e.g. for local custom tasks). A task missing from the table falls back to the task's
own mteb prompt, with a warning. Similarity is cosine (``ModelMeta.similarity_fn_name``), computed by mteb.

mteb is an optional dependency (``pip install 'gircse[mteb]'``); built-in tasks download their data.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

import numpy as np

try:
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("gircse.mteb needs mteb: pip install 'gircse[mteb]' (or pip install mteb)") from exc

__all__ = ["INSTRUCTIONS_FILE", "GIRCSEEncoder", "load_instructions", "model_meta"]

INSTRUCTIONS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mteb_instructions.json")


def _check_entry(name: str, entry) -> dict[str, str | None]:
    """An instruction entry as ``{"query": str | None, "document": str | None}``; a str applies to both."""
    if isinstance(entry, str):
        return {"query": entry, "document": entry}
    if isinstance(entry, dict) and set(entry) <= {"query", "document"} and entry:
        for key, value in entry.items():
            if value is not None and not isinstance(value, str):
                raise ValueError(f"instructions[{name!r}][{key!r}] must be a str or null, got {value!r:.60}")
        return {"query": entry.get("query") or None, "document": entry.get("document") or None}
    raise ValueError(f"instructions[{name!r}] must be a str or an object with 'query' / 'document', got {entry!r:.80}")


def load_instructions(path: str = INSTRUCTIONS_FILE) -> dict[str, dict[str, str | None]]:
    """``{task name: {"query": ..., "document": ...}}`` from an instructions JSON file."""
    with open(path, encoding="utf-8") as f:
        tasks = json.load(f)["tasks"]
    return {name: _check_entry(name, entry) for name, entry in tasks.items()}


def model_meta(model, *, name: str | None = None, revision: str | None = None) -> ModelMeta:
    """mteb ``ModelMeta`` of a ``GIRCSE`` model (cosine similarity, instruction-following)."""
    if name is None:
        base = os.path.basename(str(model.base_model or "in-memory").rstrip("/")) or "model"
        name = f"gircse/{base}-{model.method}" + (f"-k{model.k}" if model.method in ("gircse", "two-stage") else "")
    import gircse

    return ModelMeta(
        loader=None, name=name, revision=revision or f"gircse-{gircse.__version__}", release_date=None,
        languages=None, n_parameters=sum(p.numel() for p in model.parameters()), memory_usage_mb=None,
        max_tokens=model.max_length, embed_dim=model.embedding_dim, license=None, open_weights=True,
        public_training_code=None, public_training_data=None, framework=["PyTorch"], similarity_fn_name="cosine",
        use_instructions=True, training_datasets=None, reference="https://arxiv.org/abs/2509.24291",
    )


class GIRCSEEncoder(AbsEncoder):
    """An mteb v2 encoder around a ``GIRCSE`` model.

    Args:
        model: the ``GIRCSE`` model.
        instructions: extra or overriding entries ``{task name: str | {"query", "document"}}``.
        k: soft tokens per text (default: the model's K).
        name, revision: for ``mteb_model_meta`` (results are filed under them).
    """

    def __init__(self, model, *, instructions: dict[str, Any] | None = None, k: int | None = None,
                 name: str | None = None, revision: str | None = None):
        self.model = model
        self.k = k
        self.instructions = load_instructions()
        for task_name, entry in (instructions or {}).items():
            self.instructions[task_name] = _check_entry(task_name, entry)
        self.mteb_model_meta = model_meta(model, name=name, revision=revision)
        self._warned: set[str] = set()

    def task_instruction(self, task_metadata, prompt_type=None) -> str | None:
        """The instruction for this task and side (``prompt_type`` "query" / "document"; None: symmetric)."""
        name = task_metadata.name
        entry = self.instructions.get(name) or self.instructions.get(re.sub(r"\.v\d+$", "", name))
        side = "document" if prompt_type is not None and getattr(prompt_type, "value", prompt_type) == "document" \
            else "query"
        if entry is not None:
            return entry[side]
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"gircse.mteb: no instruction for task {name!r} in the table; using the task's own "
                          "mteb prompt (documents of retrieval tasks stay bare). Pass instructions={...} to set one.",
                          UserWarning, stacklevel=3)
        prompt = task_metadata.prompt
        if isinstance(prompt, dict):
            return prompt.get(side) or None
        if side == "document" and task_metadata.type in ("Retrieval", "Reranking", "InstructionRetrieval"):
            return None
        return prompt or None

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs):
        """``[n, d]`` float32 numpy, L2-normalized. Empty texts (some MTEB corpora have them) have no GIRCSE
        embedding: they get the zero vector (similarity 0 to everything), with a warning."""
        texts = [text for batch in inputs for text in batch["text"]]
        out = np.zeros((len(texts), self.model.embedding_dim), dtype=np.float32)
        keep = [i for i, text in enumerate(texts) if isinstance(text, str) and text.strip()]
        if len(keep) < len(texts):
            warnings.warn(f"gircse.mteb: {len(texts) - len(keep)} empty text(s) in {task_metadata.name} "
                          f"({hf_subset}/{hf_split}) embedded as zero vectors", UserWarning, stacklevel=2)
        if keep:
            out[keep] = self.model.encode([texts[i] for i in keep], self.task_instruction(task_metadata, prompt_type),
                                          k=self.k, batch_size=kwargs.get("batch_size", 32),
                                          show_progress_bar=kwargs.get("show_progress_bar"))
        return out
