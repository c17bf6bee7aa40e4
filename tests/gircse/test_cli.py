"""The ``gircse`` command line: encode writes a .npy; demo prints a semantic search."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from gircse import cli


@pytest.fixture
def saved_tiny(tmp_path, make_tiny):
    directory = str(tmp_path / "tiny-gircse")
    make_tiny("llama", k=2).save_pretrained(directory)
    return directory


def test_encode_writes_npy(saved_tiny, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("first text\nsecond, longer text about things\nthird\n", encoding="utf-8")
    out = tmp_path / "vectors.npy"
    assert cli.main(["encode", "--model", saved_tiny, "--instruction", "Find it", "--input", str(texts),
                     "--output", str(out)]) == 0
    vectors = np.load(out)
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert cli.main(["encode", "--model", saved_tiny, "--input", str(texts), "--output", str(out),
                     "--all-steps", "--k", "3", "--no-normalize"]) == 0
    assert np.load(out).shape == (3, 3, 32)


def test_encode_stdin_to_stdout_subprocess(saved_tiny):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "gircse", "encode", "--model", saved_tiny],
                          input=b"hello world\nanother line\n", capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert np.load(io.BytesIO(proc.stdout)).shape == (2, 32)


def test_encode_rejects_empty_line(saved_tiny, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("first\n\nthird\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="line 2 is empty"):
        cli.main(["encode", "--model", saved_tiny, "--input", str(texts), "--output", str(tmp_path / "o.npy")])


def test_demo_prints_search_results(monkeypatch, make_tiny, capsys):
    monkeypatch.setattr(cli, "_load", lambda args: make_tiny("llama", k=2))
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "query: famous landmark in the French capital" in out
    assert "top-1 correct:" in out


def test_parser_has_one_function_per_subcommand():
    parser = cli.build_parser()
    for command in ("demo", "encode"):
        args = parser.parse_args([command])
        assert args.func is getattr(cli, f"run_{command}")
