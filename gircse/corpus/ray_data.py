"""Corpus encoding on Ray Data: a callable class for ``Dataset.map_batches`` (the ``ray`` extra).

    import ray
    from gircse.corpus.ray_data import RayEncoder

    ds = ray.data.read_json("docs.jsonl")                  # rows {"id": ..., "text": ...}
    ds = ds.map_batches(RayEncoder, fn_constructor_kwargs={"model": "default"}, batch_size=256,
                        compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1)   # one GPU per actor
    ds.write_parquet("embeddings/")                        # every column kept, plus "embedding" [d]

Each actor loads the model once (``gircse.load_model``) and embeds its batches as documents with
``GIRCSE.encode_documents`` (length-sorted inside each batch). Ray schedules, retries and scales the actors;
``concurrency=N`` instead of ``compute=`` does the same on Ray versions before its deprecation. Ray itself is
not imported here: this module only needs ``ray`` to be installed where ``map_batches`` runs.
"""
from __future__ import annotations

__all__ = ["RayEncoder"]


class RayEncoder:
    """``map_batches`` callable: adds ``output_column`` (float32 ``[batch, d]``, L2-normalized unless
    ``normalize=False``) to each batch (a dict of numpy arrays, Ray's default batch format, or a pandas
    DataFrame). ``model`` and the model options are those of ``gircse.load_model``."""

    def __init__(self, model: str = "default", *, text_column: str = "text", output_column: str = "embedding",
                 instruction: str | None = None, batch_size: int = 32, normalize: bool = True, adapter=None,
                 method=None, k=None, max_length=None, prompt_style=None, dtype=None, device=None):
        from ..model import load_model
        from ..validation import as_bool, as_int

        for name, value in (("text_column", text_column), ("output_column", output_column)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty str, got {value!r}")
        self.text_column, self.output_column, self.instruction = text_column, output_column, instruction
        self.batch_size = as_int("batch_size", batch_size, minimum=1)
        self.normalize = as_bool("normalize", normalize)
        self.model = load_model(model, adapter=adapter, method=method, k=k, max_length=max_length,
                                prompt_style=prompt_style, dtype=dtype, device=device)

    def __call__(self, batch):
        if self.text_column not in batch:
            raise ValueError(f"the batch has no column {self.text_column!r} (its columns: {list(batch.keys())}); "
                             "pass text_column= in fn_constructor_kwargs")
        texts = [str(text) for text in batch[self.text_column]]
        vectors = self.model.encode_documents(texts, self.instruction, batch_size=self.batch_size,
                                              normalize_embeddings=self.normalize, show_progress_bar=False)
        if hasattr(batch, "assign"):  # a pandas DataFrame (batch_format="pandas")
            return batch.assign(**{self.output_column: list(vectors)})
        return {**batch, self.output_column: vectors}
