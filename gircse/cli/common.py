"""What the ``gircse`` subcommands (and ``python -m gircse.data.debian``) share: the one-line parser and
error reporting, option types, the model options and the model they load, output-path and device checks,
and the task-file helpers of the evaluation commands.

Nothing here imports torch at import time, so building the parsers stays cheap.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import tempfile

from ..methods import METHODS

# --dtype names (== gircse.loading.DTYPES, tested; not imported here so parsing needs no torch)
DTYPE_NAMES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


# ---------------------------------------------------------------------- errors and option types
class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, ``<prog>: <message>``, and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def user_error(prog: str, error: BaseException) -> int:
    """Print ``<prog>: <message>`` as one line on stderr; the exit status of a user error (2)."""
    print(f"{prog}: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def run_command(prog: str, func, args) -> int:
    """``func(args)``, with user errors (ValueError, e.g. a bad option or a malformed file; OSError,
    e.g. a missing file; ImportError, a package the chosen model or command needs and the error names)
    reported as one line and status 2 instead of a traceback."""
    try:
        return func(args)
    except (ValueError, OSError, ImportError) as error:
        return user_error(prog, error)


def number_in(convert, minimum, maximum=None):
    """An argparse ``type``: an int or a finite float (``convert``) from ``minimum`` to ``maximum`` (None: no
    upper bound), checked while parsing (before anything is loaded)."""
    bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an int' if convert is int else 'a number'} {bounds}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value
    return parse


def int_at_least(minimum: int):
    """An argparse ``type``: an int >= ``minimum``."""
    return number_in(int, minimum)


def check_device(device: str | None) -> None:
    """--device names a device that can run the model on this machine: cpu, or an available cuda / mps /
    xpu device (``meta`` and the like hold no data: the model would fail after loading)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r}: {error}") from None
    if parsed.type == "cpu":
        return
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None),
               "xpu": getattr(torch, "xpu", None)}.get(parsed.type)
    if backend is None:
        raise ValueError(f"--device {device!r}: not a device that runs models; use cpu, cuda[:N], mps or xpu")
    if not backend.is_available():
        raise ValueError(f"--device {device!r}: {parsed.type.upper()} is not available on this machine")
    count = getattr(backend, "device_count", lambda: 1)()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"--device {device!r}: this machine has {count} {parsed.type} device(s)")


def check_model_options(args) -> None:
    """Every model option that can be checked without loading the model (numbers and --dtype are
    checked by the parser)."""
    from .. import loading

    if args.model in (None, "default"):
        if args.adapter is not None:
            raise ValueError("--adapter needs --model (the base model it was trained on)")
        loading.resolve_model_source("smollm2-135m")  # the default's base: its package must be installed
    else:
        model = loading.check_model_reference(args.model, what="--model")
        if model.lower() in loading.SMOLLM2_ALIASES:
            loading.resolve_model_source(model)
        if loading.is_gircse_dir(model):
            loading.read_config(model)  # a malformed or inconsistent config fails here, not after loading
    if args.adapter is not None:
        if not os.path.isfile(os.path.join(args.adapter, loading.ADAPTER_CONFIG_FILE)):
            raise FileNotFoundError(f"--adapter: no peft adapter in {args.adapter} (no {loading.ADAPTER_CONFIG_FILE})")
        loading.read_adapter_config(args.adapter)  # malformed JSON: the error names the file
        loading.check_adapter_weights(args.adapter)
    check_device(args.device)


def check_instruction_options(args) -> None:
    """--instruction and --document-instruction, where the command has them: an empty one would embed
    "Instruct: \\nQuery: ...", so it fails here, before the model loads."""
    from ..prompts import check_instruction

    for name in ("instruction", "document_instruction"):
        value = getattr(args, name, None)
        if value is not None:
            check_instruction("--" + name.replace("_", "-"), value)


def check_output_path(path: str, option: str = "--output", *, other_files: dict[str, str] | None = None) -> None:
    """A file path that can be written: not a directory, in an existing directory where a file can be
    created (tried: ``os.access`` says yes to root everywhere, and to /proc), and none of ``other_files``
    (``{option: path}`` of the files the command reads or also writes)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{option} {path} is a directory; name a file")
    for other_option, other_path in (other_files or {}).items():
        if other_path not in (None, "-") and same_file(path, other_path):
            raise ValueError(f"{option} {path} is the same file as {other_option}: one would overwrite the other; "
                             "name another file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{option} {path}: directory {parent} does not exist")
    try:
        if os.path.exists(path):
            with open(path, "ab"):  # opened for writing, nothing written (the file is unchanged)
                pass
        else:
            with tempfile.TemporaryFile(dir=parent):
                pass
    except OSError as error:
        raise PermissionError(f"{option} {path}: cannot be written ({error.strerror or error})") from None


def same_file(a: str, b: str) -> bool:
    """Do two paths name one file (the same path, a symlink to it, or a hard link)?"""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


@contextlib.contextmanager
def _quiet_loading():
    """Hide transformers' loading bars (the GGUF de-quantization bar is a bare tqdm) in CLI output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        hf_logging.enable_progress_bar()


def _load(args):
    """The model every command runs, after ``check_model_options`` (so no command ignores an option)."""
    import gircse

    check_model_options(args)
    check_instruction_options(args)
    with _quiet_loading():
        return gircse.load_model(args.model, adapter=args.adapter, method=args.method, k=args.k, device=args.device,
                                 dtype=args.dtype, max_length=args.max_length, prompt_style=args.prompt_style)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M + shipped adapter), 'smollm2-135m', a saved GIRCSE "
                             "directory, or a transformers causal LM path/id")
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="default: the saved directory's method, else gircse")
    parser.add_argument("--k", type=int_at_least(1), default=None,
                        help="soft tokens to generate (default: saved, else 20; 5 with --prompt-style reference)")
    parser.add_argument("--adapter", default=None, help="peft adapter directory to attach")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--max-length", type=int_at_least(2), default=None,
                        help="input tokens kept (default: saved, else 512; the shipped model: 128)")
    parser.add_argument("--prompt-style", choices=("gircse", "reference"), default=None,
                        help="'reference': the authors' prompts (their released adapters); default: saved, else gircse")


# ---------------------------------------------------------------------- the evaluation commands' pieces
def _fail(command: str, message: str):
    print(f"gircse {command}: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load_task(command: str, path: str):
    from ..data.jsonl import DataError
    from ..evaluation import load_task

    try:
        return load_task(path)
    except (DataError, FileNotFoundError) as exc:
        _fail(command, str(exc))


def _add_task_arguments(parser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--task", required=True, help="JSONL task file (.gz ok); see gircse.evaluation for the rows")
    parser.add_argument("--instruction", default=None, help="instruction for rows without their own")
    parser.add_argument("--document-instruction", default=None, help="retrieval documents (default: bare)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--progress", action="store_true", help="show encoding progress bars")


def _write_json(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=2)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)


def _check_batch_size(command: str, batch_size: int) -> None:
    if batch_size < 1:
        _fail(command, f"--batch-size must be >= 1, got {batch_size}")
