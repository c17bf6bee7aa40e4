"""TrainConfig.validate: every field has a rule, every bad value names its option, numpy scalars are
numbers; the CLI reports option and data errors in one line before loading a model."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from gircse.training.config import RULES, TrainConfig


def test_every_field_has_a_rule():
    assert {f.name for f in dataclasses.fields(TrainConfig)} == set(RULES)
    assert TrainConfig().validate() == TrainConfig()  # the defaults are valid


def test_a_field_without_a_rule_is_refused(monkeypatch):
    monkeypatch.delitem(RULES, "lam")
    with pytest.raises(RuntimeError, match="TrainConfig.lam has no validation rule"):
        TrainConfig().validate()


@pytest.mark.parametrize("field,bad", [
    ("method", "mean"), ("k", 0), ("k", 2.5), ("k", True), ("temperature", 0.0), ("temperature", float("nan")),
    ("lam", -0.1), ("step_reduction", "max"), ("lr", 0.0), ("lr", float("inf")), ("warmup_ratio", 1.0), ("warmup_ratio", -0.1),
    ("weight_decay", -1e-3), ("epochs", 0), ("max_steps", 0), ("max_steps", -5), ("batch_size", 0),
    ("grad_accum", 0), ("num_negatives", -1), ("embed_chunk", 0), ("max_length", 1), ("lora_r", 0),
    ("lora_alpha", 0), ("lora_alpha", -8), ("lora_dropout", 1.0), ("lora_dropout", -0.1),
    ("lora_target_modules", []), ("lora_target_modules", ""), ("lora_target_modules", ["q_proj", ""]),
    ("gradient_checkpointing", 1), ("bf16", "yes"), ("max_grad_norm", 0.0), ("max_grad_norm", -1.0),
    ("checkpoint_every", -1), ("stop_at_step", 0), ("seed", -1), ("progress", None), ("log_every", 0), ("_kill_after_step", 0),
])
def test_bad_values_name_the_option(field, bad):
    with pytest.raises((ValueError, TypeError), match=field):
        TrainConfig(**{field: bad}).validate()


def test_gradcache_needs_deterministic_forward():
    with pytest.raises(ValueError, match="lora_dropout must be 0"):
        TrainConfig(embed_chunk=4, lora_dropout=0.1).validate()
    TrainConfig(embed_chunk=4).validate()
    TrainConfig(lora_dropout=0.1).validate()


def test_numpy_scalars_become_python_numbers():
    config = TrainConfig(k=np.int64(3), lr=np.float32(1e-4), lam=np.float64(0.5), batch_size=np.int32(4),
                         max_grad_norm=np.float32(1.0), bf16=np.bool_(True), lora_alpha=np.int16(16)).validate()
    assert (type(config.k), type(config.lr), type(config.batch_size), type(config.bf16)) == (int, float, int, bool)
    json.dumps(config.public())  # np.float32 / np.int64 would not serialize
    assert config.lr == pytest.approx(1e-4) and config.k == 3
