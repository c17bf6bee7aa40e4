"""Encoding a corpus into shards, resumable, one process or many under ``torchrun``.

``CorpusJob.prepare`` does everything that needs no model: it checks the options, reads the whole input once
(``reader.scan``: blank texts, duplicate ids, malformed rows) and claims OUT_DIR for this spec (a directory
made with another model, other options or another input is refused). ``CorpusJob.run(model)`` then encodes the
shards of this rank -- shard i belongs to rank ``i % world_size``, so ranks never talk while they work -- each
with ``GIRCSE.encode_documents`` (its length-sorted batches), skipping shards a previous run finished and
verified (``plan``, which needs no model either). At the end the ranks meet at a barrier and rank 0 writes
the manifest.

Under ``torchrun`` the rank and world size come from the default process group (``torch.distributed``); without
one the job is a single process.
"""
from __future__ import annotations

import dataclasses
import os
import time

from . import store
from .model_spec import LOADED_SETTINGS, model_spec_of
from .reader import InputSummary, input_format, iter_records, scan

__all__ = ["DEFAULT_SHARD_SIZE", "CorpusJob", "encode_corpus"]

DEFAULT_SHARD_SIZE = 10_000


def _distributed_rank_and_size() -> tuple[int, int]:
    from ..training import distributed

    return distributed.rank(), distributed.world_size()


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


@dataclasses.dataclass
class CorpusJob:
    """One corpus encoding: the input, OUT_DIR and the spec they were prepared with."""

    input: InputSummary
    out_dir: str
    spec: dict
    resumed: bool  # OUT_DIR already held this spec

    @classmethod
    def prepare(cls, input, out_dir, *, model: dict, instruction: str | None = None, format: str = "auto",
                id_field: str = "id", text_field: str = "text", shard_size: int = DEFAULT_SHARD_SIZE,
                shard_format: str = "safetensors", normalize: bool = True) -> "CorpusJob":
        """Check the options and the whole input, and claim OUT_DIR; no model is needed (``model`` is a spec:
        ``requested_model_spec`` or ``model_spec_of``). What changes a text's embedding is in the spec; how the
        work runs (batch size, processes, threads, device) is not, and may change between runs."""
        from ..validation import as_bool, as_int, as_path

        input_path, out_dir = as_path("input", input), as_path("out_dir", out_dir)
        fmt = input_format(input_path, format)
        for name, value in (("id_field", id_field), ("text_field", text_field)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty str, got {value!r}")
        if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
            raise ValueError(f"instruction must be a non-empty str or None, got {instruction!r}")
        if shard_format not in store.SHARD_FORMATS:
            raise ValueError(f"shard_format must be one of {store.SHARD_FORMATS}, got {shard_format!r}")
        spec_input = {"format": fmt} | ({"id_field": id_field, "text_field": text_field} if fmt == "jsonl" else {})
        options = {"instruction": instruction, "normalize": as_bool("normalize", normalize),
                   "shard_size": as_int("shard_size", shard_size, minimum=1), "shard_format": shard_format}
        summary = scan(input_path, fmt, id_field=id_field, text_field=text_field)
        spec = {"format": store.FORMAT, "version": store.VERSION,
                "input": {**spec_input, "rows": summary.rows, "sha256": summary.sha256},
                "model": dict(model), **options}
        resumed = store.prepare_directory(out_dir, spec)
        return cls(summary, out_dir, spec, resumed)

    @property
    def shard_count(self) -> int:
        return -(-self.input.rows // self.spec["shard_size"])

    def shard_rows(self, index: int) -> tuple[int, int]:
        """``(first_row, rows)`` of shard ``index``."""
        size = self.spec["shard_size"]
        return index * size, min(size, self.input.rows - index * size)

    def _check(self, index: int, verify: bool):
        first, rows = self.shard_rows(index)
        return store.check_shard(self.out_dir, index, first_row=first, rows=rows,
                                 shard_format=self.spec["shard_format"], spec_digest=store.spec_sha256(self.spec),
                                 verify=verify)

    def plan(self, log=None) -> list[int]:
        """This rank's shards that must be encoded: every one not finished and verified (sha256 recomputed).
        Their leftovers (partial files, temporary files of a killed writer) are removed. ``log``: called with
        one-line messages (why a shard is redone, the plan)."""
        rank, world_size = _distributed_rank_and_size()
        say = log or (lambda message: None)
        mine = range(rank, self.shard_count, world_size)
        pending = []
        for index in mine:
            record, why = self._check(index, verify=True)
            if record is None:
                if why != "missing":
                    say(f"shard {index}: redoing it ({why})")
                store.remove_shard_files(self.out_dir, index, self.spec["shard_format"])
                pending.append(index)
        where = f"rank {rank} of {world_size}: " if world_size > 1 else ""
        say(f"{where}{len(mine) - len(pending)} of {len(mine)} shards finished, {len(pending)} to encode "
            f"({self.input.rows:,} texts in {self.shard_count} shards of up to {self.spec['shard_size']:,})")
        return pending

    def run(self, model, *, pending: list[int] | None = None, batch_size: int = 32, progress: bool = False,
            log=None) -> "store.Corpus":
        """Encode this rank's unfinished shards (``pending``, default ``plan(log)``), then (rank 0, after every
        rank is done) write the manifest; return the opened corpus on every rank. ``model`` may be None when
        ``pending`` is empty (a rank with nothing left need not load one). ``progress``: a tqdm bar of this
        rank's texts (texts/s and ETA)."""
        from ..validation import as_int

        batch_size = as_int("batch_size", batch_size, minimum=1)
        rank, world_size = _distributed_rank_and_size()
        pending = self.plan(log) if pending is None else pending
        if pending:
            if model is None:
                raise ValueError(f"shards {pending[:5]} need encoding, and no model was given")
            loaded, wanted = model_spec_of(model), self.spec["model"]
            differing = [f"{key} {loaded[key]!r} (the spec says {wanted[key]!r})" for key in LOADED_SETTINGS
                         if loaded[key] != wanted[key]]
            if differing:
                raise ValueError(f"the model does not match the spec it was prepared for: {', '.join(differing)}")
            self._encode(model, pending, rank=rank, batch_size=batch_size,
                         progress_label=(f"encode-corpus rank {rank} of {world_size}" if world_size > 1
                                         else "encode-corpus") if progress else None)
        _barrier(world_size)
        if rank == 0:
            records = []
            for index in range(self.shard_count):
                record, why = self._check(index, verify=False)  # each rank verified (or wrote) its own
                if record is None:
                    raise RuntimeError(f"shard {index} is not finished after every rank ended ({why})")
                records.append(record)
            store.write_manifest(self.out_dir, self.spec, records, input_path=os.path.abspath(self.input.path))
        _barrier(world_size)
        return store.open_corpus(self.out_dir)

    def _encode(self, model, pending: list[int], *, rank: int, batch_size: int, progress_label: str | None) -> None:
        """Stream the input once, collecting the rows of the pending shards; encode and write each as it fills."""
        size = self.spec["shard_size"]
        todo = set(pending)
        bar = None
        if progress_label is not None:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(self.shard_rows(i)[1] for i in pending), unit="text", smoothing=0.1,
                       desc=progress_label)
        ids: list[str] = []
        texts: list[str] = []
        try:
            fields = {k: v for k, v in self.spec["input"].items() if k in ("id_field", "text_field")}
            for record in iter_records(self.input.path, self.input.format, keep=lambda row: row // size in todo,
                                       **fields):
                ids.append(record.id)
                texts.append(record.text)
                index = record.row // size
                if len(ids) == self.shard_rows(index)[1]:
                    self._write(model, index, ids, texts, rank=rank, batch_size=batch_size,
                                on_batch=None if bar is None else bar.update)
                    ids, texts = [], []
                    todo.discard(index)
                    if not todo:
                        break
        finally:
            if bar is not None:
                bar.close()
        if todo:
            raise ValueError(f"input {self.input.path} has fewer rows than when the run was prepared "
                             f"({self.input.rows:,}); it changed during the run")

    def _write(self, model, index: int, ids: list[str], texts: list[str], *, rank: int, batch_size: int,
               on_batch) -> None:
        started = time.time()
        embeddings = model.encode_documents(texts, self.spec["instruction"], batch_size=batch_size,
                                            normalize_embeddings=self.spec["normalize"], show_progress_bar=False,
                                            on_batch=on_batch)
        encoded = time.time()
        try:
            store.write_shard(self.out_dir, index, first_row=self.shard_rows(index)[0], ids=ids,
                              embeddings=embeddings, shard_format=self.spec["shard_format"],
                              spec_digest=store.spec_sha256(self.spec),
                              extra={"rank": rank, "batch_size": batch_size, "started": started, "encoded": encoded,
                                     "finished": time.time()})
        except OSError as error:
            raise OSError(error.errno, f"shard {index} is not finished: {error.strerror or error}; a rerun with the "
                                       "same options redoes it") from None


def encode_corpus(model, input, out_dir, *, model_name: str | None = None, instruction: str | None = None,
                  format: str = "auto", id_field: str = "id", text_field: str = "text",
                  shard_size: int = DEFAULT_SHARD_SIZE, shard_format: str = "safetensors", batch_size: int = 32,
                  normalize: bool = True, progress: bool = False, log=None) -> "store.Corpus":
    """Embed every text of ``input`` (JSONL rows with ``id_field`` / ``text_field``, or plain text: one text per
    line, id = line number; ``.gz`` too) as documents into shards under ``out_dir``; return the opened corpus.

    Resumable: a rerun with the same model, options and input skips finished shards and redoes missing, partial
    or damaged ones; another model, options or input is refused (``CorpusMismatchError``). Under ``torchrun``
    (an initialized default process group) each rank encodes its own shards. ``model_name``: the reference the
    model loads from (recorded, so ``gircse search`` / ``Corpus.load_model`` can load it; default: its base
    model when it has no adapter, else none, and searches must then name a model).
    """
    job = CorpusJob.prepare(input, out_dir, model=model_spec_of(model, name=model_name), instruction=instruction,
                            format=format, id_field=id_field, text_field=text_field, shard_size=shard_size,
                            shard_format=shard_format, normalize=normalize)
    return job.run(model, batch_size=batch_size, progress=progress, log=log)

