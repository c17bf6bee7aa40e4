"""Atomic safetensors checkpoints: trainable weights, AdamW state, scheduler, progress, RNG.

One file, ``<out>/checkpoint.safetensors``, always the latest complete checkpoint: it is written to a
temporary name in the same directory, fsync'ed, then ``os.replace``d over the old one, so a run killed
at any moment leaves either the previous or the new checkpoint, never a partial one. Tensors:
``model.<name>`` (trainable parameters), ``optimizer.<index>.<state key>``, ``rng.torch``;
the rest (step, rows consumed, optimizer param groups, scheduler state, training config) is JSON in the
safetensors metadata.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..loading import check_safetensors

__all__ = ["CHECKPOINT_FILE", "checkpoint_info", "load_checkpoint", "load_weights", "save_checkpoint"]

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "gircse-train-checkpoint-1"


def save_checkpoint(path: str, *, named_params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler, info: dict) -> None:
    tensors = {f"model.{name}": p.detach().cpu().contiguous() for name, p in named_params.items()}
    state = optimizer.state_dict()
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                tensors[f"optimizer.{index}.{key}"] = torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {
        "info": json.dumps(info),
        "param_groups": json.dumps(state["param_groups"]),
        "scheduler": json.dumps(scheduler.state_dict()),
        "format": FORMAT,
    }
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    save_file(tensors, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _restore_weights(f, path: str, named_params: dict[str, torch.Tensor]) -> None:
    keys = set(f.keys())
    missing = [n for n in named_params if f"model.{n}" not in keys]
    if missing:
        raise ValueError(f"{path} lacks trainable parameters {missing[:3]}... (different LoRA config?)")
    with torch.no_grad():
        for name, p in named_params.items():
            p.copy_(f.get_tensor(f"model.{name}"))


def checkpoint_info(path: str) -> dict:
    """The ``info`` dict of a checkpoint (step, rows consumed, training config, data checksum, ...), without
    its tensors. A file cut short is a ValueError naming it."""
    check_safetensors(path, "checkpoint")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {path} is not a gircse training checkpoint (format {metadata.get('format')!r})")
    return json.loads(metadata["info"])


def load_weights(path: str, *, named_params: dict[str, torch.Tensor]) -> None:
    """Restore only the trainable weights (in place), e.g. to export a run at a checkpoint's step."""
    with safe_open(path, framework="pt") as f:
        _restore_weights(f, path, named_params)


def load_checkpoint(path: str, *, named_params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler) -> dict:
    """Restore weights (in place), optimizer, scheduler and RNG; returns the ``info`` dict."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
        _restore_weights(f, path, named_params)
        state: dict = {}
        for key in keys:
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = f.get_tensor(key)
        rng = f.get_tensor("rng.torch")
    device = next(iter(named_params.values())).device
    for entry in state.values():
        for name, value in entry.items():
            if name != "step":
                entry[name] = value.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    scheduler.load_state_dict(json.loads(metadata["scheduler"]))
    torch.set_rng_state(rng)
    return json.loads(metadata["info"])
