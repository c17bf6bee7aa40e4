"""A corpus directory on disk: the spec of the run, the shards, the manifest; opening it memory-mapped.

Layout of OUT_DIR::

    spec.json                  what was asked for (model and its settings, input fingerprint, instruction,
                               shard size and format): written first; a rerun with another spec is refused
    shard-00000.safetensors    rows [0, S) of the embeddings, float32 [rows, d] (or shard-00000.npy)
    shard-00000.ids.jsonl      their ids, one JSON string per line
    shard-00000.json           the shard's record: rows, dimension, byte counts and sha256 of both files;
                               written last, so it marks the shard finished
    manifest.json              spec + dimension + every shard's record, written once at the end (by rank 0)

Every file is written to a temporary name, flushed to disk and renamed over its final name, so a file that has
its final name is whole. A shard counts as finished only when its record exists, matches the spec and both data
files match the record's sizes and checksums; anything else is redone.
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import os
import re
import struct

import numpy as np

__all__ = ["FORMAT", "MANIFEST_FILE", "SHARD_FORMATS", "SPEC_FILE", "Corpus", "CorpusMismatchError", "Hit",
           "ShardedMatrix", "check_shard", "open_corpus", "prepare_directory", "spec_sha256", "write_manifest",
           "write_shard"]

FORMAT, VERSION = "gircse-corpus", 1
SPEC_FILE, MANIFEST_FILE = "spec.json", "manifest.json"
SHARD_FORMATS = ("safetensors", "npy")
TENSOR_NAME = "embeddings"
# Names this package writes into OUT_DIR (final and temporary); anything else there is someone else's file.
_OWN_NAME = re.compile(r"^(spec\.json|manifest\.json|shard-\d+\.(safetensors|npy|ids\.jsonl|json))(\.tmp\.\d+)?$")
_HASH_BLOCK = 1 << 22


class CorpusMismatchError(ValueError):
    """OUT_DIR holds a corpus encoded from another input or with other options."""


@dataclasses.dataclass(frozen=True)
class Hit:
    id: str
    score: float
    row: int


# ---------------------------------------------------------------------- files
def spec_sha256(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()


def shard_names(index: int, shard_format: str) -> dict[str, str]:
    stem = f"shard-{index:05d}"
    return {"embeddings": f"{stem}.{shard_format}", "ids": f"{stem}.ids.jsonl", "record": f"{stem}.json"}


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with builtins.open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened and synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file, fsync and rename: ``path`` is whole or absent/old.
    A failed write (disk full, I/O error) removes the temporary file and names ``path`` in the error."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with builtins.open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        message = f"writing {path} failed: {error.strerror or error}"
        raise (OSError(error.errno, message) if error.errno is not None else OSError(message)) from None


def _json_bytes(payload) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _read_json(path: str):
    with builtins.open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------- the spec
def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _differences(wanted: dict, found: dict) -> str:
    a, b = _flatten(wanted), _flatten(found)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    shown = [f"{k}: {a.get(k, '<absent>')!r:.70} now, {b.get(k, '<absent>')!r:.70} there" for k in keys[:4]]
    return "; ".join(shown) + (f"; and {len(keys) - 4} more" if len(keys) > 4 else "")


def prepare_directory(out_dir: str, spec: dict) -> bool:
    """Create OUT_DIR (parents too) or check it is this run's: empty, or a corpus directory with the same
    spec. Writes spec.json when absent. Returns True when OUT_DIR already held this spec (a rerun).

    Raises CorpusMismatchError for another spec (never mixes runs in one directory), FileExistsError when OUT_DIR
    is a file or holds files this package did not write, OSError when it cannot be created or written."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"OUT_DIR {out_dir} is a file; name a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise OSError(error.errno, f"OUT_DIR {out_dir} cannot be created: {error.strerror or error}") from None
    spec_path = os.path.join(out_dir, SPEC_FILE)
    if os.path.isfile(spec_path):
        try:
            found = _read_json(spec_path)
        except (OSError, ValueError) as error:
            raise CorpusMismatchError(f"{spec_path} cannot be read ({error}); use a new OUT_DIR") from None
        if found != spec:
            raise CorpusMismatchError(f"OUT_DIR {out_dir} holds a corpus from another input or other options "
                                      f"({_differences(spec, found)}); use a new OUT_DIR, or the options and "
                                      "input it was made with")
        return True
    names = os.listdir(out_dir)
    foreign = sorted(n for n in names if not _OWN_NAME.match(n))
    if foreign:
        raise FileExistsError(f"OUT_DIR {out_dir} is not empty and is not a gircse corpus directory (it holds "
                              f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); name a new or "
                              "empty directory")
    if any(n.startswith("shard-") and ".tmp." not in n for n in names):
        raise CorpusMismatchError(f"OUT_DIR {out_dir} holds shards but no {SPEC_FILE}: which options made them is "
                                  "unknown; use a new OUT_DIR")
    # Every rank writes the same bytes; the renames are atomic, so a concurrent writer is harmless.
    _write_atomic(spec_path, _json_bytes(spec))
    return False


# ---------------------------------------------------------------------- shards
def _embedding_bytes(embeddings: np.ndarray, shard_format: str) -> bytes:
    if shard_format == "safetensors":
        from safetensors.numpy import save

        return save({TENSOR_NAME: embeddings})
    buffer = io.BytesIO()
    np.save(buffer, embeddings)
    return buffer.getvalue()


def write_shard(out_dir: str, index: int, *, first_row: int, ids: list[str], embeddings: np.ndarray,
                shard_format: str, spec_digest: str, extra: dict | None = None) -> dict:
    """Write shard ``index`` (embeddings, ids, then its record) atomically; return the record."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
        raise ValueError(f"shard {index}: {len(ids)} ids for embeddings of shape {embeddings.shape}")
    names = shard_names(index, shard_format)
    payloads = {"embeddings": _embedding_bytes(embeddings, shard_format),
                "ids": "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ids).encode("utf-8")}
    files = {}
    for key, data in payloads.items():
        _write_atomic(os.path.join(out_dir, names[key]), data)
        files[key] = {"name": names[key], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    record = {"shard": index, "first_row": first_row, "rows": len(ids), "dim": int(embeddings.shape[1]),
              "spec_sha256": spec_digest, "files": files, **(extra or {})}
    _write_atomic(os.path.join(out_dir, names["record"]), _json_bytes(record))
    _fsync_directory(out_dir)
    return record


def check_shard(out_dir: str, index: int, *, first_row: int, rows: int, shard_format: str, spec_digest: str,
                verify: bool = True) -> tuple[dict | None, str]:
    """``(record, "")`` for a finished shard, else ``(None, why it must be redone)``. ``verify``: recompute
    both files' sha256 (reads them); otherwise sizes only."""
    names = shard_names(index, shard_format)
    record_path = os.path.join(out_dir, names["record"])
    if not os.path.isfile(record_path):
        present = [n for n in (names["embeddings"], names["ids"]) if os.path.exists(os.path.join(out_dir, n))]
        return None, ("partial (no record)" if present else "missing")
    try:
        record = _read_json(record_path)
        expected = {"shard": index, "first_row": first_row, "rows": rows, "spec_sha256": spec_digest}
        if any(record.get(k) != v for k, v in expected.items()):
            return None, "its record belongs to another layout or spec"
        for key in ("embeddings", "ids"):
            entry = record["files"][key]
            path = os.path.join(out_dir, entry["name"])
            if entry["name"] != names[key] or not os.path.isfile(path):
                return None, f"{names[key]} is missing"
            if os.path.getsize(path) != entry["bytes"]:
                return None, f"{names[key]} has {os.path.getsize(path)} bytes, its record says {entry['bytes']}"
            if verify and _sha256_file(path) != entry["sha256"]:
                return None, f"{names[key]} does not match its checksum"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"its record is unreadable ({error})"
    return record, ""


def remove_shard_files(out_dir: str, index: int, shard_format: str) -> None:
    """Delete what a shard left (its files, and temporary files of any writer), record first."""
    names = shard_names(index, shard_format)
    stems = (names["record"], names["embeddings"], names["ids"])
    for name in sorted(os.listdir(out_dir), key=lambda n: not n.startswith(names["record"])):
        if name in stems or any(name.startswith(stem + ".tmp.") for stem in stems):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))


def write_manifest(out_dir: str, spec: dict, records: list[dict], *, input_path: str) -> dict:
    """The manifest of a finished run: spec, dimension, row counts and every shard's files and checksums."""
    dims = {r["dim"] for r in records}
    if len(dims) != 1:
        raise ValueError(f"the shards of {out_dir} disagree on the dimension: {sorted(dims)}")
    manifest = {
        "format": FORMAT, "version": VERSION, "spec": spec, "spec_sha256": spec_sha256(spec),
        "input_path": input_path, "rows": sum(r["rows"] for r in records), "dim": dims.pop(),
        "dtype": "float32", "shards": [{k: v for k, v in r.items() if k != "spec_sha256"} for r in records],
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_atomic(os.path.join(out_dir, MANIFEST_FILE), _json_bytes(manifest))
    return manifest


# ---------------------------------------------------------------------- reading a finished corpus
def _memmap_safetensors(path: str) -> np.ndarray:
    with builtins.open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    entry = header[TENSOR_NAME]
    if entry["dtype"] != "F32" or len(entry["shape"]) != 2:
        raise ValueError(f"{path}: expected a float32 [rows, d] tensor {TENSOR_NAME!r}, got {entry}")
    start, _ = entry["data_offsets"]
    return np.memmap(path, dtype="<f4", mode="r", offset=8 + length + start, shape=tuple(entry["shape"]))


def _memmap(path: str, shard_format: str) -> np.ndarray:
    if shard_format == "safetensors":
        return _memmap_safetensors(path)
    return np.load(path, mmap_mode="r")


class ShardedMatrix:
    """The ``[n, d]`` float32 embeddings of a corpus: its shards memory-mapped, read only when indexed, never
    copied whole into RAM unless asked (``np.asarray(matrix)``).

    Indexing takes a row, a slice (step 1) or an array of rows (and a column index after them) and returns a
    numpy array; ``chunks(rows)`` yields ``(first_row, block)`` views for streaming over the whole matrix."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, parts: list[np.ndarray]):
        if not parts:
            raise ValueError("a corpus has at least one shard")
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]), int(parts[0].shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedMatrix(shape={self.shape}, shards={len(self.parts)})"

    def chunks(self, rows: int = 65536):
        for first, part in zip(self.offsets[:-1], self.parts):
            for start in range(0, len(part), rows):
                yield int(first + start), part[start:start + rows]

    def _rows(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        index = np.where(index < 0, index + len(self), index)
        out = np.empty(index.shape + (self.shape[1],), dtype=np.float32)
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        for s in np.unique(shard):
            where = shard == s
            out[where] = self.parts[s][index[where] - self.offsets[s]]
        return out

    def __getitem__(self, key):
        columns = slice(None)
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError(f"a ShardedMatrix has 2 dimensions, got an index of {len(key)}")
            key, columns = key
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self._rows(np.arange(start, stop, step))[:, columns]
            pieces = []
            for first, part in zip(self.offsets[:-1], self.parts):
                lo, hi = max(start - first, 0), min(stop - first, len(part))
                if lo < hi:
                    pieces.append(part[lo:hi])
            block = np.concatenate(pieces) if pieces else np.empty((0, self.shape[1]), np.float32)
            return np.array(block[:, columns])
        if np.ndim(key) == 0:
            return self._rows(np.array([int(key)]))[0][columns]
        return self._rows(np.asarray(key))[:, columns]

    def __array__(self, dtype=None, copy=None):
        full = np.concatenate(self.parts)
        return full if dtype is None else full.astype(dtype)


class Corpus:
    """A finished corpus (``open_corpus``): ``ids`` (list of str, row order), ``embeddings`` (a
    ``ShardedMatrix``, memory-mapped), ``manifest`` (dict), ``dim``; ``search`` / ``search_texts`` for top-k."""

    def __init__(self, directory: str, manifest: dict, ids: list[str], embeddings: ShardedMatrix):
        self.directory, self.manifest, self.ids, self.embeddings = directory, manifest, ids, embeddings
        self.dim = embeddings.shape[1]
        self._row_of: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        model = self.manifest["spec"]["model"]
        return (f"Corpus({self.directory!r}, rows={len(self)}, dim={self.dim}, model={model['name']!r}, "
                f"method={model['method']!r}, k={model['k']})")

    def row_of(self, identifier: str) -> int:
        if self._row_of is None:
            self._row_of = {i: r for r, i in enumerate(self.ids)}
        return self._row_of[identifier]

    def search(self, query_embeddings, top: int = 10, *, backend: str = "auto", chunk_rows: int = 65536
               ) -> list[list[Hit]]:
        """The ``top`` rows of highest cosine similarity to each query embedding (``[d]`` or ``[m, d]``), best
        first, ties broken by row; see ``gircse.corpus.search.top_k`` for the backends."""
        from .search import top_k

        queries = np.atleast_2d(np.asarray(query_embeddings, dtype=np.float32))
        scores, rows = top_k(queries, self.embeddings, top, backend=backend, chunk_rows=chunk_rows,
                             normalized=self.manifest["spec"]["normalize"])
        return [[Hit(self.ids[r], float(s), int(r)) for s, r in zip(qs, qr)] for qs, qr in zip(scores, rows)]

    def load_model(self, model: str | None = None, *, device=None):
        """The model the corpus was encoded with (its name, adapter and settings from the manifest), to embed
        queries. ``model``: load this reference instead, with the manifest's settings."""
        from .model_spec import load_recorded_model

        return load_recorded_model(self.manifest["spec"]["model"], model, device=device)

    def search_texts(self, queries, top: int = 10, *, instruction: str | None = None, model=None,
                     backend: str = "auto", batch_size: int = 32) -> list[list[Hit]]:
        """Embed ``queries`` (a str or a list) as queries with ``instruction`` and search. ``model``: a loaded
        GIRCSE (default: ``load_model()``)."""
        model = self.load_model() if model is None else model
        texts = [queries] if isinstance(queries, str) else list(queries)
        vectors = model.encode_queries(texts, instruction, batch_size=batch_size)
        return self.search(vectors, top, backend=backend)


def open_corpus(out_dir, *, verify: bool = False) -> Corpus:
    """Open a finished corpus directory: ids in memory, embeddings memory-mapped (nothing else read).
    ``verify``: also check every file's sha256 against the manifest (reads everything once)."""
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(out_dir, SPEC_FILE)):
            raise FileNotFoundError(f"{out_dir}: the encoding is not finished (no {MANIFEST_FILE}); rerun "
                                    "gircse encode-corpus with the same options to finish it")
        what = "no such directory" if not os.path.isdir(out_dir) else f"not a gircse corpus directory (no {MANIFEST_FILE})"
        raise FileNotFoundError(f"{out_dir}: {what}")
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a gircse corpus manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: corpus format version {manifest.get('version')}, this gircse reads {VERSION}")
    shard_format = manifest["spec"]["shard_format"]
    ids: list[str] = []
    parts = []
    for shard in manifest["shards"]:
        files = shard["files"]
        for key in ("embeddings", "ids"):
            file = os.path.join(out_dir, files[key]["name"])
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{out_dir}: {files[key]['name']} is missing; rerun gircse encode-corpus "
                                        "with the same options to redo it")
            if os.path.getsize(file) != files[key]["bytes"] or (verify and _sha256_file(file) != files[key]["sha256"]):
                raise ValueError(f"{out_dir}: {files[key]['name']} does not match the manifest (damaged?); rerun "
                                 "gircse encode-corpus with the same options to redo it")
        part = _memmap(os.path.join(out_dir, files["embeddings"]["name"]), shard_format)
        with builtins.open(os.path.join(out_dir, files["ids"]["name"]), encoding="utf-8") as f:
            shard_ids = [json.loads(line) for line in f]
        if part.shape != (shard["rows"], manifest["dim"]) or len(shard_ids) != shard["rows"]:
            raise ValueError(f"{out_dir}: shard {shard['shard']} holds {part.shape} embeddings and {len(shard_ids)} "
                             f"ids, the manifest says {shard['rows']} rows of dimension {manifest['dim']}")
        parts.append(part)
        ids.extend(shard_ids)
    return Corpus(out_dir, manifest, ids, ShardedMatrix(parts))
