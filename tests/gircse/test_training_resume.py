"""A run SIGKILLed mid-way and resumed ends with exactly the weights (and optimizer state) of an
uninterrupted run; the JSONL log has every step once. Run as a script, this file is the killed run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

CFG = dict(k=2, batch_size=2, grad_accum=1, lora_r=4, lora_alpha=8, lr=5e-3, num_negatives=1,
           checkpoint_every=2, progress=False, max_length=48)


def run(tokenizer, data, out, **kw):
    from gircse import GIRCSE
    from gircse.training import TrainConfig, train
    from tests.gircse.conftest import tiny_causal_lm

    model = GIRCSE(tiny_causal_lm("llama", seed=0), tokenizer, k=2, max_length=48)
    resume, overwrite = kw.pop("resume", False), kw.pop("overwrite", False)
    return train(model, data, out, TrainConfig(**{**CFG, **kw}), resume=resume, overwrite=overwrite)


def _tensors(path):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(path).items() if not k.startswith("rng")}


def test_kill_and_resume_equals_uninterrupted(smollm2_tokenizer, tmp_path):
    from .test_training import make_rows, write_rows

    data = write_rows(tmp_path / "train.jsonl", make_rows(11, seed=7))  # 5 steps of 2 rows (one row dropped)
    tok_dir = str(tmp_path / "tok")
    smollm2_tokenizer.save_pretrained(tok_dir)
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    run(smollm2_tokenizer, data, full)

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), tok_dir, data, killed, "3"],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL after step 3 (checkpoint at step 2)
    from safetensors import safe_open

    with safe_open(os.path.join(killed, "checkpoint.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["info"])["step"] == 2
    assert len(open(os.path.join(killed, "train_log.jsonl")).readlines()) == 3

    run(smollm2_tokenizer, data, killed, resume=True)
    a, b = _tensors(os.path.join(full, "checkpoint.safetensors")), _tensors(os.path.join(killed, "checkpoint.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_full = [json.loads(l) for l in open(os.path.join(full, "train_log.jsonl"))]
    log_resumed = [json.loads(l) for l in open(os.path.join(killed, "train_log.jsonl"))]
    assert [e["step"] for e in log_resumed] == [1, 2, 3, 4, 5]
    assert [e["loss"] for e in log_resumed] == [e["loss"] for e in log_full]
    assert [e["lr"] for e in log_resumed] == [e["lr"] for e in log_full]
    # resuming a finished run is a no-op that keeps the weights
    run(smollm2_tokenizer, data, killed, resume=True)
    assert all(torch.equal(v, _tensors(os.path.join(killed, "checkpoint.safetensors"))[k]) for k, v in b.items())


def test_stop_at_step_pauses_inside_the_schedule_and_resume_finishes_it(smollm2_tokenizer, tmp_path):
    """``stop_at_step`` ends the process after that step of the *full* schedule (lr as in the full run, a
    checkpoint and a loadable model at that step); ``resume`` then ends exactly where an uninterrupted run does."""
    from safetensors import safe_open

    from .test_training import make_rows, write_rows

    data = write_rows(tmp_path / "train.jsonl", make_rows(11, seed=7))  # 5 steps of 2 rows
    full, paused = str(tmp_path / "full"), str(tmp_path / "paused")
    run(smollm2_tokenizer, data, full)
    run(smollm2_tokenizer, data, paused, stop_at_step=3)
    log_full = open_log(full)
    log_paused = open_log(paused)
    assert [e["lr"] for e in log_paused] == [e["lr"] for e in log_full[:3]]  # the 5-step schedule, not a 3-step one
    assert json.load(open(os.path.join(paused, "train_config.json")))["total_steps"] == 5
    with safe_open(os.path.join(paused, "checkpoint.safetensors"), "pt") as f:  # the checkpoint is step 3's
        assert json.loads(f.metadata()["info"])["step"] == 3
    run(smollm2_tokenizer, data, paused, resume=True)
    recorded = json.load(open(os.path.join(paused, "train_config.json")))  # this leg's options, not the first's
    assert recorded["stop_at_step"] is None and recorded["resumed_at_steps"] == [3]
    a, b = _tensors(os.path.join(full, "checkpoint.safetensors")), _tensors(os.path.join(paused, "checkpoint.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert [e["loss"] for e in open_log(paused)] == [e["loss"] for e in log_full]


def open_log(out):
    return [json.loads(l) for l in open(os.path.join(out, "train_log.jsonl"))]


def test_resume_rejects_a_different_config(smollm2_tokenizer, tmp_path):
    import pytest

    from .test_training import make_rows, write_rows

    data = write_rows(tmp_path / "train.jsonl", make_rows(4))
    out = str(tmp_path / "o")
    run(smollm2_tokenizer, data, out, max_steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        _resume_with(smollm2_tokenizer, data, out)


def _resume_with(tokenizer, data, out):
    from gircse import GIRCSE
    from gircse.training import TrainConfig, train
    from tests.gircse.conftest import tiny_causal_lm

    model = GIRCSE(tiny_causal_lm("llama", seed=0), tokenizer, k=2, max_length=48)
    train(model, data, out, TrainConfig(**{**CFG, "batch_size": 1}), resume=True)


def test_resume_needs_the_same_data_file(smollm2_tokenizer, tmp_path):
    """--resume with another --data trained on the other file and kept the old name in train_config.json:
    the data file's bytes (SHA-256) are part of the run, like its options. The same bytes elsewhere resume."""
    import pytest

    from .test_training import make_rows, write_rows

    data = write_rows(tmp_path / "train.jsonl", make_rows(11, seed=7))
    other = write_rows(tmp_path / "other.jsonl", make_rows(11, seed=8))
    out = str(tmp_path / "run")
    run(smollm2_tokenizer, data, out, stop_at_step=2)
    recorded = json.load(open(os.path.join(out, "train_config.json")))
    assert recorded["data"] == data and len(recorded["data_sha256"]) == 64
    with pytest.raises(ValueError, match=f"--resume: the checkpoint was trained on {data} .*, this run's data "
                                         f"{other} differs"):
        run(smollm2_tokenizer, other, out, resume=True)
    assert [e["step"] for e in open_log(out)] == [1, 2]  # untouched
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(open(data, "rb").read())
    run(smollm2_tokenizer, str(moved), out, resume=True)
    assert [e["step"] for e in open_log(out)] == [1, 2, 3, 4, 5]


def test_resume_without_a_checkpoint_is_an_error(smollm2_tokenizer, tmp_path):
    """It used to start from scratch silently (a typo in --out, a run killed before its first checkpoint)."""
    import pytest

    from .test_training import make_rows, write_rows

    data = write_rows(tmp_path / "train.jsonl", make_rows(4))
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint in .*nothing to continue"):
        run(smollm2_tokenizer, data, str(tmp_path / "typo"), resume=True)
    assert not (tmp_path / "typo").exists()


def test_a_second_run_into_a_run_needs_resume_or_overwrite(smollm2_tokenizer, tmp_path):
    """A second run into a finished or checkpointed --out overwrote its checkpoint, log and adapter: refused
    unless overwrite=True, which starts again (the old run's files replaced). A log without a checkpoint (a
    run killed before its first) is no run to keep."""
    import pytest

    from gircse.training.checkpoint import checkpoint_info

    from .test_training import make_rows, write_rows

    data = write_rows(tmp_path / "train.jsonl", make_rows(11, seed=7))
    finished, paused = str(tmp_path / "finished"), str(tmp_path / "paused")
    run(smollm2_tokenizer, data, finished)
    run(smollm2_tokenizer, data, paused, stop_at_step=2)
    for out in (finished, paused):
        before = {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}
        with pytest.raises(FileExistsError, match=f"--out {out} already holds a run \\(checkpoint.safetensors"):
            run(smollm2_tokenizer, data, out, lr=1e-3)
        assert {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))} == before
    with pytest.raises(ValueError, match="choose one"):
        run(smollm2_tokenizer, data, finished, resume=True, overwrite=True)
    run(smollm2_tokenizer, data, finished, lr=1e-3, max_steps=1, overwrite=True)
    assert [e["step"] for e in open_log(finished)] == [1]
    assert json.load(open(os.path.join(finished, "train_config.json")))["lr"] == 1e-3
    info = checkpoint_info(os.path.join(finished, "checkpoint.safetensors"))
    assert info["step"] == 1 and info["config"]["lr"] == 1e-3
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "train_log.jsonl").write_text('{"step": 1}\n')
    run(smollm2_tokenizer, data, str(killed), max_steps=1)
    assert [e["step"] for e in open_log(str(killed))] == [1]


def test_resume_from_a_checkpoint_cut_short_names_it(smollm2_tokenizer, tmp_path):
    import pytest

    from .test_training import make_rows, write_rows

    data = write_rows(tmp_path / "train.jsonl", make_rows(4))
    out = tmp_path / "run"
    run(smollm2_tokenizer, data, str(out), max_steps=1)
    checkpoint = out / "checkpoint.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-64])
    with pytest.raises(ValueError, match=f"checkpoint {checkpoint} is not a complete safetensors file"):
        run(smollm2_tokenizer, data, str(out), max_steps=1, resume=True)


if __name__ == "__main__":
    from transformers import AutoTokenizer

    tok_dir, data, out, kill_after = sys.argv[1:5]
    run(AutoTokenizer.from_pretrained(tok_dir), data, out, _kill_after_step=int(kill_after))
