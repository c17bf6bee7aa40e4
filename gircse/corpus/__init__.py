"""Corpus-scale encoding and search.

    corpus = gircse.corpus.encode_corpus(model, "docs.jsonl.gz", "out/")   # shards + manifest, resumable
    corpus = gircse.corpus.open("out/")            # ids + a memory-mapped [n, d] matrix
    corpus.search_texts("a query", top=10, instruction="...")            # exact top-k (numpy or FAISS)

``torchrun --nproc_per_node N -m gircse encode-corpus INPUT OUT_DIR`` spreads the shards over N processes;
``gircse.corpus.ray_data.RayEncoder`` is the same encoding as a Ray Data ``map_batches`` callable (the ``ray``
extra). Modules: ``reader`` (the input), ``store`` (the files of a corpus directory), ``model_spec`` (which
model), ``encode`` (the job), ``search`` (top-k), ``ray_data``. Importing this package imports numpy, not torch.
"""
from .encode import CorpusJob, encode_corpus
from .model_spec import load_recorded_model, model_spec_of, requested_model_spec
from .reader import CorpusInputError, iter_records, scan
from .search import top_k
from .store import Corpus, CorpusMismatchError, Hit, ShardedMatrix, open_corpus

open = open_corpus  # gircse.corpus.open(OUT_DIR), as the issue names it

__all__ = ["Corpus", "CorpusInputError", "CorpusJob", "CorpusMismatchError", "Hit", "ShardedMatrix",
           "encode_corpus", "iter_records", "load_recorded_model", "model_spec_of", "open", "open_corpus",
           "requested_model_spec", "scan", "top_k"]
