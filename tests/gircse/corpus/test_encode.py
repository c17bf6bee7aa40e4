"""``gircse.corpus.encode``: shards equal ``GIRCSE.encode``, reruns resume, other runs are refused."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import gircse.corpus as gc
from gircse.corpus import store
from gircse.corpus.encode import CorpusJob
from gircse.corpus.model_spec import model_spec_of, requested_model_spec

from .corpus_data import TEXTS, corpus_rows, write_jsonl


def _matrix(corpus) -> np.ndarray:
    return np.asarray(corpus.embeddings)


@pytest.mark.parametrize("shard_format", store.SHARD_FORMATS)
def test_corpus_equals_encode_in_input_order(tiny_model, corpus_file, tmp_path, shard_format):
    corpus = gc.encode_corpus(tiny_model, corpus_file, tmp_path / "out", shard_size=7, batch_size=4,
                              shard_format=shard_format)
    assert corpus.ids == [f"doc-{i:03d}" for i in range(len(TEXTS))]
    assert isinstance(corpus.embeddings.parts[0], np.memmap) and len(corpus.embeddings.parts) == 5
    np.testing.assert_allclose(_matrix(corpus), tiny_model.encode(TEXTS), atol=1e-5)
    manifest = corpus.manifest
    assert manifest["rows"] == len(TEXTS) and manifest["dim"] == 32 and manifest["dtype"] == "float32"
    assert [s["rows"] for s in manifest["shards"]] == [7, 7, 7, 7, 3]
    assert manifest["spec"]["model"] | {"name": None} == {
        "name": None, "adapter": None, "digest": None, "method": "gircse", "k": 2, "max_length": 512,
        "prompt_style": "gircse", "dtype": "float32"}
    assert all(len(s["files"]["embeddings"]["sha256"]) == 64 for s in manifest["shards"])
    assert gc.open(tmp_path / "out", verify=True).ids == corpus.ids


def test_instruction_plain_text_and_no_normalize(tiny_model, tmp_path):
    path = tmp_path / "docs.txt.gz"
    import gzip

    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(TEXTS[:9]) + "\n")
    corpus = gc.encode_corpus(tiny_model, path, tmp_path / "out", shard_size=4, instruction="Represent it",
                              normalize=False)
    assert corpus.ids == [str(i) for i in range(1, 10)]
    want = tiny_model.encode_documents(TEXTS[:9], "Represent it", normalize_embeddings=False)
    np.testing.assert_allclose(_matrix(corpus), want, atol=1e-5)
    assert np.abs(np.linalg.norm(want, axis=1) - 1).max() > 1e-3  # really not normalized


def test_rerun_skips_finished_and_redoes_missing_partial_and_damaged_shards(tiny_model, corpus_file, tmp_path):
    out = tmp_path / "out"
    clean = _matrix(gc.encode_corpus(tiny_model, corpus_file, out, shard_size=5))
    names = {i: store.shard_names(i, "safetensors") for i in range(7)}
    untouched = os.stat(out / names[0]["record"]).st_mtime_ns
    os.remove(out / names[1]["embeddings"])                                      # missing file
    os.remove(out / names[2]["record"])                                          # data without a record
    (out / (names[2]["ids"] + ".tmp.999")).write_text('"half')                   # a killed writer's temp
    damaged = bytearray((out / names[3]["embeddings"]).read_bytes())
    damaged[-5] ^= 0x40
    (out / names[3]["embeddings"]).write_bytes(bytes(damaged))                   # a flipped bit
    for i in (4, 5, 6):
        store.remove_shard_files(str(out), i, "safetensors")                     # never written
    os.remove(out / store.MANIFEST_FILE)
    with pytest.raises(FileNotFoundError, match="the encoding is not finished"):
        gc.open(out)
    messages = []
    corpus = gc.encode_corpus(tiny_model, corpus_file, out, shard_size=5, log=messages.append)
    assert f"shard 1: redoing it ({names[1]['embeddings']} is missing)" in messages
    assert "shard 2: redoing it (partial (no record))" in messages
    assert f"shard 3: redoing it ({names[3]['embeddings']} does not match its checksum)" in messages
    assert messages[-1].startswith("1 of 7 shards finished, 6 to encode")
    assert os.stat(out / names[0]["record"]).st_mtime_ns == untouched
    assert not [n for n in os.listdir(out) if ".tmp." in n]
    np.testing.assert_allclose(_matrix(corpus), clean, atol=1e-6)
    # a finished run: nothing to redo
    messages.clear()
    gc.encode_corpus(tiny_model, corpus_file, out, shard_size=5, log=messages.append)
    assert messages == ["7 of 7 shards finished, 0 to encode (31 texts in 7 shards of up to 5)"]


def test_other_options_model_or_input_are_refused_before_encoding(tiny_model, make_tiny, corpus_file, tmp_path):
    out = tmp_path / "out"
    gc.encode_corpus(tiny_model, corpus_file, out, shard_size=5)
    before = sorted(os.listdir(out))
    other_input = write_jsonl(tmp_path / "other.jsonl", corpus_rows(TEXTS[:-1]))
    cases = [
        (dict(input=other_input), "input.rows: 30 now, 31 there"),
        (dict(shard_size=6), "shard_size: 6 now, 5 there"),
        (dict(instruction="Find it"), "instruction: 'Find it' now, None there"),
        (dict(normalize=False), "normalize: False now, True there"),
        (dict(model=make_tiny("llama", k=3)), "model.k: 3 now, 2 there"),
        (dict(shard_format="npy"), "shard_format: 'npy' now, 'safetensors' there"),
    ]
    for change, message in cases:
        kwargs = dict(model=tiny_model, input=corpus_file, out_dir=out, shard_size=5) | change
        with pytest.raises(gc.CorpusMismatchError, match="holds a corpus from another input or other options") as e:
            gc.encode_corpus(kwargs.pop("model"), kwargs.pop("input"), kwargs.pop("out_dir"), **kwargs)
        assert message in str(e.value), (change, str(e.value))
    assert sorted(os.listdir(out)) == before
    # how the work runs is not part of the spec: another batch size resumes the same corpus
    gc.encode_corpus(tiny_model, corpus_file, out, shard_size=5, batch_size=3)


def test_loaded_model_must_match_the_prepared_spec(tiny_model, make_tiny, corpus_file, tmp_path):
    job = CorpusJob.prepare(corpus_file, tmp_path / "out", model=model_spec_of(tiny_model), shard_size=8)
    with pytest.raises(ValueError, match=r"does not match the spec it was prepared for: k 3 \(the spec says 2\)"):
        job.run(make_tiny("llama", k=3))
    with pytest.raises(ValueError, match=r"shards \[0, 1, 2, 3\] need encoding, and no model was given"):
        job.run(None)
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith("shard-")]


def test_requested_spec_is_what_loading_gives(tiny_dir, tiny_model, tmp_path):
    """The command line claims OUT_DIR with the spec worked out before loading; the loaded model agrees."""
    spec = requested_model_spec(tiny_dir)
    assert spec["name"] == os.path.abspath(tiny_dir) and len(spec["digest"]) == 64
    assert {k: spec[k] for k in ("method", "k", "max_length", "prompt_style", "dtype")} == \
        {k: v for k, v in model_spec_of(tiny_model).items() if k in ("method", "k", "max_length", "prompt_style",
                                                                      "dtype")}
    assert requested_model_spec(tiny_dir, k=4, dtype="bf16")["k"] == 4
    assert requested_model_spec(tiny_dir, dtype="bf16")["dtype"] == "bfloat16"
    default = requested_model_spec("default")
    assert default["name"] == "default" and default["k"] == 5 and default["max_length"] == 128
    # retraining the model in place changes its digest: the corpus can no longer be searched with it
    config = os.path.join(tiny_dir, "gircse_config.json")
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(tiny_dir, copy)
    before = requested_model_spec(str(copy))["digest"]
    (copy / "gircse_config.json").write_text(open(config).read().replace('"k": 2', '"k": 3'))
    assert requested_model_spec(str(copy))["digest"] != before


def test_encode_reports_each_batch(tiny_model):
    seen = []  # the K soft-token steps run on decode groups (here all 10 texts): one call per group
    tiny_model.encode(TEXTS[:10], batch_size=4, on_batch=seen.append)
    assert seen == [10]
    seen = []
    tiny_model.encode(TEXTS[:10], batch_size=4, decode_batch_size=4, on_batch=seen.append)
    assert seen == [4, 4, 2]


def test_search_texts_uses_the_recorded_model(tiny_dir, tiny_model, corpus_file, tmp_path):
    corpus = gc.encode_corpus(tiny_model, corpus_file, tmp_path / "out", shard_size=8, model_name=tiny_dir)
    queries = ["alpha beta", "gamma"]
    hits = corpus.search_texts(queries, top=5, instruction="Find the document", backend="exact")
    vectors = tiny_model.encode_queries(queries, "Find the document")
    scores = vectors @ tiny_model.encode(TEXTS).T
    for q, row_hits in enumerate(hits):
        order = np.lexsort((np.arange(len(TEXTS)), -scores[q]))[:5]
        assert [h.id for h in row_hits] == [f"doc-{i:03d}" for i in order]
        np.testing.assert_allclose([h.score for h in row_hits], scores[q][order], atol=1e-5)
    assert corpus.row_of("doc-004") == 4
    unnamed = gc.encode_corpus(tiny_model, corpus_file, tmp_path / "unnamed", shard_size=8)
    assert unnamed.manifest["spec"]["model"]["name"] == tiny_model.base_model
    record = dict(corpus.manifest["spec"]["model"], name=None)
    from gircse.corpus.model_spec import check_recorded_model

    with pytest.raises(ValueError, match="records no loadable model"):
        check_recorded_model(record)
    json.dumps(corpus.manifest)  # the manifest is plain JSON
