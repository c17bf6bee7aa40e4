"""``gircse encode-corpus``: the shards equal ``encode``; bad input is one line and exit 2 before the model loads;
a full disk leaves no shard marked finished; under torchrun 2 ranks give the single-process result, and a rank
killed mid-run followed by a rerun gives the clean run's result."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

import gircse.corpus as gc
from gircse import cli
from tests.gircse.corpus.corpus_data import TEXTS, corpus_rows, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _reference(directory, texts, **kwargs):
    from gircse import GIRCSE

    return GIRCSE.from_pretrained(directory).encode_documents(texts, **kwargs)


def _run(argv, *, launcher=(), limit_file_bytes=None, env=None, timeout=180):
    """``python [-m torch.distributed.run ...] -m <module> argv`` in its own session, killed whole on a hang."""
    def limit():
        if limit_file_bytes is not None:  # writes past it fail with EFBIG, as on a full disk
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, *launcher, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env, preexec_fn=limit)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out, err


def _torchrun(module, argv, **kwargs):
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", module)
    return _run(argv, launcher=launcher, **kwargs)


def test_writes_what_encode_gives(saved_tiny, tmp_path, capsys, restore_threads):
    data = write_jsonl(tmp_path / "docs.jsonl.gz", corpus_rows())
    out = tmp_path / "out"
    assert cli.main(["encode-corpus", data, str(out), "--model", saved_tiny, "--shard-size", "8",
                     "--instruction", "Represent the document", "--batch-size", "5", "--progress"]) == 0
    err = capsys.readouterr().err
    assert "0 of 4 shards finished, 4 to encode (31 texts in 4 shards of up to 8)" in err
    assert "text/s" in err  # the progress bar's rate (and ETA)
    assert err.strip().splitlines()[-1].startswith(f"gircse encode-corpus: 31 texts -> {out} (4 shards, d=32) in ")
    corpus = gc.open(out, verify=True)
    assert corpus.ids == [r["id"] for r in corpus_rows()]
    np.testing.assert_allclose(np.asarray(corpus.embeddings),
                               _reference(saved_tiny, TEXTS, instruction="Represent the document"), atol=1e-5)
    spec = corpus.manifest["spec"]
    assert spec["model"]["name"] == os.path.abspath(saved_tiny) and spec["instruction"] == "Represent the document"
    assert spec["input"] == {"format": "jsonl", "id_field": "id", "text_field": "text", "rows": 31,
                             "sha256": gc.scan(data).sha256}
    # plain text, .npy shards, other field names
    lines = tmp_path / "docs.txt"
    lines.write_text("\n".join(TEXTS[:5]) + "\n", encoding="utf-8")
    assert cli.main(["encode-corpus", str(lines), str(tmp_path / "txt"), "--model", saved_tiny,
                     "--shard-format", "npy", "--no-progress"]) == 0
    corpus = gc.open(tmp_path / "txt")
    assert corpus.ids == ["1", "2", "3", "4", "5"] and os.path.isfile(tmp_path / "txt" / "shard-00000.npy")
    np.testing.assert_allclose(np.asarray(corpus.embeddings), _reference(saved_tiny, TEXTS[:5]), atol=1e-5)


def _bad_inputs(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", corpus_rows()[:4])
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": " \t"}])
    duplicate = write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"},
                                                     {"id": "a", "text": "z"}])
    blank_line = tmp_path / "blank.txt"
    blank_line.write_text("one\n\nthree\n")
    (tmp_path / "a-file").write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    out = str(tmp_path / "out")
    return [
        ([blank, out], f"{blank}:2: the text is empty"),
        ([duplicate, out], f"{duplicate}:3: duplicate id 'a' (first on line 1)"),
        ([str(blank_line), out], f"{blank_line}:2: the text is empty"),
        ([good, out, "--id-field", "package"], f"{good}:1: no 'package' field"),
        ([str(tmp_path / "missing.jsonl"), out], "no such file"),
        ([good, str(tmp_path / "a-file")], "is a file; name a directory"),
        ([good, str(tmp_path / "a-file" / "below")], "cannot be created"),
        ([good, str(foreign)], "is not empty and is not a gircse corpus directory (it holds notes.txt)"),
        ([good, out, "--model", str(tmp_path / "no-model")], "--model: no such directory"),
        ([good, out, "--device", "nonsense"], "--device 'nonsense'"),
    ]


def test_bad_input_is_one_line_exit_2_before_loading(saved_tiny, tmp_path, capsys, no_model_loading):
    for argv, message in _bad_inputs(tmp_path):
        argv = ["encode-corpus", *argv] + ([] if "--model" in argv else ["--model", saved_tiny])
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("gircse encode-corpus: ") and message in err and err.count("\n") == 1, (argv, err)
        assert not os.path.exists(tmp_path / "out" / "manifest.json")
    for argv in (["--shard-size", "0"], ["--batch-size", "-1"], ["--threads", "0"], ["--shard-format", "csv"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["encode-corpus", "in.jsonl", "out", *argv])
        assert exit_.value.code == 2


def test_rerun_with_other_options_refused_before_loading(saved_tiny, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "docs.jsonl", corpus_rows())
    out = str(tmp_path / "out")
    assert cli.main(["encode-corpus", data, out, "--model", saved_tiny, "--shard-size", "10"]) == 0
    capsys.readouterr()
    import gircse

    monkeypatch.setattr(gircse.GIRCSE, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    other = write_jsonl(tmp_path / "other.jsonl", corpus_rows(TEXTS[:-1]))
    for argv, message in (([data, out, "--k", "3"], "model.k: 3 now, 2 there"),
                          ([other, out], "input.rows: 30 now, 31 there"),
                          ([data, out, "--instruction", "x"], "instruction: 'x' now, None there"),
                          ([data, out, "--dtype", "bf16"], "model.dtype: 'bfloat16' now, 'float32' there")):
        assert cli.main(["encode-corpus", *argv, "--model", saved_tiny, "--shard-size", "10"]) == 2
        err = capsys.readouterr().err
        assert "holds a corpus from another input or other options" in err and message in err, err
        assert err.count("\n") == 1
    # the same options again: every shard verified, nothing to encode, so no model is loaded
    assert cli.main(["encode-corpus", data, out, "--model", saved_tiny, "--shard-size", "10"]) == 0
    assert "4 of 4 shards finished, 0 to encode" in capsys.readouterr().err


def test_full_disk_leaves_no_shard_finished_and_a_rerun_completes(saved_tiny, tmp_path, restore_threads):
    data = write_jsonl(tmp_path / "docs.jsonl", corpus_rows())
    out = tmp_path / "out"
    argv = ["-m", "gircse", "encode-corpus", data, str(out), "--model", saved_tiny, "--shard-size", "16"]
    # 2000 bytes: spec.json fits, a shard of 16 x 32 float32 (2 KiB + its header) does not
    code, _, err = _run(argv, limit_file_bytes=2000)
    assert code == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("gircse encode-corpus: ") and "shard 0 is not finished: writing " in line
    assert "shard-00000.safetensors failed: File too large; a rerun with the same options redoes it" in line
    assert sorted(os.listdir(out)) == ["spec.json"]  # no record, no data, no temporary file
    assert cli.main(argv[2:]) == 0
    np.testing.assert_allclose(np.asarray(gc.open(out, verify=True).embeddings), _reference(saved_tiny, TEXTS),
                               atol=1e-5)


def test_unwritable_out_dir_is_one_line_before_loading(saved_tiny, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", corpus_rows())
    # 200 bytes: less than spec.json, the first file written (python's own temp-dir probe writes 4 bytes)
    code, _, err = _run(["-m", "gircse", "encode-corpus", data, str(tmp_path / "out"), "--model", saved_tiny],
                        limit_file_bytes=200)
    assert code == 2
    assert err.strip().splitlines() == [f"gircse encode-corpus: [Errno 27] writing {tmp_path / 'out' / 'spec.json'} "
                                        "failed: File too large"]


def test_two_ranks_give_the_single_process_result(saved_tiny, tmp_path, restore_threads, capsys):
    data = write_jsonl(tmp_path / "docs.jsonl", corpus_rows())
    common = ["--model", saved_tiny, "--shard-size", "4", "--batch-size", "3", "--threads", "1"]
    assert cli.main(["encode-corpus", data, str(tmp_path / "one"), *common]) == 0
    code, _, err = _torchrun("gircse", ["encode-corpus", data, str(tmp_path / "two"), *common])
    assert code == 0, err[-3000:]
    assert "rank 0 of 2: 0 of 4 shards finished, 4 to encode" in err and "rank 1 of 2: 0 of 4 shards" in err
    assert err.count("gircse encode-corpus: 31 texts ->") == 1  # rank 0 writes the manifest and reports
    one, two = gc.open(tmp_path / "one"), gc.open(tmp_path / "two", verify=True)
    assert two.ids == one.ids
    # Same shards, same batches, one thread each: bit for bit.
    assert np.array_equal(np.asarray(two.embeddings), np.asarray(one.embeddings))
    assert [s["rank"] for s in two.manifest["shards"]] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert two.manifest["spec"] == one.manifest["spec"]
    # options are checked on every rank; rank 0 alone reports
    code, _, err = _torchrun("gircse", ["encode-corpus", data, str(tmp_path / "two"), *common[:-4], "--k", "3"])
    assert code != 0 and err.count("holds a corpus from another input or other options") == 1


def test_a_rank_killed_mid_run_then_a_rerun_equals_a_clean_run(saved_tiny, tmp_path, restore_threads):
    data = write_jsonl(tmp_path / "docs.jsonl", corpus_rows())
    common = ["--model", saved_tiny, "--shard-size", "3", "--batch-size", "2", "--threads", "1"]
    out = tmp_path / "out"
    code, _, err = _torchrun("tests.gircse.cli.kill_rank", ["encode-corpus", data, str(out), *common],
                             env={"GIRCSE_TEST_KILL_RANK": "1"})
    assert code != 0, err[-3000:]
    left = sorted(os.listdir(out))
    assert "manifest.json" not in left
    # rank 1 finished shard 1, then died inside shard 3: its data file and half an ids temp file are there
    assert "shard-00001.json" in left and "shard-00003.safetensors" in left and "shard-00003.json" not in left
    assert any(n.startswith("shard-00003.ids.jsonl.tmp.") for n in left)
    code, _, err = _torchrun("gircse", ["encode-corpus", data, str(out), *common])
    assert code == 0, err[-3000:]
    assert "shard 3: redoing it (partial (no record))" in err
    assert not [n for n in os.listdir(out) if ".tmp." in n]
    assert cli.main(["encode-corpus", data, str(tmp_path / "clean"), *common]) == 0
    resumed, clean = gc.open(out, verify=True), gc.open(tmp_path / "clean")
    assert resumed.ids == clean.ids
    assert np.array_equal(np.asarray(resumed.embeddings), np.asarray(clean.embeddings))
    np.testing.assert_allclose(np.asarray(resumed.embeddings), _reference(saved_tiny, TEXTS), atol=1e-5)
    assert json.load(open(out / "manifest.json"))["rows"] == 31
