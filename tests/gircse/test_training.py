"""Trainer: GradCache == direct gradients, cached generation == uncached Algorithm 1 gradients,
gradient checkpointing and bf16, end-to-end run with JSONL log, checkpoint and saved model."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from gircse.training import TrainConfig, apply_lora, batch_gradients, train, trainable_parameters

from .conftest import tiny_causal_lm

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega apple river stone cloud music paper light green").split()


def make_rows(n, seed=0, negs=2):
    import random

    rng = random.Random(seed)
    text = lambda a, b: " ".join(rng.choice(WORDS) for _ in range(rng.randint(a, b)))
    return [{"query": text(2, 6), "pos": [text(5, 14)], "neg": [text(5, 14) for _ in range(negs)],
             "instruction": "Find the matching text" if i % 3 else None} for i in range(n)]


def write_rows(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def tiny_gircse(tokenizer, method="gircse", *, seed=0, lora=True, **cfg):
    """A tiny random Llama GIRCSE with a LoRA adapter whose B matrices are non-zero (so every LoRA
    parameter gets a gradient)."""
    from gircse import GIRCSE

    config = TrainConfig(method=method, k=3, lora_r=4, lora_alpha=8, seed=seed, **cfg)
    model = GIRCSE(tiny_causal_lm("llama", seed=seed), tokenizer, method=method, k=3, max_length=64)
    if lora:
        apply_lora(model, config)
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in trainable_parameters(model).items():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    model.train()
    return model, config


def grads_of(model, rows, config, **kw):
    model.zero_grad(set_to_none=True)
    loss, per_step = batch_gradients(model, rows, config, **kw)
    return loss, per_step, {n: p.grad.clone() for n, p in trainable_parameters(model).items()}


def assert_grads_close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys() and a
    worst = max(((x - b[n]).abs().max() / (b[n].abs().max() + atol)).item() for n, x in a.items())
    assert worst < rtol, worst
    assert any(g.abs().max() > 0 for g in b.values())


@pytest.mark.parametrize("method", ["gircse", "causal-eos", "bidirectional-avg"])
def test_gradcache_equals_direct(smollm2_tokenizer, method):
    model, config = tiny_gircse(smollm2_tokenizer, method, num_negatives=2, temperature=0.1)
    rows = make_rows(5)
    loss_d, steps_d, direct = grads_of(model, rows, config)
    for chunk in (1, 4):
        cfg = TrainConfig(**{**config.public(), "embed_chunk": chunk})
        loss_c, steps_c, cached = grads_of(model, rows, cfg)
        assert torch.allclose(loss_c, loss_d, rtol=1e-5) and torch.allclose(steps_c, steps_d, rtol=1e-5)
        assert_grads_close(cached, direct)
    assert steps_d.shape == ((3,) if method == "gircse" else (1,))


def test_cached_generation_gradients_equal_uncached_algorithm1(smollm2_tokenizer, monkeypatch):
    """The trainer's GIRCSE path (prefill once, K one-position steps through the KV cache, graph kept)
    gives the same parameter gradients as Algorithm 1 recomputed from scratch at every step."""
    import gircse.model as gm
    from gircse.generation import generate_soft_tokens_uncached

    model, config = tiny_gircse(smollm2_tokenizer, "gircse", num_negatives=1, temperature=0.1)
    rows = make_rows(4, seed=3)
    calls = []
    original = gm.generate_soft_tokens
    monkeypatch.setattr(gm, "generate_soft_tokens", lambda *a, **k: calls.append(1) or original(*a, **k))
    loss_c, _, cached = grads_of(model, rows, config)
    assert calls  # the trainer really goes through the cached generation
    monkeypatch.setattr(gm, "generate_soft_tokens", generate_soft_tokens_uncached)
    loss_u, _, uncached = grads_of(model, rows, config)
    assert torch.allclose(loss_c, loss_u, rtol=1e-5)
    assert_grads_close(cached, uncached, rtol=1e-4)


def test_gradient_checkpointing_and_accum_scale(smollm2_tokenizer):
    from gircse.generation import base_causal_lm

    model, config = tiny_gircse(smollm2_tokenizer, "gircse", num_negatives=1)
    rows = make_rows(4, seed=5)
    _, _, plain = grads_of(model, rows, config)
    base_causal_lm(model.model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, _, ckpt = grads_of(model, rows, config)
    assert_grads_close(ckpt, plain)
    _, _, half = grads_of(model, rows, config, scale=0.5)
    assert_grads_close({n: 2 * g for n, g in half.items()}, plain)


def test_bf16_autocast_loss_fp32(smollm2_tokenizer):
    model, config = tiny_gircse(smollm2_tokenizer, "gircse", num_negatives=1, bf16=True)
    loss, per_step, grads = grads_of(model, make_rows(4), config)
    assert loss.dtype == torch.float32 and per_step.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    _, fp32 = tiny_gircse(smollm2_tokenizer, "gircse", num_negatives=1)
    loss32, _, _ = grads_of(model, make_rows(4), fp32)
    assert abs(loss.item() - loss32.item()) < 0.1 * loss32.item()


@pytest.mark.parametrize("tie", [True, False])
def test_frozen_weights_cast_once_give_autocasts_bits(smollm2_tokenizer, tie):
    """``train`` under bf16 casts the frozen linear weights once instead of autocast casting them at
    every call: the loss and every LoRA gradient must be bit-identical, the tied embedding must stay
    fp32, and the fp32 weights must come back afterwards (the same tensors, not a bf16 round trip)."""
    from gircse import GIRCSE
    from gircse.generation import base_causal_lm
    from gircse.training import frozen_linear_weights_in_bf16

    from .conftest import tiny_causal_lm

    config = TrainConfig(method="gircse", k=3, lora_r=4, lora_alpha=8, num_negatives=1, bf16=True)
    model = GIRCSE(tiny_causal_lm("llama", tie=tie), smollm2_tokenizer, k=3, max_length=64)
    apply_lora(model, config)
    with torch.no_grad():
        for name, p in trainable_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    rows = make_rows(4)
    loss, per_step, grads = grads_of(model, rows, config)
    causal_lm = base_causal_lm(model.model)
    before = {n: (p.data_ptr(), p.dtype) for n, p in causal_lm.named_parameters()}
    with frozen_linear_weights_in_bf16(model):
        dtypes = {n: p.dtype for n, p in causal_lm.named_parameters()}
        head_dtype = causal_lm.get_output_embeddings().weight.dtype
        loss_once, per_step_once, grads_once = grads_of(model, rows, config)
    assert dtypes["model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert dtypes["model.embed_tokens.weight"] == torch.float32  # embeddings, and the LM head when tied
    assert head_dtype == (torch.float32 if tie else torch.bfloat16)
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert torch.equal(loss, loss_once) and torch.equal(per_step, per_step_once)
    assert grads.keys() == grads_once.keys() and all(torch.equal(grads[n], grads_once[n]) for n in grads)
    assert all((p.data_ptr(), p.dtype) == before[n] for n, p in causal_lm.named_parameters())


def test_train_end_to_end(smollm2_tokenizer, tmp_path):
    from gircse import GIRCSE

    data = write_rows(tmp_path / "train.jsonl", make_rows(13))
    model = GIRCSE(tiny_causal_lm("llama"), smollm2_tokenizer, k=3, max_length=64)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    out = tmp_path / "run"
    train(model, data, str(out), TrainConfig(k=3, batch_size=3, grad_accum=2, lora_r=4, lora_alpha=8, lr=1e-3,
                                             embed_chunk=5, checkpoint_every=1, progress=False))
    log = [json.loads(l) for l in open(out / "train_log.jsonl")]
    assert [e["step"] for e in log] == [1, 2]  # 13 rows // (3 * 2) = 2 steps, one epoch
    assert all(len(e["L"]) == 3 and e["loss"] > 0 for e in log)
    assert log[0]["lr"] == pytest.approx(1e-3)  # warmup = ceil(0.1 * 2) = 1 step
    assert os.path.exists(out / "checkpoint.safetensors") and os.path.exists(out / "train_config.json")
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    params = trainable_parameters(model)
    assert params and all("lora_" in n for n in params)
    assert any((p - 0).abs().max() > 0 for n, p in params.items() if "lora_B" in n)  # B moved from zero init
    for n, p in model.model.named_parameters():  # base weights frozen
        if "lora_" not in n:
            assert torch.equal(p, before[n.replace("base_model.model.", "", 1).replace(".base_layer", "")])


def test_config_errors(smollm2_tokenizer, tmp_path):
    from gircse import GIRCSE
    from gircse.data import DataError

    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="nope").validate()
    data = write_rows(tmp_path / "d.jsonl", make_rows(4, negs=0))
    model = GIRCSE(tiny_causal_lm("llama"), smollm2_tokenizer, k=3)
    with pytest.raises(DataError, match="d.jsonl:1: 0 hard negative"):
        train(model, data, str(tmp_path / "o"), TrainConfig(batch_size=2, lora_r=2, progress=False))
    with pytest.raises(ValueError, match="fewer rows"):
        train(model, data, str(tmp_path / "o"), TrainConfig(batch_size=8, lora_r=2, num_negatives=0, progress=False))


def test_whole_training_file_is_checked_before_the_first_step(smollm2_tokenizer, tmp_path):
    """A bad row near the end fails before any step: no log line, no checkpoint, the weights untouched."""
    from gircse import GIRCSE
    from gircse.data import DataError

    rows = make_rows(12)
    rows[10]["query"] = ""
    data = write_rows(tmp_path / "d.jsonl", rows)
    model = GIRCSE(tiny_causal_lm("llama"), smollm2_tokenizer, k=2, max_length=48)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    out = tmp_path / "run"
    with pytest.raises(DataError, match="d.jsonl:11: 'query' must be a non-empty string"):
        train(model, data, out, TrainConfig(k=2, batch_size=2, lora_r=2, progress=False))
    assert not out.exists()
    assert not hasattr(model.model, "peft_config")
    assert all(torch.equal(p, before[n]) for n, p in model.model.named_parameters())


def test_train_accepts_paths(tiny_base_dir, tmp_path):
    """pathlib.Path for the model (loaded by name), the data and the output directory."""
    from gircse import GIRCSE

    base = tiny_base_dir
    data = tmp_path / "d.jsonl"
    write_rows(data, make_rows(4))
    model = train(base, data, tmp_path / "run", TrainConfig(k=2, batch_size=4, lora_r=2, progress=False))
    assert model.base_model == str(base) and hasattr(model.model, "peft_config")
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["data"] == str(data)
    assert GIRCSE.from_pretrained(tmp_path / "run").k == 2


def test_resume_names_a_malformed_log_line(tmp_path):
    from gircse.data import DataError
    from gircse.training.trainer import _rewrite_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2\n')
    with pytest.raises(DataError, match="train_log.jsonl:2: invalid JSON"):
        _rewrite_log(str(log), 1)


def test_export_checkpoint_gives_the_runs_model(tiny_base_dir, tmp_path):
    """The adapter exported from the final checkpoint embeds exactly like the run's own saved model;
    a file that is not a training checkpoint, and a model that already has an adapter, are refused."""
    from gircse import GIRCSE
    from gircse.training import export_checkpoint

    data = tmp_path / "d.jsonl"
    write_rows(data, make_rows(8))
    config = TrainConfig(k=2, batch_size=4, lora_r=2, lr=1e-2, checkpoint_every=1, progress=False, max_length=48)
    train(tiny_base_dir, data, tmp_path / "run", config)
    step = export_checkpoint(tiny_base_dir, tmp_path / "run" / "checkpoint.safetensors", tmp_path / "exported")
    assert step == 2
    texts = ["the cat sat on the mat", "rain"]
    saved, exported = GIRCSE.from_pretrained(tmp_path / "run"), GIRCSE.from_pretrained(tmp_path / "exported")
    assert exported.k == 2 and exported.max_length == 48
    assert np.array_equal(saved.encode(texts), exported.encode(texts))
    assert not np.allclose(GIRCSE.from_pretrained(tiny_base_dir, k=2).encode(texts), saved.encode(texts))
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="bad.safetensors|header|safetensors"):
        export_checkpoint(tiny_base_dir, tmp_path / "bad.safetensors", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        export_checkpoint(tiny_base_dir, tmp_path / "missing.safetensors", tmp_path / "x")
    # a model that already has an adapter is refused, in memory or as a saved directory
    for with_adapter in (saved, tmp_path / "run"):
        with pytest.raises(ValueError, match="already has an adapter"):
            export_checkpoint(with_adapter, tmp_path / "run" / "checkpoint.safetensors", tmp_path / "x")
