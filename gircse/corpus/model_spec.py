"""Which model a corpus was encoded with: its spec (reference, adapter, file digest and the settings that change
an embedding), worked out before loading (``requested_model_spec``) or read off a loaded model
(``model_spec_of``), and loading it again for queries (``load_recorded_model``)."""
from __future__ import annotations

import hashlib
import os

__all__ = ["LOADED_SETTINGS", "check_recorded_model", "load_recorded_model", "model_digest", "model_spec_of",
           "requested_model_spec"]

# Model files whose bytes identify a model (configs, tokenizers, weights); files larger than _WHOLE_FILE
# are identified by size and their first and last MiB, so a multi-GB base model is not read in full.
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".gguf", ".model", ".txt", ".pt", ".pth", ".tiktoken")
_WHOLE_FILE, _SAMPLE = 64 << 20, 1 << 20


def _model_spec(*, name, adapter, digest, method, k, max_length, prompt_style, dtype) -> dict:
    return {"name": name, "adapter": adapter, "digest": digest, "method": method, "k": k,
            "max_length": max_length, "prompt_style": prompt_style, "dtype": dtype}


# What a loaded model is checked against before it encodes anything (the rest names where it came from).
LOADED_SETTINGS = ("method", "k", "max_length", "prompt_style", "dtype")


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_spec_of(model, *, name: str | None = None, adapter: str | None = None, digest: str | None = None) -> dict:
    """The spec of a loaded ``GIRCSE``: its settings, and ``name`` (the reference it can be loaded from again;
    ``gircse search`` loads it) with ``adapter`` and ``digest`` when known. ``name`` None: the base model when
    no adapter is attached (the recorded settings rebuild the model from it), else unknown."""
    from ..generation import base_causal_lm

    if name is None and not hasattr(model.model, "peft_config"):
        name = model.base_model
    return _model_spec(name=name, adapter=adapter, digest=digest,
                       method=model.method, k=model.k, max_length=model.max_length, prompt_style=model.prompt_style,
                       dtype=_dtype_name(base_causal_lm(model.model).dtype))


def _model_directories(reference: str, adapter: str | None) -> list[str]:
    from .. import loading

    settings = loading.resolve_pretrained(reference, adapter=adapter)
    base, _ = loading.resolve_model_source(settings["base_model"])
    return [d for d in dict.fromkeys([reference, settings["adapter"], base]) if d is not None and os.path.isdir(d)]


def model_digest(reference: str, adapter: str | None = None) -> str | None:
    """A sha256 over the model files (configs, tokenizer, weights) of the model's local directories: the
    reference, its adapter and its base model. None for a model that only the Hugging Face hub holds.
    Detects a model retrained or replaced under the same path."""
    from .. import loading

    if reference in (None, "default"):
        reference = loading.default_model_reference()
    directories = _model_directories(reference, adapter)
    if not directories:
        return None
    digest = hashlib.sha256()
    for directory in directories:
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if not (name.endswith(_MODEL_FILE_SUFFIXES) and os.path.isfile(path)):
                continue
            size = os.path.getsize(path)
            digest.update(f"{name}\0{size}\0".encode("utf-8"))
            with open(path, "rb") as f:
                if size <= _WHOLE_FILE:
                    digest.update(f.read())
                else:
                    digest.update(f.read(_SAMPLE))
                    f.seek(size - _SAMPLE)
                    digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def requested_model_spec(reference="default", *, adapter=None, method=None, k=None, max_length=None,
                         prompt_style=None, dtype=None, device=None) -> dict:
    """The spec of the model ``gircse.load_model(reference, ...)`` would load, worked out without loading it
    (so a rerun with another model is refused before one is loaded)."""
    import torch

    from .. import loading

    default = reference in (None, "default")
    if default and adapter is not None:
        raise ValueError("adapter needs a model (the base model it was trained on), not 'default'")
    source = loading.default_model_reference() if default else loading.check_model_reference(reference, "model")
    settings = loading.resolve_pretrained(source, adapter=adapter, method=method, k=k, max_length=max_length,
                                          prompt_style=prompt_style)
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    name = "default" if default else (os.path.abspath(source) if os.path.exists(source) else source)
    return _model_spec(name=name, adapter=None if adapter is None else os.path.abspath(adapter),
                       digest=model_digest(source, adapter), method=settings["method"], k=settings["k"],
                       max_length=settings["max_length"], prompt_style=settings["prompt_style"],
                       dtype=_dtype_name(loading.resolve_dtype(dtype, device)))


def check_recorded_model(recorded: dict, override: str | None = None) -> None:
    """The recorded model can be loaded again and is unchanged (its files' digest), before loading it."""
    if override is not None:
        return
    if recorded["name"] is None:
        raise ValueError("the corpus records no loadable model (it was encoded from an in-memory model without "
                         "model_name=); name the model to embed queries with")
    if recorded["digest"] is not None and model_digest(recorded["name"], recorded["adapter"]) != recorded["digest"]:
        raise ValueError(f"the model {recorded['name']} changed since the corpus was encoded (its files differ); "
                         "queries embedded with it would not match the corpus")


def load_recorded_model(recorded: dict, override: str | None = None, *, device=None):
    """Load the model a corpus was encoded with (``recorded``: the manifest's ``spec["model"]``), or
    ``override`` with the recorded settings."""
    from ..model import load_model

    check_recorded_model(recorded, override)
    return load_model(override or recorded["name"], adapter=None if override else recorded["adapter"],
                      method=recorded["method"], k=recorded["k"], max_length=recorded["max_length"],
                      prompt_style=recorded["prompt_style"], dtype=recorded["dtype"], device=device)
