"""``gircse train`` end to end on a tiny saved model: arguments -> TrainConfig, run, saved GIRCSE
directory loads back with the adapter and embeds."""
from __future__ import annotations

import argparse
import json
import os

import pytest


def _parser():
    from gircse.cli.train import add_train_parser

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_config_from_args_defaults_are_the_papers():
    from gircse.cli.train import config_from_args

    c = config_from_args(_parser().parse_args(["train", "--out", "x"]))
    assert (c.method, c.k, c.lr, c.warmup_ratio, c.temperature, c.lam, c.epochs) == ("gircse", 5, 1e-5, 0.1, 0.02, 1.0, 1)
    assert (c.lora_r, c.lora_alpha, c.lora_target_modules, c.embed_chunk) == (64, 32, "all-linear", None)
    assert c.step_reduction == "sum"  # the paper's Eq. 7
    c = config_from_args(_parser().parse_args(["train", "--out", "x", "--step-reduction", "mean",
                                               "--max-grad-norm", "1.0"]))
    assert c.step_reduction == "mean" and c.max_grad_norm == 1.0
    assert config_from_args(_parser().parse_args(["train", "--out", "x"])).max_grad_norm == 1.0  # clipped by default
    assert config_from_args(_parser().parse_args(["train", "--out", "x", "--max-grad-norm", "none"])).max_grad_norm is None
    c = config_from_args(_parser().parse_args(["train", "--out", "x", "--method", "causal-eos", "--gradcache-chunk", "8",
                                               "--lora-target-modules", "q_proj,v_proj", "--bf16"]))
    assert c.method == "causal-eos" and c.embed_chunk == 8 and c.lora_target_modules == ["q_proj", "v_proj"] and c.bf16
    with pytest.raises(ValueError, match="batch_size"):
        config_from_args(_parser().parse_args(["train", "--out", "x", "--batch-size", "0"]))


def test_cli_train_saves_a_loadable_model(smollm2_tokenizer, tmp_path):
    import numpy as np

    from gircse import GIRCSE
    from tests.gircse.conftest import tiny_causal_lm

    from ..test_training import make_rows, write_rows

    base = str(tmp_path / "base")
    tiny_causal_lm("llama").save_pretrained(base)
    smollm2_tokenizer.save_pretrained(base)
    data = write_rows(tmp_path / "d.jsonl", make_rows(8))
    out = str(tmp_path / "run")
    args = _parser().parse_args(["train", "--model", base, "--data", data, "--out", out, "--k", "2",
                                 "--batch-size", "4", "--lora-r", "4", "--lr", "1e-3", "--no-progress",
                                 "--max-length", "48"])
    assert args.func(args) == 0
    assert [json.loads(l)["step"] for l in open(os.path.join(out, "train_log.jsonl"))] == [1, 2]
    loaded = GIRCSE.from_pretrained(out)
    assert loaded.method == "gircse" and loaded.k == 2 and hasattr(loaded.model, "peft_config")
    emb = loaded.encode(["alpha beta", "gamma"], k=3)
    assert emb.shape == (2, 32) and np.isfinite(emb).all()
    plain = GIRCSE.from_pretrained(base, k=2).encode(["alpha beta", "gamma"])
    assert not np.allclose(loaded.encode(["alpha beta", "gamma"]), plain)  # the adapter is applied


def test_cli_user_errors_are_one_line_before_loading(tmp_path, capsys, no_model_loading):
    from gircse.cli import main

    from ..test_training import make_rows, write_rows

    good = write_rows(tmp_path / "good.jsonl", make_rows(6))
    rows = make_rows(6)
    rows[4]["pos"] = []
    bad = write_rows(tmp_path / "bad.jsonl", rows)
    latin = str(tmp_path / "latin.jsonl")
    with open(latin, "wb") as f:
        f.write(open(good, "rb").read().replace(b"\n", "\n{\"query\": \"caf\xe9\"}\n".encode("latin-1"), 1))
    out = str(tmp_path / "o")
    cases = [
        (["--data", str(tmp_path / "nope.jsonl")], "no such training data file"),
        (["--data", str(tmp_path)], f"training data {tmp_path} is a directory"),
        (["--data", latin], f"{latin}:2: not UTF-8 text"),
        (["--data", bad], "bad.jsonl:5: 'pos' needs at least 1 item"),
        (["--data", good, "--num-negatives", "3"], "good.jsonl:1: 2 hard negative(s), training asks for 3"),
        (["--data", good, "--max-steps", "0"], "max_steps must be >= 1"),
        (["--data", good, "--lam", "-1"], "lam must be >= 0"),
        (["--data", good, "--max-grad-norm", "0"], "max_grad_norm must be > 0"),
        (["--data", good, "--lora-alpha", "0"], "lora_alpha must be >= 1"),
        (["--data", good, "--checkpoint-every", "-1"], "checkpoint_every must be >= 0"),
        (["--data", good, "--lr", "nan"], "lr must be finite"),
        (["--data", good, "--model", str(tmp_path / "no-model")], "--model: no such directory"),
        (["--data", good, "--device", "gpu0"], "--device 'gpu0'"),
    ]
    for extra, message in cases:
        assert main(["train", "--out", out] + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("gircse train: ") and message in err and err.count("\n") == 1, (extra, err)
    (tmp_path / "file").write_text("x")
    assert main(["train", "--out", str(tmp_path / "file"), "--data", good]) == 2
    assert "is a file" in capsys.readouterr().err
    for extra in (["--dtype", "int8"], ["--max-grad-norm", "off"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--out", out] + extra)
        assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_cli_run_checks_before_loading(smollm2_tokenizer, tmp_path, capsys, monkeypatch):
    """What the run into --out would do wrong is found before the model loads (it took 1.5-3 minutes):
    fewer rows than one step, a --resume without a checkpoint, whose options or data file differ from the
    checkpoint's, a second run into a checkpointed --out without --resume or --overwrite."""
    import gircse
    from gircse.cli import main

    from ..test_training import make_rows, write_rows
    from ..test_training_resume import run

    data = write_rows(tmp_path / "d.jsonl", make_rows(6))
    other = write_rows(tmp_path / "other.jsonl", make_rows(6, seed=1))
    out = str(tmp_path / "run")
    run(smollm2_tokenizer, data, out, max_steps=1)  # CFG: k 2, batch 2, LoRA r 4 / alpha 8, lr 5e-3, max_length 48
    same = ["--k", "2", "--batch-size", "2", "--lora-r", "4", "--lora-alpha", "8", "--lr", "5e-3",
            "--max-length", "48", "--max-steps", "1"]
    monkeypatch.setattr(gircse.GIRCSE, "from_pretrained", lambda *a, **k: pytest.fail("loaded before the checks"))
    cases = [
        (["--data", data, "--out", str(tmp_path / "new"), "--batch-size", "7"], "6 rows, fewer rows than one "
         "optimizer step needs (7 = batch_size 7 x 1 rank(s) x grad_accum 1)"),
        (["--data", data, "--out", str(tmp_path / "new"), "--resume", *same], "--resume: no checkpoint in"),
        (["--data", data, "--out", out, "--resume", *same[:-4]],
         "--resume: checkpoint has max_length=48, this run 256"),
        (["--data", other, "--out", out, "--resume", *same], f"--resume: the checkpoint was trained on {data}"),
        (["--data", data, "--out", out, *same], f"--out {out} already holds a run (checkpoint.safetensors)"),
        (["--data", data, "--out", out, "--resume", "--overwrite", *same], "choose one"),
    ]
    for argv, message in cases:
        assert main(["train", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("gircse train: ") and message in err and err.count("\n") == 1, (argv, err)


def test_methods_match_the_model_layer_and_parser_is_cheap():
    import subprocess
    import sys

    from gircse.model import METHODS
    from gircse.training import TrainConfig

    for method in METHODS:
        assert TrainConfig(method=method).validate().method == method
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="mean-pooling").validate()
    code = ("import argparse, sys, gircse.cli.train as c; p = argparse.ArgumentParser(); "
            "c.add_train_parser(p.add_subparsers()); print('torch' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip() == "False"


def test_gircse_cli_has_train():
    from gircse.cli import build_parser
    from gircse.cli.train import run_train

    args = build_parser().parse_args(["train", "--out", "x", "--method", "causal-eos"])
    assert args.func is run_train and args.method == "causal-eos"
