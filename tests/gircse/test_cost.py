"""gircse.cost: the model-level roofline's counts against FlopCounterMode and by hand."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gircse import cost, flops
from gircse.generation import generate_soft_tokens

from .conftest import tiny_causal_lm


def test_encode_flops_are_the_executed_count():
    for k in (1, 5):
        calls = cost.encode_calls("smollm2-135m", "gircse", [100] * 8, k, batch_size=4, decode_rows=8)
        assert sum(c.flops for c in calls) == flops.encode_flops("smollm2-135m", "gircse", 100, k,
                                                                 convention="executed", batch=8)
    eos = cost.encode_calls("smollm2-135m", "causal-eos", [100] * 8, batch_size=4)
    assert sum(c.flops for c in eos) == flops.encode_flops("smollm2-135m", "causal-eos", 101,
                                                           convention="executed", batch=8)
    assert [c.name for c in eos] == ["prefill", "prefill"]


def test_step_bytes_and_ideal_time_by_hand():
    shape = flops.PRESETS["smollm2-135m"]
    calls = cost.encode_calls(shape, "gircse", [10, 20], 2, dtype_bytes=2, batch_size=2)
    assert [c.name for c in calls] == ["prefill", "op 1", "step 1", "op 2", "step 2"]
    kv = 2 * 30 * 3 * 64 * 2  # keys and values, 30 layers, 3 kv heads of 64, bf16
    assert calls[4].bytes == shape.decoder_linear_params * 2 + (20 + 2 + 10 + 2) * kv
    assert calls[1].bytes == 49152 * 576 * 2  # tied: W = E read once
    assert calls[1].flops == 2 * 2 * 49152 * (576 + 576)
    machine = cost.Machine("m", gemm_flops=1e12, bandwidth=1e11)
    assert calls[4].seconds(machine) == calls[4].bytes / 1e11  # a step: bound by its bytes
    assert calls[0].seconds(machine) == max(calls[0].flops / 1e12, calls[0].bytes / 1e11)
    assert cost.ideal_seconds(calls, machine) == pytest.approx(sum(c.seconds(machine) for c in calls))
    with pytest.raises(ValueError, match="bandwidth"):
        cost.Machine("m", 1e12, 0)
    with pytest.raises(ValueError, match="method"):
        cost.encode_calls(shape, "bidirectional-avg", [10])


def test_training_flops_match_flop_counter_on_a_lora_model():
    """One forward and backward of the trainer's generation (equal lengths, so no padding) on a tiny
    Llama with rank-4 LoRA on every linear layer: what autograd executes, as FlopCounterMode counts it,
    is what ``training_calls`` predicts, apart from the op backward's logits recompute, which the op's
    registered formula leaves out."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    shape = flops.DecoderShape.from_config(model.config)
    ids = torch.randint(5, 1000, (6, 9))
    mask = torch.ones_like(ids)
    counter = FlopCounterMode(display=False)
    with counter:
        out = generate_soft_tokens(model, None, ids, mask, 3, prefill_rows=4)
        out.float().pow(2).sum().backward()
    calls = cost.training_calls(shape, "gircse", [9] * 6, 3, lora_rank=4, prefill_rows=4)
    recompute = 3 * 6 * 2 * shape.vocab_size * shape.hidden_size  # 3 op backwards, logits recomputed
    predicted = sum(c.flops for c in calls) - recompute
    assert counter.get_total_flops() == pytest.approx(predicted, rel=0.02)


def test_training_memory_counts():
    mem = cost.training_memory("smollm2-135m", "gircse", [50] * 4, 5, lora_rank=64)
    eos = cost.training_memory("smollm2-135m", "causal-eos", [50] * 4, lora_rank=64)
    assert mem["adapter_state"] == 16 * cost.lora_params("smollm2-135m", 64) == eos["adapter_state"]
    assert mem["activations"] / eos["activations"] == pytest.approx(55 / 51)
    assert cost.lora_params("smollm2-135m", 1) == 30 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
