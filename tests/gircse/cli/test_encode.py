"""``gircse encode`` writes the .npy that ``GIRCSE.encode`` gives, one row per input line."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from gircse import cli


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
        (["--device", "meta", "--output", str(tmp_path / "o.npy")], "--device 'meta': not a device that runs models"),
        (["--device", "cuda:7", "--output", str(tmp_path / "o.npy")], "--device 'cuda:7'"),
        (["--output", "/proc/x.npy"], "--output /proc/x.npy: cannot be written"),
        (["--output", str(texts)], "--output {t} is the same file as --input".format(t=texts)),
        (["--input", str(tmp_path), "--output", str(tmp_path / "o.npy")], f"--input {tmp_path} is a directory"),
        (["--instruction", " ", "--output", str(tmp_path / "o.npy")], "--instruction is empty (or only whitespace)"),
    ]
    for extra, message in cases:
        argv = ["encode", "--input", str(texts)] + extra
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("gircse encode: ") and message in err and err.count("\n") == 1, (argv, err)


def test_output_that_is_the_input_is_refused_and_the_input_kept(tmp_path, capsys, no_model_loading):
    """``--input X --output X`` used to replace the text file with the array; a symlink or a hard link to
    the input is the same file."""
    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "link.txt").symlink_to(texts)
    os.link(texts, tmp_path / "hard.txt")
    for output in (texts, tmp_path / "link.txt", tmp_path / "hard.txt", tmp_path / "." / "t.txt"):
        assert cli.main(["encode", "--input", str(texts), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert "is the same file as --input" in err and err.count("\n") == 1, err
    assert texts.read_text(encoding="utf-8") == "one\ntwo\n"


def test_non_finite_embeddings_fail_in_one_line_and_write_nothing(tmp_path, capsys, saved_nan_model):
    texts = tmp_path / "t.txt"
    texts.write_text("rain\nsnow\n", encoding="utf-8")
    out = tmp_path / "o.npy"
    capsys.readouterr()  # the fixture's saving output
    assert cli.main(["encode", "--model", saved_nan_model, "--input", str(texts), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gircse encode: the model produced a non-finite (NaN or infinite) embedding")
    assert err.count("\n") == 1 and not out.exists()
