"""``gircse.corpus.store``: atomic shards with checksums, the spec guard, the memory-mapped matrix."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gircse.corpus import store
from gircse.corpus.store import CorpusMismatchError, ShardedMatrix

SPEC = {"format": store.FORMAT, "version": store.VERSION, "input": {"format": "text", "rows": 7, "sha256": "ab"},
        "model": {"name": "m", "k": 2}, "instruction": None, "normalize": True, "shard_size": 4,
        "shard_format": "safetensors"}


def _write(directory, index, rows, shard_format="safetensors", seed=0):
    embeddings = np.random.default_rng(seed).standard_normal((rows, 6)).astype(np.float32)
    ids = [f"id{index}-{i}" for i in range(rows)]
    store.write_shard(str(directory), index, first_row=index * 4, ids=ids, embeddings=embeddings,
                      shard_format=shard_format, spec_digest="d")
    return embeddings, ids


def _check(directory, index, rows, shard_format="safetensors", digest="d"):
    return store.check_shard(str(directory), index, first_row=index * 4, rows=rows, shard_format=shard_format,
                             spec_digest=digest)


@pytest.mark.parametrize("shard_format", store.SHARD_FORMATS)
def test_written_shard_checks_and_memory_maps(tmp_path, shard_format):
    embeddings, ids = _write(tmp_path, 0, 4, shard_format)
    record, why = _check(tmp_path, 0, 4, shard_format)
    assert why == "" and record["rows"] == 4 and record["dim"] == 6
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]
    part = store._memmap(str(tmp_path / record["files"]["embeddings"]["name"]), shard_format)
    assert isinstance(part, np.memmap) and np.array_equal(part, embeddings)


def test_damaged_or_partial_shards_are_not_finished(tmp_path):
    _write(tmp_path, 0, 4)
    names = store.shard_names(0, "safetensors")
    path = tmp_path / names["embeddings"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert _check(tmp_path, 0, 4) == (None, f"{names['embeddings']} does not match its checksum")
    path.write_bytes(bytes(data[:-4]))
    assert "has" in _check(tmp_path, 0, 4)[1] and "its record says" in _check(tmp_path, 0, 4)[1]
    assert _check(tmp_path, 0, 4, digest="other")[1] == "its record belongs to another layout or spec"
    assert _check(tmp_path, 0, 3)[1] == "its record belongs to another layout or spec"
    (tmp_path / names["record"]).write_text("{not json")
    assert _check(tmp_path, 0, 4)[1].startswith("its record is unreadable")
    os.remove(tmp_path / names["record"])
    assert _check(tmp_path, 0, 4) == (None, "partial (no record)")
    (tmp_path / (names["ids"] + ".tmp.123")).write_text("half")
    store.remove_shard_files(str(tmp_path), 0, "safetensors")
    assert os.listdir(tmp_path) == [] and _check(tmp_path, 0, 4) == (None, "missing")


def test_failed_write_leaves_no_temporary_file_and_names_the_path(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"writing .*shard-00000.safetensors failed: No space left on device"):
        _write(tmp_path, 0, 4)
    assert os.listdir(tmp_path) == []


def test_directory_claimed_once_per_spec(tmp_path):
    out = str(tmp_path / "out" / "nested")
    assert store.prepare_directory(out, SPEC) is False
    assert json.load(open(os.path.join(out, store.SPEC_FILE))) == SPEC
    assert store.prepare_directory(out, SPEC) is True
    other = {**SPEC, "model": {"name": "m", "k": 3}, "instruction": "x"}
    with pytest.raises(CorpusMismatchError, match=r"instruction: 'x' now, None there; model.k: 3 now, 2 there"):
        store.prepare_directory(out, other)


def test_directory_that_is_not_ours_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        store.prepare_directory(str(tmp_path / "file"), SPEC)
    with pytest.raises(FileExistsError, match="not empty and is not a gircse corpus directory .*file"):
        store.prepare_directory(str(tmp_path), SPEC)
    bare = tmp_path / "bare"
    bare.mkdir()
    _write(bare, 0, 4)
    with pytest.raises(CorpusMismatchError, match="holds shards but no spec.json"):
        store.prepare_directory(str(bare), SPEC)
    with pytest.raises(OSError, match="cannot be created"):
        store.prepare_directory(str(tmp_path / "file" / "below"), SPEC)


def test_sharded_matrix_indexes_like_the_concatenated_array():
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((n, 3)).astype(np.float32) for n in (4, 4, 1)]
    full = np.concatenate(parts)
    matrix = ShardedMatrix(parts)
    assert matrix.shape == (9, 3) and len(matrix) == 9
    for key in (0, 5, -1, slice(None), slice(2, 7), slice(3, 4), slice(8, 100), slice(6, 2), slice(1, 9, 3),
                [8, 0, 4, 4], np.array([-2, 3]), (slice(2, 6), 1), (7, slice(0, 2)), ([1, 5], [0, 2])):
        expected = full[key] if not (isinstance(key, tuple) and isinstance(key[0], list)) else full[key[0]][:, key[1]]
        assert np.array_equal(matrix[key], expected), key
    assert np.array_equal(np.asarray(matrix), full)
    chunks = list(matrix.chunks(3))
    assert [first for first, _ in chunks] == [0, 3, 4, 7, 8]
    assert np.array_equal(np.concatenate([block for _, block in chunks]), full)
    with pytest.raises(IndexError):
        matrix[9]
