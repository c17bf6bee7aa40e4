"""Two gloo CPU processes: the all-gathered loss gives, after summing gradients over ranks, exactly the
gradients of one process on the same global batch (direct and GradCache), and a 2-rank ``train`` run
ends with the weights of a single-process run with twice the per-rank batch."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank, init_file, tok_dir, data, results_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from transformers import AutoTokenizer

        from gircse.training import TrainConfig, batch_gradients, train, trainable_parameters
        from gircse.training import distributed as D
        from tests.gircse.test_training import make_rows, tiny_gircse

        tok = AutoTokenizer.from_pretrained(tok_dir)
        rows = make_rows(6, seed=11)
        out = {}
        for chunk in (None, 4):
            model, config = tiny_gircse(tok, "gircse", num_negatives=1, temperature=0.1, embed_chunk=chunk)
            model.zero_grad(set_to_none=True)
            loss, per_step = batch_gradients(model, rows[rank * 3:(rank + 1) * 3], config)
            params = trainable_parameters(model)
            D.all_reduce_gradients(params.values())
            out[f"loss.{chunk}"] = loss
            out.update({f"grad.{chunk}.{n}": p.grad for n, p in params.items()})
        torch.save(out, os.path.join(results_dir, f"rank{rank}.pt"))

        from gircse import GIRCSE
        from tests.gircse.conftest import tiny_causal_lm
        from tests.gircse.test_training_resume import CFG

        model = GIRCSE(tiny_causal_lm("llama", seed=0), tok, k=2, max_length=48)
        train(model, data, os.path.join(results_dir, "ddp_run"), TrainConfig(**{**CFG, "max_steps": 2}))
    finally:
        dist.destroy_process_group()


def test_two_rank_gradients_equal_single_process(smollm2_tokenizer, tmp_path):
    from safetensors.torch import load_file

    from gircse.training import TrainConfig, train
    from tests.gircse.conftest import tiny_causal_lm

    from .test_training import assert_grads_close, grads_of, make_rows, tiny_gircse, write_rows
    from .test_training_resume import CFG

    tok_dir = str(tmp_path / "tok")
    smollm2_tokenizer.save_pretrained(tok_dir)
    data = write_rows(tmp_path / "train.jsonl", make_rows(9, seed=4))
    mp.start_processes(_worker, args=(str(tmp_path / "init"), tok_dir, data, str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    rows = make_rows(6, seed=11)
    model, config = tiny_gircse(smollm2_tokenizer, "gircse", num_negatives=1, temperature=0.1)
    loss, _, single = grads_of(model, rows, config)
    for chunk in ("None", "4"):
        for r in results:
            assert torch.allclose(r[f"loss.{chunk}"], loss, rtol=1e-5)  # every rank: the global-batch loss
            # Each rank runs the op on half the rows with its own thread split: fp32 summation orders
            # differ from the single process, and tau = 0.02 amplifies that to ~1e-4 relative.
            assert_grads_close({n: r[f"grad.{chunk}.{n}"] for n in single}, single, rtol=3e-4)

    # train(): 2 ranks x batch 2 == 1 process x batch 4 (same rows per step, same negatives)
    from gircse import GIRCSE

    model = GIRCSE(tiny_causal_lm("llama", seed=0), smollm2_tokenizer, k=2, max_length=48)
    train(model, data, str(tmp_path / "single"), TrainConfig(**{**CFG, "max_steps": 2, "batch_size": 4}))
    a = load_file(tmp_path / "single" / "checkpoint.safetensors")
    b = load_file(tmp_path / "ddp_run" / "checkpoint.safetensors")
    # Adam divides by sqrt(v): entries with near-zero gradients turn fp32 round-off into O(lr) update
    # differences, so compare each tensor relative to its own scale.
    for key in a:
        if key.startswith("model."):
            scale = b[key].abs().max() + 1e-6
            assert (a[key] - b[key]).abs().max() / scale < 1e-3, key


def test_torchrun_cli(smollm2_tokenizer, tmp_path):
    """``torchrun --nproc_per_node 2 -m gircse train``: the process group comes up from the environment."""
    import json
    import subprocess
    import sys

    from tests.gircse.conftest import tiny_causal_lm

    from .test_training import make_rows, write_rows

    base = str(tmp_path / "base")
    tiny_causal_lm("llama").save_pretrained(base)
    smollm2_tokenizer.save_pretrained(base)
    data = write_rows(tmp_path / "d.jsonl", make_rows(12))
    out = tmp_path / "run"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gircse", "train", "--model", base, "--data", data, "--out", str(out), "--k", "2",
           "--batch-size", "2", "--lora-r", "4", "--max-length", "48", "--no-progress"]
    # own session: on a hang, the whole group (launcher and both workers) is killed, no orphans
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert json.load(open(out / "train_config.json"))["world_size"] == 2
    assert [json.loads(l)["step"] for l in open(out / "train_log.jsonl")] == [1, 2, 3]  # 12 rows / (2 x 2)
    assert stderr.count("gircse train: gircse on") == 1  # rank 0 reports
